"""Whole-slide images to a tiling job: tissue patches at a chosen resolution, their
coordinates, a picture of what was kept, and patch labels from tumour annotations.

    python -m clusiam.tile SLIDES --out JOB --mpp 0.5 --size 224 [--annotations ANN_DIR] [--coords_only]

Everything goes under JOB: ``patches/[<class>/]<slide>/<x>_<y>.png`` (x, y: level-0 pixels
of the top-left corner; none with ``--coords_only``, where patches are read from the slide
when needed), ``coords/<slide>.h5`` (coordinates with the attributes TRIDENT's and, where
they mean the same patch, CLAM's readers expect), ``thumbnails/<slide>.png``, ``tiles.csv``
(one row per slide), ``patch_labels.csv`` with annotations, ``failed_slides.txt`` and
``job.json`` (which slide file each coordinate file was made from). A slide is tiled in
``JOB/.unfinished/`` and its files move into place only once it is complete, its
coordinate file last, so a slide that fails leaves nothing a reader would pick up. Each
coordinate file records what made it (the slide file's size and modification time, the
options): a job run again, or resumed after it was killed, skips the slides it already holds
as this run would make them.
``--layout trident`` / ``clam`` also links each coordinate file where TRIDENT's processor
(``JOB/<mag>x_<size>px_<overlap>px_overlap/patches/<slide>_patches.h5``) or CLAM's feature
extractor (``JOB/patches/<slide>.h5``) looks for it.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import shutil
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import shapely
from PIL import Image, ImageDraw
from scipy import ndimage
from shapely.geometry import Polygon, shape
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from tqdm import tqdm

from clusiam.coords import (
    COORDS,
    JOB_FILE,
    LAYOUTS,
    coordinate_attributes,
    read_attributes,
    trident_folder,
    trident_folders,
    write_link,
)
from clusiam.errors import CommandParser, ConfigError, DataError, counted, run_command
from clusiam.files import check_output_folder, find_files, make_folder, write_atomically
from clusiam.machine import default_processes
from clusiam.slides import (
    SLIDE_EXTENSIONS,
    LevelTiles,
    PatchReader,
    SlideLevel,
    level0_mpp,
    open_slide,
    slide_property,
)
from clusiam.tables import read_csv_rows, read_table, write_csv

CLAM_SLIDE_LIST = "process_list_autogen.csv"  # --layout clam: the slides CLAM's feature extractor is to read
# ASAP groups of the Camelyon16 annotations: _0 and _1 are tumour, _2 marks normal tissue inside them.
ASAP_EXCLUSION_GROUPS = {"_2", "exclusion", "Exclusion"}
# The other folders of a job (JOB = --out; job.json and coords/ are named in clusiam.coords).
PATCHES, THUMBNAILS, STAGING = "patches", "thumbnails", ".unfinished"
TILE_COLUMNS = ("slide", "tiles", "tissue_area_mm2", "mpp", "level", "otsu_threshold", "tumor_tiles", "seconds",
                "warnings")
LABEL_COLUMNS = ("slide", "x", "y", "label", "path")
# Thumbnail saturation of glass, and of the black some scanners pad with, is below this; of stained tissue above it.
GLASS_SATURATION = 0.1
# The most pixels a tissue mask has: a slide whose mask at --mask_mpp would have more (a Camelyon16 scan: 78 M at
# 4 um/px) is masked at a whole multiple of it (8 um/px: 19.5 M), so that a slide of any size takes bounded memory.
MASK_PIXELS = 2**25
STRIP_PIXELS = 2**22  # pixels of a slide level read at a time for the mask
PICTURE_PIXELS = 2**22  # thumbnails/<slide>.png larger than this are shrunk by a whole factor (a PNG costs 0.1 s/M px)
# Peak RSS of one process tiling a slide, with margin: 270 MiB measured on a Camelyon16-size slide, 432 MiB on one
# whose mask is just under MASK_PIXELS, the most (benchmarks/RESULTS.md). The default --workers is the cores, or the
# available memory divided by this where that is less.
SLIDE_PEAK_MIB = 768
TILING_RECORD = "clusiam_tiling"  # attribute of a coordinate file: what made it, and its row of tiles.csv
# Raised when the same options give other coordinates, so that a job run again re-tiles the
# slides an older tiler made (2: --min_tissue 0 keeps only the tiles that touch tissue).
TILER_VERSION = 2


def option(default: Any, help: str, rule: tuple[Callable[[Any], bool], str] | None = None, **argparse_options) -> Any:
    """A tiling option, defined once: its default, its ``--help``, the rule a value must
    follow (checked before any slide is opened: whether it is usable, and what it must be)
    and what else ``add_argument`` needs (``type`` when the default is None, ``action`` for a
    switch, ``flag`` when the flag's name differs from the field's, ``choices``)."""
    return field(default=default, metadata={"help": help, "rule": rule, "argparse": argparse_options})


def at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"{low:g} or more"


def number(text: str) -> float | None:
    """``text`` as a float; None where it is not one."""
    try:
        return float(text)
    except ValueError:
        return None


def slide_mpps(value: str) -> float | dict[str, float]:
    """``--slide_mpp``: a number, the level-0 um/px of every slide; else a CSV of some slides'
    (``slide,mpp``, or TRIDENT's ``wsi,mpp``), read here so that a bad one is refused before any
    slide is opened, and keyed by stem: a slide is named by its file name or its stem."""
    mpp = number(value)
    if mpp is not None:
        return mpp
    if not Path(value).is_file():
        raise ConfigError(f"--slide_mpp {value} is neither a number nor a CSV file: pass the level-0 um/px of every "
                          "slide (0.25 for 40x, 0.5 for 20x) or a CSV with columns slide,mpp")
    try:
        rows = read_csv_rows(value, ())
    except DataError as error:
        raise DataError(f"--slide_mpp {error}") from None
    column = next((name for name in ("slide", "wsi") if name in rows[0]), None)
    if column is None or "mpp" not in rows[0]:
        raise DataError(f"--slide_mpp {value} needs columns slide,mpp (or TRIDENT's wsi,mpp); it has "
                        f"{', '.join(rows[0])}")
    mpps: dict[str, float] = {}
    for line, row in enumerate(rows, start=2):
        file = Path(row[column].strip())  # TRIDENT's wsi may hold the folders below its source
        name = file.stem if file.suffix.lower() in SLIDE_EXTENSIONS else file.name
        mpp = number(row["mpp"])
        if mpp is None or not mpp > 0:
            raise DataError(f"--slide_mpp {value}, line {line}: mpp {row['mpp']!r} of {name} is not a number above 0; "
                            "give its level-0 um/px (0.25 for 40x, 0.5 for 20x), or drop the row to use the file's")
        if name in mpps:
            raise DataError(f"--slide_mpp {value}, line {line}: slide {name} is listed twice; keep one row")
        mpps[name] = mpp
    return mpps


@dataclass(frozen=True)
class TilingOptions:
    """How every slide is tiled; each field is also a flag of ``python -m clusiam.tile``."""

    mpp: float = option(0.5, "microns per pixel of the patches (0.5 = 20x)", (lambda v: v > 0, "above 0 (0.5 = 20x)"))
    size: int = option(224, "patch side in pixels", (lambda v: v >= 1, "at least 1 pixel"))
    overlap: float = option(0.0, "fraction of a tile shared with its neighbour",
                            (lambda v: 0 <= v < 1, "in [0, 1): the share of a tile its neighbour repeats"))
    min_tissue: float = option(
        0.6, "keep tiles with at least this tissue fraction (0.6 keeps half-glass edge tiles out); 0 keeps every tile "
        "that touches tissue, as TRIDENT's 0 does, and no tile of glass alone",
        (lambda v: 0 <= v <= 1, "in [0, 1]: the tissue fraction a kept tile needs"))
    mask_mpp: float = option(4.0, "resolution of the tissue mask (um/px)",
                             (lambda v: v > 0, "above 0 (4 um/px is the default)"))
    min_object_um2: float = option(20000.0, "tissue pieces smaller than this are dropped", at_least(0))
    max_hole_um2: float = option(5000.0, "holes smaller than this are filled", at_least(0))
    saturation_threshold: float | None = option(
        None, f"fixed saturation threshold instead of Otsu's (or of {GLASS_SATURATION:g}, where Otsu's does not split "
        "glass from tissue)",
        (lambda v: v is None or 0 <= v <= 1, "in [0, 1], or left out for Otsu's"), type=float)
    slide_mpp: float | dict[str, float] | None = option(
        None, "level-0 um/px, used instead of the file's: a number for every slide, or a CSV of slide,mpp (or "
        "TRIDENT's wsi,mpp; a slide by its file name or stem) for the slides it lists, the others keeping the file's",
        (lambda v: v is None or isinstance(v, dict) or v > 0, "above 0 (0.25 for 40x, 0.5 for 20x), or a CSV"),
        type=slide_mpps)
    image_format: str = option("png", "patch file format", flag="format", choices=["png", "jpeg"])
    label_threshold: float = option(0.5, "tumour fraction from which a tile is labelled tumor",
                                    (lambda v: 0 < v <= 1, "in (0, 1]: the tumour fraction from which a tile is tumor"))
    annotations: Path | None = option(None, "folder of <slide>.xml (ASAP) or <slide>.geojson tumour annotations, "
                                      "which label the patches (default: no labels)", type=Path)
    coords_only: bool = option(False, "write coordinates, thumbnails and tables but no patch image (readers "
                               "read the patches from the slides)", action="store_true")

    @property
    def overlap_px(self) -> int:
        """The overlap in pixels at ``--mpp``, as coordinate files record it; the grid steps by the rest."""
        return round(self.size * self.overlap)

    @property
    def extension(self) -> str:
        return "jpg" if self.image_format == "jpeg" else self.image_format


@dataclass(frozen=True)
class ReadPlan:
    """Where a slide's tiles lie and how they are read: the grid in level-0 pixels, the
    reader (the pyramid level read from and the side read there, resized to ``--size``) and
    the scale of the thumbnail the tissue is found on."""

    level0_mpp: float
    magnification: float | None  # the slide's level-0 objective power, when the file records it
    width: int  # level-0 pixels
    height: int
    reader: PatchReader
    downsample: float  # of the level the reader reads
    step0: float  # grid step in level-0 pixels
    thumb_scale: float  # level-0 pixels per thumbnail pixel


def find_tissue(slide, path: Path, plan: ReadPlan,
                options: TilingOptions) -> tuple[np.ndarray, float, str | None, np.ndarray]:
    """The slide's tissue mask at ``plan.thumb_scale``: saturation above :func:`tissue_threshold`,
    small holes filled and small objects removed; the threshold used and, where Otsu's was
    asked for but not used, a note that says why; and the slide's picture (the mask's RGB image,
    shrunk for ``thumbnails/``). Saturation is looked up by each pixel's brightest and darkest
    channel (:func:`saturation_table`), never computed per pixel in floats: the same values,
    threshold and mask, in a fraction of the time and memory. Each image is let go as soon as
    the next is made: on a scanner-size slide they are tens of MB each."""
    thumbnail = mask_image(slide, path, plan.thumb_scale, options.mask_mpp / plan.level0_mpp)
    picture = shrink(thumbnail, picture_factor(thumbnail.shape))
    pairs = channel_pairs(thumbnail)
    del thumbnail
    table = saturation_table().ravel()
    threshold, fallback = tissue_threshold(table, counts(pairs, table.size), options.saturation_threshold)
    mask = (table > threshold)[pairs]
    del pairs
    remove_specks(mask, plan.thumb_scale * plan.level0_mpp, options)
    return mask, threshold, fallback, picture


def remove_specks(mask: np.ndarray, mask_mpp: float, options: TilingOptions) -> None:
    """Fill the holes smaller than --max_hole_um2 and remove the pieces smaller than
    --min_object_um2, in place: skimage's ``remove_small_holes`` and ``remove_small_objects``
    (4-connected, sizes in pixels at ``mask_mpp`` rounded, a piece of that size included)."""
    pixel_area = mask_mpp**2  # um^2 per mask pixel
    np.logical_not(mask, out=mask)
    remove_small_pieces(mask, round(options.max_hole_um2 / pixel_area))
    np.logical_not(mask, out=mask)
    remove_small_pieces(mask, round(options.min_object_um2 / pixel_area))


def remove_small_pieces(mask: np.ndarray, max_size: int) -> None:
    """Set to False, in place, the 4-connected pieces of ``mask`` of at most ``max_size`` pixels,
    as skimage's ``remove_small_objects`` does; its sizes are counted here a strip at a time,
    where skimage counts them on an int64 copy of the labels (8 bytes a pixel)."""
    if max_size == 0:
        return
    labels = np.empty(mask.shape, dtype=np.int32)
    small = counts(labels, ndimage.label(mask, output=labels) + 1) <= max_size
    small[0] = False  # the background
    if small.any():
        flat, kept = labels.reshape(-1), mask.reshape(-1)
        for start in range(0, flat.size, STRIP_PIXELS):
            kept[start:start + STRIP_PIXELS] &= ~small[flat[start:start + STRIP_PIXELS]]


def counts(values: np.ndarray, length: int) -> np.ndarray:
    """``np.bincount`` of an array of small non-negative integers, a strip at a time: whole, it
    would first copy them all to int64."""
    flat = values.reshape(-1)
    return sum(np.bincount(flat[start:start + STRIP_PIXELS], minlength=length)
               for start in range(0, flat.size, STRIP_PIXELS))


def picture_factor(shape: tuple[int, ...]) -> int:
    """The whole factor by which a mask of ``shape`` is shrunk into a picture of at most ``PICTURE_PIXELS``."""
    return max(1, math.ceil(math.sqrt(shape[0] * shape[1] / PICTURE_PIXELS)))


@cache
def saturation_table() -> np.ndarray:
    """HSV saturation, (max - min) / max (0 where max is 0), of every pair of a pixel's brightest
    and darkest uint8 channel, (256, 256) float64 indexed [max, min]: computed by skimage's
    ``rgb2hsv`` on pixels (max, min, min), so that looking it up gives its values bit for bit."""
    high, low = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    low = np.minimum(low, high)
    return rgb2hsv(np.stack([high, low, low], axis=-1).astype(np.uint8))[..., 1]


def channel_pairs(thumbnail: np.ndarray) -> np.ndarray:
    """Each pixel's index into :func:`saturation_table`, 256 * max + min of its channels, uint16."""
    red, green, blue = (thumbnail[..., channel] for channel in range(3))
    high = np.maximum(np.maximum(red, green), blue).astype(np.uint16)
    high <<= 8
    high |= np.minimum(np.minimum(red, green), blue)
    return high


