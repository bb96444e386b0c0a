"""Coordinate files: one ``<slide>.h5`` per slide, dataset ``coords`` (N, 2) int64, the
top-left corner of each patch in level-0 pixels, as TRIDENT and CLAM write them.

The two tools say differently what a patch covers (their code, read 2026: TRIDENT
``trident/IO.py``, CLAM ``wsi_core/WholeSlideImage.py``):

- TRIDENT: ``patch_size`` pixels at ``target_magnification``, so ``patch_size *
  level0_magnification / target_magnification`` level-0 pixels (``patch_size_level0``);
- CLAM: ``patch_size`` pixels read at pyramid level ``patch_level``.

:func:`coordinate_attributes` writes TRIDENT's set, which its reader accepts without
falling back, plus our own (``mpp``, ``level0_mpp``, ``read_level``, ``read_size``), and
CLAM's ``patch_level`` only where its ``patch_size`` means the same field of view (patches
read at their own size). No attribute is ever NaN: readers compare and divide by them.
:func:`read_coords` reads any of the three layouts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from clusiam.errors import DataError
from clusiam.slides import PatchReader
from clusiam.storage import readable

# A tiling job (python -m clusiam.tile --out JOB): which slide file each coordinate file was
# made from, and the folder of the coordinate files (JOB/coords/<slide>.h5).
JOB_FILE, COORDS = "job.json", "coords"


def coordinate_attributes(*, name: str, reader: PatchReader, downsample: float, width: int, height: int,
                          level0_mpp: float, magnification: float | None, overlap_px: int,
                          savetodir: Path) -> dict:
    """The ``coords`` attributes of one slide tiled with ``reader``. The level-0 objective
    power is the file's, else 10 / mpp (40x ~ 0.25 um/px); the target magnification is the
    one at which ``patch_size`` pixels span the field of view actually read, so a TRIDENT
    reader derives the same ``patch_size_level0`` as we read."""
    level0_magnification = magnification if magnification else 10.0 / level0_mpp
    attributes = {
        "patch_size": reader.size,
        "patch_size_level0": round(reader.side0),
        "level0_magnification": float(level0_magnification),
        "target_magnification": round(level0_magnification * reader.size / reader.side0, 4),
        "overlap": int(overlap_px),
        "level0_width": int(width),
        "level0_height": int(height),
        "name": name,
        "savetodir": str(savetodir),
        "mpp": round(level0_mpp * reader.side0 / reader.size, 6),  # float noise off: 4.0, not 3.9999999999999996
        "level0_mpp": float(level0_mpp),
        "read_level": reader.level,
        "read_size": reader.read_size,
    }
    if reader.read_size == reader.size:  # CLAM's patch_size: pixels at patch_level, the same field of view
        dimensions = (round(width / downsample), round(height / downsample))
        attributes.update({"patch_level": reader.level, "downsample": (downsample, downsample),
                           "level_dim": dimensions, "downsampled_level_dim": dimensions})
    return attributes


def _number(attributes: h5py.AttributeManager, key: str) -> float | None:
    """A numeric attribute, or None when it is absent, not a number, NaN or not above 0."""
    value = attributes.get(key)
    try:
        value = float(np.asarray(value).ravel()[0])
    except (TypeError, ValueError, IndexError):
        return None
    return value if math.isfinite(value) and value > 0 else None


@dataclass(frozen=True)
class SlideCoords:
    """The patches one coordinate file lists, and what each covers."""

    path: Path
    name: str
    coords: np.ndarray  # (N, 2) int64, top-left corners in level-0 pixels
    size: int  # patch side in pixels as the file means it
    side0: float | None  # field of view in level-0 pixels; None: patch_size at clam_level (CLAM)
    clam_level: int | None
    level0_size: tuple[int, int] | None  # the slide's level-0 (width, height), where the file records it

    def reader(self, slide, size: int | None = None) -> PatchReader:
        """How to read these patches from ``slide``, resized to ``size`` (default: the file's)."""
        side0 = self.side0
        if side0 is None:
            if self.clam_level >= slide.level_count:
                raise DataError(f"{self.path}: patch_level {self.clam_level}, but the slide has only "
                                f"{slide.level_count} level(s): is it the slide these coordinates were made from?")
            side0 = self.size * slide.level_downsamples[self.clam_level]
        return PatchReader.for_slide(slide, side0, size or self.size)


def read_attributes(path: Path) -> dict:
    """The attributes of a (checked) coordinate file's ``coords``, which a bag's ``coords``
    carries on (as TRIDENT's feature files do), so that a reader of the bag knows what a patch covers."""
    with h5py.File(readable(path), "r") as handle:
        return dict(handle["coords"].attrs)


def read_coords(path: Path) -> SlideCoords:
    """A coordinate file in TRIDENT's, CLAM's or the tiler's layout."""
    try:
        with h5py.File(readable(path), "r") as handle:
            if "coords" not in handle:
                raise DataError(f"{path} holds no 'coords' dataset: pass coordinate files written by "
                                "python -m clusiam.tile, TRIDENT or CLAM")
            dataset = handle["coords"]
            coords = np.asarray(dataset[:], dtype=np.int64).reshape(-1, 2)
            attributes = dataset.attrs
            size = _number(attributes, "patch_size")
            level0_mag, target_mag = _number(attributes, "level0_magnification"), _number(attributes,
                                                                                          "target_magnification")
            side0 = _number(attributes, "patch_size_level0")
            if side0 is None and size and level0_mag and target_mag:
                side0 = size * level0_mag / target_mag
            level = attributes.get("patch_level")
            width, height = _number(attributes, "level0_width"), _number(attributes, "level0_height")
            name = attributes.get("name", path.stem)
    except OSError as error:
        raise DataError(f"{path} is not a readable HDF5 file ({error}): write it again") from None
    if size is None or (side0 is None and level is None):
        raise DataError(f"{path}: the coords attributes say neither TRIDENT's field of view (patch_size with "
                        "patch_size_level0, or with level0_magnification and target_magnification) nor CLAM's "
                        "(patch_size with patch_level): write the file again with one of those tools")
    return SlideCoords(
        path=path, name=name.decode() if isinstance(name, bytes) else str(name), coords=coords, size=int(size),
        side0=side0, clam_level=None if side0 is not None else int(level),
        level0_size=(int(width), int(height)) if width and height else None,
    )
