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

Where each tool looks for these files (``--layout`` of ``python -m clusiam.tile`` and
``mil.compute_feats`` links ours there, see :data:`LAYOUTS`):

- CLAM: ``DIR/patches/<slide>.h5`` (``create_patches_fp.py`` writes it, ``extract_features_fp.py
  --data_h5_dir DIR`` reads it), features in ``FEATS/h5_files/<slide>.h5`` and
  ``FEATS/pt_files/<slide>.pt`` (``Generic_MIL_Dataset(data_dir=FEATS)`` reads them);
- TRIDENT: ``JOB/<mag>x_<size>px_<overlap>px_overlap/patches/<slide>_patches.h5`` and
  ``.../features_<encoder>/<slide>.h5`` (``Processor.run_patch_feature_extraction_job`` and
  ``run_slide_feature_extraction_job``, ``job_dir=JOB``, ``coords_dir`` the folder: :func:`trident_folder`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from clusiam.errors import DataError
from clusiam.files import write_atomically
from clusiam.slides import PatchReader
from clusiam.storage import readable

# A tiling job (python -m clusiam.tile --out JOB): which slide file each coordinate file was
# made from, and the folder of the coordinate files (JOB/coords/<slide>.h5).
JOB_FILE, COORDS = "job.json", "coords"
# The folder layouts a command can write (--layout): ours always; TRIDENT's and CLAM's are links to
# our files (and CLAM's <slide>.pt tensors, which are files of their own).
LAYOUTS = ("clusiam", "trident", "clam")


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


def trident_folder(attributes: Mapping) -> str | None:
    """TRIDENT's folder of one patching, named as its ``run_batch_of_slides.py`` names it
    (``f"{float(mag):g}x_{patch_size}px_{overlap}px_overlap"``), from a coordinate file's
    attributes. The magnification is 10 / ``mpp`` where the tiler recorded it (the job's
    ``--mpp``: every slide of a 0.5 um/px job goes into 20x, whatever its objective power makes
    its ``target_magnification``), else TRIDENT's own ``target_magnification``; None where the
    file records neither (CLAM's)."""
    size, mpp, target = (_number(attributes, key) for key in ("patch_size", "mpp", "target_magnification"))
    magnification = 10 / mpp if mpp else target
    if size is None or magnification is None:
        return None
    return f"{magnification:g}x_{int(size)}px_{int(_number(attributes, 'overlap') or 0)}px_overlap"


def trident_folders(root: Path) -> list[Path]:
    """The folders in ``root`` named as :func:`trident_folder` names them: where an earlier
    ``--layout trident`` may have linked files, under the name of how they were tiled then."""
    return [folder for folder in root.glob("*x_*px_*px_overlap") if folder.is_dir()]


def write_link(path: Path, target: Path) -> None:
    """A relative symbolic link at ``path`` to ``target``, put in place atomically: a link, so
    that another tool's layout costs no space and always leads to the current file (a slide
    tiled or encoded again is never seen through a stale copy); relative, so that the folder
    holding both can be moved or copied whole. A file that is not a link is never replaced."""
    if path.exists() and not path.is_symlink():
        raise DataError(f"{path} is a file, not a link --layout made: move it out of the way (another tool wrote "
                        "it there?) and run again, or pass another --out")
    relative = os.path.relpath(target, path.parent)
    try:
        write_atomically(path, lambda temporary: os.symlink(relative, temporary))
    except OSError as error:  # a file system without symbolic links (FAT, some network shares)
        raise DataError(f"cannot make the link {path} ({error.strerror}): write --out on a file system that "
                        "keeps symbolic links, or leave --layout out") from None


def _number(attributes: Mapping, key: str) -> float | None:
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
