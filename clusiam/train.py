"""The pretraining loop: set a run up, train it epoch by epoch, check and save each epoch.

Data flows one way: a patch source (:mod:`clusiam.sources`) read in the epoch's order
(:mod:`clusiam.order`) -> uint8 patches as stored (DataLoader workers) -> views made in
batch on the training device -> model -> loss (or, with ``--augment pil``, the paper's PIL
views made in the workers). The step
(:mod:`clusiam.step`) never reads a value back to the host; logged scalars are read every
``--print_freq`` steps, which is also where a non-finite loss is caught.

Under torchrun (see :mod:`clusiam.distributed`) the same loop runs once per process:
``--batch_size`` is the global batch, split evenly over the processes; the model is
wrapped in DistributedDataParallel with SyncBatchNorm (on GPUs); the cluster loss sees the
gathered global batch; only rank 0 writes files or prints.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from lightly.utils.dist import print_rank_zero
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clusiam.augment import BatchViews, TwoViews, ViewRecipe, paper_augmentation, stack_by_size, stored_patches
from clusiam.best import BEST_FILE, Best, resumed_best
from clusiam.checkpoint import ARCHITECTURE_OPTIONS, check_weights, load_checkpoint, save_checkpoint
from clusiam.config import parse_config
from clusiam.demo import DemoSpec, prepare_demo
from clusiam.distributed import barrier, check_replicas_agree, is_main, main_computes, processes, rank, world_size
from clusiam.errors import ConfigError, DataError, DiskFullError, run_command
from clusiam.files import make_folder, remove_left_temporaries
from clusiam.images import Checked, check_images, find_images, remember_check
from clusiam.initial_weights import InitialWeights, read_initial_weights, start_from
from clusiam.ledger import pretraining_slides
from clusiam.models import PretrainModel
from clusiam.monitor import CLUSTER_DIAGNOSTICS, collapse_warnings
from clusiam.order import EpochOrder
from clusiam.runlock import RunLock
from clusiam.runlog import EpochLog, RunLog, mean_over_ranks, step_diagnostics
from clusiam.slide_source import OPEN_SLIDES, SlideSource, folder_pairs, is_job, job_pairs
from clusiam.sources import FolderSource, PatchSource, SkipLog, cached_channel_statistics
from clusiam.step import LossSettings, build_optimizer, set_learning_rate, training_step

if TYPE_CHECKING:
    from clusiam.probe import Probe, ProbePlan

# Options a resumed run is told about when they differ from the checkpoint's.
TRAINING_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "momentum", "fix_pred_lr", "alpha", "tau", "eps",
                    "target_momentum", "cosine_target_momentum", "image_size", "augment", "vflip", "rotate90",
                    "hed_jitter", "precision", "seed", "patch_size", "slides_per_batch", "init")
CHECK_CACHE = "checked_files.json"  # in SAVE_PATH: the verdict on the patch files, reused by a restart
DIAGNOSTIC_NOISE = 2**32  # a seed key no rank number reaches: the diagnostics' own random stream

ViewMaker = Callable[[list], tuple[Tensor, Tensor]]  # one step's collated parts -> two views on the training device


@dataclass
class Run:
    """What a run trains with, set up once by :func:`set_up_run`; only ``step`` changes."""

    source: PatchSource
    pretrained_on: list[str] | None  # the slides the weights have seen (resumed runs' too); None: not known
    init: dict | None  # --init: what the backbone started from (InitialWeights.record())
    skipped: SkipLog | None  # with --skip_bad_files: the patches left out, and why
    skipped_reported: int  # how many of them the run has already warned about
    dataset: Dataset  # the source through what the DataLoader workers do to each patch
    collate: Callable | None  # how a worker stacks its part of a batch (None: PyTorch's default)
    make_views: ViewMaker
    order: EpochOrder  # which patches each step reads
    model: PretrainModel
    network: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    loss: LossSettings
    mean: list[float]
    std: list[float]
    init_lr: float
    start_epoch: int
    step: int
    device: torch.device
    autocast: bool
    probe: Probe | None = None  # --probe: the labelled patches scored while training
    best: Best | None = None  # --keep_best: the best probed epoch so far, which best.pth holds


def seed_from(*keys: int) -> int:
    """A seed that depends only on ``keys``. Every epoch reseeds from (seed, epoch, rank),
    so a resumed epoch draws what an uninterrupted one would, for any number of processes."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


