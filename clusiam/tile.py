"""Whole-slide images to tissue patches at a chosen resolution, with an index per slide,
a picture of what was kept, and patch labels from tumour annotations.

    python -m clusiam.tile SLIDES_DIR --out PATCH_ROOT --mpp 0.5 --size 224 [--annotations ANN_DIR]

Writes ``PATCH_ROOT/[<class>/]<slide>/<x>_<y>.png`` (x, y: level-0 pixels of the top-left
corner) and, beside it in ``PATCH_ROOT_index/``: ``<slide>.h5`` (coordinates and tiling
attributes), ``<slide>_thumbnail.png``, ``tiles.csv`` (one row per slide) and, with
annotations, ``patch_labels.csv`` (path, label, slide) for ``evaluate_knn.py``. A slide's
patches appear only once the slide is complete, so one that fails leaves none behind.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import shapely
from PIL import Image, ImageDraw
from shapely.geometry import Polygon, shape
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects
from tqdm import tqdm

from clusiam.errors import ConfigError, DataError, SlideError, run_command
from clusiam.files import find_files
from clusiam.tables import read_table, write_csv

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".svslide")
# ASAP groups of the Camelyon16 annotations: _0 and _1 are tumour, _2 marks normal tissue inside them.
ASAP_EXCLUSION_GROUPS = {"_2", "exclusion", "Exclusion"}
# Under the index folder: slides being tiled, moved into place when complete.
STAGING = ".unfinished"


def option(default: Any, help: str, rule: tuple[Callable[[Any], bool], str] | None = None, **argparse_options) -> Any:
    """A tiling option, defined once: its default, its ``--help``, the rule a value must
    follow (checked before any slide is opened: whether it is usable, and what it must be)
    and what else ``add_argument`` needs (``type`` when the default is None, ``flag`` when
    the flag's name differs from the field's, ``choices``)."""
    return field(default=default, metadata={"help": help, "rule": rule, "argparse": argparse_options})


def at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"{low:g} or more"


@dataclass(frozen=True)
class TilingOptions:
    """How every slide is tiled; each field is also a flag of ``python -m clusiam.tile``."""

    mpp: float = option(0.5, "microns per pixel of the patches (0.5 = 20x)", (lambda v: v > 0, "above 0 (0.5 = 20x)"))
    size: int = option(224, "patch side in pixels", (lambda v: v >= 1, "at least 1 pixel"))
    overlap: float = option(0.0, "fraction of a tile shared with its neighbour",
                            (lambda v: 0 <= v < 1, "in [0, 1): the share of a tile its neighbour repeats"))
    min_tissue: float = option(0.6, "keep tiles with at least this tissue fraction (0.6 keeps half-glass edge tiles "
                               "out)", (lambda v: 0 <= v <= 1, "in [0, 1]: the tissue fraction a kept tile needs"))
    mask_mpp: float = option(4.0, "resolution of the tissue mask (um/px)",
                             (lambda v: v > 0, "above 0 (4 um/px is the default)"))
    min_object_um2: float = option(20000.0, "tissue pieces smaller than this are dropped", at_least(0))
    max_hole_um2: float = option(5000.0, "holes smaller than this are filled", at_least(0))
    saturation_threshold: float | None = option(
        None, "fixed saturation threshold instead of Otsu's",
        (lambda v: v is None or 0 <= v <= 1, "in [0, 1], or left out for Otsu's"), type=float)
    slide_mpp: float | None = option(
        None, "level-0 um/px for slides whose file lacks it",
        (lambda v: v is None or v > 0, "above 0 (0.25 for 40x, 0.5 for 20x)"), type=float)
    image_format: str = option("png", "patch file format", flag="format", choices=["png", "jpeg"])
    label_threshold: float = option(0.5, "tumour fraction from which a tile is labelled tumor",
                                    (lambda v: 0 < v <= 1, "in (0, 1]: the tumour fraction from which a tile is tumor"))
    annotations: Path | None = option(None, "folder of <slide>.xml (ASAP) or <slide>.geojson", type=Path)


@dataclass(frozen=True)
class ReadPlan:
    """Where a slide's tiles lie and how they are read: the grid in level-0 pixels, the
    pyramid level read from and the side read there (resized to ``--size`` when it
    differs), and the scale of the thumbnail the tissue is found on."""

    level0_mpp: float
    magnification: float | None  # the slide's level-0 objective power, when the file records it
    width: int  # level-0 pixels
    height: int
    level: int
    downsample: float
    tile0: float  # tile side in level-0 pixels
    step0: float  # grid step in level-0 pixels
    read_size: int  # tile side in pixels at ``level``
    thumb_scale: float  # level-0 pixels per thumbnail pixel


def open_slide(path: Path):
    """A slide through tiffslide; through openslide when tiffslide cannot read it and
    openslide is installed."""
    import tiffslide

    try:
        return tiffslide.TiffSlide(path)
    except Exception as tiff_error:
        try:
            import openslide
        except ImportError:
            raise SlideError(f"{path}: not a readable slide ({type(tiff_error).__name__}: {tiff_error})") from None
        try:
            return openslide.OpenSlide(str(path))
        except Exception as error:
            raise SlideError(f"{path}: not a readable slide ({type(error).__name__}: {error})") from None


def level0_mpp(slide, path: Path, override: float | None) -> float:
    """Microns per pixel at level 0, from the file or ``--slide_mpp``."""
    if override:
        return override
    for key in ("tiffslide.mpp-x", "openslide.mpp-x"):
        value = slide.properties.get(key)
        if value:
            return float(value)
    raise SlideError(f"{path}: the file records no microns-per-pixel; pass --slide_mpp "
                     "(e.g. 0.25 for 40x, 0.5 for 20x)")


def tissue_mask(thumbnail: np.ndarray, mask_mpp: float, options: TilingOptions) -> tuple[np.ndarray, float]:
    """Tissue on an RGB thumbnail: saturation above Otsu's threshold (or a given one), small
    holes filled and small objects removed. Returns the mask and the threshold used."""
    saturation = rgb2hsv(thumbnail)[..., 1]
    threshold = options.saturation_threshold
    if threshold is None:
        threshold = float(threshold_otsu(saturation)) if saturation.max() > saturation.min() else 1.0
    pixel_area = mask_mpp**2  # um^2 per thumbnail pixel
    mask = saturation > threshold
    mask = remove_small_holes(mask, max_size=round(options.max_hole_um2 / pixel_area))
    mask = remove_small_objects(mask, max_size=round(options.min_object_um2 / pixel_area))
    return mask, threshold


def read_annotations(path: Path) -> shapely.Geometry:
    """Tumour regions from ASAP XML (Camelyon16: groups _0/_1 tumour, _2 excluded) or
    GeoJSON (QuPath; every polygon counts), in level-0 pixels."""
    try:
        return read_asap(path) if path.suffix.lower() == ".xml" else read_geojson(path)
    except Exception as error:  # the parsers and shapely raise many types; the file is the cause
        raise DataError(f"{path} is not a readable annotation file ({type(error).__name__}: {error}): "
                        "export it again from ASAP (.xml) or QuPath (.geojson)") from None


def read_asap(path: Path) -> shapely.Geometry:
    tumour, excluded = [], []
    for annotation in ElementTree.parse(path).getroot().iter("Annotation"):
        points = sorted(annotation.iter("Coordinate"), key=lambda c: int(c.get("Order", 0)))
        if len(points) < 3:  # dots and lines mark no area
            continue
        polygon = Polygon([(float(p.get("X")), float(p.get("Y"))) for p in points]).buffer(0)
        (excluded if annotation.get("PartOfGroup") in ASAP_EXCLUSION_GROUPS else tumour).append(polygon)
    return shapely.difference(shapely.union_all(tumour), shapely.union_all(excluded))


def read_geojson(path: Path) -> shapely.Geometry:
    data = json.loads(path.read_text())
    features = data["features"] if isinstance(data, dict) and "features" in data else data
    features = features if isinstance(features, list) else [features]
    return shapely.union_all([shape(f["geometry"]).buffer(0) for f in features if f.get("geometry")])


def annotation_file(directory: Path | None, slide: str) -> Path | None:
    if directory is None:
        return None
    for suffix in (".xml", ".geojson", ".json"):
        candidate = directory / f"{slide}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def tile_slide(path: Path, out: Path, index_dir: Path, slide_class: str | None, options: TilingOptions) -> dict:
    """Tile one slide into a staging folder and move it into place only when complete, so a
    slide that fails half-way leaves no patches for pretraining to pick up; return its
    summary row (and the patch label rows)."""
    relative = Path(slide_class, path.stem) if slide_class else Path(path.stem)
    staging = index_dir / STAGING / path.stem
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    try:
        row = tile_into(path, relative, staging, options)
        publish(staging, out / relative, index_dir, path.stem)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return row


def publish(staging: Path, folder: Path, index_dir: Path, name: str) -> None:
    """Move a finished slide's index and thumbnail, then its patches, into place. The
    patches of an earlier tiling of the slide are replaced rather than mixed with these."""
    for file in (f"{name}.h5", f"{name}_thumbnail.png"):
        os.replace(staging / file, index_dir / file)
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(staging / "patches", folder)  # a rename, or a copy when --index_dir is on another disk
    staging.rmdir()


def plan_reading(slide, path: Path, options: TilingOptions) -> ReadPlan:
    """The grid and the read level of one slide: read from the most downsampled level that is
    still at least as fine as ``--mpp``."""
    mpp0 = level0_mpp(slide, path, options.slide_mpp)
    width, height = slide.dimensions
    target = options.mpp / mpp0  # level-0 pixels per output pixel
    level = max((i for i, d in enumerate(slide.level_downsamples) if d <= target * 1.001), default=0)
    downsample = slide.level_downsamples[level]
    tile0 = options.size * target
    magnification = slide.properties.get("tiffslide.objective-power") or slide.properties.get(
        "openslide.objective-power")
    return ReadPlan(
        level0_mpp=mpp0, magnification=float(magnification) if magnification else None,
        width=width, height=height, level=level, downsample=downsample, tile0=tile0,
        step0=tile0 * (1 - options.overlap), read_size=max(1, round(tile0 / downsample)),
        thumb_scale=options.mask_mpp / mpp0,
    )


def tissue_tiles(mask: np.ndarray, plan: ReadPlan, min_tissue: float) -> tuple[np.ndarray, list[float]]:
    """The grid's tiles with at least ``min_tissue`` of their area in the tissue mask: their
    top-left corners (N, 2) in level-0 pixels, and their tissue fractions."""
    coords, tissue = [], []
    scale, tile0 = plan.thumb_scale, plan.tile0
    for y in np.arange(0, plan.height - tile0 + 1e-6, plan.step0):
        for x in np.arange(0, plan.width - tile0 + 1e-6, plan.step0):
            box = mask[int(y / scale): max(int(y / scale) + 1, int((y + tile0) / scale)),
                       int(x / scale): max(int(x / scale) + 1, int((x + tile0) / scale))]
            fraction = float(box.mean()) if box.size else 0.0
            if fraction >= min_tissue:
                coords.append((int(round(x)), int(round(y))))
                tissue.append(fraction)
    return np.array(coords, dtype=np.int64).reshape(-1, 2), tissue


def tumour_region(options: TilingOptions, slide: str) -> tuple[shapely.Geometry | None, str | None]:
    """The slide's annotated tumour (empty when no file names it: Camelyon16 ships XML for
    its tumour slides only), None without ``--annotations``; and a warning when its file
    holds no polygon the tiler recognises, which labels every tile normal as silently as a
    missing file would."""
    if options.annotations is None:
        return None, None
    annotations = annotation_file(options.annotations, slide)
    if annotations is None:
        return shapely.Polygon(), None
    region = read_annotations(annotations)
    if not region.is_empty:
        return region, None
    return region, (f"{annotations} holds no tumour polygon (only dots, lines or points, exclusions, or nothing): "
                    f"every tile of {slide} is labelled normal; draw the tumour as polygons (ASAP: Polygon or Spline, "
                    "group _0 or _1; QuPath: area annotations), or delete the file if the slide has no tumour")


def no_tile_warning(path: Path, plan: ReadPlan, options: TilingOptions, tissue_mm2: float) -> str:
    """Why a slide gave no patch, and what to change."""
    if plan.tile0 > min(plan.width, plan.height):
        return (f"{path} gave 0 patches: a {options.size} px tile at {options.mpp:g} um/px spans {plan.tile0:.0f} "
                f"level-0 pixels, more than the slide's {plan.width} x {plan.height} at {plan.level0_mpp:g} um/px; "
                "check --slide_mpp (0.25 for 40x, 0.5 for 20x), or lower --size or --mpp")
    return (f"{path} gave 0 patches: no tile holds {options.min_tissue:.0%} tissue ({tissue_mm2} mm2 of tissue "
            f"found); see {path.stem}_thumbnail.png in the index folder, and lower --min_tissue or set "
            "--saturation_threshold")


def tumour_fractions(coords: np.ndarray, tile0: float, region: shapely.Geometry) -> np.ndarray:
    """The share of each tile's area inside ``region``."""
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + tile0, coords[:, 1] + tile0)
    return shapely.area(shapely.intersection(boxes, region)) / (tile0 * tile0)