def tissue_threshold(values: np.ndarray, counts: np.ndarray, given: float | None) -> tuple[float, str | None]:
    """The saturation above which a pixel is tissue, from the thumbnail's saturations (``values``,
    each held by ``counts`` pixels): ``given`` (--saturation_threshold), else Otsu's where it
    splits glass from tissue. Otsu's always splits the pixels in two: on a crop with no glass,
    pale tissue from dark; on glass alone, glass from glass. Where its paler class is not glass,
    or its other class is glass too, all that is more saturated than glass is tissue
    (``GLASS_SATURATION``), with a note saying so."""
    if given is not None:
        return given, None
    present = counts > 0
    values, counts = values[present], counts[present]
    otsu = otsu_threshold(values, counts) if values.max() > values.min() else 1.0
    above = values > otsu
    paler = weighted_median(values[~above], counts[~above])
    darker = weighted_median(values[above], counts[above]) if above.any() else paler  # one saturation: one class
    if paler < GLASS_SATURATION <= darker:
        return otsu, None
    found = "no glass" if paler >= GLASS_SATURATION else "only glass"
    return GLASS_SATURATION, (f"{found} found (Otsu's threshold {otsu:.3f} splits the saturation into classes of "
                              f"median {paler:.2f} and {darker:.2f}, glass has less than {GLASS_SATURATION:g}): "
                              f"saturation threshold {GLASS_SATURATION:g} used instead of Otsu's (pass "
                              "--saturation_threshold to choose)")


