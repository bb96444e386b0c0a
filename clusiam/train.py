"""The pretraining loop: data checks and statistics, the training step, logging,
checkpoints and exact resumption.

Data flows one way: patch files -> uint8 batches (DataLoader workers) -> views made in
batch on the training device -> model -> loss (or, with ``--augment pil``, the paper's
PIL views made in the workers).
The step never reads a value back to the host; logged scalars are read every
``--print_freq`` steps, which is also where a non-finite loss is caught.

Under torchrun (see :mod:`clusiam.distributed`) the same loop runs once per process:
``--batch_size`` is the global batch, split evenly over the processes; the model is
wrapped in DistributedDataParallel with SyncBatchNorm (on GPUs); the cluster loss sees the
gathered global batch; only rank 0 writes files or prints.
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lightly.utils.dist import print_rank_zero
from lightly.utils.scheduler import cosine_schedule
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from clusiam.augment import BatchViews, TwoViews, ViewRecipe, paper_augmentation
from clusiam.checkpoint import ARCHITECTURE_OPTIONS, load_checkpoint, save_checkpoint
from clusiam.config import ConfigError, parse_config
from clusiam.data import DataError, PatchDataset, cached_channel_statistics, check_images, find_images, uint8_tensor
from clusiam.demo import DemoSpec, prepare_demo
from clusiam.distributed import (barrier, check_replicas_agree, earliest_step, gather_views, is_main, main_computes,
                                 processes, rank, sum_over_ranks, world_size)
from clusiam.errors import UserError, run_command
from clusiam.losses import byol_invariance, cluster_similarity, simsiam_invariance
from clusiam.models import Method, PretrainModel, PretrainOutput
from clusiam.monitor import CLUSTER_DIAGNOSTICS, cluster_diagnostics, collapse_warnings, projection_std


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; nothing was saved over the last good checkpoint."""


