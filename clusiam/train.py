"""The pretraining loop: data checks and statistics, the training step, logging,
checkpoints and exact resumption.

Data flows one way: patch files -> uint8 batches (DataLoader workers) -> views made in
batch on the training device -> model -> loss (or, with ``--augment pil``, the paper's
PIL views made in the workers).
The step never reads a value back to the host; logged scalars are read every
``--print_freq`` steps, which is also where a non-finite loss is caught.
"""
from __future__ import annotations

import argparse
import csv
import math
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lightly.utils.scheduler import cosine_schedule
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from clusiam.augment import BatchViews, TwoViews, ViewRecipe, paper_augmentation
from clusiam.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from clusiam.config import ConfigError, parse_config, resolve_device
from clusiam.data import DataError, PatchDataset, cached_channel_statistics, check_images, find_images, uint8_tensor
from clusiam.demo import prepare_demo
from clusiam.errors import UserError, run_command
from clusiam.losses import byol_invariance, cluster_similarity, simsiam_invariance
from clusiam.models import PretrainModel, PretrainOutput
from clusiam.monitor import CLUSTER_DIAGNOSTICS, cluster_diagnostics, collapse_warnings, projection_std

# Options that define the network: a checkpoint can only resume a run that agrees on them.
ARCHITECTURE_OPTIONS = ("model_type", "backbone", "feat_size", "num_clusters")


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


def compute_losses(model: PretrainModel, output: PretrainOutput, alpha: float, tau: float,
                   eps: float) -> dict[str, torch.Tensor]:
    """Invariance loss, cluster loss (clustered methods) and their weighted sum, in fp32."""
    p1, p2 = (p.float() for p in output.predictions)
    t1, t2 = (t.float() for t in output.targets)
    invariance_fn = byol_invariance if model.method.momentum_target else simsiam_invariance
    losses = {"invariance": invariance_fn(p1, p2, t1, t2, eps)}
    if output.cluster_logits is None:
        losses["loss"] = losses["invariance"]
        return losses
    losses["cluster"] = cluster_similarity(
        torch.cat(output.projections).float(), torch.cat(output.cluster_logits).float(), tau, eps
    )
    losses["loss"] = (1 - alpha) * losses["invariance"] + alpha * losses["cluster"]
    return losses


def training_step(model: PretrainModel, optimizer: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor,
                  args: argparse.Namespace, autocast: bool, target_momentum: float | None = None
                  ) -> tuple[PretrainOutput, dict[str, torch.Tensor]]:
    """One optimisation step on a pair of views; nothing is read back to the host."""
    with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=autocast):
        output = model(x1, x2)
    losses = compute_losses(model, output, args.alpha, args.tau, args.eps)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    if target_momentum is not None:
        model.update_target(target_momentum)
    return output, losses