def write_patches(slide, coords: np.ndarray, plan: ReadPlan, folder: Path, relative: Path,
                  options: TilingOptions) -> list[str]:
    """Read, resize and save every tile as ``folder/<x>_<y>.<ext>``; return the paths as
    ``relative/<x>_<y>.<ext>`` (from PATCH_ROOT)."""
    folder.mkdir(parents=True)
    extension = "jpg" if options.image_format == "jpeg" else options.image_format
    paths = []
    for x, y in coords:
        patch = slide.read_region((int(x), int(y)), plan.level, (plan.read_size, plan.read_size)).convert("RGB")
        if plan.read_size != options.size:
            patch = patch.resize((options.size, options.size), Image.LANCZOS)
        patch.save(folder / f"{x}_{y}.{extension}", **({"quality": 90} if extension == "jpg" else {}))
        paths.append(str(relative / f"{x}_{y}.{extension}"))
    return paths


def write_index(path: Path, name: str, coords: np.ndarray, plan: ReadPlan, options: TilingOptions,
                tissue: list[float], paths: list[str], tumour: np.ndarray | None, labels: np.ndarray | None) -> None:
    """The slide's ``<slide>.h5``: ``coords`` with the attributes CLAM / TRIDENT readers look
    for (plus the resolution in microns), tissue fractions, patch paths and, with
    annotations, tumour fractions and labels."""
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset("coords", data=coords)
        dataset.attrs.update({
            "patch_size": options.size, "patch_size_level0": plan.tile0, "patch_level": plan.level,
            "downsample": plan.downsample, "level_dim": slide_dims(plan.width, plan.height, plan.downsample),
            "mpp": options.mpp, "level0_mpp": plan.level0_mpp, "overlap": options.overlap,
            "level0_magnification": plan.magnification or float("nan"),
            "name": name, "format": "jpg" if options.image_format == "jpeg" else options.image_format,
        })
        handle["tissue_fraction"] = np.array(tissue, dtype=np.float32)
        handle["paths"] = paths
        if tumour is not None:
            handle["tumor_fraction"] = tumour.astype(np.float32)
            handle["label"] = labels.astype("S")


