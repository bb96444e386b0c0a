"""Scanner-size slides for benchmarks: pyramidal TIFFs the size of a Camelyon16 scan, written
in seconds, and TRIDENT-style coordinate files over their tissue.

    write_scanner_slide(Path("/tmp/scan_2x.tif"), step=2)   # levels at 1, 2, 4, ... (Camelyon16's TIFFs)
    write_scanner_slide(Path("/tmp/scan_4x.tif"), step=4)   # levels at 1, 4, 16, 64 (Aperio): no 20x level

Level 0 is 100,000 x 200,000 px at 0.25 um/px (40x), in 256 px JPEG tiles (YCbCr 4:2:0,
quality 80, as scanners write them), with an Aperio description so that slide readers find
the resolution and the objective power. A few ellipses of tissue cover about 15 % of the
slide, the rest is glass. Tiles are not computed per position: tissue tiles cycle through a
pool of real H&E (the CC0 slide, upsampled to 40x and encoded once) and every glass tile
repeats one encoded tile, so a file (about 1.3 GB) is written in seconds while a reader
still decodes real JPEG tiles of the real size at every position. Lower levels hold tissue
where level 0 does, so a mask read from any level agrees with level 0.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import tifffile
from PIL import Image

from clusiam.demo import CMU_SLIDE
from clusiam.slides import open_slide

WIDTH, HEIGHT, MPP, MAGNIFICATION = 100_000, 200_000, 0.25, 40  # a Camelyon16 scan at 40x
TILE, QUALITY = 256, 80
TISSUE_SHARE = 0.15


def tissue_mask(columns: int, rows: int, seed: int = 0) -> np.ndarray:
    """(rows, columns) bool, one per level-0 tile: a few ellipses of tissue, about TISSUE_SHARE of the slide."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    mask = np.zeros((rows, columns), dtype=bool)
    while mask.mean() < TISSUE_SHARE:
        cy, cx = rng.uniform(0.1, 0.9) * rows, rng.uniform(0.15, 0.85) * columns
        ry, rx = rng.uniform(0.05, 0.12) * rows, rng.uniform(0.1, 0.25) * columns
        mask |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    return mask


def encoded_tiles(images: list[np.ndarray]) -> list[bytes]:
    """Each (TILE, TILE, 3) uint8 image as the JPEG tile bytes a TIFF of this module's format holds:
    written by tifffile itself into a small TIFF and read back raw, so the bytes match the tags."""
    buffer = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    scratch = buffer / f"scanner_tiles_{id(images)}.tif"
    try:
        with tifffile.TiffWriter(scratch) as writer:
            # tifffile writes YCbCr samples as given: convert first, so that readers decode the RGB given here
            ycbcr = np.asarray(Image.fromarray(np.concatenate(images, axis=0)).convert("YCbCr"))
            writer.write(ycbcr, tile=(TILE, TILE), **tile_options())
        with tifffile.TiffFile(scratch) as tiff, open(scratch, "rb") as handle:
            page = tiff.pages[0]
            tiles = []
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                handle.seek(offset)
                tiles.append(handle.read(count))
        return tiles
    finally:
        scratch.unlink(missing_ok=True)


def tile_options() -> dict:
    return {"compression": "jpeg", "compressionargs": {"level": QUALITY}, "photometric": "ycbcr", "subsampling": (2, 2)}


def tile_pool() -> tuple[list[bytes], bytes]:
    """Encoded tissue tiles (real H&E from the CC0 slide, upsampled 2x to 40x, mostly tissue)
    and one encoded glass tile."""
    with open_slide(CMU_SLIDE) as slide:
        region = slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")
    region = np.asarray(region.resize((2 * region.width, 2 * region.height), Image.LANCZOS))
    tissue = []
    for top in range(0, region.shape[0] - TILE + 1, TILE):
        for left in range(0, region.shape[1] - TILE + 1, TILE):
            tile = region[top : top + TILE, left : left + TILE]
            saturated = (tile.max(-1).astype(np.int16) - tile.min(-1)) > 25
            if saturated.mean() > 0.6:
                tissue.append(np.ascontiguousarray(tile))
    glass = np.clip(np.random.default_rng(0).normal(236, 2, (TILE, TILE, 3)), 0, 255).astype(np.uint8)
    encoded = encoded_tiles([*tissue, glass])
    return encoded[:-1], encoded[-1]