def prepare_files(args: argparse.Namespace, save_path: Path) -> list[Path]:
    """The checked list of training images (the demo set when no DATA_DIR is given)."""
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = prepare_demo(save_path / "demo_data")
        print(f"no DATA_DIR given: training on the built-in demo set in {data_dir}")
    files = find_images(data_dir)
    return check_images(files, args.image_size, args.skip_bad_files, save_path / "skipped_files.txt",
                        same_size=args.augment == "batched")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling and worker seeds depend only on (seed, epoch), so a resumed epoch sees the
    same batches as an uninterrupted one."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


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
        bad_step = int(self.first_bad_step)
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
        """Mean losses over the epoch's steps and mean diagnostics over its logged steps
        (NaN when --print_freq exceeds the epoch, so every CSV row has the same columns)."""
        losses = (self.loss_sums / self.steps).tolist() if self.steps else []
        result = dict(zip(self.loss_names, losses))
        count = self.diagnostic_count or math.nan
        result.update({k: v / count for k, v in self.diagnostic_sums.items()})
        return result

    def write_row(self, row: dict[str, float]) -> None:
        new = not self.csv_path.is_file()
        with open(self.csv_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def step_diagnostics(output: PretrainOutput) -> dict[str, float]:
    """Collapse signals of one step (this reads values back to the host: logged steps only)."""
    diagnostics = {"projection_std": projection_std(torch.cat(output.projections))}
    if output.cluster_logits is not None:
        diagnostics.update(cluster_diagnostics(torch.cat(output.cluster_logits)))
    return {name: float(value) for name, value in diagnostics.items()}


def train(args: argparse.Namespace) -> Path:
    """Run (or resume) pretraining as configured; return the path of the last checkpoint."""
    save_path, log_dst = Path(args.save_path), Path(args.log_dst)
    save_path.mkdir(parents=True, exist_ok=True)
    log_dst.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        for option in ARCHITECTURE_OPTIONS:
            if checkpoint["config"][option] != getattr(args, option):
                raise ConfigError(
                    f"--resume {args.resume} was trained with --{option} {checkpoint['config'][option]}, "
                    f"not {getattr(args, option)}: pass the same value"
                )

    files = prepare_files(args, save_path)
    if checkpoint is not None:
        mean, std = checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"]
    elif args.mean is not None:
        mean, std = args.mean, args.std
    else:
        mean, std = cached_channel_statistics(files, save_path / "normalization.json", args.num_worker)
    steps_per_epoch = len(files) // args.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"only {len(files)} usable images for --batch_size {args.batch_size}: lower --batch_size")

    # channels_last and bf16 autocast are what make convolutions fast on tensor cores.
    on_gpu = device.type == "cuda"
    memory_format = torch.channels_last if on_gpu else torch.preserve_format
    autocast = on_gpu and args.precision == "bf16"
    torch.backends.cudnn.benchmark = on_gpu
    model = PretrainModel(args.model_type, args.backbone, args.feat_size, args.num_clusters)
    model = model.to(device, memory_format=memory_format)
    method = model.method
    init_lr = args.lr * args.batch_size / 256
    optimizer = build_optimizer(model, init_lr, args.momentum, args.weight_decay, args.fix_pred_lr)
    start_epoch, step = args.start_epoch, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        restore_rng_state(checkpoint["rng"])
        print(f"resumed {args.resume} at epoch {start_epoch}, step {step}")

    if args.augment == "batched":  # workers decode; views are made on the device
        dataset = PatchDataset(files, uint8_tensor)
        recipe = ViewRecipe(vflip_p=0.5 if args.vflip else 0.0, rotate90=args.rotate90, hed_jitter=args.hed_jitter)
        batch_views = BatchViews(args.image_size, mean, std, recipe)
    else:  # the paper's pipeline: workers decode and augment with PIL
        dataset = PatchDataset(files, TwoViews(paper_augmentation(args.image_size, mean, std)))
    total_steps = steps_per_epoch * args.epochs
    diagnostic_names = ["projection_std", *(CLUSTER_DIAGNOSTICS if method.clustered else ())]
    writer = SummaryWriter(str(log_dst))
    print(
        f"{args.model_type} ({args.backbone}) on {device}: {len(files)} images, {steps_per_epoch} steps/epoch, "
        f"lr {init_lr:g}, alpha {args.alpha}, mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}"
    )
    last = save_path / "last.pth"
    for epoch in range(start_epoch, args.epochs):
        lr = set_learning_rate(optimizer, init_lr, epoch, args.epochs)
        loader = DataLoader(
            dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_worker,
            pin_memory=on_gpu, generator=epoch_generator(args.seed, epoch),
        )
        log = EpochLog(log_dst / "epochs.csv", diagnostic_names, device)
        model.train()
        started = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch")
        for batch in bar:
            views = batch_views(batch.to(device, non_blocking=True)) if args.augment == "batched" else batch
            x1, x2 = (view.to(device, non_blocking=True, memory_format=memory_format) for view in views)
            momentum = None
            if method.momentum_target:
                momentum = (cosine_schedule(step, total_steps, args.target_momentum, 1.0)
                            if args.cosine_target_momentum else args.target_momentum)
            output, losses = training_step(model, optimizer, x1, x2, args, autocast, momentum)
            log.add_losses(losses, step)
            step += 1
            if step % args.print_freq == 0:  # the only place the step's values reach the host
                log.stop_if_nonfinite(epoch, last)
                values = dict(zip(losses, torch.stack([v.detach() for v in losses.values()]).tolist()))
                diagnostics = step_diagnostics(output)
                log.add_diagnostics(diagnostics)
                for name, value in {**values, **diagnostics, "lr": lr}.items():
                    writer.add_scalar(f"train/{name}", value, step)
                bar.set_postfix({name: f"{value:.4f}" for name, value in values.items()})
        log.stop_if_nonfinite(epoch, last)
        seconds = time.time() - started
        averages = log.averages()
        log.write_row({"epoch": epoch + 1, "step": step, "lr": lr, **averages, "seconds": round(seconds, 2),
                       "images_per_s": round(log.steps * args.batch_size / max(seconds, 1e-9), 1)})
        writer.flush()
        for warning in collapse_warnings(averages, args.num_clusters if method.clustered else None):
            print(f"warning (epoch {epoch + 1}): {warning}")

        state = {
            "epoch": epoch + 1, "step": step, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng_state(), "config": vars(args), "normalization": {"mean": list(mean), "std": list(std)},
        }
        if (epoch + 1) % args.save_freq == 0:
            save_checkpoint(state, save_path / f"checkpoint_{epoch + 1:04d}.pth")
        save_checkpoint(state, last)
    writer.close()
    print(f"done: {last}")
    return last


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: train(parse_config(argv)))