def tile_into(path: Path, relative: Path, staging: Path, options: TilingOptions) -> dict:
    """Tile one slide into ``staging``: patches under ``patches/``, index and thumbnail
    beside them; return its summary row and, with annotations, its patch label rows."""
    started = time.time()
    name = path.stem
    slide = open_slide(path)
    try:
        plan = plan_reading(slide, path, options)
        thumbnail = np.asarray(slide_thumbnail(slide, plan.thumb_scale))
        mask, threshold = tissue_mask(thumbnail, options.mask_mpp, options)
        coords, tissue = tissue_tiles(mask, plan, options.min_tissue)
        region, annotation_warning = tumour_region(options, name)
        paths = write_patches(slide, coords, plan, staging / "patches", relative, options)
    finally:
        slide.close()
    tumour = labels = None
    if region is not None:
        tumour = tumour_fractions(coords, plan.tile0, region)
        labels = np.where(tumour >= options.label_threshold, "tumor", "normal")
    write_index(staging / f"{name}.h5", name, coords, plan, options, tissue, paths, tumour, labels)
    draw_thumbnail(thumbnail, mask, coords / plan.thumb_scale, plan.tile0 / plan.thumb_scale,
                   staging / f"{name}_thumbnail.png", region, plan.thumb_scale)
    tissue_mm2 = round(float(mask.sum()) * options.mask_mpp**2 / 1e6, 3)
    warnings = [annotation_warning] if annotation_warning else []
    if len(coords) == 0:
        warnings.append(no_tile_warning(path, plan, options, tissue_mm2))
    return {
        "slide": name, "tiles": len(coords), "tissue_area_mm2": tissue_mm2,
        "mpp": plan.level0_mpp, "level": plan.level, "otsu_threshold": round(threshold, 4),
        "tumor_tiles": int((labels == "tumor").sum()) if labels is not None else "",
        "seconds": round(time.time() - started, 2), "warnings": warnings,
        "patch_labels": [] if labels is None else list(zip(paths, labels.tolist(), [name] * len(paths))),
    }


