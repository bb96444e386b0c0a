"""Regenerate the documentation's pictures from a demo run, on a CPU (two minutes on 2 idle cores).

    python docs/make_figures.py [--out docs/images] [--work DIR]

The pictures are made by clusiam's own commands, run as a user runs them, so that they show
what the commands make today and are never edited by hand:

1. ``python -m clusiam.demo demo``: the demo set.
2. ``python pretrain.py --config configs/demo.yaml demo --save_path runs/demo --probe
   demo/synthetic/patch_labels.csv``: the demo run, probed after every epoch on the demo's
   labelled patches.
3. ``python evaluate_knn.py --checkpoint runs/demo/last.pth`` on the demo's ``knn_train.csv`` /
   ``knn_test.csv``: the KNN report, in ``reports/knn``.
4. ``python -m clusiam.tile`` and ``python -m clusiam.slidemap`` on the CC0 slide region
   ``clusiam/assets/cmu_small_region.svs``: its thumbnail and its map of the run's clusters.

OUT then receives ``cmu_thumbnail.png``, ``cmu_clusters.png``, ``probe_curve.png`` (drawn here
from the run's ``logs/epochs.csv``), ``knn_confusion_matrix.png`` and ``embedding.png``, each
downsized and reduced to 256 colours so that the repository stays small. WORK (a temporary
folder unless ``--work`` is given) is where the commands run, so their relative paths are
the README's; a ``--work`` folder is kept, and running again into it reuses the finished run
(the demo config resumes) and the report's feature cache.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "clusiam" / "assets" / "cmu_small_region.svs"
# The slide is tiled as the demo cuts its patches (64 px at its native 20x), so the map shows
# the clusters of patches like those the demo run trained on.
TILE_MPP, TILE_SIZE = "0.5", "64"
MAP_MPP = "2"  # um/px of the cluster map and of the thumbnail (the tiler's --mask_mpp): 554 x 740 px
MAX_WIDTH = 900  # px: as wide as a page of the docs shows
BUDGET = 150 * 1024  # bytes a picture may take in the repository
LOSSES = ("loss", "invariance", "cluster")


def run(work: Path, *command: str | Path) -> None:
    """Run one of clusiam's commands with this Python in WORK, where the README's relative
    paths (``runs/demo``, ``reports/knn``) then lie, so the pictures name what a user's would."""
    words = [str(word) for word in command]
    print(f"$ cd {work} && python " + " ".join(words), flush=True)
    subprocess.run([sys.executable, *words], cwd=work, check=True)


def demo_run(work: Path) -> Path:
    """The demo set and the demo run, probed after every epoch; returns the run folder."""
    run(work, "-m", "clusiam.demo", "demo")
    run(work, REPO / "pretrain.py", "--config", REPO / "configs" / "demo.yaml", "demo", "--save_path", "runs/demo",
        "--probe", "demo/synthetic/patch_labels.csv")
    return work / "runs" / "demo"


def knn_report(work: Path) -> Path:
    """The KNN report of the demo run's checkpoint on the demo's split; returns the
    checkpoint's folder in it (named by the report's row of that checkpoint)."""
    checkpoint = "runs/demo/last.pth"
    run(work, REPO / "evaluate_knn.py", "--checkpoint", checkpoint, "--train", "demo/synthetic/knn_train.csv",
        "--test", "demo/synthetic/knn_test.csv", "--k", "1", "20", "--out", "reports/knn")
    rows = json.loads((work / "reports" / "knn" / "report.json").read_text())["rows"]
    return work / "reports" / "knn" / next(row["encoder"] for row in rows if row["checkpoint"] == checkpoint)


def slide_pictures(work: Path) -> tuple[Path, Path]:
    """The CC0 slide tiled (coordinates only: the map reads its patches from the slide) and
    coloured by the demo run's clusters; returns the thumbnail and the cluster map."""
    run(work, "-m", "clusiam.tile", SLIDE, "--out", "jobs/cmu", "--mpp", TILE_MPP, "--size", TILE_SIZE,
        "--mask_mpp", MAP_MPP, "--coords_only")
    run(work, "-m", "clusiam.slidemap", "--checkpoint", "runs/demo/last.pth", "--job", "jobs/cmu",
        "--slide", SLIDE.stem, "--out", "maps", "--map_mpp", MAP_MPP)
    return work / "jobs" / "cmu" / "thumbnails" / f"{SLIDE.stem}.png", work / "maps" / f"{SLIDE.stem}_clusters.png"


def plot_probe_curve(epochs_csv: Path, target: Path) -> Path:
    """Probe scores (left) and the training losses (right) per epoch, from ``epochs.csv``;
    epochs without a probe are left out of the scores."""
    with open(epochs_csv) as handle:
        rows = list(csv.DictReader(handle))
    epochs = [int(row["epoch"]) for row in rows]
    scores = [name for name in rows[0] if name.startswith("probe_") and name != "probe_seconds"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4), dpi=100)
    for name in scores:
        probed = [(epoch, float(row[name])) for epoch, row in zip(epochs, rows) if row[name]]
        left.plot(*zip(*probed), marker="o", label=name.removeprefix("probe_"))
    left.set(title="probe on the demo's labelled patches", xlabel="epoch", ylabel="score", ylim=(0, 1))
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    for name in (name for name in LOSSES if name in rows[0]):
        right.plot(epochs, [float(row[name]) for row in rows], marker="o", label=name)
    right.set(title="training loss (epoch mean)", xlabel="epoch")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    for axes in (left, right):
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(target)
    plt.close(figure)
    return target


def save_small(source: Path, target: Path) -> None:
    """``source`` as ``target`` in 256 colours (PNG's palette mode, a third to a tenth of the
    RGB file), at most MAX_WIDTH wide and shrunk further until it fits BUDGET."""
    image = Image.open(source).convert("RGB")
    scale = min(1.0, MAX_WIDTH / image.width)
    while True:
        size = (round(image.width * scale), round(image.height * scale))
        small = image.resize(size, Image.LANCZOS) if scale < 1 else image
        small.quantize(256, method=Image.Quantize.FASTOCTREE).save(target, optimize=True)
        if target.stat().st_size <= BUDGET:
            break
        scale *= 0.9
    print(f"wrote {target}: {size[0]} x {size[1]} px, {target.stat().st_size / 1024:.0f} KiB")


def make_figures(out: Path, work: Path) -> None:
    """Run the commands in WORK and write the pictures into OUT."""
    started = time.perf_counter()
    run_folder = demo_run(work)
    report = knn_report(work)
    thumbnail, clusters = slide_pictures(work)
    out.mkdir(parents=True, exist_ok=True)
    curve = plot_probe_curve(run_folder / "logs" / "epochs.csv", work / "probe_curve.png")
    for source, name in ((thumbnail, "cmu_thumbnail.png"), (clusters, "cmu_clusters.png"), (curve, "probe_curve.png"),
                         (report / "confusion_matrix.png", "knn_confusion_matrix.png"),
                         (report / "embedding.png", "embedding.png")):
        save_small(source, out / name)
    print(f"done in {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="where the pictures go")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the run, the reports and the job here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        make_figures(args.out.resolve(), args.work.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="clusiam_figures_") as work:
            make_figures(args.out.resolve(), Path(work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