# --- setting a run up -------------------------------------------------------------------

def resume_path(args: argparse.Namespace, save_path: Path) -> Path | None:
    """The checkpoint to resume: ``--resume PATH``; with ``--resume auto``, or when torchrun
    restarts the job after a failure (``--max_restarts``), SAVE_PATH/last.pth if it exists."""
    last = save_path / "last.pth"
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if args.resume == "auto" or (restarted and last.is_file()):
        return last if last.is_file() else None
    return Path(args.resume) if args.resume else None


def load_resumable(path: Path, args: argparse.Namespace) -> dict:
    """The checkpoint to resume from, refused unless it has this run's architecture; training
    options that differ from the checkpoint's are named (a longer --epochs is the usual one)."""
    checkpoint = load_checkpoint(path)
    if "optimizer" not in checkpoint:
        raise ConfigError(f"--resume {path} holds no optimizer state, so training cannot continue from it: "
                          "start a new run (its weights can still be evaluated and exported)")
    for option in ARCHITECTURE_OPTIONS:
        if checkpoint["config"][option] != getattr(args, option):
            raise ConfigError(f"--resume {path} was trained with --{option} {checkpoint['config'][option]}, "
                              f"not {getattr(args, option)}: pass the same value")
    check_weights(PretrainModel(args.model_type, args.backbone, args.feat_size, args.num_clusters), checkpoint, path)
    saved = checkpoint["config"]
    changed = [f"--{name} {getattr(args, name)} (was {saved[name]})" for name in TRAINING_OPTIONS
               if name in saved and saved[name] != getattr(args, name)]
    if changed:
        print_rank_zero(f"note: resuming {path} with options that differ from its run: {', '.join(changed)}")
    return checkpoint