def slide_dims(width: int, height: int, downsample: float) -> tuple[int, int]:
    return round(width / downsample), round(height / downsample)


def draw_thumbnail(thumbnail: np.ndarray, mask: np.ndarray, corners: np.ndarray, side: float, path: Path,
                   region: shapely.Geometry | None, scale: float) -> None:
    """The thumbnail with the tissue mask tinted green, kept tiles outlined in blue and
    tumour annotations in red."""
    picture = thumbnail.astype(np.float32)
    picture[mask] = 0.7 * picture[mask] + 0.3 * np.array([0, 200, 0])
    image = Image.fromarray(picture.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for x, y in corners:
        draw.rectangle([x, y, x + side, y + side], outline=(0, 60, 255))
    for outline in polygon_outlines(region, scale):
        draw.line(outline + outline[:1], fill=(230, 0, 0), width=2)
    image.save(path)


def polygon_outlines(region: shapely.Geometry | None, scale: float) -> list[list[tuple[float, float]]]:
    """Exterior and interior rings of a (multi)polygon, divided by ``scale``."""
    if region is None or region.is_empty:
        return []
    polygons = getattr(region, "geoms", [region])
    rings = [ring for p in polygons if isinstance(p, Polygon) for ring in (p.exterior, *p.interiors)]
    return [[(x / scale, y / scale) for x, y in ring.coords] for ring in rings]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clusiam.tile", description=__doc__.split("\n\n")[0])
    parser.add_argument("slides", type=Path, help="a slide file or a folder of slides")
    parser.add_argument("--out", type=Path, required=True, help="PATCH_ROOT for the patches")
    parser.add_argument("--index_dir", type=Path, default=None,
                        help="index, thumbnails and tables (default: PATCH_ROOT_index)")
    parser.add_argument("--classes", type=Path, default=None,
                        help="slides.csv (slide, label): patches go under <label>/<slide>/")
    parser.add_argument("--workers", type=int, default=4, help="slides tiled in parallel")
    for spec in fields(TilingOptions):
        options = dict(spec.metadata["argparse"])
        flag = options.pop("flag", spec.name)
        options.setdefault("type", type(spec.default))
        parser.add_argument(f"--{flag}", dest=spec.name, default=spec.default, help=spec.metadata["help"], **options)
    return parser


def tiling_options(args: argparse.Namespace) -> TilingOptions:
    """The tiling options of the command line, refused (before any slide is opened) where a
    value would make every slide fail: a zero step, a zero resolution, a missing folder."""
    for spec in fields(TilingOptions):
        value = getattr(args, spec.name)
        if spec.metadata["rule"] is not None and not spec.metadata["rule"][0](value):
            raise ConfigError(f"--{spec.metadata['argparse'].get('flag', spec.name)} {value} must be "
                              f"{spec.metadata['rule'][1]}")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers} must be at least 1")
    if args.annotations is not None and not args.annotations.is_dir():
        state = "is not a folder" if args.annotations.exists() else "does not exist"
        raise DataError(f"--annotations {args.annotations} {state}: pass the folder of <slide>.xml (ASAP) "
                        "or <slide>.geojson files, or leave --annotations out")
    return TilingOptions(**{spec.name: getattr(args, spec.name) for spec in fields(TilingOptions)})


