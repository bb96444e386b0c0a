"""How fast DataLoader workers feed pretraining from scanner-size slides, in slide order and in
the training's order, and what each worker holds in memory.

    python benchmarks/read_rate.py --work /tmp/read_rate [--slides 270] [--workers 2] [--batch_size 512]

Two generated pyramidal TIFFs the size of a Camelyon16 scan (benchmarks/scanner_slides.py:
100,000 x 200,000 px at 0.25 um/px, 256 px JPEG tiles, 15 % tissue), one with a level every
2x (a 20x level to read from) and one every 4x (Aperio's 40x, 10x, 2.5x: 20x patches are read
as 448 px at 40x), each behind ``--slides`` links with TRIDENT's coordinate files of 224 px
patches at 20x (``<slide>_patches.h5``, about 15,000 patches per slide, the grid running past
the slide's right and bottom edges as TRIDENT's does). For each pyramid:

- the cost of opening a slide and reading its first patch;
- patches/s per worker with ``--workers`` workers and global batches of ``--batch_size``,
  read the way pretraining's loader reads them (``clusiam.train.part_loader`` over the
  batched views' dataset: patches as stored, stacked by size, a worker's patches of one
  slide read together), in slide order (slide after slide, each in its file's order: a
  part's neighbouring patches share tiles, each decoded once), in slide order one patch at
  a time (no tile shared), and in the training's order (``clusiam.order``: a part's patches
  of a slide lie anywhere in it, so they share almost no tile);
- each worker's peak Pss (shared pages split among their sharers, so the figures add up);
- the distinct slides in each global batch (fewest and mean).

``--ablations`` adds the training order read the ways this project read slides before: a
uniform shuffle over all patches, tiffslide's ``read_region`` instead of the tile reader,
and the 40x read resized on the CPU (Lanczos) instead of on the training device.

``--s3 N`` adds the training order over N copies of a small slide (8,192 x 16,384 px, levels
every 2x, 7 MB) from an S3 server this script starts on 127.0.0.1 (moto's, in this process)
beside the same files on the local disk. Small, because moto reads an object whole for every
range request (about 7 ms for a 2 MB object, 80 ms for 110 MB, measured here): what this
measures is the reading code and moto, not a cloud's network.

The files sit in the page cache (warm reads), as on a machine that has read them once.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import numpy as np
import torch
from torch.utils.data import Dataset

from clusiam import slides as slide_module
from clusiam.augment import stack_by_size
from clusiam.images import uint8_tensor
from clusiam.order import EpochOrder
from clusiam.slide_source import SlideSource, folder_pairs
from clusiam.slides import SlideLevel, open_level, open_slide
from clusiam.train import part_loader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scanner_slides import tissue_grid, write_scanner_slide, write_trident_coords  # noqa: E402

PATCH_PX, MAGNIFICATION = 224, 20
SMALL = (8192, 16384)  # the slides of --s3 (width, height)


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


def opening_cost(source: SlideSource, count: int = 20) -> tuple[float, float, float]:
    """Milliseconds to open a slide and read its first patch, and MiB of resident memory an open
    slide holds once a patch is read: with the tile reader, and as tiffslide's handle
    (``count`` slides each, kept open while counted)."""
    def opened(open_one) -> tuple[float, float]:
        before, started = rss_kib(), time.perf_counter()
        handles = []
        for entry in source.entries[:count]:
            handles.append(open_one(entry))
            x, y = entry.coords[0]
            handles[-1].region(int(x), int(y), entry.reader.read_size)
        seconds, grown = time.perf_counter() - started, rss_kib() - before
        for handle in handles:
            handle.close()
        return seconds / count * 1e3, grown / count / 1024

    milliseconds, tiles = opened(lambda entry: open_level(entry.path, entry.reader.level))
    _, tiffslide = opened(lambda entry: SlideLevel(open_slide(entry.path), entry.reader.level))
    return milliseconds, tiles, tiffslide


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def slide_order(count: int, batch_size: int, workers: int) -> Iterator[list[int]]:
    """The first ``count`` patches in the source's own order (slide after slide), cut like a step's parts."""
    for start in range(0, count - batch_size + 1, batch_size):
        yield from (part.tolist() for part in np.array_split(np.arange(start, start + batch_size), max(1, workers)))


@contextmanager
def tiffslide_reads() -> Iterator[None]:
    """Every level read through tiffslide's read_region (clusiam.slides.SlideLevel), as before the tile reader."""
    tiles = slide_module.LevelTiles.of
    slide_module.LevelTiles.of = classmethod(lambda cls, slide, level, path: None)
    try:
        yield
    finally:
        slide_module.LevelTiles.of = tiles