def checkpoint_to_resume(args: argparse.Namespace, save_path: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint this run continues (path and contents), or (None, None) for a new run;
    a new run refuses a folder that holds another run's last.pth."""
    resume = resume_path(args, save_path)
    refuse_earlier_run(resume, save_path)
    return resume, load_resumable(resume, args) if resume else None


def refuse_earlier_run(resume: Path | None, save_path: Path) -> None:
    """A new run must not write over another run's checkpoints."""
    if resume is None and (save_path / "last.pth").is_file():
        raise ConfigError(f"{save_path / 'last.pth'} is from an earlier run: pass --resume auto to continue it, "
                          "or another --save_path")


def check_demo_size(args: argparse.Namespace) -> None:
    """The built-in demo set's patches must be large enough for the views."""
    demo_size = DemoSpec().patch_size
    if args.image_size > demo_size:
        raise ConfigError(f"the built-in demo set has {demo_size} px patches, smaller than --image_size "
                          f"{args.image_size}: run `python pretrain.py --config configs/demo.yaml`, "
                          f"or pass --image_size {demo_size} (or a DATA_DIR)")


def check_source(data_dir: Path | None, args: argparse.Namespace) -> tuple[PatchSource, Checked]:
    """The patches to train on, and the verdict on their files: the slides of a tiling job
    (DATA_DIR holds job.json) or of --coords/--slides, or the patch files under ``data_dir``.
    Rank 0 checks and every rank gets the result; nothing is written."""
    def check() -> tuple[PatchSource, Checked]:
        if args.coords is not None:
            return check_slides(folder_pairs(args.coords, args.slides), args)
        if is_job(data_dir):
            return check_slides(job_pairs(data_dir), args)
        files = find_images(data_dir, "DATA_DIR (or none, for the built-in demo)")
        checked = check_images(files, args.image_size, args.skip_bad_files, same_size=args.augment == "batched",
                               cache=Path(args.save_path) / CHECK_CACHE)
        return FolderSource(checked.good), checked

    return main_computes(check)


def check_slides(pairs: Sequence[tuple[Path, Path]], args: argparse.Namespace) -> tuple[SlideSource, Checked]:
    """Each slide checked (:meth:`SlideSource.checked`), and its patches large enough for the views."""
    source, checked = SlideSource.checked(pairs, args.patch_size, args.skip_bad_files,
                                          skip_advice="pass --skip_bad_files to leave them out", defer=True)
    source.open_slides = max(OPEN_SLIDES, 2 * args.slides_per_batch)  # each process reads at most this many at once
    if source.patch_size < args.image_size:
        raise ConfigError(f"the slides' patches are {source.patch_size} px, smaller than --image_size "
                          f"{args.image_size}: pass --patch_size {args.image_size} (the same field of view read at "
                          f"more pixels) or --image_size {source.patch_size}")
    return source, checked


@contextlib.contextmanager
def run_folder(save_path: Path, log_dst: Path) -> Iterator[None]:
    """Create the run folder and hold its lock (:mod:`clusiam.runlock`, on rank 0) while the
    run lives; a folder another live run holds is refused, naming that run."""
    lock = RunLock(save_path) if is_main() else None

    def claim() -> str | None:
        make_folder(save_path, "--save_path")
        return lock.acquire()

    refusal = main_computes(claim)
    if refusal is not None:
        raise ConfigError(refusal)
    try:
        if is_main():
            make_folder(log_dst, "--log_dst")
            left = remove_left_temporaries(save_path) + remove_left_temporaries(log_dst)
            if left:
                print(f"note: removed {len(left)} temporary file(s) a run killed while saving left behind "
                      f"({', '.join(path.name for path in left)})")
        yield
    finally:
        if lock is not None:
            lock.release()


def normalization(args: argparse.Namespace, checkpoint: dict | None, source: PatchSource,
                  skipped: SkipLog | None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the views: a resumed run's own, ``--mean/--std``, or the
    statistics of the training patches (computed once by rank 0 and cached)."""
    if checkpoint is not None:
        return checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"]
    if args.mean is not None:
        return args.mean, args.std
    statistics = main_computes(lambda: cached_channel_statistics(source, args.num_worker, skipped))
    return statistics.mean, statistics.std


def view_pipeline(args: argparse.Namespace, source: PatchSource, mean: Sequence[float], std: Sequence[float],
                  device: torch.device, memory_format: torch.memory_format,
                  skipped: SkipLog | None) -> tuple[Dataset, Callable | None, ViewMaker]:
    """What the DataLoader workers make of each patch, how a worker stacks its part of a
    batch, and how one step's parts become two views on ``device``. Batched: workers only
    read patches as stored (uint8) and the views, resize included, are made on the device;
    pil: the paper's pipeline, PIL transforms of the patch in the workers."""

    def on_device(views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        x1, x2 = (view.to(device, non_blocking=True, memory_format=memory_format) for view in views)
        return x1, x2

    if args.augment == "pil":
        dataset = source.dataset(TwoViews(paper_augmentation(args.image_size, mean, std)), skipped)
        return dataset, None, lambda parts: on_device([torch.cat(views) for views in zip(*parts)])
    recipe = ViewRecipe(vflip_p=0.5 if args.vflip else 0.0, rotate90=args.rotate90, hed_jitter=args.hed_jitter)
    batch_views = BatchViews(args.image_size, mean, std, recipe)
    dataset = source.dataset(torch.from_numpy, skipped, as_stored=True)
    size = source.patch_size
    return dataset, stack_by_size, lambda parts: on_device(batch_views(stored_patches(parts, size, device)))


def build_model(args: argparse.Namespace, device: torch.device, memory_format: torch.memory_format,
                initial: InitialWeights | None = None) -> PretrainModel:
    """The network, seeded alike on every process, its backbone (and the BYOL family's target)
    started from ``initial`` when given, with SyncBatchNorm when several GPU processes train
    it (BatchNorm statistics over the global batch, as the authors ran it)."""
    torch.manual_seed(args.seed)
    model = PretrainModel(args.model_type, args.backbone, args.feat_size, args.num_clusters)
    if initial is not None:
        start_from([model.backbone, *([model.target_backbone] if model.method.momentum_target else [])], initial)
    if world_size() > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=memory_format)


def slides_seen(checkpoint: dict | None, source: PatchSource, init: dict | None) -> list[str] | None:
    """The slides the weights will have seen: this run's, and a resumed checkpoint's or an --init
    clusiam checkpoint's (which may have trained on other data); None when a checkpoint predates
    the ledger (not known)."""
    if checkpoint is not None:
        earlier = pretraining_slides(checkpoint)
    else:
        earlier = init["pretrained_on"] if init is not None and init["pretrained_on"] is not None else []
    return None if earlier is None else sorted({*earlier, *source.slides})


def set_up_run(device: torch.device, args: argparse.Namespace, checkpoint: dict | None, source: PatchSource,
               skipped: SkipLog | None, initial: InitialWeights | None = None) -> Run:
    """Normalisation, network and optimizer of a run on ``source``, restored from
    ``checkpoint`` when it continues one, or with its backbone started from ``initial`` (--init)."""
    skipped_reported = skipped.count() if skipped is not None and is_main() else 0  # the check's, reported
    mean, std = normalization(args, checkpoint, source, skipped)
    # channels_last and bf16 autocast are what make convolutions fast on tensor cores.
    on_gpu = device.type == "cuda"
    memory_format = torch.channels_last if on_gpu else torch.preserve_format
    torch.backends.cudnn.benchmark = on_gpu
    model = build_model(args, device, memory_format, initial)
    init_lr = args.lr * args.batch_size / 256
    optimizer = build_optimizer(model, init_lr, args.momentum, args.weight_decay, args.fix_pred_lr)
    start_epoch, step = args.start_epoch, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])  # checked by load_resumable
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
    network = model
    if world_size() > 1:
        network = DistributedDataParallel(model, device_ids=[device] if on_gpu else None)
    dataset, collate, make_views = view_pipeline(args, source, mean, std, device, memory_format, skipped)
    init = checkpoint.get("init") if checkpoint is not None else initial.record() if initial else None
    return Run(source=source, pretrained_on=slides_seen(checkpoint, source, init), init=init, skipped=skipped,
               skipped_reported=skipped_reported, dataset=dataset, collate=collate, make_views=make_views,
               order=EpochOrder.of_source(source, args.batch_size, args.seed, args.slides_per_batch), model=model,
               network=network, optimizer=optimizer, loss=LossSettings(args.alpha, args.tau, args.eps),
               mean=list(mean), std=list(std), init_lr=init_lr, start_epoch=start_epoch, step=step,
               device=device, autocast=on_gpu and args.precision == "bf16")


