"""Time from ``python pretrain.py`` to its first training step, for a folder of patch files and
for a tiling job whose patches are read from slides, on a first run, a restart and a resume.

    python benchmarks/startup.py --work /tmp/startup listing --patches 100000
    python benchmarks/startup.py --work /tmp/startup statistics --patches 100000
    python benchmarks/startup.py --work /tmp/startup folder --patches 100000
    python benchmarks/startup.py --work /tmp/startup job --patches 1000000 --slides 200
    python benchmarks/startup.py --work /tmp/startup cohort --slides 2000 --per_slide 5000

listing: the old listing (``Path.rglob`` and ``is_file``) against :func:`clusiam.files.find_files`
(``os.scandir``), and the file-list key, on the generated folder (warm page cache, best of 3).

statistics: the folder's channel statistics from their seeded sample and from every patch.

folder, job: the data is generated under --work once (real H&E cut from the CC0 slide at 20x;
a job's slides are links to one generated pyramidal TIFF, each with coordinate files of its
own), then ``pretrain.py`` runs three times in one --save_path, each stopped at its first step:

1. first: nothing cached;
2. restart: a new run in the same folder, its caches (check verdicts, statistics) there;
3. resume: ``--resume auto`` from a last.pth (trained for one epoch on a few patches with the
   same options: which patches it saw does not change what a resume does before its first step).

cohort: ``--coords --slides`` over links to one scanner-size slide (benchmarks/scanner_slides.py,
100,000 x 200,000 px, levels every --step x), each with TRIDENT coordinates of its own
(--per_slide patches of 224 px at 20x drawn from the tissue grid); runs: first (the user
cache, CLUSIAM_CACHE under --work, emptied), new (another --save_path), resume.

Each run prints when its output first shows each phase, in seconds since launch (``python``'s
own start and imports included). The training options (--train_args) keep the step itself
small on a CPU: the point is what comes before it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from clusiam.coords import coordinate_attributes
from clusiam.demo import CMU_SLIDE
from clusiam.files import file_list_key, find_files
from clusiam.images import IMAGE_EXTENSIONS
from clusiam.slide_source import SlideSource, folder_pairs
from clusiam.slides import PatchReader, open_slide
from clusiam.sources import STATISTICS_SAMPLE, FolderSource, PatchSource, channel_statistics

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))  # write_pyramid: the tests' generated scanner file
from conftest import write_pyramid  # noqa: E402

sys.path.insert(0, str(REPOSITORY / "benchmarks"))
from scanner_slides import tissue_grid, write_scanner_slide, write_trident_coords  # noqa: E402

TRAIN_ARGS = "--device cpu --image_size 64 --batch_size 64 --num_worker 2 --num_clusters 10 --print_freq 1"
# The first time each phase shows in a run's output (stdout and tqdm's stderr, merged).
PHASES = {
    "checking": re.compile(r"checking (images|slides)|reusing the check|reading coordinates"),
    "statistics": re.compile(r"channel statistics"),
    "set up": re.compile(r" on \S+: \d+ images, \d+ steps/epoch"),
    "first step": re.compile(r"epoch \d+/\d+:\s*\d+%\|[^|]*\|\s*[1-9]\d*/\d+"),
}
COHORT_PATCH_PX = 224  # a cohort's patches: 224 px at 20x, TRIDENT's default
PATCHES_PER_SLIDE = 500  # of a generated patch folder: root/<class>/<slide>/<patch>.png, the authors' layout


def cmu_region() -> np.ndarray:
    """The whole CC0 slide (2220 x 2967 px of H&E at 20x, 0.499 um/px) as (H, W, 3) uint8."""
    with open_slide(CMU_SLIDE) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def tissue_corners(region: np.ndarray, count: int, side: int, seed: int = 0) -> np.ndarray:
    """``count`` random (x, y) corners of ``side`` px squares at least half tissue (stained
    tissue is saturated, glass is not), as (count, 2) int64."""
    tissue = (region.max(-1).astype(np.int16) - region.min(-1)) > 25
    table = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table: any square's tissue at once
    rng = np.random.default_rng(seed)
    kept = np.empty((0, 2), dtype=np.int64)
    while len(kept) < count:
        x = rng.integers(0, region.shape[1] - side, 2 * count)
        y = rng.integers(0, region.shape[0] - side, 2 * count)
        area = table[y + side, x + side] - table[y, x + side] - table[y + side, x] + table[y, x]
        kept = np.concatenate([kept, np.stack([x, y], 1)[area >= side * side / 2]])
    return kept[:count]


def made_before(folder: Path, spec: dict) -> bool:
    """Whether ``folder`` already holds the data ``spec`` describes (its made.json); generated data is reused."""
    record = folder / "made.json"
    return record.is_file() and json.loads(record.read_text()) == spec


def make_patch_folder(folder: Path, count: int, size: int) -> Path:
    """``count`` PNG patches of ``size`` px, in slides of PATCHES_PER_SLIDE patches under two classes."""
    spec = {"patches": count, "size": size}
    if made_before(folder, spec):
        return folder
    region = cmu_region()
    for index, (x, y) in enumerate(tqdm(tissue_corners(region, count, size), desc="writing patches")):
        slide = index // PATCHES_PER_SLIDE
        path = folder / ("tumor" if slide % 2 else "normal") / f"slide_{slide:04d}" / f"{index:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(region[y : y + size, x : x + size]).save(path)
    (folder / "made.json").write_text(json.dumps(spec))
    return folder


def make_job(folder: Path, count: int, slides: int, size: int) -> Path:
    """A tiling job (job.json, coords/<slide>.h5) of ``slides`` slides with ``count`` patches
    of ``size`` px at 20x in all; every slide is a link to one pyramidal TIFF of the CC0
    slide (20x, 0.5 um/px, levels 1, 4 and 16, 256 px JPEG tiles)."""
    spec = {"patches": count, "slides": slides, "size": size}
    if made_before(folder, spec):
        return folder
    region = cmu_region()
    (folder / "slides").mkdir(parents=True, exist_ok=True)
    (folder / "coords").mkdir(exist_ok=True)
    base = write_pyramid(folder / "slides" / "base.tif", region, mpp=0.5, downsamples=(1, 4, 16), magnification=20,
                         tile=256)
    with open_slide(base) as slide:
        reader = PatchReader.for_slide(slide, size, size)
        width, height = slide.dimensions
    paths = {}
    for index, corners in enumerate(tqdm(np.array_split(tissue_corners(region, count, size), slides),
                                         desc="writing coordinates")):
        name = f"slide_{index:04d}"
        paths[name] = folder / "slides" / f"{name}.tif"
        paths[name].unlink(missing_ok=True)
        paths[name].symlink_to(base.name)
        with h5py.File(folder / "coords" / f"{name}.h5", "w") as handle:
            handle.create_dataset("coords", data=corners).attrs.update(coordinate_attributes(
                name=name, reader=reader, downsample=1.0, width=width, height=height, level0_mpp=0.5,
                magnification=20, overlap_px=0, savetodir=folder / "coords"))
    (folder / "job.json").write_text(json.dumps({"slides": {name: str(path) for name, path in paths.items()}}))
    (folder / "made.json").write_text(json.dumps(spec))
    return folder


def time_to_first_step(arguments: list[str], log: Path, limit: float) -> dict[str, float]:
    """Run ``pretrain.py arguments`` until its first training step; return the seconds from
    launch at which each phase of PHASES first showed. The run (its whole process group,
    DataLoader workers included) is stopped there; its output goes to ``log``, each line
    (and progress bar update) after the second it arrived."""
    command = [sys.executable, str(REPOSITORY / "pretrain.py"), *arguments]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPOSITORY,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    seen: dict[str, float] = {}
    pending = b""
    with open(log, "wb") as record:
        record.write(f"$ {shlex.join(command)}\n".encode())
        while "first step" not in seen and time.perf_counter() - started < limit:
            chunk = process.stdout.read1(65536)
            if not chunk:
                break
            arrived = time.perf_counter() - started
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for line in filter(None, lines):
                text = line.decode(errors="replace")
                record.write(f"{arrived:7.2f} {text}\n".encode())
                for phase, pattern in PHASES.items():
                    if phase not in seen and pattern.search(text):
                        seen[phase] = arrived
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    process.wait()
    if "first step" not in seen:
        raise SystemExit(f"no first step within {limit:g} s (exit status {process.returncode}); see {log}")
    return seen


def checkpoint_for_resume(data: list[str], save_path: Path, train_args: list[str], limit: float) -> Path:
    """A last.pth of one short epoch on ``data`` (pretrain.py's data arguments) with ``train_args``,
    the checkpoint a resume continues."""
    last = save_path / "last.pth"
    if not last.is_file():
        command = [sys.executable, str(REPOSITORY / "pretrain.py"), *data, "--save_path", str(save_path),
                   "--epochs", "1", *train_args]
        subprocess.run(command, cwd=REPOSITORY, check=True, timeout=limit, stdout=subprocess.DEVNULL)
    return last


def three_starts(name: str, data: list[str], warm_data: list[str], args: argparse.Namespace,
                 second: str = "restart") -> None:
    """First run, a second new run and a resume on ``data`` (pretrain.py's data arguments),
    each timed to its first step; the resume's checkpoint is trained on ``warm_data``. The
    second run is in the first one's --save_path ("restart") or in another ("new"); the user
    cache (CLUSIAM_CACHE) is a folder under --work, emptied before the first run."""
    train_args = shlex.split(args.train_args)
    save_path = args.work / "runs" / name.replace(" ", "_")
    cache = args.work / "cache"
    os.environ["CLUSIAM_CACHE"] = str(cache)
    for folder in (save_path, save_path.with_name(f"{save_path.name}-new"), cache):
        shutil.rmtree(folder, ignore_errors=True)
    donor = checkpoint_for_resume(warm_data, save_path.with_name(f"{save_path.name}-donor"), train_args, args.limit)
    runs = {"first": (save_path, []), second: (save_path.with_name(f"{save_path.name}-new") if second == "new"
                                               else save_path, []),
            "resume": (save_path, ["--resume", "auto", "--epochs", "2"])}
    for run, (folder, extra) in runs.items():
        if run == "resume":
            shutil.copyfile(donor, folder / "last.pth")
        seen = time_to_first_step([*data, "--save_path", str(folder), "--epochs", "1", *train_args, *extra],
                                  args.work / f"{save_path.name}-{run}.log", args.limit)
        phases = "  ".join(f"{phase} {seconds:6.1f}" for phase, seconds in seen.items())
        print(f"{name:<28} {run:<8} first step at {seen['first step']:6.1f} s   ({phases})", flush=True)


def best_of(action, repeats: int = 3) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return min(timings)


def rglob_listing(root: Path) -> list[Path]:
    """How find_files listed before: Path.rglob, and a stat per path for is_file."""
    return sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())


def resolving_key(files: list[Path]) -> None:
    """What file_list_key cost before: every path resolved (links and all)."""
    for path in files:
        path.stat()
        path.resolve()


def listing(args: argparse.Namespace) -> None:
    """The folder listed, and its file-list key taken, the old way and the present one."""
    root = make_patch_folder(args.work / f"patches_{args.patches}", args.patches, args.patch_px)
    files = find_files(root, IMAGE_EXTENSIONS, "images", "", "")
    assert rglob_listing(root) == files, "the two listings differ"
    timings = {
        "Path.rglob + is_file (before)": best_of(lambda: rglob_listing(root)),
        "os.scandir (find_files)": best_of(lambda: find_files(root, IMAGE_EXTENSIONS, "images", "", "")),
        "file-list key, paths resolved (before)": best_of(lambda: resolving_key(files)),
        "file-list key, paths made absolute (file_list_key)": best_of(lambda: file_list_key(files)),
    }
    for what, seconds in timings.items():
        print(f"{len(files)} files: {what:<52} {seconds:6.2f} s")


def statistics(args: argparse.Namespace) -> None:
    """The channel statistics of the folder from their seeded sample and from every patch, and the time of each."""
    root = make_patch_folder(args.work / f"patches_{args.patches}", args.patches, args.patch_px)
    source = FolderSource(find_files(root, IMAGE_EXTENSIONS, "images", "", ""))
    for size in (min(STATISTICS_SAMPLE, len(source)), len(source)):
        started = time.perf_counter()
        statistics = channel_statistics(source, num_workers=2, sample_size=size)
        print(f"{size} of {len(source)} patches, 2 workers: {statistics} in {time.perf_counter() - started:.1f} s")


def folder(args: argparse.Namespace) -> None:
    data = make_patch_folder(args.work / f"patches_{args.patches}", args.patches, args.patch_px)
    warm = make_patch_folder(args.work / "patches_128", 128, args.patch_px)
    three_starts(f"folder of {args.patches}", [str(data)], [str(warm)], args)


def job(args: argparse.Namespace) -> None:
    data = make_job(args.work / f"job_{args.patches}_{args.slides}", args.patches, args.slides, args.patch_px)
    warm = make_job(args.work / "job_128_2", 128, 2, args.patch_px)
    three_starts(f"job of {args.patches} on {args.slides} slides", [str(data)], [str(warm)], args)


def make_cohort(folder: Path, slides: int, per_slide: int, step: int) -> tuple[Path, Path]:
    """(coords folder, slides folder): ``slides`` links to one scanner-size slide with levels
    every ``step``x, each with ``per_slide`` patches of the tissue grid (a seeded draw per slide)."""
    spec = {"slides": slides, "per_slide": per_slide, "step": step}
    coords_dir, slides_dir = folder / "coords", folder / "slides"
    if made_before(folder, spec):
        return coords_dir, slides_dir
    scan = write_scanner_slide(folder.parent / f"scan_{step}x.tif", step)
    grid = tissue_grid(scan, COHORT_PATCH_PX, 20)
    shutil.rmtree(folder, ignore_errors=True)
    slides_dir.mkdir(parents=True)
    for index in tqdm(range(slides), desc="writing the cohort"):
        name = f"slide_{index:05d}"
        (slides_dir / f"{name}.tif").symlink_to(scan)
        chosen = np.sort(np.random.default_rng(index).choice(len(grid), min(per_slide, len(grid)), replace=False))
        write_trident_coords(coords_dir / f"{name}_patches.h5", grid[chosen], name, COHORT_PATCH_PX, 20)
    (folder / "made.json").write_text(json.dumps(spec))
    return coords_dir, slides_dir


def cohort(args: argparse.Namespace) -> None:
    coords, slides = make_cohort(args.work / f"cohort_{args.step}x_{args.slides}_{args.per_slide}", args.slides,
                                 args.per_slide, args.step)
    warm_coords, warm_slides = make_cohort(args.work / f"cohort_{args.step}x_2_64", 2, 64, args.step)
    three_starts(f"cohort of {args.slides} slides x {args.per_slide} ({args.step}x)",
                 ["--coords", str(coords), "--slides", str(slides)],
                 ["--coords", str(warm_coords), "--slides", str(warm_slides)], args, second="new")
    if args.compare_statistics:
        compare_statistics(coords, slides)


class UniformlySampled(SlideSource):
    """A slide source whose statistics read a uniform sample of patches, as before slides were drawn."""

    statistics_patches = STATISTICS_SAMPLE
    statistics_sample = PatchSource.statistics_sample
    sample_groups = PatchSource.sample_groups


def compare_statistics(coords: Path, slides: Path) -> None:
    """The cohort's channel statistics from slides drawn (pretraining's sample) and from a
    uniform sample of 20,000 patches, each with its time (2 workers) and standard error."""
    source, _ = SlideSource.checked(folder_pairs(coords, slides), defer=True)
    for name, sampled in (("64 slides x 64 patches", source), ("uniform 20,000", UniformlySampled(source.entries))):
        started = time.perf_counter()
        statistics = channel_statistics(sampled, num_workers=2)
        print(f"statistics, {name}: {statistics} in {time.perf_counter() - started:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the generated data, runs and logs")
    parser.add_argument("--train_args", default=TRAIN_ARGS, help="pretrain.py options of every run")
    parser.add_argument("--limit", type=float, default=900, help="seconds a run may take to its first step")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, action, patches, size in (("listing", listing, 100_000, 64), ("statistics", statistics, 100_000, 64),
                                        ("folder", folder, 100_000, 64), ("job", job, 1_000_000, 224)):
        command = commands.add_parser(name)
        command.add_argument("--patches", type=int, default=patches)
        command.add_argument("--patch_px", type=int, default=size, help="patch side in pixels")
        command.set_defaults(action=action)
        if name == "job":
            command.add_argument("--slides", type=int, default=200)
    command = commands.add_parser("cohort")
    command.add_argument("--slides", type=int, default=2000)
    command.add_argument("--per_slide", type=int, default=5000, help="patches per slide")
    command.add_argument("--step", type=int, default=2, choices=(2, 4), help="the pyramid's step between levels")
    command.add_argument("--compare_statistics", action="store_true",
                         help="then the statistics of pretraining's sample against a uniform one")
    command.set_defaults(action=cohort)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.action(args)


if __name__ == "__main__":
    main()