def otsu_threshold(values: np.ndarray, counts: np.ndarray) -> float:
    """skimage's ``threshold_otsu`` of the image holding each of ``values`` ``counts`` times: its
    256 bins between the lowest and the highest value, counted here from the values alone."""
    histogram, edges = np.histogram(values, bins=256, range=(values.min(), values.max()), weights=counts)
    return float(threshold_otsu(hist=(histogram, (edges[:-1] + edges[1:]) / 2)))


def weighted_median(values: np.ndarray, counts: np.ndarray) -> float:
    """``np.median`` of the array holding each of ``values`` ``counts`` times."""
    order = np.argsort(values, kind="stable")
    values, ends = values[order], np.cumsum(counts[order])
    total = int(ends[-1])
    middle = values[np.searchsorted(ends, [(total - 1) // 2, total // 2], side="right")]
    return float((middle[0] + middle[1]) / 2)


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


def tile_slide(path: Path, job: Path, slide_class: str | None, options: TilingOptions,
               layouts: Sequence[str]) -> dict:
    """Tile one slide into a staging folder and move it into place only when complete, so a
    slide that fails half-way leaves nothing for pretraining or a reader to pick up; its
    coordinate file records what made it and its row of ``tiles.csv``, so that a run killed
    later, or run again, finds it done (:func:`finished_row`). Link it into the other tools'
    ``layouts``; return its summary row (and its patch label rows)."""
    made = slide_record(path, slide_class, options)  # before reading: a file changed meanwhile is tiled again
    relative = Path(PATCHES, slide_class or "", path.stem)
    staging = job / STAGING / path.stem
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    try:
        row = tile_into(path, relative, staging, job / COORDS, options)
        with h5py.File(staging / f"{path.stem}.h5", "a") as handle:
            summary = {key: value for key, value in row.items() if key != "patch_labels"}
            handle.attrs[TILING_RECORD] = json.dumps({"made": made, "row": summary})
        publish(staging, job, relative, path.stem)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        # The slide's parsed file (tifffile keeps every level's tile offsets as Python integers: tens of MB for a
        # scanner-size slide) lies in reference cycles, which the collector seldom visits in a worker that makes
        # few Python objects: without this, a worker grew by 5-30 MB a slide (2.3 GB after 400 scanner-size slides).
        gc.collect()
    row["warnings"] += link_layouts(job, path.stem, layouts)
    return row


def slide_record(path: Path, slide_class: str | None, options: TilingOptions) -> dict:
    """What a slide's coordinates are made from, as JSON holds it: the tiler's version, the slide
    file (where it leads, its size and modification time), its class, its annotation file's and
    every tiling option (of a --slide_mpp CSV, this slide's value). Equal records: the same coordinates, patches,
    thumbnail and row."""
    annotations = annotation_file(options.annotations, path.stem)
    slide_mpp = options.slide_mpp.get(path.stem) if isinstance(options.slide_mpp, dict) else options.slide_mpp
    record = {"tiler": TILER_VERSION, "file": file_stamp(path), "class": slide_class,
              "annotations": None if annotations is None else file_stamp(annotations),
              "options": {**plain_options(options), "slide_mpp": slide_mpp}}
    return json.loads(json.dumps(record))


def file_stamp(path: Path) -> list:
    """Where ``path`` leads, its size and its modification time (ns): a file replaced or written to differs."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def plain_options(options: TilingOptions) -> dict:
    """The options as JSON holds them."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(options).items()}


def finished_row(path: Path, job: Path, slide_class: str | None, options: TilingOptions) -> dict | None:
    """The row (and patch label rows) of a slide the job already holds as this run would make it:
    its coordinate file records the same :func:`slide_record`, and its thumbnail is there (the
    coordinate file is published last, so its patches are too). None otherwise: tile it."""
    coords = job / COORDS / f"{path.stem}.h5"
    if not coords.is_file() or not (job / THUMBNAILS / f"{path.stem}.png").is_file():
        return None
    try:
        with h5py.File(coords, "r") as handle:
            stored = json.loads(handle.attrs.get(TILING_RECORD, "null"))
            if not stored or stored["made"] != slide_record(path, slide_class, options):
                return None
            labels = handle["label"][:].astype(str) if "label" in handle else None
            paths = handle["paths"].asstr()[:].tolist() if "paths" in handle else None
            return {**stored["row"], "patch_labels": label_rows(path.stem, handle["coords"][:], labels, paths)}
    except (OSError, ValueError, KeyError, TypeError):  # a damaged file, or one an older tiler wrote: tile it again
        return None


def link_layouts(job: Path, name: str, layouts: Sequence[str]) -> list[str]:
    """Link the slide's coordinate file where TRIDENT's processor and CLAM's feature extractor
    look for it (see :mod:`clusiam.coords`). CLAM's reads ``patch_size`` pixels at
    ``patch_level``, which a file has only where the slide has a level at ``--mpp``
    (:func:`clusiam.coords.coordinate_attributes`): a slide without one is not linked for it,
    and the warning returned says so."""
    coords = job / COORDS / f"{name}.h5"
    attributes = read_attributes(coords)
    if "trident" in layouts:
        write_link(job / trident_folder(attributes) / PATCHES / f"{name}_patches.h5", coords)
    if "clam" not in layouts:
        return []
    if "patch_level" in attributes:
        write_link(job / PATCHES / f"{name}.h5", coords)
        return []
    return [f"{name}: not linked as {PATCHES}/{name}.h5 for CLAM, whose extractor reads patch_size pixels at "
            "patch_level: the slide has no pyramid level at --mpp, so that would be another field of view (read its "
            "coordinates with TRIDENT, --layout trident, or with clusiam)"]


def unlink_layouts(job: Path, name: str) -> None:
    """Remove the links an earlier ``--layout`` made to the slide's coordinate file, which is
    about to be replaced or withdrawn: a TRIDENT folder is named by how the slide was tiled
    then, and CLAM's link holds only where the new tiling has a ``patch_level``."""
    trident = [folder / PATCHES / f"{name}_patches.h5" for folder in trident_folders(job)]
    for link in (job / PATCHES / f"{name}.h5", *trident):
        if link.is_symlink():
            link.unlink()


def publish(staging: Path, job: Path, relative: Path, name: str) -> None:
    """Move a finished slide into place. Its earlier coordinate file goes first and the new
    one comes last, so that a coordinate file in the job always belongs to the patches and
    thumbnail beside it; patches of an earlier tiling are replaced rather than mixed with
    these (and removed under --coords_only, which writes none)."""
    unlink_layouts(job, name)
    (job / COORDS / f"{name}.h5").unlink(missing_ok=True)
    shutil.rmtree(job / relative, ignore_errors=True)
    if (staging / PATCHES).is_dir():
        (job / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / PATCHES, job / relative)
    os.replace(staging / f"{name}.png", job / THUMBNAILS / f"{name}.png")
    os.replace(staging / f"{name}.h5", job / COORDS / f"{name}.h5")
    staging.rmdir()


def withdraw(job: Path, name: str) -> bool:
    """Remove what an earlier run wrote for slide ``name`` (its coordinates, patches and
    thumbnail), which this run could not tile again, so that the job never describes a slide
    as it no longer is; return whether there was any."""
    coords = job / COORDS / f"{name}.h5"
    if not coords.is_file():
        return False
    try:
        with h5py.File(coords, "r") as handle:
            paths = handle["paths"].asstr()[:] if "paths" in handle else []
    except OSError:  # a damaged coordinate file: it goes, with what can be found of the rest
        paths = []
    for folder in {Path(path).parent for path in paths}:
        shutil.rmtree(job / folder, ignore_errors=True)
    unlink_layouts(job, name)
    coords.unlink()
    (job / THUMBNAILS / f"{name}.png").unlink(missing_ok=True)
    return True


def plan_reading(slide, path: Path, options: TilingOptions) -> ReadPlan:
    """The grid and the reader of one slide: ``--size`` pixels at ``--mpp``, on a grid that
    steps by the tile less the overlap in whole pixels at ``--mpp`` (what the coordinate file
    records)."""
    mpp0 = level0_mpp(slide, path, options.slide_mpp)
    width, height = slide.dimensions
    target = options.mpp / mpp0  # level-0 pixels per output pixel
    reader = PatchReader.for_slide(slide, options.size * target, options.size)
    return ReadPlan(
        level0_mpp=mpp0, magnification=slide_property(slide, "objective-power"), width=width, height=height,
        reader=reader, downsample=float(slide.level_downsamples[reader.level]),
        step0=(options.size - options.overlap_px) * target,
        thumb_scale=mask_scale(width, height, options.mask_mpp / mpp0),
    )


def mask_scale(width: int, height: int, scale: float) -> float:
    """Level-0 pixels per mask pixel: ``scale`` (--mask_mpp's), or the smallest whole multiple
    of it at which the mask has at most ``MASK_PIXELS`` pixels. The mask's memory and time are
    then bounded on a slide of any size, and a tile still spans many mask pixels (a 224 px
    tile at 20x: 28 at 4 um/px, 14 at 8 um/px on a Camelyon16 scan)."""
    return scale * max(1, math.ceil(math.sqrt(width * height / scale**2 / MASK_PIXELS)))


def tissue_tiles(mask: np.ndarray, plan: ReadPlan, min_tissue: float) -> tuple[np.ndarray, list[float]]:
    """The grid's tiles with at least ``min_tissue`` of their area in the tissue mask, and some
    tissue (``min_tissue`` 0 keeps the tiles that touch tissue, as TRIDENT's 0 does, not the
    glass): their top-left corners (N, 2) in level-0 pixels, and their tissue fractions. A
    tile covers the mask pixels from the one its corner lies in to the one before its far edge
    (at least one), those inside the mask; a grid row's fractions come from running sums over
    its band of rows."""
    tile0 = plan.reader.side0
    xs = np.arange(0, plan.width - tile0 + 1e-6, plan.step0)
    left, right = mask_span(xs, tile0, plan.thumb_scale, mask.shape[1])
    coords, tissue = [], []
    for y in np.arange(0, plan.height - tile0 + 1e-6, plan.step0):
        (top,), (bottom,) = mask_span(np.array([y]), tile0, plan.thumb_scale, mask.shape[0])
        sums = np.concatenate([[0], np.cumsum(mask[top:bottom].sum(axis=0))])
        area = (bottom - top) * (right - left)
        fraction = np.divide(sums[right] - sums[left], area, out=np.zeros(len(xs)), where=area > 0)
        keep = (fraction > 0) & (fraction >= min_tissue)
        coords += [(int(round(x)), int(round(y))) for x in xs[keep]]
        tissue += fraction[keep].tolist()
    return np.array(coords, dtype=np.int64).reshape(-1, 2), tissue


def mask_span(starts: np.ndarray, tile0: float, scale: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The mask pixels [first, end) that tiles starting at level-0 ``starts`` cover along one axis."""
    first = (starts / scale).astype(np.int64)
    end = np.maximum(first + 1, ((starts + tile0) / scale).astype(np.int64))
    return np.minimum(first, length), np.minimum(end, length)


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
    if plan.reader.side0 > min(plan.width, plan.height):
        return (f"{path} gave 0 patches: a {options.size} px tile at {options.mpp:g} um/px spans "
                f"{plan.reader.side0:.0f} level-0 pixels, more than the slide's {plan.width} x {plan.height} at "
                f"{plan.level0_mpp:g} um/px; check --slide_mpp (0.25 for 40x, 0.5 for 20x), or lower --size or --mpp")
    need, lower = (("touches tissue", "") if options.min_tissue == 0
                   else (f"holds {options.min_tissue:.0%} tissue", "lower --min_tissue or "))
    return (f"{path} gave 0 patches: no tile {need} ({tissue_mm2} mm2 of tissue found); see "
            f"{THUMBNAILS}/{path.stem}.png in the job folder, and {lower}set --saturation_threshold")


def tumour_fractions(coords: np.ndarray, tile0: float, region: shapely.Geometry) -> np.ndarray:
    """The share of each tile's area inside ``region``."""
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + tile0, coords[:, 1] + tile0)
    return shapely.area(shapely.intersection(boxes, region)) / (tile0 * tile0)


def tumour_labels(coords: np.ndarray, tile0: float, region: shapely.Geometry | None,
                  threshold: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Each tile's tumour fraction and label (``tumor`` from ``threshold`` on, else
    ``normal``); neither without --annotations."""
    if region is None:
        return None, None
    tumour = tumour_fractions(coords, tile0, region)
    return tumour, np.where(tumour >= threshold, "tumor", "normal")


def write_patches(slide, coords: np.ndarray, reader: PatchReader, folder: Path, relative: Path,
                  extension: str) -> list[str]:
    """Read every tile and save it as ``folder/<x>_<y>.<ext>``; return the paths as
    ``relative/<x>_<y>.<ext>`` (from the job folder)."""
    folder.mkdir()
    paths = []
    for x, y in coords:
        name = f"{x}_{y}.{extension}"
        reader.read(slide, x, y).save(folder / name, **({"quality": 90} if extension == "jpg" else {}))
        paths.append(str(relative / name))
    return paths


def write_coords(path: Path, coords: np.ndarray, attributes: dict, tissue: list[float], paths: list[str] | None,
                 tumour: np.ndarray | None, labels: np.ndarray | None) -> None:
    """The slide's coordinate file: ``coords`` with ``attributes`` (see
    :func:`clusiam.coords.coordinate_attributes`), and ours beside it: tissue fractions, the
    patch files (none under --coords_only) and, with annotations, tumour fractions and labels."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset("coords", data=coords).attrs.update(attributes)
        handle["tissue_fraction"] = np.array(tissue, dtype=np.float32)
        if paths is not None:
            handle["paths"] = np.array(paths, dtype=h5py.string_dtype())
        if tumour is not None:
            handle["tumor_fraction"] = tumour.astype(np.float32)
            handle["label"] = labels.astype("S")


def label_rows(name: str, coords: np.ndarray, labels: np.ndarray | None, paths: list[str] | None) -> list[dict]:
    """The slide's rows of ``patch_labels.csv``: where each patch lies, its label and its
    file (empty under --coords_only: read it from the slide)."""
    if labels is None:
        return []
    files = paths if paths is not None else [""] * len(coords)
    return [dict(zip(LABEL_COLUMNS, (name, int(x), int(y), label, file)))
            for (x, y), label, file in zip(coords, labels.tolist(), files)]


def tile_into(path: Path, relative: Path, staging: Path, coords_dir: Path, options: TilingOptions) -> dict:
    """Tile one slide into ``staging``: patches under ``patches/`` (unless --coords_only),
    coordinate file and thumbnail beside them; return its summary row and its patch label rows."""
    started = time.time()
    name = path.stem
    region, annotation_warning = tumour_region(options, name)
    slide = open_slide(path)
    try:
        plan = plan_reading(slide, path, options)
        mask, threshold, fallback, picture = find_tissue(slide, path, plan, options)
        coords, tissue = tissue_tiles(mask, plan, options.min_tissue)
        staging.mkdir(parents=True)
        paths = None if options.coords_only else write_patches(slide, coords, plan.reader, staging / PATCHES,
                                                                relative, options.extension)
    finally:
        slide.close()
    tumour, labels = tumour_labels(coords, plan.reader.side0, region, options.label_threshold)
    attributes = coordinate_attributes(
        name=name, reader=plan.reader, downsample=plan.downsample, width=plan.width, height=plan.height,
        level0_mpp=plan.level0_mpp, magnification=plan.magnification, overlap_px=options.overlap_px,
        savetodir=coords_dir)
    write_coords(staging / f"{name}.h5", coords, attributes, tissue, paths, tumour, labels)
    draw_thumbnail(picture, mask, coords, plan.reader.side0, staging / f"{name}.png", region, plan.thumb_scale)
    mask_mpp = plan.thumb_scale * plan.level0_mpp  # --mask_mpp's, or coarser on a scanner-size slide
    tissue_mm2 = round(float(mask.sum()) * mask_mpp**2 / 1e6, 3)
    warnings = [annotation_warning] if annotation_warning else []
    if len(coords) == 0:
        warnings.append(no_tile_warning(path, plan, options, tissue_mm2))
    if fallback:
        warnings.append(f"{path}: {fallback}")
    return {
        "slide": name, "tiles": len(coords), "tissue_area_mm2": tissue_mm2,
        "mpp": plan.level0_mpp, "level": plan.reader.level, "otsu_threshold": round(threshold, 4),
        "tumor_tiles": int((labels == "tumor").sum()) if labels is not None else "",
        "seconds": round(time.time() - started, 2), "warnings": warnings,
        "patch_labels": label_rows(name, coords, labels, paths),
    }


def draw_thumbnail(picture: np.ndarray, mask: np.ndarray, coords: np.ndarray, tile0: float, path: Path,
                   region: shapely.Geometry | None, scale: float) -> None:
    """The slide's picture (:func:`find_tissue`; the mask ``scale`` level-0 pixels per pixel) with
    the tissue mask tinted green, kept tiles (level-0 corners ``coords``, side ``tile0``) outlined
    in blue and tumour annotations in red. Shrunk by a whole factor to at most ``PICTURE_PIXELS``,
    which is plenty to look at and keeps a scanner-size slide's picture from costing seconds."""
    factor = picture_factor(mask.shape)
    picture = picture.copy()
    tinted = shrink(mask.view(np.uint8) * np.uint8(255), factor) >= 128
    picture[tinted] = 0.7 * picture[tinted] + 0.3 * np.array([0, 200, 0])
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    scale *= factor
    for x, y in coords / scale:
        draw.rectangle([x, y, x + tile0 / scale, y + tile0 / scale], outline=(0, 60, 255))
    for outline in polygon_outlines(region, scale):
        draw.line(outline + outline[:1], fill=(230, 0, 0), width=2)
    image.save(path, compress_level=1)


def polygon_outlines(region: shapely.Geometry | None, scale: float) -> list[list[tuple[float, float]]]:
    """Exterior and interior rings of a (multi)polygon, divided by ``scale``."""
    if region is None or region.is_empty:
        return []
    polygons = getattr(region, "geoms", [region])
    rings = [ring for p in polygons if isinstance(p, Polygon) for ring in (p.exterior, *p.interiors)]
    return [[(x / scale, y / scale) for x, y in ring.coords] for ring in rings]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m clusiam.tile", description=__doc__.split("\n\n")[0])
    parser.add_argument("slides", type=Path, help="a slide file or a folder of slides")
    parser.add_argument("--out", type=Path, required=True,
                        help="JOB: the job folder (patches, coordinates, thumbnails, tables, job.json)")
    parser.add_argument("--classes", type=Path, default=None,
                        help="slides.csv (slide, label): patches go under patches/<label>/<slide>/ (default: "
                        "patches/<slide>/)")
    parser.add_argument("--workers", type=int, default=None,
                        help="slides tiled in parallel (default: the cores, or as many as the available memory holds "
                        f"at {SLIDE_PEAK_MIB} MiB a slide)")
    parser.add_argument("--layout", nargs="+", default=["clusiam"], choices=LAYOUTS,
                        help="also link each coordinate file where TRIDENT (JOB/<mag>x_<size>px_<overlap>px_overlap/"
                        "patches/<slide>_patches.h5) or CLAM (JOB/patches/<slide>.h5) looks for it")
    for spec in fields(TilingOptions):
        options = dict(spec.metadata["argparse"])
        flag = options.pop("flag", spec.name)
        if "action" not in options:
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
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers} must be at least 1")
    if args.annotations is not None and not args.annotations.is_dir():
        state = "is not a folder" if args.annotations.exists() else "does not exist"
        raise DataError(f"--annotations {args.annotations} {state}: pass the folder of <slide>.xml (ASAP) "
                        "or <slide>.geojson files, or leave --annotations out")
    options = TilingOptions(**{spec.name: getattr(args, spec.name) for spec in fields(TilingOptions)})
    if options.overlap_px >= options.size:
        raise ConfigError(f"--overlap {options.overlap:g} of a {options.size} px tile rounds to {options.overlap_px} "
                          "px, the whole tile: the grid would not move; lower --overlap")
    return options


def find_slides(source: Path) -> list[Path]:
    """The slide files to tile, refusing two of one name: a job keeps one coordinate file per name."""
    if source.is_file():
        return [source]
    slides = find_files(source, SLIDE_EXTENSIONS, "slides", "pass a slide file or a folder of slides",
                        "check the path")
    seen: dict[str, Path] = {}
    for path in slides:
        if path.stem in seen:
            raise DataError(f"{seen[path.stem]} and {path} are both named {path.stem}, and a job keeps one "
                            "coordinate file per slide name: rename one, or tile them into separate --out folders")
        seen[path.stem] = path
    return slides


def slide_thumbnail(slide, scale: float) -> Image.Image:
    """The whole slide as RGB, ``scale`` level-0 pixels per thumbnail pixel."""
    size = thumbnail_size(slide, scale)
    return slide.get_thumbnail(size).convert("RGB").resize(size)


def thumbnail_size(slide, scale: float) -> tuple[int, int]:
    width, height = slide.dimensions
    return max(1, round(width / scale)), max(1, round(height / scale))


def mask_image(slide, path: Path, scale: float, source_scale: float) -> np.ndarray:
    """The whole slide as RGB, (height, width, 3) uint8, ``scale`` level-0 pixels per pixel, from
    the level :func:`slide_thumbnail` reads at ``source_scale`` (--mask_mpp's; ``scale`` is a
    whole multiple of it where the mask is coarser): read whole where that level is small, else
    a strip of rows at a time, each resized (area average) to its rows of the image, so that the
    memory it takes is the image's and a strip's, however large the level."""
    level = slide.get_best_level_for_downsample(source_scale)
    level_width, level_height = slide.level_dimensions[level]
    if scale == source_scale and level_width * level_height <= MASK_PIXELS:
        return np.asarray(slide_thumbnail(slide, scale))
    width, height = thumbnail_size(slide, scale)
    step = level_height / height  # level rows per image row
    image = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, int(STRIP_PIXELS / (level_width * step)))
    reader = LevelTiles.of(slide, level, path) or SlideLevel(slide, level)
    try:
        for first in range(0, height, rows):
            end = min(first + rows, height)
            top, bottom = math.floor(first * step), min(level_height, math.ceil(end * step))
            strip = Image.fromarray(level_rows(reader, slide.level_downsamples[level], top, bottom - top, level_width))
            box = (0, first * step - top, level_width, end * step - top)
            image[first:end] = np.asarray(resized(strip, (width, end - first), box))
    finally:
        if isinstance(reader, LevelTiles):  # its own file handle; a SlideLevel's is the slide's
            reader.close()
    return image