def level_tiles(mask: np.ndarray, downsample: int, pool: list[bytes], glass: bytes) -> Iterator[bytes]:
    """The tiles of the level at ``downsample``, row by row: tissue where any level-0 tile it covers is tissue."""
    rows = -(-mask.shape[0] // downsample)
    columns = -(-mask.shape[1] // downsample)
    padded = np.zeros((rows * downsample, columns * downsample), dtype=bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    covered = padded.reshape(rows, downsample, columns, downsample).any(axis=(1, 3))
    cycle = itertools.cycle(pool)
    for is_tissue in covered.ravel():
        yield next(cycle) if is_tissue else glass


def write_scanner_slide(path: Path, step: int, width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> Path:
    """A pyramidal TIFF of ``width`` x ``height`` px at 0.25 um/px, levels every ``step``x down
    to about 1,000 px; reused when ``path`` already holds one of the same making (path.json)."""
    spec = {"step": step, "width": width, "height": height, "seed": seed, "tile": TILE, "quality": QUALITY,
            "version": 1}
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file() and json.loads(record.read_text()) == spec:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    pool, glass = tile_pool()
    mask = tissue_mask(-(-width // TILE), -(-height // TILE), seed)
    description = (f"Aperio Image Library clusiam benchmark\r\n{width}x{height} ({TILE}x{TILE}) JPEG/RGB "
                   f"Q={QUALITY}|AppMag = {MAGNIFICATION}|MPP = {MPP}")
    downsample = 1
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        while downsample == 1 or max(width, height) // downsample >= 1000:
            shape = (-(-height // downsample), -(-width // downsample), 3)
            writer.write(level_tiles(mask, downsample, pool, glass), shape=shape, dtype=np.uint8,
                         tile=(TILE, TILE), description=description if downsample == 1 else None,
                         subfiletype=0 if downsample == 1 else 1, **tile_options())
            downsample *= step
    record.write_text(json.dumps(spec))
    return path


def tissue_grid(path: Path, patch_px: int, magnification: float, seed: int = 0) -> np.ndarray:
    """TRIDENT-style coordinates over the slide at ``path`` (written by :func:`write_scanner_slide`
    with ``seed``): corners (level-0 px) of a grid of ``patch_px`` px patches at ``magnification``
    whose level-0 tile under the patch centre is tissue; the grid runs while x < width (TRIDENT's)."""
    with open_slide(path) as slide:
        width, height = slide.dimensions
    side0 = round(patch_px * MAGNIFICATION / magnification)
    mask = tissue_mask(-(-width // TILE), -(-height // TILE), seed)
    xs, ys = np.meshgrid(np.arange(0, width, side0), np.arange(0, height, side0))
    centre_x, centre_y = np.minimum(xs + side0 // 2, width - 1), np.minimum(ys + side0 // 2, height - 1)
    keep = mask[centre_y // TILE, centre_x // TILE]
    return np.stack([xs[keep], ys[keep]], 1).astype(np.int64)


def write_trident_coords(path: Path, coords: np.ndarray, name: str, patch_px: int, magnification: float,
                         width: int = WIDTH, height: int = HEIGHT) -> Path:
    """``coords`` as TRIDENT's ``coords_to_h5`` writes them (its attributes, its names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("coords", data=coords).attrs.update({
            "patch_size": patch_px, "level0_magnification": MAGNIFICATION, "target_magnification": magnification,
            "patch_size_level0": round(patch_px * MAGNIFICATION / magnification), "overlap": 0,
            "name": name, "savetodir": str(path.parent), "level0_width": width, "level0_height": height})
    return path