class OneByOne(Dataset):
    """A dataset read one item at a time, as PyTorch reads a dataset without ``__getitems__``:
    each patch's tiles read and decoded for it alone."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]


def measure(source: SlideSource, parts, args: argparse.Namespace, cpu_resize: bool = False,
            together: bool = True) -> dict:
    """Per-worker patches/s over ``args.batches`` steps, or as many as the source holds (after two
    to start the workers), and peak Pss per worker. ``together``: a worker reads its part's
    patches of a slide together (each tile decoded once), else one by one."""
    dataset = (source.dataset(uint8_tensor) if cpu_resize else
               source.dataset(torch.from_numpy, as_stored=True))
    dataset = dataset if together else OneByOne(dataset)
    loader = iter(part_loader(dataset, parts, None if cpu_resize else stack_by_size, args.workers,
                              pin_memory=False, seed=0))
    per_step = max(1, args.workers)
    steps = min(args.batches, len(source) // args.batch_size - 2)
    for _ in range(2 * per_step):
        next(loader)
    peak: dict[int, int] = {}
    started = time.perf_counter()
    for _ in range(steps * per_step):
        next(loader)
        for child in multiprocessing.active_children():
            peak[child.pid] = max(peak.get(child.pid, 0), pss_kib(child.pid))
    seconds = time.perf_counter() - started
    del loader
    return {"rate": steps * args.batch_size / seconds / max(1, args.workers),
            "pss": ", ".join(f"{value / 1024:.0f}" for value in peak.values())}


def slides_per_batch(source: SlideSource, order: EpochOrder, steps: int) -> tuple[int, float]:
    ends = np.cumsum(source.slide_sizes())
    counts = [len(np.unique(np.searchsorted(ends, batch, side="right")))
              for _, batch in zip(range(steps), order.global_batches(0))]
    return min(counts), float(np.mean(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the generated slides and coordinates")
    parser.add_argument("--slides", type=int, default=270)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=8, help="steps timed each way")
    parser.add_argument("--ablations", action="store_true", help="also the ways slides were read before")
    parser.add_argument("--s3", type=int, default=0, metavar="N",
                        help="also N slides read from a local S3 server (moto's) and from local files")
    parser.add_argument("--pyramids", type=int, nargs="*", default=[2, 4], help="level steps of the scanner slides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.s3:
        report(s3_rates(args), args)
    for step in args.pyramids:
        coords_dir, slides_dir = cohort(args.work, step, args.slides)
        source, _ = SlideSource.checked(folder_pairs(coords_dir, slides_dir))
        entry = source.entries[0]
        milliseconds, tiles, tiffslide = opening_cost(source)
        print(f"levels every {step}x: {len(source.entries)} slides, {len(source)} patches; read at level "
              f"{entry.reader.level} as {entry.reader.read_size} px for {entry.reader.size} px patches; opening a "
              f"slide and reading a patch: {milliseconds:.1f} ms; an open slide holds {tiles:.1f} MiB (through "
              f"tiffslide: {tiffslide:.1f} MiB)", flush=True)
        training = EpochOrder.of_slides(source.slide_sizes(), args.batch_size, seed=0)
        fewest, mean = slides_per_batch(source, training, args.batches + 2)
        print(f"  distinct slides per batch in the training order: fewest {fewest}, mean {mean:.1f}", flush=True)
        report(measured_ways(source, training, args), args)


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    for way, result in results.items():
        print(f"  {way:<36} {result['rate']:6.0f} patches/s per worker ({args.workers} workers); peak Pss per "
              f"worker {result['pss']} MiB", flush=True)


def s3_rates(args: argparse.Namespace) -> dict[str, dict]:
    """The training order over ``args.s3`` copies of a small slide, from local files and from a local S3 server."""
    from moto.server import ThreadedMotoServer  # moto[server], with the test extras

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="benchmark", AWS_SECRET_ACCESS_KEY="benchmark", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    width, height = SMALL
    scan = write_scanner_slide(args.work / "scan_small_2x.tif", 2, width=width, height=height)
    coords = tissue_grid(scan, PATCH_PX, MAGNIFICATION)
    local = args.work / "s3_local"
    s3 = fsspec.filesystem("s3")
    s3.mkdir("benchmark")
    for index in range(args.s3):
        name = f"slide_{index:02d}"
        write_trident_coords(local / "coords" / f"{name}_patches.h5", coords, name, PATCH_PX, MAGNIFICATION,
                             width=width, height=height)
        s3.put(str(scan), f"benchmark/slides/{name}.tif")
    s3.put(str(local / "coords"), "benchmark/coords", recursive=True)
    (local / "slides").mkdir(exist_ok=True)
    for index in range(args.s3):
        link = local / "slides" / f"slide_{index:02d}.tif"
        if not link.is_symlink():
            link.symlink_to(scan)
    results = {}
    for where, (coords_dir, slides_dir) in {"local files": (local / "coords", local / "slides"),
                                            f"S3 server on {host}": ("s3://benchmark/coords",
                                                                     "s3://benchmark/slides")}.items():
        source, _ = SlideSource.checked(folder_pairs(coords_dir, slides_dir))
        order = EpochOrder.of_slides(source.slide_sizes(), args.batch_size, seed=0)
        results[f"training order, {args.s3} slides, {where}"] = measure(source, order.parts(0, 0, 1, args.workers),
                                                                        args)
    server.stop()
    return results


def measured_ways(source: SlideSource, training: EpochOrder, args: argparse.Namespace) -> dict[str, dict]:
    """Each way of reading measured, by name (see the module's docstring)."""
    def epoch_of(order: EpochOrder, cpu_resize: bool = False) -> dict:  # epoch 0 of one process
        return measure(source, order.parts(0, 0, 1, args.workers), args, cpu_resize)

    in_slide_order = list(slide_order(len(source), args.batch_size, args.workers))
    results = {"slide order": measure(source, in_slide_order, args),
               "slide order, one patch at a time": measure(source, in_slide_order, args, together=False),
               "training order": epoch_of(training)}
    if args.ablations:
        results["uniform shuffle (before)"] = epoch_of(EpochOrder.shuffled(len(source), args.batch_size, seed=0))
        with tiffslide_reads():
            results["training order, tiffslide reads"] = epoch_of(training)
        if source.entries[0].reader.read_size != source.patch_size:
            results["training order, resized on the CPU"] = epoch_of(training, cpu_resize=True)
    return results


if __name__ == "__main__":
    main()