def level_rows(reader: LevelTiles | SlideLevel, downsample: float, top: int, rows: int, width: int) -> np.ndarray:
    """``rows`` whole rows of a level from row ``top``, (rows, width, 3) uint8: squares side by side,
    each tile decoded once. The readers take level-0 pixels and divide them by the downsample:
    rounded up, they land on the level's pixel."""
    corners = [(math.ceil(left * downsample), math.ceil(top * downsample)) for left in range(0, width, rows)]
    return np.concatenate(reader.regions(corners, rows), axis=1)[:, :width]


def resized(image: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
    """The ``box`` of ``image`` resized to ``size``, each pixel the mean of the area it covers;
    by PIL's ``reduce`` where that is a whole factor of the image (a pyramid's 2x or 4x: 3x as fast)."""
    factor = image.width / size[0]
    if factor.is_integer() and box == (0, 0, image.width, image.height) and image.height == size[1] * factor:
        return image.reduce(int(factor))
    return image.resize(size, Image.Resampling.BOX, box=box)


def shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """``image`` (uint8, RGB or one channel) ``factor`` times smaller, each pixel the mean of its block."""
    return image if factor == 1 else np.asarray(Image.fromarray(image).reduce(factor))


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


def tile_all(slides: Sequence[Path], job: Path, classes: dict[str, str], options: TilingOptions,
             workers: int | None, layouts: Sequence[str]) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Tile the slides ``workers`` at a time (None: :func:`default_workers`), skipping those the
    job already holds as this run would make them (:func:`finished_row`; their links are made
    again, for this run's ``layouts``); return the summary rows of all of them, in the slides'
    order, and the slides that failed, with why (one bad slide must not stop the others)."""
    rows, failed, todo = [], [], []
    for path in slides:
        row = finished_row(path, job, classes.get(path.stem), options)
        if row is None:
            todo.append(path)
            continue
        try:
            unlink_layouts(job, path.stem)
            rows.append({**row, "warnings": row["warnings"] + link_layouts(job, path.stem, layouts)})
        except DataError as error:  # a file where a link belongs: the slide fails, as when it is tiled
            failed.append((path, f"{type(error).__name__}: {error}"))
    if len(todo) < len(slides):
        print(f"skipped {len(slides) - len(todo)} of {len(slides)} slide(s), already tiled from the same file (size "
              f"and modification time) with the same options; tiling {len(todo)}")
    if todo:
        rows += tile_slides(todo, job, classes, options, workers or default_workers(), layouts, failed)
    shutil.rmtree(job / STAGING, ignore_errors=True)
    order = {path.stem: index for index, path in enumerate(slides)}
    return sorted(rows, key=lambda row: order[row["slide"]]), failed


def tile_slides(slides: Sequence[Path], job: Path, classes: dict[str, str], options: TilingOptions, workers: int,
                layouts: Sequence[str], failed: list[tuple[Path, str]]) -> list[dict]:
    """Tile ``slides`` in ``workers`` processes, with a progress bar that shows the time left;
    return their rows, and add those that fail to ``failed``."""
    rows = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(tile_slide, path, job, classes.get(path.stem), options, layouts): path
                   for path in slides}
        for future in tqdm(as_completed(futures), total=len(futures), desc="slides", unit="slide"):
            try:
                rows.append(future.result())
            except Exception as error:  # any failure of one slide, whatever raised it
                failed.append((futures[future], f"{type(error).__name__}: {error}"))
                tqdm.write(f"skipped {futures[future]}: {error}")
                continue
            for warning in rows[-1]["warnings"]:  # printed here: the workers' own output would interleave
                tqdm.write(f"warning: {warning}")
    return rows


def default_workers() -> int:
    """Slides tiled at once when --workers is left out: one per core, as many as the available
    memory holds at ``SLIDE_PEAK_MIB`` each, and at least one; said on the console."""
    workers, why = default_processes("--workers", SLIDE_PEAK_MIB, "a slide")
    print(why)
    return workers


def read_job(job: Path) -> dict:
    """What an earlier run recorded in ``job.json`` (nothing for a new job), read before any
    slide is tiled, so that a damaged record stops the run before the work rather than after."""
    record = job / JOB_FILE
    if not record.is_file():
        return {}
    try:
        earlier = json.loads(record.read_text())
        if isinstance(earlier.get("slides"), dict):
            return earlier
    except (ValueError, AttributeError):  # not JSON; JSON but not an object
        pass
    raise DataError(f"{record} is not the job record python -m clusiam.tile writes (a \"slides\" mapping): delete "
                    f"it and tile every slide of {job} again, or pass another --out")


def write_job(job: Path, earlier: dict, tiled: dict[str, Path], options: TilingOptions) -> set[str]:
    """``job.json``, written atomically: the slide file of each coordinate file in the job
    (this run's slides, and an earlier run's whose coordinate file is still there), whether
    some patches exist only as coordinates, and this run's options. Returns the names of
    the earlier run's slides kept."""
    kept = {name: path for name, path in earlier.get("slides", {}).items()
            if name not in tiled and (job / COORDS / f"{name}.h5").is_file()}
    plain = plain_options(options)
    record = {
        "slides": dict(sorted({**kept, **{name: str(path) for name, path in tiled.items()}}.items())),
        "coords_only": plain.pop("coords_only") or bool(kept and earlier.get("coords_only")),
        "options": plain,
    }
    write_atomically(job / JOB_FILE, lambda temporary: temporary.write_text(json.dumps(record, indent=2) + "\n"))
    return set(kept)


def write_clam_list(job: Path) -> None:
    """``JOB/process_list_autogen.csv``, the slide list CLAM's ``create_patches_fp.py`` writes and
    its ``extract_features_fp.py --csv_path`` reads (column ``slide_id``: the slide's file name,
    which CLAM cuts at ``--slide_ext``): every slide of the job linked for CLAM."""
    slides = json.loads((job / JOB_FILE).read_text())["slides"]
    rows = [[Path(path).name] for name, path in slides.items() if (job / PATCHES / f"{name}.h5").is_symlink()]
    write_atomically(job / CLAM_SLIDE_LIST, lambda temporary: write_csv(temporary, ["slide_id"], rows))


def update_table(path: Path, columns: Sequence[str], rows: Sequence[dict], kept: set[str]) -> None:
    """Write this run's ``rows`` to ``path`` (atomically) after those an earlier run wrote
    there for the slides the job keeps from it; a table left without rows is removed."""
    earlier = []
    if kept and path.is_file():
        with open(path, newline="") as handle:
            earlier = [row for row in csv.DictReader(handle) if row.get("slide") in kept]
    merged = [[row.get(column, "") for column in columns] for row in (*earlier, *rows)]
    if merged:
        write_atomically(path, lambda temporary: write_csv(temporary, columns, merged))
    else:
        path.unlink(missing_ok=True)


def write_tables(job: Path, rows: list[dict], failed: list[tuple[Path, str]], kept: set[str]) -> Path:
    """``tiles.csv`` (its ``warnings`` column: what a slide gave that is likely not what was
    meant, "; "-separated) and ``patch_labels.csv`` (with annotations), each keeping an
    earlier run's rows of the slides the job keeps; and ``failed_slides.txt`` (only when a
    slide of this run failed: a list from an earlier run would no longer be true). Returns
    the last one's path."""
    update_table(job / "tiles.csv", TILE_COLUMNS, [{**row, "warnings": "; ".join(row["warnings"])} for row in rows],
                 kept)
    update_table(job / "patch_labels.csv", LABEL_COLUMNS, [label for row in rows for label in row["patch_labels"]],
                 kept)
    failed_list = job / "failed_slides.txt"
    if failed:
        failed_list.write_text("".join(f"{p}\t{why}\n" for p, why in failed))
    else:
        failed_list.unlink(missing_ok=True)
    return failed_list


def tile(args: argparse.Namespace) -> dict:
    """Tile every slide into the job folder; unreadable ones are reported, listed and skipped."""
    options = tiling_options(args)
    slides = find_slides(args.slides)
    classes = read_classes(args.classes, slides) if args.classes else {}
    job = check_output_folder(args.out, "--out").resolve()
    earlier = read_job(job)
    for folder in (COORDS, THUMBNAILS):
        make_folder(job / folder, "--out")
    if options.annotations is not None:
        report_unannotated(slides, options.annotations)
    rows, failed = tile_all(slides, job, classes, options, args.workers, args.layout)
    withdrawn = [path.stem for path, _ in failed if withdraw(job, path.stem)]
    if withdrawn:
        print(f"removed the earlier coordinates, patches and thumbnails of {len(withdrawn)} slide(s) that could not "
              f"be tiled again ({', '.join(withdrawn)})")
    files = {path.stem: path.resolve() for path in slides}
    kept = write_job(job, earlier, {row["slide"]: files[row["slide"]] for row in rows}, options)
    if "clam" in args.layout:
        write_clam_list(job)
    failed_list = write_tables(job, rows, failed, kept)
    if not rows:
        raise DataError(f"none of the {len(slides)} slide(s) could be tiled; the reasons are in {failed_list}")
    warned = sum(1 for row in rows if row["warnings"])
    what = "coordinates of " if options.coords_only else ""
    patches = counted(sum(row["tiles"] for row in rows), "patch", "patches")
    print(f"{what}{patches} from {counted(len(rows), 'slide')} into {job}"
          + (f"; {counted(warned, 'slide')} with warnings (in tiles.csv)" if warned else "")
          + (f"; {counted(len(failed), 'slide')} could not be read (listed in {failed_list})" if failed else ""))
    return {"rows": rows, "failed": failed, "job": job}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: tile(build_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
