r"""Pictures of a slide: every tile coloured by its cluster (the assigner's argmax), or by a
per-tile score such as DSMIL attention, over the slide's thumbnail, with annotation
contours on top.

    python -m clusiam.slidemap --checkpoint runs/clusiam/last.pth --slide S.svs --patches PATCH_ROOT --out maps/
    python -m clusiam.slidemap --scores reports/mil/attention/seed0_fold0.h5 --slide S.svs \
        --patches PATCH_ROOT --out maps/

The tiles come from the tiler's index (``PATCH_ROOT_index/<slide>.h5``). Scores are read
from a CSV with columns x, y, score (level-0 pixels) or from a ``mil.train`` attention file;
tiles without a score are counted and drawn grey.
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
from clusiam.distributed import resolve_device
from clusiam.errors import DataError, UserError, run_command
from clusiam.features import encode
from clusiam.tables import read_csv_rows, write_csv
from clusiam.tile import annotation_file, index_folder, open_slide, polygon_outlines, read_annotations, slide_thumbnail

TILE_ALPHA = 0.55
UNSCORED = np.array([128, 128, 128], dtype=np.uint8)  # grey: a tile the scores file does not mention


def cluster_palette(num_clusters: int) -> np.ndarray:
    """(K, 3) uint8 colours: matplotlib's 60 qualitative colours, cycled."""
    colours = np.concatenate([matplotlib.colormaps[name].colors for name in ("tab20", "tab20b", "tab20c")])
    return (np.asarray(colours)[np.arange(num_clusters) % len(colours)] * 255).astype(np.uint8)


def read_index(index_dir: Path, slide: str) -> dict:
    path = index_dir / f"{slide}.h5"
    if not path.is_file():
        raise UserError(f"no tiling index {path}: tile the slide with python -m clusiam.tile first, "
                        "or pass --index_dir")
    with h5py.File(path, "r") as handle:
        coords = handle["coords"]
        return {"coords": coords[:], "paths": [p.decode() for p in handle["paths"][:]],
                "tile0": float(coords.attrs["patch_size_level0"]), "mpp0": float(coords.attrs["level0_mpp"])}


def tile_clusters(checkpoint: str, files: Sequence[Path], device_name: str, batch_size: int) -> np.ndarray:
    """Each patch's cluster: argmax of the cluster assigner on its projection."""
    model, state = load_pretrained(checkpoint)
    if not model.method.clustered:
        raise UserError(f"{checkpoint} is a {model.model_type} checkpoint, which has no clusters; "
                        "draw scores with --scores")
    assigner = nn.Sequential(model.backbone, model.projector, model.cluster_projector, model.cluster_assigner)
    logits = encode(assigner, files, state["normalization"]["mean"], state["normalization"]["std"],
                    resolve_device(device_name), batch_size=batch_size, num_workers=0, desc="clusters")
    return logits.argmax(1)


def read_scores(path: Path, slide: str, coords: np.ndarray) -> np.ndarray:
    """Per-tile scores in index order from a CSV (x, y, score) or a mil attention file
    (the positive class's attention); tiles without a score are NaN."""
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
    parser = argparse.ArgumentParser(prog="python -m clusiam.slidemap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, required=True)
    parser.add_argument("--patches", type=Path, required=True, help="the PATCH_ROOT the slide was tiled into")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", default=None, help="colour tiles by this checkpoint's clusters")
    parser.add_argument("--scores", type=Path, default=None,
                        help="colour tiles by these scores instead (CSV x, y, score or mil attention .h5)")
    parser.add_argument("--index_dir", type=Path, default=None, help="the tiler's index (default: PATCH_ROOT_index)")
    parser.add_argument("--annotations", type=Path, default=None,
                        help="annotation file or folder (ASAP XML / GeoJSON) to outline")
    parser.add_argument("--map_mpp", type=float, default=4.0, help="resolution of the picture (um/px)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch_size", type=int, default=256)
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


def draw(args: argparse.Namespace) -> Path:
    check_inputs(args)
    name = args.slide.stem
    index = read_index(args.index_dir or index_folder(args.patches), name)
    slide = open_slide(args.slide)
    scale = args.map_mpp / index["mpp0"]
    thumbnail = slide_thumbnail(slide, scale)
    slide.close()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        patch_files = [args.patches / p for p in index["paths"]]
        clusters = tile_clusters(args.checkpoint, patch_files, args.device, args.batch_size)
        colours = cluster_palette(int(clusters.max()) + 1)[clusters]
        target = args.out / f"{name}_clusters.png"
        write_csv(args.out / f"{name}_clusters.csv", ("x", "y", "cluster"),
                  [(x, y, c) for (x, y), c in zip(index["coords"], clusters)])
    else:
        colours = score_colours(read_scores(args.scores, name, index["coords"]), name, args.scores)
        target = args.out / f"{name}_heatmap.png"
    picture = paint(thumbnail, index["coords"], index["tile0"], colours, scale)
    annotations = args.annotations
    if annotations is not None and annotations.is_dir():
        annotations = annotation_file(annotations, name)
        if annotations is None:
            print(f"no annotation file for {name} in {args.annotations}; no contours drawn")
    if annotations is not None:
        pen = ImageDraw.Draw(picture)
        for outline in polygon_outlines(read_annotations(annotations), scale):
            pen.line(outline + outline[:1], fill=(0, 255, 255), width=2)
    picture.save(target)
    print(f"wrote {target}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: draw(build_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
