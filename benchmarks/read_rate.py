"""How fast one DataLoader worker gets patches from slides, against decoding patch files, and
what a slide source's workers hold in memory.

    python benchmarks/read_rate.py --work /tmp/read_rate [--patches 2000] [--workers 8] [--slides 200]

1. Patches/s of one process (what one DataLoader worker delivers) reading 224 px patches of
   real H&E (the CC0 slide, cut at the same tissue positions every way):
   - a :class:`~clusiam.slide_source.SlideSource` on a 20x slide (0.5 um/px, levels 1, 4 and 16,
     256 px JPEG tiles): the patch is read at level 0, no resize;
   - a SlideSource on a 40x-only slide (the same tissue upsampled to 0.25 um/px, one level):
     448 px read and resized to 224 (Lanczos), what a 40x scan without a 20x level costs;
   - the 20x SlideSource over ``--slides`` slides (links to one file) in a shuffled order, as
     an epoch asks: with OPEN_SLIDES handles per process, most reads open their slide again;
   - a :class:`~clusiam.sources.FolderSource` of the same pixels as PNG files, and as JPEG (quality 90).
   Files are read once before timing (warm page cache), as are slides. Then the time to open a slide
   and read one patch from it.
2. Peak memory of a SlideSource over ``--slides`` slides (links to the 20x slide), read in
   random order by ``--workers`` DataLoader workers: every process keeps its own
   OPEN_SLIDES handles, closing the least recently used, so the slides cycle through them.
   Each worker reports its peak resident set (ru_maxrss, which counts pages shared with the
   main process once per worker) and its proportional set (Pss, shared pages split among the
   processes that share them, so that the Pss of all processes add up). Run in a process of
   its own, so that the workers do not inherit what writing the slides took.

The generated slides are small (2220 x 2967 px at 20x) and in the page cache: opening a
scanner's multi-gigabyte file reads more of it, so reopening costs more there.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info
from tqdm import tqdm

from clusiam.slide_source import OPEN_SLIDES, SlidePatches, SlideSource
from clusiam.slides import PatchReader, open_slide
from clusiam.sources import FolderSource, PatchSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import cmu_region, tissue_corners, write_pyramid  # noqa: E402

SIZE = 224


def slide_source(path: Path, corners: np.ndarray, side0: int, names: int = 1) -> SlideSource:
    """A source of ``corners`` (level-0 pixels) of ``side0`` px read at SIZE px, from ``path``
    under ``names`` names (links to it), each with all of the corners."""
    with open_slide(path) as slide:
        reader = PatchReader.for_slide(slide, side0, SIZE)
    links = [path]
    for index in range(1, names):
        links.append(path.with_name(f"{path.stem}_{index:04d}{path.suffix}"))
        links[-1].unlink(missing_ok=True)
        links[-1].symlink_to(path.name)
    return SlideSource([SlidePatches(link, link.stem, reader, corners) for link in links])


def patch_files(folder: Path, region: np.ndarray, corners: np.ndarray, fmt: str, options: dict) -> FolderSource:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, (x, y) in enumerate(corners):
        files.append(folder / f"{index:05d}.{fmt.lower()}")
        Image.fromarray(region[y : y + SIZE, x : x + SIZE]).save(files[-1], fmt, **options)
    return FolderSource(files)


def patches_per_second(source: PatchSource, order: np.ndarray | None = None) -> float:
    """Patches read per second, in ``order`` (default: the source's), after a few to open and warm up."""
    order = np.arange(len(source)) if order is None else order
    for index in order[:50]:
        source.read(int(index))
    started = time.perf_counter()
    for index in order:
        source.read(int(index))
    return len(order) / (time.perf_counter() - started)


def proc_kib(file: str, field: str) -> int:
    """A memory figure of this process in KiB, from /proc/self/``file``: ``Pss`` (smaps_rollup)
    or ``VmHWM`` (status, the peak resident set since this process started its program)."""
    for line in Path(f"/proc/self/{file}").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise OSError(f"no {field} line in /proc/self/{file}")


def worker_memory(_image: Image.Image) -> torch.Tensor:
    """Which worker read the patch, with its peak RSS (ru_maxrss) and its Pss now (KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return torch.tensor([get_worker_info().id, peak, proc_kib("smaps_rollup", "Pss")])


def memory_of_workers(source: SlideSource, workers: int) -> None:
    """Read every patch of ``source`` in random order with ``workers`` workers; print their peaks.
    The main process's peak is VmHWM: its ru_maxrss would carry the peak of the process that
    launched it (Linux keeps it across exec)."""
    peak_rss, peak_pss = np.zeros(workers, dtype=np.int64), np.zeros(workers, dtype=np.int64)
    loader = DataLoader(source.dataset(worker_memory), batch_size=16, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    for batch in tqdm(loader, desc=f"{workers} workers over {len(source.entries)} slides"):
        for worker, rss, pss in batch.tolist():
            peak_rss[worker], peak_pss[worker] = max(peak_rss[worker], rss), max(peak_pss[worker], pss)
    seconds = time.perf_counter() - started
    print(f"{workers} workers, {len(source.entries)} slides, {len(source)} patches in random order "
          f"({len(source) / seconds:.0f} patches/s in all); each process keeps at most OPEN_SLIDES = {OPEN_SLIDES} "
          f"slides open, {OPEN_SLIDES * (workers + 1)} handles at most across the workers and the main process")
    print(f"  main process: peak RSS {proc_kib('status', 'VmHWM') / 1024:.0f} MiB, Pss "
          f"{proc_kib('smaps_rollup', 'Pss') / 1024:.0f} MiB")
    print(f"  per worker: peak RSS (ru_maxrss) {peak_rss.min() / 1024:.0f}-{peak_rss.max() / 1024:.0f} MiB (sum "
          f"{peak_rss.sum() / 1024:.0f} MiB, pages shared with the main process counted in each); peak Pss "
          f"{peak_pss.min() / 1024:.0f}-{peak_pss.max() / 1024:.0f} MiB (sum {peak_pss.sum() / 1024:.0f} MiB)")


def grid(path: Path, count: int) -> np.ndarray:
    """The first ``count`` corners of a grid of SIZE px patches over the slide at ``path``."""
    with open_slide(path) as slide:
        width, height = slide.dimensions
    corners = [(x, y) for y in range(0, height - SIZE, SIZE) for x in range(0, width - SIZE, SIZE)]
    return np.array(corners[:count], dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the generated slides and files")
    parser.add_argument("--patches", type=int, default=2000, help="patches read each way")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--slides", type=int, default=200)
    parser.add_argument("--per_slide", type=int, default=20, help="patches per slide of the memory measurement")
    parser.add_argument("--memory", action="store_true",
                        help="only part 2, on the slide part 1 wrote (run in a process of its own, so that the "
                             "workers do not inherit the memory that writing the slides took)")
    args = parser.parse_args()
    at_20x = args.work / "cmu_20x.tif"
    if args.memory:
        memory_of_workers(slide_source(at_20x, grid(at_20x, args.per_slide), SIZE, names=args.slides), args.workers)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    region = cmu_region()
    corners = tissue_corners(region, args.patches, SIZE)
    write_pyramid(at_20x, region, mpp=0.5, downsamples=(1, 4, 16), magnification=20, tile=256)
    upsampled = Image.fromarray(region).resize((2 * region.shape[1], 2 * region.shape[0]), Image.LANCZOS)
    at_40x = write_pyramid(args.work / "cmu_40x_only.tif", upsampled, mpp=0.25, downsamples=(1,), magnification=40,
                           tile=256)
    many = slide_source(at_20x, corners[: args.patches // args.slides + 1], SIZE, names=args.slides)
    shuffled = np.random.default_rng(0).permutation(len(many))[: args.patches]  # a shuffled epoch's order
    ways = {
        "slide, 20x level (no resize)": (slide_source(at_20x, corners, SIZE), None),
        "slide, 40x only (448 px read, resized 2x)": (slide_source(at_40x, 2 * corners, 2 * SIZE), None),
        f"slide, 20x, in random order over {args.slides} slides": (many, shuffled),
        "PNG files": (patch_files(args.work / "png", region, corners, "PNG", {}), None),
        "JPEG files (quality 90)": (patch_files(args.work / "jpeg", region, corners, "JPEG", {"quality": 90}), None),
    }
    for way, (source, order) in ways.items():
        print(f"{SIZE} px, one process, {way:<46} {patches_per_second(source, order):7.0f} patches/s", flush=True)
    started = time.perf_counter()
    for x, y in corners[:20]:
        with open_slide(at_20x) as slide:
            slide.read_region((int(x), int(y)), 0, (SIZE, SIZE))
    print(f"opening a slide and reading one patch: {(time.perf_counter() - started) / 20 * 1e3:.1f} ms", flush=True)
    subprocess.run([sys.executable, __file__, "--work", str(args.work), "--workers", str(args.workers), "--slides",
                    str(args.slides), "--per_slide", str(args.per_slide), "--memory"], check=True)


if __name__ == "__main__":
    main()