def build_optimizer(model: PretrainModel, init_lr: float, momentum: float, weight_decay: float,
                    fix_pred_lr: bool) -> torch.optim.SGD:
    """SGD over the trainable parameters. Under ``fix_pred_lr`` the predictor gets its own
    group flagged ``fix_lr``, which :func:`set_learning_rate` holds at ``init_lr``."""
    predictor = {id(p) for p in model.predictor.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if fix_pred_lr:
        groups = [
            {"params": [p for p in trainable if id(p) not in predictor], "fix_lr": False},
            {"params": [p for p in trainable if id(p) in predictor], "fix_lr": True},
        ]
    else:
        groups = [{"params": trainable, "fix_lr": False}]
    return torch.optim.SGD(groups, lr=init_lr, momentum=momentum, weight_decay=weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, init_lr: float, epoch: int, epochs: int) -> float:
    """The authors' per-epoch cosine: init_lr * (1 + cos(pi * epoch / epochs)) / 2.
    (lightly's schedule reaches its end value at max_steps - 1, hence epochs + 1.)"""
    lr = cosine_schedule(epoch, epochs + 1, init_lr, 0.0)
    for group in optimizer.param_groups:
        group["lr"] = init_lr if group["fix_lr"] else lr
    return lr


def compute_losses(method: Method, output: PretrainOutput, alpha: float, tau: float, eps: float,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Invariance loss, cluster loss (clustered methods) and their weighted sum, in fp32.

    The invariance loss is this process's batch mean (DDP averages its gradients over the
    processes). The cluster loss is computed on the global batch, gathered from every
    process, with Gumbel noise from ``generator`` (seeded alike on every process)."""
    p1, p2 = (p.float() for p in output.predictions)
    t1, t2 = (t.float() for t in output.targets)
    invariance_fn = byol_invariance if method.momentum_target else simsiam_invariance
    losses = {"invariance": invariance_fn(p1, p2, t1, t2, eps)}
    if output.cluster_logits is None:
        losses["loss"] = losses["invariance"]
        return losses
    losses["cluster"] = cluster_similarity(
        gather_views([z.float() for z in output.projections]), gather_views([a.float() for a in output.cluster_logits]),
        tau, eps, generator,
    )
    losses["loss"] = (1 - alpha) * losses["invariance"] + alpha * losses["cluster"]
    return losses


def training_step(network: nn.Module, optimizer: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor,
                  args: argparse.Namespace, autocast: bool, target_momentum: float | None = None,
                  generator: torch.Generator | None = None) -> tuple[PretrainOutput, dict[str, torch.Tensor]]:
    """One optimisation step on a pair of views; nothing is read back to the host.
    ``network`` is a :class:`PretrainModel` or its DistributedDataParallel wrapper."""
    model = network.module if isinstance(network, DistributedDataParallel) else network
    with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=autocast):
        output = network(x1, x2)
    losses = compute_losses(model.method, output, args.alpha, args.tau, args.eps, generator)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    if target_momentum is not None:
        model.update_target(target_momentum)
    return output, losses


# Options a resumed run is told about when they differ from the checkpoint's.
TRAINING_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "momentum", "fix_pred_lr", "alpha", "tau", "eps",
                    "target_momentum", "cosine_target_momentum", "image_size", "augment", "vflip", "rotate90",
                    "hed_jitter", "precision", "seed")
DIAGNOSTIC_NOISE = 2**32  # a seed key no rank number reaches: the diagnostics' own random stream


def prepare_files(args: argparse.Namespace, save_path: Path) -> list[Path]:
    """The checked list of training images (the demo set when no DATA_DIR is given).
    Rank 0 writes the demo set and checks the images; every rank gets its verdict."""
    data_dir = args.data_dir
    if data_dir is None:
        demo_size = DemoSpec().patch_size
        if args.image_size > demo_size:
            raise ConfigError(f"the built-in demo set has {demo_size} px patches, smaller than --image_size "
                              f"{args.image_size}: run `python pretrain.py --config configs/demo.yaml`, "
                              f"or pass --image_size {demo_size} (or a DATA_DIR)")
        data_dir = main_computes(lambda: prepare_demo(save_path / "demo_data"))
        print_rank_zero(f"no DATA_DIR given: training on the built-in demo set in {data_dir}")
    files = find_images(data_dir, "DATA_DIR (or none, for the built-in demo)")

    def usable() -> list[bool]:
        good = set(check_images(files, args.image_size, args.skip_bad_files, save_path / "skipped_files.txt",
                                same_size=args.augment == "batched"))
        return [path in good for path in files]

    return [path for path, keep in zip(files, main_computes(usable)) if keep]


def seed_from(*keys: int) -> int:
    """A seed that depends only on ``keys``. Every epoch reseeds from (seed, epoch, rank),
    so a resumed epoch draws what an uninterrupted one would, for any number of processes."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def resume_path(args: argparse.Namespace, save_path: Path) -> Path | None:
    """The checkpoint to resume: ``--resume PATH``; with ``--resume auto``, or when torchrun
    restarts the job after a failure (``--max_restarts``), SAVE_PATH/last.pth if it exists."""
    last = save_path / "last.pth"
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if args.resume == "auto" or (restarted and last.is_file()):
        return last if last.is_file() else None
    return Path(args.resume) if args.resume else None


class EpochLog:
    """One epoch's record: loss sums and the first non-finite step (kept on the device
    until read), diagnostics of the logged steps, and a CSV row at the end."""

    def __init__(self, csv_path: Path, diagnostic_names: Sequence[str], device: torch.device) -> None:
        self.csv_path = csv_path
        self.loss_sums: torch.Tensor | None = None
        self.loss_names: list[str] = []
        self.steps = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.diagnostic_sums = dict.fromkeys(diagnostic_names, 0.0)
        self.diagnostic_count = 0

    def add_losses(self, losses: dict[str, torch.Tensor], step: int) -> None:
        values = torch.stack([value.detach() for value in losses.values()])
        self.loss_names = list(losses)
        self.loss_sums = values if self.loss_sums is None else self.loss_sums + values
        self.steps += 1
        bad = ~torch.isfinite(losses["loss"].detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def stop_if_nonfinite(self, epoch: int, last: Path) -> None:
        bad_step = int(earliest_step(self.first_bad_step))  # every rank stops at the same step
        if bad_step >= 0:
            kept = f"the last good checkpoint {last} is untouched" if last.is_file() else "no checkpoint was written"
            raise NonFiniteLossError(
                f"the loss became non-finite at step {bad_step} (epoch {epoch + 1}); training stopped and {kept}. "
                "Lower --lr, or look for corrupt images in the data."
            )

    def add_diagnostics(self, diagnostics: dict[str, float]) -> None:
        for key, value in diagnostics.items():
            self.diagnostic_sums[key] += value
        self.diagnostic_count += 1

    def averages(self) -> dict[str, float]:
        """Mean losses over the epoch's steps and all processes, and mean diagnostics over its
        logged steps (at least its last)."""
        losses = (sum_over_ranks(self.loss_sums) / (self.steps * world_size())).tolist()
        result = dict(zip(self.loss_names, losses))
        result.update({k: v / self.diagnostic_count for k, v in self.diagnostic_sums.items()})
        return result

    def write_row(self, row: dict[str, float]) -> None:
        new = not self.csv_path.is_file()
        with open(self.csv_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def step_diagnostics(output: PretrainOutput, generator: torch.Generator) -> dict[str, float]:
    """Collapse signals of one step over the global batch (this reads values back to the
    host: logged steps only). ``generator`` is the diagnostics' own Gumbel noise."""
    diagnostics = {"projection_std": projection_std(gather_views(output.projections))}
    if output.cluster_logits is not None:
        diagnostics.update(cluster_diagnostics(gather_views([a.detach() for a in output.cluster_logits]), generator))
    return {name: float(value) for name, value in diagnostics.items()}


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
    saved = checkpoint["config"]
    changed = [f"--{name} {getattr(args, name)} (was {saved[name]})" for name in TRAINING_OPTIONS
               if name in saved and saved[name] != getattr(args, name)]
    if changed:
        print_rank_zero(f"note: resuming {path} with options that differ from its run: {', '.join(changed)}")
    return checkpoint


def build_model(args: argparse.Namespace, device: torch.device, memory_format: torch.memory_format) -> PretrainModel:
    """The network, seeded alike on every process, with SyncBatchNorm when several GPU
    processes train it (BatchNorm statistics over the global batch, as the authors ran it)."""
    torch.manual_seed(args.seed)
    model = PretrainModel(args.model_type, args.backbone, args.feat_size, args.num_clusters)
    if world_size() > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=memory_format)


def train(args: argparse.Namespace) -> Path:
    """Run (or resume) pretraining as configured; return the path of the last checkpoint."""
    with processes(args.device, args.dist_timeout) as device:
        return train_on(device, args)


def train_on(device: torch.device, args: argparse.Namespace) -> Path:
    save_path, log_dst = Path(args.save_path), Path(args.log_dst)
    if is_main():
        save_path.mkdir(parents=True, exist_ok=True)
        log_dst.mkdir(parents=True, exist_ok=True)
    processes_count = world_size()
    if args.batch_size % processes_count:
        raise ConfigError(f"--batch_size {args.batch_size} is the global batch and must split evenly over the "
                          f"{processes_count} processes: pass a multiple of {processes_count}")
    resume = resume_path(args, save_path)
    if resume is None and (save_path / "last.pth").is_file():
        raise ConfigError(f"{save_path / 'last.pth'} is from an earlier run: pass --resume auto to continue it, "
                          "or another --save_path")
    checkpoint = load_resumable(resume, args) if resume else None
    if checkpoint is not None and checkpoint["epoch"] >= args.epochs:
        print_rank_zero(f"{resume} already holds {checkpoint['epoch']} epochs (--epochs {args.epochs}): "
                        "nothing to train; pass a larger --epochs to train on")
        return resume
    files = prepare_files(args, save_path)
    if checkpoint is not None:
        mean, std = checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"]
    elif args.mean is not None:
        mean, std = args.mean, args.std
    else:
        mean, std = main_computes(lambda: cached_channel_statistics(files, save_path / "normalization.json", args.num_worker))
    steps_per_epoch = len(files) // args.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"only {len(files)} usable images for --batch_size {args.batch_size}: lower --batch_size")

    # channels_last and bf16 autocast are what make convolutions fast on tensor cores.
    on_gpu = device.type == "cuda"
    memory_format = torch.channels_last if on_gpu else torch.preserve_format
    autocast = on_gpu and args.precision == "bf16"
    torch.backends.cudnn.benchmark = on_gpu
    model = build_model(args, device, memory_format)
    method = model.method
    init_lr = args.lr * args.batch_size / 256
    optimizer = build_optimizer(model, init_lr, args.momentum, args.weight_decay, args.fix_pred_lr)
    start_epoch, step = args.start_epoch, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        print_rank_zero(f"resumed {resume} at epoch {start_epoch}, step {step}")
    network = model
    if processes_count > 1:
        network = DistributedDataParallel(model, device_ids=[device] if on_gpu else None)

    if args.augment == "batched":  # workers decode; views are made on the device
        dataset = PatchDataset(files, uint8_tensor)
        recipe = ViewRecipe(vflip_p=0.5 if args.vflip else 0.0, rotate90=args.rotate90, hed_jitter=args.hed_jitter)
        batch_views = BatchViews(args.image_size, mean, std, recipe)
    else:  # the paper's pipeline: workers decode and augment with PIL
        dataset = PatchDataset(files, TwoViews(paper_augmentation(args.image_size, mean, std)))
    # The global batch of step k is the same images for any number of processes; each
    # process takes every world_size-th of them.
    sampler = DistributedSampler(dataset, num_replicas=processes_count, rank=rank(), shuffle=True, seed=args.seed,
                                 drop_last=True)
    total_steps = steps_per_epoch * args.epochs
    diagnostic_names = ["projection_std", *(CLUSTER_DIAGNOSTICS if method.clustered else ())]
    writer = SummaryWriter(str(log_dst)) if is_main() else None
    placement = f"{device}" if processes_count == 1 else (
        f"{processes_count} processes ({device.type}), {args.batch_size // processes_count} images each")
    print_rank_zero(
        f"{args.model_type} ({args.backbone}) on {placement}: {len(files)} images, {steps_per_epoch} steps/epoch "
        f"of {args.batch_size}, lr {init_lr:g}, alpha {args.alpha}, mean {[round(m, 4) for m in mean]}, "
        f"std {[round(s, 4) for s in std]}"
    )
    if processes_count > 1 and not on_gpu:
        print_rank_zero("note: SyncBatchNorm needs GPUs; on CPU processes BatchNorm statistics are per process")
    last = save_path / "last.pth"
    for epoch in range(start_epoch, args.epochs):
        lr = set_learning_rate(optimizer, init_lr, epoch, args.epochs)
        torch.manual_seed(seed_from(args.seed, epoch, rank()))  # view parameters: this rank's own draws
        gumbel = torch.Generator(device).manual_seed(seed_from(args.seed, epoch))  # Gumbel noise: alike on every rank
        diagnostic_noise = torch.Generator(device).manual_seed(seed_from(args.seed, epoch, DIAGNOSTIC_NOISE))
        sampler.set_epoch(epoch)
        loader = DataLoader(
            dataset, batch_size=args.batch_size // processes_count, sampler=sampler, drop_last=True,
            num_workers=args.num_worker, pin_memory=on_gpu,
            generator=torch.Generator().manual_seed(seed_from(args.seed, epoch, rank())),  # worker seeds
        )
        log = EpochLog(log_dst / "epochs.csv", diagnostic_names, device)
        network.train()
        started = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", disable=not is_main())
        for index, batch in enumerate(bar):
            views = batch_views(batch.to(device, non_blocking=True)) if args.augment == "batched" else batch
            x1, x2 = (view.to(device, non_blocking=True, memory_format=memory_format) for view in views)
            momentum = None
            if method.momentum_target:
                momentum = (cosine_schedule(step, total_steps, args.target_momentum, 1.0)
                            if args.cosine_target_momentum else args.target_momentum)
            output, losses = training_step(network, optimizer, x1, x2, args, autocast, momentum, gumbel)
            step += 1  # steps are counted from 1, in messages, the CSV and TensorBoard alike
            log.add_losses(losses, step)
            # The only place the step's values reach the host: every --print_freq steps, and
            # the epoch's last step, so that every epoch has diagnostics to warn from.
            if step % args.print_freq == 0 or index == len(loader) - 1:
                log.stop_if_nonfinite(epoch, last)
                mean_losses = sum_over_ranks(torch.stack([v.detach() for v in losses.values()])) / processes_count
                values = dict(zip(losses, mean_losses.tolist()))
                diagnostics = step_diagnostics(output, diagnostic_noise)
                log.add_diagnostics(diagnostics)
                if writer is not None:
                    for name, value in {**values, **diagnostics, "lr": lr}.items():
                        writer.add_scalar(f"train/{name}", value, step)
                bar.set_postfix({name: f"{value:.4f}" for name, value in values.items()})
        log.stop_if_nonfinite(epoch, last)
        seconds = time.time() - started
        averages = log.averages()
        check_replicas_agree(model)
        if not is_main():
            continue
        log.write_row({"epoch": epoch + 1, "step": step, "lr": lr, **averages, "seconds": round(seconds, 2),
                       "images_per_s": round(log.steps * args.batch_size / max(seconds, 1e-9), 1)})
        writer.flush()
        for warning in collapse_warnings(averages, args.num_clusters if method.clustered else None):
            print(f"warning (epoch {epoch + 1}): {warning}")
        state = {
            "epoch": epoch + 1, "step": step, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": {**vars(args), "world_size": processes_count},
            "normalization": {"mean": list(mean), "std": list(std)},
        }
        if (epoch + 1) % args.save_freq == 0:
            save_checkpoint(state, save_path / f"checkpoint_{epoch + 1:04d}.pth")
        save_checkpoint(state, last)
    if writer is not None:
        writer.close()
    barrier()  # the last checkpoint exists before any process returns its path
    print_rank_zero(f"done: {last}")
    return last


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: train(parse_config(argv)))