def find_slides(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return find_files(source, SLIDE_EXTENSIONS, "slides", "pass a slide file or a folder of slides", "check the path")


def index_folder(patch_root: Path) -> Path:
    """Where the tiler puts a patch root's index, thumbnails and tables: PATCH_ROOT_index."""
    return patch_root.with_name(patch_root.name + "_index")


def slide_thumbnail(slide, scale: float) -> Image.Image:
    """The whole slide as RGB, ``scale`` level-0 pixels per thumbnail pixel."""
    width, height = slide.dimensions
    size = (max(1, round(width / scale)), max(1, round(height / scale)))
    return slide.get_thumbnail(size).convert("RGB").resize(size)


def read_classes(path: Path, slides: Sequence[Path]) -> dict[str, str]:
    """Each slide's class from ``--classes``; every slide must have one, or the patch root
    would mix class folders with bare slide folders."""
    classes = read_table(path, ("slide", "label"))
    missing = [p.stem for p in slides if p.stem not in classes]
    if missing:
        raise DataError(f"--classes {path} lists no class for {len(missing)} slide(s): {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}; add them to it, or drop --classes")
    return classes


def report_unannotated(slides: Sequence[Path], folder: Path) -> None:
    """Say how many slides are labelled normal throughout because no annotation file names them."""
    missing = [p for p in slides if annotation_file(folder, p.stem) is None]
    if missing:
        print(f"{len(missing)} of {len(slides)} slide(s) have no annotation file in {folder} (e.g. {missing[0].name}): "
              "all their tiles are labelled normal (tumour fraction 0)")


def tile_all(slides: Sequence[Path], out: Path, index_dir: Path, classes: dict[str, str], options: TilingOptions,
             workers: int) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Tile the slides ``workers`` at a time; return the summary rows of those tiled and the
    slides that failed, with why (one bad slide must not stop the others)."""
    rows, failed = [], []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(tile_slide, path, out, index_dir, classes.get(path.stem), options): path
                   for path in slides}
        for future in tqdm(futures, desc="slides", unit="slide"):
            try:
                rows.append(future.result())
            except Exception as error:  # any failure of one slide, whatever raised it
                failed.append((futures[future], f"{type(error).__name__}: {error}"))
                tqdm.write(f"skipped {futures[future]}: {error}")
                continue
            for warning in rows[-1]["warnings"]:  # printed here: the workers' own output would interleave
                tqdm.write(f"warning: {warning}")
    shutil.rmtree(index_dir / STAGING, ignore_errors=True)
    return rows, failed


def write_tables(index_dir: Path, out: Path, rows: list[dict], failed: list[tuple[Path, str]],
                 labelled: bool) -> Path:
    """``tiles.csv`` (its ``warnings`` column: what a slide gave that is likely not what was
    meant, "; "-separated), ``patch_labels.csv`` (with annotations) and ``failed_slides.txt``
    (only when a slide failed: a list from an earlier run would no longer be true); return the
    last one's path."""
    patch_labels = [label for row in rows for label in row.pop("patch_labels")]
    columns = ("slide", "tiles", "tissue_area_mm2", "mpp", "level", "otsu_threshold", "tumor_tiles", "seconds")
    write_csv(index_dir / "tiles.csv", (*columns, "warnings"),
              [[*(row[column] for column in columns), "; ".join(row["warnings"])] for row in rows])
    if labelled:
        relative = Path("..") / out.name if index_dir.parent == out.parent else out
        write_csv(index_dir / "patch_labels.csv", ("path", "label", "slide"),
                  [(str(relative / path), label, slide) for path, label, slide in patch_labels])
    failed_list = index_dir / "failed_slides.txt"
    if failed:
        failed_list.write_text("".join(f"{p}\t{why}\n" for p, why in failed))
    else:
        failed_list.unlink(missing_ok=True)
    return failed_list


def tile(args: argparse.Namespace) -> dict:
    """Tile every slide; unreadable ones are reported, listed and skipped."""
    options = tiling_options(args)
    slides = find_slides(args.slides)
    classes = read_classes(args.classes, slides) if args.classes else {}
    out = args.out.resolve()  # `--out .` has no name to put _index after
    index_dir = (args.index_dir or index_folder(out)).resolve()
    index_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if options.annotations is not None:
        report_unannotated(slides, options.annotations)
    rows, failed = tile_all(slides, out, index_dir, classes, options, args.workers)
    failed_list = write_tables(index_dir, out, rows, failed, labelled=options.annotations is not None)
    if not rows:
        raise DataError(f"none of the {len(slides)} slide(s) could be tiled; the reasons are in {failed_list}")
    warned = sum(1 for row in rows if row["warnings"])
    print(f"{sum(r['tiles'] for r in rows)} patches from {len(rows)} slides into {out}; index in {index_dir}"
          + (f"; {warned} slide(s) with warnings (in tiles.csv)" if warned else "")
          + (f"; {len(failed)} slide(s) could not be read (listed in {failed_list})" if failed else ""))
    return {"rows": rows, "failed": failed, "index_dir": index_dir}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: tile(build_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
