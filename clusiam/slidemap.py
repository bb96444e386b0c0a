r"""Pictures of a slide: every tile coloured by its cluster (the assigner's argmax), or by a
per-tile score such as DSMIL attention, over the slide's thumbnail, with annotation
contours on top.

    python -m clusiam.slidemap --checkpoint runs/clusiam/last.pth --job JOB --slide S --out maps/
    python -m clusiam.slidemap --scores reports/mil/attention/seed0_fold0.h5 --job JOB --slide S --out maps/

The tiles are those of a tiling job (``python -m clusiam.tile SLIDES --out JOB``): its
``coords/<slide>.h5``. A cluster map reads each patch from the slide, so a job tiled with
``--coords_only`` draws one as well as a job with patch files. Scores are read from a CSV
with columns x, y, score (level-0 pixels) or from a ``mil.train`` attention file; tiles
without a score are counted and drawn grey.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import h5py
import matplotlib
import numpy as np
from PIL import Image, ImageDraw
from torch import nn

from clusiam.checkpoint import load_pretrained
from clusiam.distributed import DEVICE_HELP, resolve_device
from clusiam.errors import CommandParser, DataError, UserError, run_command
from clusiam.features import cluster_head, encode
from clusiam.files import check_output_folder, make_folder
from clusiam.slide_source import SlideSource, job_pairs
from clusiam.slides import open_slide
from clusiam.sources import PatchSource
from clusiam.tables import read_csv_rows, write_csv
from clusiam.tile import annotation_file, polygon_outlines, read_annotations, slide_thumbnail

TILE_ALPHA = 0.55
UNSCORED = np.array([128, 128, 128], dtype=np.uint8)  # grey: a tile the scores file does not mention


def cluster_palette(num_clusters: int) -> np.ndarray:
    """(K, 3) uint8 colours: matplotlib's 60 qualitative colours, cycled."""
    colours = np.concatenate([matplotlib.colormaps[name].colors for name in ("tab20", "tab20b", "tab20c")])
    return (np.asarray(colours)[np.arange(num_clusters) % len(colours)] * 255).astype(np.uint8)


def job_slide(job: Path, slide: str) -> tuple[Path, Path]:
    """The slide file and coordinate file of ``slide`` in a tiling job. ``slide`` is its name
    in the job or a slide file of that name (read instead of the one the job records, which
    may have moved since)."""
    pairs = {coords.stem: (slide_path, coords) for slide_path, coords in job_pairs(job)}
    name = slide if slide in pairs else Path(slide).stem
    if name not in pairs:
        raise DataError(f"the tiling job {job} has no coordinates for slide {name} (it has "
                        f"{', '.join(sorted(pairs)[:5]) or 'none'}): tile it with python -m clusiam.tile SLIDE "
                        f"--out {job}, or pass the job it was tiled into")
    slide_path, coords = pairs[name]
    return (Path(slide) if Path(slide).is_file() else slide_path), coords


def read_tiles(path: Path) -> dict:
    """A coordinate file's tile corners (level-0 pixels), their side in level-0 pixels and
    the slide's level-0 resolution, which scales the picture."""
    with h5py.File(path, "r") as handle:
        coords = handle["coords"]
        tiles = {"coords": coords[:], "tile0": float(coords.attrs["patch_size_level0"]),
                 "mpp0": float(coords.attrs["level0_mpp"])}
    if not len(tiles["coords"]):
        raise DataError(f"{path} lists no tile, so there is nothing to draw: the job's tiles.csv says why (its "
                        "warnings column); tile the slide again as it suggests")
    return tiles


def tile_clusters(checkpoint: str, patches: PatchSource, device_name: str, batch_size: int) -> np.ndarray:
    """Each patch's cluster: argmax of the cluster assigner on its projection."""
    model, state = load_pretrained(checkpoint)
    if not model.method.clustered:
        raise UserError(f"{checkpoint} is a {model.model_type} checkpoint, which has no clusters; "
                        "draw scores with --scores")
    assigner = nn.Sequential(model.backbone, cluster_head(model))
    logits = encode(assigner, patches, state["normalization"]["mean"], state["normalization"]["std"],
                    resolve_device(device_name), batch_size=batch_size, num_workers=0, desc="clusters")
    return logits.argmax(1)


def read_scores(path: Path, slide: str, coords: np.ndarray) -> np.ndarray:
    """Per-tile scores, in the coordinate file's order, from a CSV (x, y, score) or a mil
    attention file (the positive class's attention); tiles without a score are NaN."""
    if path.suffix.lower() in (".h5", ".hdf5"):
        with h5py.File(path, "r") as handle:
            if slide not in handle:
                raise UserError(f"{path} holds no scores for slide {slide} (it has {', '.join(list(handle)[:5])} ...)")
            group = handle[slide]
            if "coords" not in group:
                raise UserError(f"{path}: slide {slide} has no patch coordinates to place its scores")
            keyed = dict(zip(map(tuple, group["coords"][:]), group["attention"][:, -1]))
    else:
        keyed = read_score_table(path)
    scores = np.array([keyed.get(tuple(c), np.nan) for c in coords], dtype=np.float64)
    if np.isnan(scores).all():
        raise UserError(f"{path}: none of the scores matches a tile of {slide} (are the coordinates level-0 pixels?)")
    return scores