def announce(run: Run, args: argparse.Namespace) -> None:
    """One line on what is about to train, where, on what."""
    processes_count = world_size()
    placement = f"{run.device}" if processes_count == 1 else (
        f"{processes_count} processes ({run.device.type}), {args.batch_size // processes_count} images each")
    print_rank_zero(
        f"{args.model_type} ({args.backbone}) on {placement}: {len(run.source)} images, {run.order.steps} "
        f"steps/epoch of {args.batch_size}, lr {run.init_lr:g}, alpha {args.alpha}, "
        f"mean {[round(m, 4) for m in run.mean]}, std {[round(s, 4) for s in run.std]}"
    )
    if processes_count > 1 and run.device.type != "cuda":
        print_rank_zero("note: SyncBatchNorm needs GPUs; on CPU processes BatchNorm statistics are per process")


# --- one epoch --------------------------------------------------------------------------

def epoch_batches(run: Run, epoch: int, args: argparse.Namespace) -> Iterator[list]:
    """This process's batches of the epoch, each as the parts its DataLoader workers read
    (:mod:`clusiam.order`): the global batch of step k is the same images for any number of
    processes and workers."""
    parts = run.order.parts(epoch, rank(), world_size(), args.num_worker)
    loader = part_loader(run.dataset, parts, run.collate, args.num_worker, pin_memory=run.device.type == "cuda",
                         seed=seed_from(args.seed, epoch, rank()))
    step = []
    for part in loader:
        step.append(part)
        if len(step) == parts.parts_per_step:
            yield step
            step = []


def part_loader(dataset: Dataset, parts: Iterable[list[int]], collate: Callable | None, num_workers: int,
                pin_memory: bool, seed: int) -> DataLoader:
    """A DataLoader of ``parts`` (index lists), which PyTorch hands to its workers in turn;
    ``seed`` seeds the workers' random streams."""
    return DataLoader(dataset, batch_sampler=parts, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))


