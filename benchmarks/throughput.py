"""Pretraining throughput, three ways, in one run on the same files and machine:

1. model only: the training step on views already on the device (the ceiling);
2. end to end: uint8 patches decoded in DataLoader workers, views made in batch on the
   device (``--augment batched``), the same step;
3. the paper's pipeline: PIL augmentation in the workers, fp32 step.

    python benchmarks/throughput.py --make_patches 30000 --patches /tmp/patches   # real H&E from the CC0 slide
    python benchmarks/throughput.py --patches /tmp/patches --model_type clubyol

Prints images/s (one image = its two views), the end-to-end / model-only ratio, and peak
GPU memory of each. A CPU smoke run: --device cpu --batch_size 8 --image_size 64 --steps 2.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from clusiam.augment import BatchViews, TwoViews, paper_augmentation
from clusiam.config import parse_config
from clusiam.demo import CMU_SLIDE
from clusiam.distributed import resolve_device
from clusiam.images import find_images, uint8_tensor
from clusiam.models import PretrainModel
from clusiam.sources import FolderSource
from clusiam.step import LossSettings, build_optimizer, training_step

# Camelyon16 20x statistics (Wu et al., ICCV 2023, the authors' code); they do not change the speed.
MEAN, STD = [0.6684, 0.5115, 0.6791], [0.2521, 0.2875, 0.2100]


def make_patches(out: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` PNG patches at random tissue positions of the CC0 slide (real H&E at 20x)."""
    import tiffslide

    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    tissue = (region.max(-1).astype(np.int16) - region.min(-1)) > 25
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with tqdm(total=count, desc="cutting patches") as bar:
        while written < count:
            top, left = rng.integers(0, region.shape[0] - size), rng.integers(0, region.shape[1] - size)
            if tissue[top : top + size, left : left + size].mean() >= 0.5:
                Image.fromarray(region[top : top + size, left : left + size]).save(out / f"{written:06d}.png")
                written += 1
                bar.update()


def measure(step, batches, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Seconds per step after ``warmup`` steps and peak memory (GiB) of ``step(batch)``."""
    iterator = iter(batches)
    for _ in range(warmup):
        step(next(iterator))
    if device.type == "cuda":  # the device itself: the current one is cuda:0 whatever --device says
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(next(iterator))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def endless(loader: DataLoader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=Path, required=True)
    parser.add_argument("--make_patches", type=int, default=0, help="first cut this many patches into --patches")
    parser.add_argument("--patch_size", type=int, default=224)
    parser.add_argument("--model_type", default="clusiam")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_workers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip_paper", action="store_true", help="leave out the paper's (slow) pipeline")
    args = parser.parse_args()

    if args.make_patches:
        make_patches(args.patches, args.make_patches, args.patch_size)
    files = find_images(args.patches, "--patches")
    device = resolve_device(args.device)
    config = parse_config(["--model_type", args.model_type, "--batch_size", str(args.batch_size),
                           "--device", str(device)])
    on_gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = on_gpu
    memory_format = torch.channels_last if on_gpu else torch.preserve_format

    def fresh_model(memory_format=memory_format):
        torch.manual_seed(0)
        model = PretrainModel(config.model_type, config.backbone, config.feat_size, config.num_clusters)
        model = model.to(device, memory_format=memory_format).train()
        return model, build_optimizer(model, config.lr * args.batch_size / 256, config.momentum,
                                      config.weight_decay, config.fix_pred_lr)

    def loader(transform):
        return endless(DataLoader(FolderSource(files).dataset(transform), batch_size=args.batch_size, shuffle=True,
                                  drop_last=True, num_workers=args.num_workers, pin_memory=on_gpu,
                                  persistent_workers=args.num_workers > 0))

    loss = LossSettings(config.alpha, config.tau, config.eps)
    momentum = config.target_momentum if config.model_type in ("clubyol", "byol") else None
    views = BatchViews(args.image_size, MEAN, STD)
    results = {}

    model, optimizer = fresh_model()
    resident = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[: args.batch_size]]))
    fixed = [v.contiguous(memory_format=memory_format) for v in views(resident.permute(0, 3, 1, 2).to(device))]
    precision = "bf16 + channels_last" if on_gpu else "fp32"
    results[f"model only (views on device), {precision}"] = measure(
        lambda _: training_step(model, optimizer, *fixed, loss, on_gpu, momentum), endless([None]),
        args.steps, args.warmup, device)

    model, optimizer = fresh_model()

    def end_to_end(batch):
        x1, x2 = (v.contiguous(memory_format=memory_format) for v in views(batch.to(device, non_blocking=True)))
        training_step(model, optimizer, x1, x2, loss, on_gpu, momentum)

    results[f"end to end (batched views), {precision}"] = measure(end_to_end, loader(uint8_tensor), args.steps,
                                                                  args.warmup, device)

    if not args.skip_paper:
        model, optimizer = fresh_model(torch.preserve_format)

        def paper(batch):  # as the authors ran it: default precision and memory layout
            x1, x2 = (v.to(device, non_blocking=True) for v in batch)
            training_step(model, optimizer, x1, x2, loss, False, momentum)

        results["paper pipeline (PIL in workers), fp32"] = measure(
            paper, loader(TwoViews(paper_augmentation(args.image_size, MEAN, STD))), args.steps, args.warmup, device)

    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"\n{config.model_type}, {name}, batch {args.batch_size}, {args.image_size} px, {len(files)} files, "
          f"{args.num_workers} workers, {args.steps} timed steps")
    ceiling = args.batch_size / next(iter(results.values()))[0]
    for label, (seconds, peak) in results.items():
        rate = args.batch_size / seconds
        print(f"{label:<56} {rate:9.0f} images/s  {rate / ceiling:5.2f} of model-only  peak {peak:6.2f} GiB")


if __name__ == "__main__":
    main()