def read_score_table(path: Path) -> dict[tuple[int, int], float]:
    """A CSV's scores keyed by tile corner (x, y), refusing rows that are not numbers."""
    keyed = {}
    for line, row in enumerate(read_csv_rows(path, ("x", "y", "score")), start=2):
        try:
            keyed[int(row["x"]), int(row["y"])] = float(row["score"])
        except (TypeError, ValueError):
            raise DataError(f"{path}, line {line}: x={row['x']!r}, y={row['y']!r}, score={row['score']!r}; "
                            "x and y must be whole level-0 pixels (the tiler's coordinates) "
                            "and score a number") from None
    return keyed


def paint(thumbnail: Image.Image, coords: np.ndarray, side: float, colours: np.ndarray, scale: float) -> Image.Image:
    """Blend each tile's colour over the thumbnail (thumbnail pixels = level-0 / scale)."""
    picture = np.asarray(thumbnail, dtype=np.float32).copy()
    for (x, y), colour in zip(coords, colours):
        top, left = int(round(y / scale)), int(round(x / scale))
        bottom, right = int(round((y + side) / scale)), int(round((x + side) / scale))
        region = picture[top:bottom, left:right]
        region[:] = (1 - TILE_ALPHA) * region + TILE_ALPHA * colour
    return Image.fromarray(picture.clip(0, 255).astype(np.uint8))


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m clusiam.slidemap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, required=True, help="the tiling job (python -m clusiam.tile --out JOB)")
    parser.add_argument("--slide", required=True, help="the slide: its name in the job, or its file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", default=None, help="colour tiles by this checkpoint's clusters")
    parser.add_argument("--scores", type=Path, default=None,
                        help="colour tiles by these scores instead (CSV x, y, score or mil attention .h5)")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="annotation file or folder (ASAP XML / GeoJSON) to outline")
    parser.add_argument("--map_mpp", type=float, default=4.0, help="resolution of the picture (um/px)")
    parser.add_argument("--device", default="auto", help=f"where the clusters are computed: {DEVICE_HELP}")
    parser.add_argument("--batch_size", type=int, default=256, help="with --checkpoint: patches encoded at a time")
    return parser


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse missing input files before the slide is read."""
    if (args.checkpoint is None) == (args.scores is None):
        raise UserError("pass exactly one of --checkpoint (cluster map) and --scores (heatmap)")
    if args.scores is not None and not args.scores.is_file():
        raise DataError(f"--scores {args.scores} does not exist: pass a CSV with columns x, y, score "
                        "or the attention .h5 that mil.train writes")
    if args.annotations is not None and not args.annotations.exists():
        raise DataError(f"--annotations {args.annotations} does not exist: pass an ASAP .xml or a .geojson file, "
                        "or a folder of <slide>.xml / <slide>.geojson, or leave --annotations out")
    check_output_folder(args.out, "--out")


def score_colours(scores: np.ndarray, slide: str, source: Path) -> np.ndarray:
    """Inferno colours of the scores scaled to [0, 1]; grey for tiles without a score,
    which are counted."""
    unscored = np.isnan(scores)
    if unscored.any():
        print(f"{int(unscored.sum())} of {len(scores)} tiles of {slide} have no score in {source}; drawn grey")
    low, high = np.nanmin(scores), np.nanmax(scores)
    normalised = (scores - low) / (high - low) if high > low else np.zeros_like(scores)
    colours = (matplotlib.colormaps["inferno"](np.nan_to_num(normalised))[:, :3] * 255).astype(np.uint8)
    colours[unscored] = UNSCORED
    return colours


def draw_contours(picture: Image.Image, annotations: Path, name: str, scale: float) -> None:
    """Outline the slide's annotated regions from a file, or from its file in a folder (a
    slide without one is said, and drawn without)."""
    if annotations.is_dir():
        folder, annotations = annotations, annotation_file(annotations, name)
        if annotations is None:
            print(f"no annotation file for {name} in {folder}; no contours drawn")
            return
    pen = ImageDraw.Draw(picture)
    for outline in polygon_outlines(read_annotations(annotations), scale):
        pen.line(outline + outline[:1], fill=(0, 255, 255), width=2)


def draw(args: argparse.Namespace) -> Path:
    """The slide's cluster map or heatmap, as ``OUT/<slide>_clusters.png`` (with the
    clusters in ``<slide>_clusters.csv``) or ``OUT/<slide>_heatmap.png``."""
    check_inputs(args)
    slide_path, coords_path = job_slide(args.job, args.slide)
    name = coords_path.stem
    tiles = read_tiles(coords_path)
    slide = open_slide(slide_path)
    scale = args.map_mpp / tiles["mpp0"]
    thumbnail = slide_thumbnail(slide, scale)
    slide.close()
    if args.checkpoint:  # the checkpoint is read, and may be refused, before anything is written
        patches, _ = SlideSource.checked([(slide_path, coords_path)])
        clusters = tile_clusters(args.checkpoint, patches, args.device, args.batch_size)
        colours = cluster_palette(int(clusters.max()) + 1)[clusters]
        target = make_folder(args.out, "--out") / f"{name}_clusters.png"
        write_csv(args.out / f"{name}_clusters.csv", ("x", "y", "cluster"),
                  [(x, y, c) for (x, y), c in zip(tiles["coords"], clusters)])
    else:
        colours = score_colours(read_scores(args.scores, name, tiles["coords"]), name, args.scores)
        target = make_folder(args.out, "--out") / f"{name}_heatmap.png"
    picture = paint(thumbnail, tiles["coords"], tiles["tile0"], colours, scale)
    if args.annotations is not None:
        draw_contours(picture, args.annotations, name, scale)
    picture.save(target)
    print(f"wrote {target}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: draw(build_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
