"""Patch image files: finding them, checking them up front, and reading them as 8-bit RGB.

Any layout works as long as patches are image files somewhere under the root, including
the authors' ``root/<class>/<slide>/<patch>.png``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from clusiam.errors import DataError
from clusiam.files import find_files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
JPEG_END = b"\xff\xd9"  # end-of-image marker
CHECK_CHUNK = 4096


def find_images(root: str | os.PathLike, option: str) -> list[Path]:
    """All patch images under ``root`` at any depth; ``option`` names where ``root`` came from."""
    return find_files(root, IMAGE_EXTENSIONS, "images", f"give {option} a folder of patch images",
                      "check the path, or tile slides into patches first")


def inspect_image(path: Path, min_size: int) -> tuple[str | None, tuple[int, int] | None]:
    """Cheaply check one file; return what is wrong with it (None if it is usable) and
    its (width, height) when readable.

    Reads the header and, for PNG and JPEG, the end-of-file marker, which catches
    truncated files without decoding them. Other formats are decoded in full.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)", None
        with Image.open(path) as image:
            size = image.size
            fmt = image.format
            if fmt not in ("PNG", "JPEG"):
                image.load()
    except Exception as error:  # PIL raises many types for unreadable files
        return f"not a readable image ({type(error).__name__}: {error})", None
    if fmt in ("PNG", "JPEG"):
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64))
            tail = handle.read().rstrip(b"\x00") if fmt == "JPEG" else handle.read()
        if not tail.endswith(PNG_END if fmt == "PNG" else JPEG_END):
            return f"truncated {fmt} (no end-of-image marker)", size
    if min(size) < min_size:
        return (
            f"image is {size[0]}x{size[1]}, smaller than the crop size {min_size}: "
            f"pass --image_size {min(size)} or less, or tile larger patches"
        ), size
    return None, size


def check_images(
    files: Sequence[Path], min_size: int, skip_bad_files: bool, report_path: Path | None = None,
    same_size: bool = False,
) -> list[Path]:
    """Check every file before training starts.

    Without ``skip_bad_files`` the first bad file raises :class:`DataError`. With it, bad
    files are left out, counted, and listed (path and reason) in ``report_path``. With
    ``same_size``, a file whose size differs from the first usable file's is bad too
    (batches of uint8 patches need one size).
    """
    bad: list[tuple[Path, str]] = []
    good: list[Path] = []
    expected_size = None
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as pool, \
            tqdm(total=len(files), desc="checking images", unit="file") as bar:
        # In chunks, so millions of files never mean millions of pending futures.
        for start in range(0, len(files), CHECK_CHUNK):
            chunk = files[start : start + CHECK_CHUNK]
            for path, (problem, size) in zip(chunk, pool.map(lambda p: inspect_image(p, min_size), chunk)):
                if problem is None and same_size:
                    expected_size = expected_size or size
                    if size != expected_size:
                        problem = (f"image is {size[0]}x{size[1]}, unlike the {expected_size[0]}x{expected_size[1]} "
                                   f"of {good[0]}: batched augmentation needs patches of one size; re-tile, or pass "
                                   "--augment pil")
                if problem is None:
                    good.append(path)
                elif not skip_bad_files:
                    raise DataError(f"{path}: {problem}. Fix or remove it, or pass --skip_bad_files to leave bad "
                                    "files out")
                else:
                    bad.append((path, problem))
            bar.update(len(chunk))
    if bad:
        message = f"skipped {len(bad)} of {len(files)} files that cannot be used"
        if report_path is not None:
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text("".join(f"{p}\t{why}\n" for p, why in bad))
            message += f"; the list with reasons is in {report_path}"
        print(message)
    if not good:
        raise DataError(f"none of the {len(files)} images is usable; see the reasons above")
    return good


def load_rgb(path: Path) -> Image.Image:
    """Decode one patch as 8-bit RGB (grey, RGBA and palette images are converted)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:
        raise DataError(f"{path}: cannot be decoded ({type(error).__name__}: {error})") from error


def uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
