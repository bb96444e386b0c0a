"""How long ``python -m clusiam.tile`` takes, and how much memory it holds, on scanner-size
slides: one slide of each pyramid, then a cohort of links to them.

    python benchmarks/tile_cohort.py --work /tmp/tile_cohort [--slides 400] [--workers 1 2 0] [--single_only]

The slides are generated pyramidal TIFFs the size of a Camelyon16 scan
(benchmarks/scanner_slides.py: 100,000 x 200,000 px at 0.25 um/px, 256 px JPEG tiles, 15 %
tissue), one with a level every 2x (Camelyon16's TIFFs) and one every 4x (Aperio's 40x, 10x,
2.5x, ...), each with two tissue layouts (seeds 0 and 1). Every run tiles at 20x into 224 px
patches with ``--coords_only``, the files in the page cache (warm reads):

- one slide of each pyramid (seed 0) with ``--workers 1``: wall time of the command, its
  peak RSS, the slide's own seconds and patches (``tiles.csv``);
- ``--slides`` links to the four files (a cohort) with each of ``--workers`` (0: the tiler's
  default), each into a new job: wall time, the peak RSS of one process (main or worker) and
  the peak of all of them together (sampled every 0.1 s), and the slides per second;
- the last cohort job run again (every slide skipped), and a job killed (SIGKILL) half-way
  and run again (it tiles only the slides it had not finished).
"""
from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scanner_slides import write_scanner_slide  # noqa: E402

OPTIONS = ["--mpp", "0.5", "--size", "224", "--coords_only"]
SEEDS = (0, 1)


def tree_rss_kib(pid: int) -> int:
    """The summed RSS in KiB of process ``pid`` and its descendants (the tiler, the pool's workers)."""
    rss = []
    for candidate in descendants(pid):
        try:
            for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss.append(int(line.split()[1]))
        except OSError:  # it ended between the listing and the read
            pass
    return sum(rss)


def descendants(pid: int) -> list[int]:
    try:
        children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return [pid]
    return [pid, *(grandchild for child in children for grandchild in descendants(child))]


def run_tiler(slides: Path, job: Path, workers: int | None, kill_after: int | None = None) -> dict:
    """Run the tiler on ``slides`` into ``job``; its wall time, the peak RSS of its largest
    process (main or worker: GNU time's, which the kernel gives for what it waited for), of all
    its processes together (sampled), and its console. ``kill_after``: SIGKILL the whole run
    once that many slides are in ``job/coords``."""
    command = ["/usr/bin/time", "-f", "peak_rss_kib=%M", sys.executable, "-m", "clusiam.tile", str(slides),
               "--out", str(job), *OPTIONS]
    command += [] if workers is None else ["--workers", str(workers)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    output = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout))  # a full pipe would stall the run
    reader.start()
    summed = 0
    while process.poll() is None:
        summed = max(summed, tree_rss_kib(process.pid))
        if kill_after is not None and len(list((job / "coords").glob("*.h5"))) >= kill_after:
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    reader.join()
    text = "".join(output)
    peaks = [int(line.split("=")[1]) for line in text.splitlines() if line.startswith("peak_rss_kib=")]
    largest = peaks[0] if peaks else 0  # none when killed
    return {"seconds": seconds, "largest_mib": largest / 1024, "summed_mib": max(summed, largest) / 1024,
            "rc": process.returncode, "output": text}


def slide_rows(job: Path) -> dict[str, dict]:
    with open(job / "tiles.csv", newline="") as handle:
        return {row["slide"]: row for row in csv.DictReader(handle)}


def single_slides(work: Path) -> None:
    print("| pyramid | command wall s | slide s (tiles.csv) | peak RSS MiB | patches | threshold |")
    print("|---|---|---|---|---|---|")
    for step in (2, 4):
        scan = write_scanner_slide(work / f"scan_{step}x.tif", step)
        job = work / f"single_{step}x"
        remove_job(job)
        result = run_tiler(scan, job, 1)
        assert result["rc"] == 0, result["output"]
        row = slide_rows(job)[scan.stem]
        print(f"| {step}x | {result['seconds']:.2f} | {row['seconds']} | {result['largest_mib']:.0f} | "
              f"{row['tiles']} | {row['otsu_threshold']} |", flush=True)


def remove_job(job: Path) -> None:
    import shutil

    shutil.rmtree(job, ignore_errors=True)


def cohort_folder(work: Path, slides: int) -> Path:
    """``slides`` links, in turn to each of the four generated files."""
    scans = [write_scanner_slide(work / f"scan_{step}x{'' if seed == 0 else f'_{seed}'}.tif", step, seed=seed)
             for seed in SEEDS for step in (2, 4)]
    folder = work / f"cohort_{slides}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(slides):
        link = folder / f"slide_{index:04d}.tif"
        if not link.is_symlink():
            link.symlink_to(scans[index % len(scans)])
    return folder


def cohort(work: Path, slides: int, workers: list[int]) -> None:
    folder = cohort_folder(work, slides)
    print(f"\n| {slides} slides | wall s | slides tiled/s | peak RSS, one process MiB | peak RSS, all MiB | console |")
    print("|---|---|---|---|---|---|")
    job = work / "job"
    for count in workers:
        remove_job(job)
        result = run_tiler(folder, job, count or None)
        report(f"--workers {count or 'default'}", result, slides)
    report("run again (all skipped)", run_tiler(folder, job, None), 0)
    remove_job(job)
    killed = run_tiler(folder, job, None, kill_after=slides // 2)
    finished = len(list((job / "coords").glob("*.h5")))
    report(f"killed after {finished} slides", killed, finished)
    report("resumed", run_tiler(folder, job, None), slides - finished)
    assert len(slide_rows(job)) == slides


def report(what: str, result: dict, tiled: int) -> None:
    """A row of the cohort's table: ``tiled``, the slides the run tiled (not skipped)."""
    lines = [line.strip() for line in result["output"].replace("\r", "\n").splitlines() if line.strip()]
    console = " / ".join(line for line in lines if not line.startswith(("slides:", "peak_rss_kib=")))
    print(f"| {what} | {result['seconds']:.1f} | {tiled / result['seconds']:.2f} | {result['largest_mib']:.0f} | "
          f"{result['summed_mib']:.0f} | {console[-300:]} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the generated slides and the jobs")
    parser.add_argument("--slides", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 0], help="0: the tiler's default")
    parser.add_argument("--single_only", action="store_true", help="only the one-slide rows")
    args = parser.parse_args()
    single_slides(args.work)
    if not args.single_only:
        cohort(args.work, args.slides, args.workers)


if __name__ == "__main__":
    main()