def target_momentum(run: Run, args: argparse.Namespace) -> float | None:
    """The BYOL family's EMA momentum at this step (None: no target network)."""
    if not run.model.method.momentum_target:
        return None
    if not args.cosine_target_momentum:
        return args.target_momentum
    return cosine_schedule(run.step, run.order.steps * args.epochs, args.target_momentum, 1.0)


def train_one_epoch(run: Run, epoch: int, args: argparse.Namespace, log: RunLog) -> EpochLog:
    """Train ``epoch``; return its record. Every random stream is reseeded from the epoch."""
    lr = set_learning_rate(run.optimizer, run.init_lr, epoch, args.epochs)
    torch.manual_seed(seed_from(args.seed, epoch, rank()))  # view parameters: this rank's own draws
    gumbel = torch.Generator(run.device).manual_seed(seed_from(args.seed, epoch))  # Gumbel noise: alike on every rank
    diagnostic_noise = torch.Generator(run.device).manual_seed(seed_from(args.seed, epoch, DIAGNOSTIC_NOISE))
    diagnostic_names = ["projection_std", *(CLUSTER_DIAGNOSTICS if run.model.method.clustered else ())]
    record = EpochLog(lr, diagnostic_names, run.device)
    last = Path(args.save_path) / "last.pth"
    run.network.train()
    bar = tqdm(epoch_batches(run, epoch, args), total=run.order.steps, desc=f"epoch {epoch + 1}/{args.epochs}",
               unit="batch", disable=not is_main())
    for index, parts in enumerate(bar):
        x1, x2 = run.make_views(parts)
        output, losses = training_step(run.network, run.optimizer, x1, x2, run.loss, run.autocast,
                                       target_momentum(run, args), gumbel)
        run.step += 1  # steps are counted from 1, in messages, the CSV and TensorBoard alike
        record.add_losses(losses, run.step)
        # The only place the step's values reach the host: every --print_freq steps, and
        # the epoch's last step, so that every epoch has diagnostics to warn from.
        if run.step % args.print_freq == 0 or index == run.order.steps - 1:
            record.stop_if_nonfinite(epoch, last)
            values = mean_over_ranks(losses)
            diagnostics = step_diagnostics(output, diagnostic_noise)
            record.add_diagnostics(diagnostics)
            log.scalars({**values, **diagnostics, "lr": lr}, run.step)
            bar.set_postfix({name: f"{value:.4f}" for name, value in values.items()})
    record.stop_if_nonfinite(epoch, last)
    return record


def finish_epoch(run: Run, epoch: int, record: EpochLog, seconds: float, args: argparse.Namespace,
                 log: RunLog) -> None:
    """The end of an epoch: replicas checked, its checkpoints (best.pth too where --keep_best
    finds a new best), then its CSV row (so the CSV never holds an epoch that was not saved),
    collapse warnings and patches left out."""
    averages = record.averages()
    check_replicas_agree(run.model)
    probed = probe_epoch(run, epoch, args)
    if not is_main():
        return
    new_best = run.best.update(probed, epoch + 1) if run.best is not None else None  # the row and state record it
    row = {"epoch": epoch + 1, "step": run.step, "lr": record.lr, **averages, "seconds": round(seconds, 2),
           "images_per_s": round(record.steps * args.batch_size / max(seconds, 1e-9), 1),
           **(run.probe.row(probed) if run.probe else {}), **(run.best.row() if run.best else {})}
    state = {
        "epoch": epoch + 1, "step": run.step, "state_dict": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "config": {**vars(args), "world_size": world_size()},
        "normalization": {"mean": run.mean, "std": run.std}, "log_row": row,
    }
    if run.init is not None:
        state["init"] = run.init
    if run.best is not None:  # the epoch best.pth holds (clusiam.best); plain values
        state["best"] = run.best.record()
    if run.pretrained_on is not None:  # the leakage ledger (clusiam.checkpoint.SeenInPretraining); plain values
        state["pretraining_slides"] = {"names": run.pretrained_on, "digest": run.source.identity,
                                       "patches": len(run.source), "init": ledger_init(run.init)}
    save_epoch(state, Path(args.save_path), save_numbered=(epoch + 1) % args.save_freq == 0,
               save_best=new_best is not None)
    log.epoch_row(row)
    if probed is not None:
        log.scalars(probed, run.step, group="probe")
        print(f"probe (epoch {epoch + 1}): {run.probe.summary(probed, seconds)}")
    if new_best is not None:
        print(new_best)
    warn_of_epoch(run, epoch, averages, args)


