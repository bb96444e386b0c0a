"""How fast DataLoader workers feed pretraining from scanner-size slides, in slide order and in
the training's order, and what each worker holds in memory.

    python benchmarks/read_rate.py --work /tmp/read_rate [--slides 270] [--workers 2] [--batch_size 512]

Two generated pyramidal TIFFs the size of a Camelyon16 scan (benchmarks/scanner_slides.py:
100,000 x 200,000 px at 0.25 um/px, 256 px JPEG tiles, 15 % tissue), one with a level every
2x (a 20x level to read from) and one every 4x (Aperio's 40x, 10x, 2.5x: 20x patches are read
at 40x and resized), each behind ``--slides`` links with TRIDENT's coordinate files of 224 px
patches at 20x (``<slide>_patches.h5``, about 15,000 patches per slide). For each pyramid:

- the cost of opening a slide and reading its first patch;
- patches/s per worker with ``--workers`` workers, batches of ``--batch_size``, the way
  pretraining's loader delivers them (what the workers do to a patch included), in slide
  order (each slide's patches in its file's order, slide after slide) and in the training
  sampler's order;
- each worker's peak Pss (shared pages split among their sharers, so the figures add up);
- the distinct slides in each batch (fewest and mean).

The files sit in the page cache (warm reads), as on a machine that has read them once.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from clusiam.images import uint8_tensor
from clusiam.slide_source import SlideSource, folder_pairs
from clusiam.slides import open_slide

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scanner_slides import tissue_grid, write_scanner_slide, write_trident_coords  # noqa: E402

PATCH_PX, MAGNIFICATION = 224, 20


def cohort(work: Path, step: int, slides: int) -> tuple[Path, Path]:
    """(coords folder, slides folder) of ``slides`` links to one scanner-size slide with levels every ``step``x."""
    scan = write_scanner_slide(work / f"scan_{step}x.tif", step)
    coords = tissue_grid(scan, PATCH_PX, MAGNIFICATION)
    slides_dir, coords_dir = work / f"slides_{step}x", work / f"coords_{step}x"
    slides_dir.mkdir(parents=True, exist_ok=True)
    for index in range(slides):
        link = slides_dir / f"slide_{index:04d}.tif"
        if not link.is_symlink():
            link.symlink_to(scan)
        target = coords_dir / f"{link.stem}_patches.h5"
        if not target.is_file():
            write_trident_coords(target, coords, link.stem, PATCH_PX, MAGNIFICATION)
    return coords_dir, slides_dir


def opening_cost(source: SlideSource, count: int = 20) -> float:
    """Milliseconds to open a slide and read its first patch (``count`` slides, each opened once)."""
    started = time.perf_counter()
    for entry in source.entries[:count]:
        with open_slide(entry.path) as slide:
            x, y = entry.coords[0]
            entry.reader.read(slide, int(x), int(y))
    return (time.perf_counter() - started) / count * 1e3


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class SlideOrder(Sampler):
    """The first ``count`` patches in the source's own order: slide after slide, each in its file's order."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):
        return iter(range(self.count))

    def __len__(self) -> int:
        return self.count


def training_sampler(source: SlideSource, batch_size: int, epoch: int) -> Sampler:
    """The order pretraining reads an epoch in (one process)."""
    sampler = DistributedSampler(range(len(source)), num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(epoch)
    return sampler


def measure(source: SlideSource, sampler: Sampler, batch_size: int, workers: int, batches: int) -> dict:
    """Per-worker patches/s over ``batches`` batches (after two to start the workers), peak Pss per worker,
    distinct slides per batch."""
    dataset = source.dataset(uint8_tensor)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        persistent_workers=False, prefetch_factor=2)
    indices = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))
    slide_of = np.searchsorted(source.offsets, indices, side="right") - 1
    per_batch = [len(np.unique(slide_of[i * batch_size:(i + 1) * batch_size])) for i in range(batches + 2)]
    peak = {}
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
        for child in multiprocessing.active_children():
            peak[child.pid] = max(peak.get(child.pid, 0), pss_kib(child.pid))
    seconds = time.perf_counter() - started
    del iterator
    return {"per_worker": batches * batch_size / seconds / workers, "pss_mib": [v / 1024 for v in peak.values()],
            "slides_min": min(per_batch), "slides_mean": float(np.mean(per_batch))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the generated slides and coordinates")
    parser.add_argument("--slides", type=int, default=270)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=8, help="batches timed each way")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for step in (2, 4):
        coords_dir, slides_dir = cohort(args.work, step, args.slides)
        source, _ = SlideSource.checked(folder_pairs(coords_dir, slides_dir), skip=True)
        entry = source.entries[0]
        print(f"levels every {step}x: {len(source.entries)} slides, {len(source)} patches; read at level "
              f"{entry.reader.level} as {entry.reader.read_size} px -> {entry.reader.size} px; opening a slide and "
              f"reading a patch: {opening_cost(source):.1f} ms", flush=True)
        count = (args.batches + 2) * args.batch_size
        for order, sampler in (("slide order", SlideOrder(count)),
                               ("training order", training_sampler(source, args.batch_size, epoch=0))):
            result = measure(source, sampler, args.batch_size, args.workers, args.batches)
            pss = ", ".join(f"{value:.0f}" for value in result["pss_mib"])
            print(f"  {order:<15} {result['per_worker']:6.0f} patches/s per worker ({args.workers} workers); peak "
                  f"Pss per worker {pss} MiB; distinct slides per batch: fewest {result['slides_min']}, mean "
                  f"{result['slides_mean']:.1f}", flush=True)


if __name__ == "__main__":
    main()