def warn_of_epoch(run: Run, epoch: int, averages: dict[str, float], args: argparse.Namespace) -> None:
    """The epoch's collapse warnings, and the patches that could not be read since the last warning."""
    for warning in collapse_warnings(averages, args.num_clusters if run.model.method.clustered else None):
        print(f"warning (epoch {epoch + 1}): {warning}")
    if run.skipped is not None and run.skipped.count() > run.skipped_reported:
        print(f"warning (epoch {epoch + 1}): {run.skipped.count() - run.skipped_reported} more patches or slides "
              "could not be read (left out of the statistics, or replaced in their batch by the next readable "
              f"patch); they are listed in {run.skipped.path}, once per process that met them")
        run.skipped_reported = run.skipped.count()


def ledger_init(init: dict | None) -> dict | None:
    """What the ledger says of --init weights: which, and whether the slides they saw are known
    (an earlier clusiam run's are, and are among the names; ImageNet's or a foundation model's are not)."""
    return None if init is None else {"source": init["source"], "sha256": init["sha256"],
                                      "slides_known": init["pretrained_on"] is not None}


def probe_epoch(run: Run, epoch: int, args: argparse.Namespace) -> dict[str, float | None] | None:
    """The probe's scores when this epoch is probed (on rank 0; every process encodes its share)."""
    if run.probe is None or not run.probe.due(epoch, args.epochs):
        return None
    return run.probe.run(run.model, run.mean, run.std, run.device, args.batch_size // world_size(), args.num_worker)


def plan_probe(args: argparse.Namespace) -> ProbePlan | None:
    """With ``--probe``: the probe's table checked and split, on rank 0 (nothing is written)."""
    if args.probe is None:
        return None
    from clusiam import probe  # scikit-learn and matplotlib: imported only by runs that probe (a second of start-up)

    return main_computes(lambda: probe.plan_probe(args))


def save_epoch(state: dict, save_path: Path, save_numbered: bool, save_best: bool) -> None:
    """``checkpoint_NNNN.pth`` (every --save_freq epochs), ``last.pth``, then ``best.pth`` when the
    epoch is the best so far. A full disk stops the run with the last good checkpoint intact.

    best.pth comes after last.pth, which records it: a run stopped between the two (killed, or a
    full disk) leaves a last.pth that names itself the best beside an older best.pth, and its
    resume writes best.pth from last.pth (:meth:`clusiam.best.Best.restore`). The other order
    could leave best.pth ahead of last.pth, put right only where the resumed run trains and
    probes that epoch again (bit-exact), which it does not with another --epochs or --probe_every."""
    last = save_path / "last.pth"
    try:
        if save_numbered:
            save_checkpoint(state, save_path / f"checkpoint_{state['epoch']:04d}.pth")
        save_checkpoint(state, last)
    except DiskFullError as error:
        kept = f"the last good checkpoint {last} is intact" if last.is_file() else "no checkpoint was written"
        raise DiskFullError(f"{error}. Epoch {state['epoch']} was not saved; {kept} (resume with --resume auto "
                            "once there is room)") from None
    if save_best:
        try:
            save_checkpoint(state, save_path / BEST_FILE)
        except DiskFullError as error:
            raise DiskFullError(f"{error}. Epoch {state['epoch']} was saved in {last} but not yet as {BEST_FILE}: "
                                f"resume with --resume auto once there is room (it writes {BEST_FILE} from "
                                f"{last.name})") from None


# --- the whole run ----------------------------------------------------------------------

def train(args: argparse.Namespace) -> Path:
    """Run (or resume) pretraining as configured; return the path of the last checkpoint."""
    with processes(args.device, args.dist_timeout) as device:
        return train_on(device, args)


def train_on(device: torch.device, args: argparse.Namespace) -> Path:
    save_path, log_dst = Path(args.save_path), Path(args.log_dst)
    # Every input is accepted before anything is written: options, the checkpoint, the patches.
    if args.batch_size % world_size():
        raise ConfigError(f"--batch_size {args.batch_size} is the global batch and must split evenly over the "
                          f"{world_size()} processes: pass a multiple of {world_size()}")
    in_use = main_computes(lambda: RunLock(save_path).in_use())  # before anything is said of the folder's files
    if in_use is not None:
        raise ConfigError(in_use)
    resume, checkpoint = checkpoint_to_resume(args, save_path)
    best = main_computes(lambda: resumed_best(args.keep_best, checkpoint, resume, save_path))
    if checkpoint is not None and checkpoint["epoch"] >= args.epochs:
        return nothing_to_train(resume, checkpoint, best, args)
    on_demo = args.data_dir is None and args.coords is None
    if on_demo:
        check_demo_size(args)
    inputs = None if on_demo else check_batch_size(check_source(args.data_dir, args), args)
    probe_plan = plan_probe(args)
    initial = read_initial_weights(args.init, args.backbone) if args.init and checkpoint is None else None
    if initial is not None:
        print_rank_zero(initial.summary())
    with run_folder(save_path, log_dst):
        refuse_earlier_run(resume, save_path)  # again, now that no other run can write here
        if inputs is None:
            demo = main_computes(lambda: prepare_demo(save_path / "demo_data"))
            print_rank_zero(f"no DATA_DIR given: training on the built-in demo set in {demo}")
            inputs = check_batch_size(check_source(demo, args), args)
        source, checked = inputs
        run = set_up_run(device, args, checkpoint, source, record_check(checked, save_path, args), initial)
        if probe_plan is not None:
            run.probe = probe_plan.start(save_path, run.model.method.clustered)
        run.best = best
        if checkpoint is not None:
            print_rank_zero(f"resumed {resume} at epoch {run.start_epoch}, step {run.step}")
        train_epochs(run, args, RunLog(log_dst), checkpoint)
    last = save_path / "last.pth"
    print_rank_zero(f"done: {last}")
    return last


def check_batch_size(inputs: tuple[PatchSource, Checked], args: argparse.Namespace) -> tuple[PatchSource, Checked]:
    """The checked patches, refused when they cannot fill one batch."""
    if len(inputs[0]) < args.batch_size:
        raise DataError(f"only {len(inputs[0])} usable images for --batch_size {args.batch_size}: lower --batch_size")
    return inputs


def nothing_to_train(resume: Path, checkpoint: dict, best: Best | None, args: argparse.Namespace) -> Path:
    """A checkpoint that already holds the epochs asked for. In its own run folder, best.pth and
    the row of its last epoch are written where a kill after the checkpoint lost them, and a
    killed run's lock is taken over and released."""
    save_path, log_dst = Path(args.save_path), Path(args.log_dst)
    if resume.resolve() == (save_path / "last.pth").resolve():
        with run_folder(save_path, log_dst):
            if best is not None:
                best.restore(checkpoint, save_path)
            RunLog(log_dst).restore_row(checkpoint)
    print_rank_zero(f"{resume} already holds {checkpoint['epoch']} epochs (--epochs {args.epochs}): "
                    "nothing to train; pass a larger --epochs to train on")
    return resume


def record_check(checked: Checked, save_path: Path, args: argparse.Namespace) -> SkipLog | None:
    """Report what the check left out (listed in skipped_files.txt under --skip_bad_files,
    which also lists what fails later) and keep a patch-file verdict for the next start."""
    skipped = SkipLog(save_path / "skipped_files.txt") if args.skip_bad_files else None
    if is_main():
        checked.report(skipped.path if skipped else None)
        if checked.key is not None:  # a check of patch files: the next start of this run reuses it
            remember_check(save_path / CHECK_CACHE, checked)
    return skipped


def train_epochs(run: Run, args: argparse.Namespace, log: RunLog, checkpoint: dict | None) -> None:
    """The epochs left to train, each ended by :func:`finish_epoch`."""
    if checkpoint is not None:  # what a run killed after its checkpoint did not write: best.pth, the row
        if run.best is not None:
            run.best.restore(checkpoint, Path(args.save_path))
        log.restore_row(checkpoint)
    announce(run, args)
    for epoch in range(run.start_epoch, args.epochs):
        started = time.time()
        record = train_one_epoch(run, epoch, args, log)
        finish_epoch(run, epoch, record, time.time() - started, args, log)
    log.close()
    barrier()  # the last checkpoint exists before any process returns its path


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: train(parse_config(argv)))
