"""Patch image files: finding them, checking them up front, and reading them as 8-bit RGB.

Any layout works as long as patches are image files somewhere under the root, including
the authors' ``root/<class>/<slide>/<patch>.png``.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from clusiam.errors import DataError, counted
from clusiam.files import file_list_key, find_files, read_cache, write_cache
from clusiam.storage import is_url

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
JPEG_END = b"\xff\xd9"  # end-of-image marker
CHECK_CHUNK = 4096


def find_images(root: str | os.PathLike, option: str) -> list[Path]:
    """All patch images under ``root`` at any depth; ``option`` names where ``root`` came from."""
    if is_url(root):
        raise DataError(f"{root} is not a tiling job (no job.json there), and patch images are read from local "
                        "folders only: from a URL, pass a tiling job or --coords URL --slides URL")
    return find_files(root, IMAGE_EXTENSIONS, "images", f"give {option} a folder of patch images",
                      "check the path, or tile slides into patches first")


# Pillow's modes for 16-bit greyscale; its 16-bit RGB(A) PNGs and TIFFs already arrive as 8-bit RGB(A).
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# 32-bit integer and floating-point images have no fixed range to map onto 0-255.
NO_FIXED_RANGE = ("I", "F")


class Checked(NamedTuple):
    """The verdict on a list of patch files: those to train on, and those left out, with why."""

    good: list[Path]
    bad: list[tuple[Path, str]]
    key: dict | None = None  # what the verdict was made for (files and options), for its cache

    def report(self, listing: Path | None) -> None:
        """List the files left out in ``listing`` (written afresh, empty when none is) and say
        how many there are."""
        if listing is not None:
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("".join(f"{p}\t{why}\n" for p, why in self.bad))
        if self.bad:
            total = len(self.good) + len(self.bad)
            where = f"; the list with reasons is in {listing}" if listing is not None else ""
            print(f"skipped {len(self.bad)} of {counted(total, 'file')} that cannot be used{where}")


def inspect_image(path: Path, min_size: int) -> tuple[str | None, tuple[int, int] | None]:
    """Check one file; return what is wrong with it (None if it is usable) and its (width,
    height) when readable.

    PNG and JPEG are first checked for their end-of-file marker, to name a truncated file as
    such. Then a PNG's chunks are read and their checksums verified (any byte changed anywhere
    shows, for little more than reading the file); a JPEG, TIFF or other file is decoded in
    full. JPEG has no checksum: a full decode finds damage that breaks its structure, but
    changed bytes inside its compressed data mostly decode without any error
    (benchmarks/image_check.py measures both).
    """
    if path.is_symlink() and not path.exists():
        return f"a symbolic link that leads nowhere (to {os.readlink(path)}: missing, or a loop of links)", None
    try:
        length = path.stat().st_size
        if length == 0:
            return "empty file (0 bytes)", None
        with open(path, "rb") as handle:
            head = handle.read(8)
            handle.seek(max(0, length - 64))
            tail = handle.read()
        marker = {b"\x89PNG\r\n\x1a\n": ("PNG", PNG_END), b"\xff\xd8": ("JPEG", JPEG_END)}
        for magic, (fmt, end) in marker.items():
            if head.startswith(magic) and not (tail.rstrip(b"\x00") if fmt == "JPEG" else tail).endswith(end):
                return f"truncated {fmt} (no end-of-image marker)", None
        with Image.open(path) as image:
            size, fmt, mode = image.size, image.format, image.mode
            if mode in NO_FIXED_RANGE:
                return unsupported_mode(mode), size
            try:
                image.verify() if fmt == "PNG" else image.load()
            except Exception as error:
                return f"corrupt {fmt} ({type(error).__name__}: {error})", size
    except Exception as error:  # PIL raises many types for unreadable files
        return f"not a readable image ({type(error).__name__}: {error})", None
    if min(size) < min_size:
        return (
            f"image is {size[0]}x{size[1]}, smaller than the crop size {min_size}: "
            f"pass --image_size {min(size)} or less, or tile larger patches"
        ), size
    return None, size


def unsupported_mode(mode: str) -> str:
    return (f"a {'32-bit integer' if mode == 'I' else 'floating-point'} image (mode {mode}) has no fixed range of "
            "pixel values to read as 8-bit RGB: save the patches as 8-bit (or 16-bit) images")


def check_images(files: Sequence[Path], min_size: int, skip_bad_files: bool, same_size: bool = False,
                 cache: Path | None = None) -> Checked:
    """Check every file before training starts.

    Without ``skip_bad_files`` the first bad file raises :class:`DataError`. With it, bad
    files are left out, with the reason. With ``same_size`` (batches of uint8 patches need
    one size), the size most files have is kept and files of any other size are bad.

    With ``cache`` (a file that :func:`remember_check` wrote, such as
    SAVE_PATH/checked_files.json), its verdict is reused, without opening any file, while the
    files (paths, sizes, modification times) and the check's options are those it was made
    for: checking 100,000 patches takes about half a minute on two cores, a restart nothing.
    The verdict carries its ``key``, for :func:`remember_check`; this function writes nothing.
    """
    key = {"file_list_key": file_list_key(files), "min_size": min_size, "skip_bad_files": skip_bad_files,
           "same_size": same_size}  # the files' key taken first: a file changed while checked misses next time
    if cache is not None:
        record = read_cache(cache)
        if record.get("key") == key:
            print(f"reusing the check of {len(files)} unchanged files from {cache}")
            left_out = dict(record["bad"])
            return Checked([path for path in files if str(path) not in left_out],
                           [(path, left_out[str(path)]) for path in files if str(path) in left_out], key)
    return check_each(files, min_size, skip_bad_files, same_size)._replace(key=key)


def remember_check(cache: Path, checked: Checked) -> None:
    """Keep a verdict of :func:`check_images` in ``cache`` for the next start to reuse."""
    write_cache(cache, {"key": checked.key, "num_files": len(checked.good) + len(checked.bad),
                        "bad": [[str(path), why] for path, why in checked.bad]})


def check_each(files: Sequence[Path], min_size: int, skip_bad_files: bool, same_size: bool) -> Checked:
    """:func:`check_images` without a cache: every file opened and checked, on threads."""
    bad: list[tuple[Path, str]] = []
    sized: list[tuple[Path, tuple[int, int]]] = []
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as pool, \
            tqdm(total=len(files), desc="checking images", unit="file") as bar:
        # In chunks, so millions of files never mean millions of pending futures.
        for start in range(0, len(files), CHECK_CHUNK):
            chunk = files[start : start + CHECK_CHUNK]
            for path, (problem, size) in zip(chunk, pool.map(lambda p: inspect_image(p, min_size), chunk)):
                if problem is None:
                    sized.append((path, size))
                elif not skip_bad_files:
                    raise DataError(f"{path}: {problem}. Fix or remove it, or pass --skip_bad_files to leave bad "
                                    "files out")
                else:
                    bad.append((path, problem))
            bar.update(len(chunk))
    if same_size:
        sized, outliers = keep_one_size(sized, skip_bad_files)
        bad += outliers
    if not sized:
        raise DataError(f"none of the {counted(len(files), 'image')} is usable; see the reasons above")
    return Checked([path for path, _ in sized], bad)


def keep_one_size(sized: list[tuple[Path, tuple[int, int]]],
                  skip_bad_files: bool) -> tuple[list[tuple[Path, tuple[int, int]]], list[tuple[Path, str]]]:
    """Split readable files into those of the size most of them have (the first file's among
    equals) and the others, with why. Without ``skip_bad_files`` a second size is an error
    that counts each size."""
    counts = Counter(size for _, size in sized)
    if len(counts) < 2:
        return sized, []
    (width, height), most = counts.most_common(1)[0]
    others = ", ".join(f"{n} of {w}x{h}" for (w, h), n in counts.most_common() if (w, h) != (width, height))
    if not skip_bad_files:
        first = {size: path for path, size in reversed(sized)}  # the first file of each size
        w, h = next(size for _, size in sized if size != (width, height))
        raise DataError(f"{first[w, h]}: image is {w}x{h}, unlike the {width}x{height} of {first[width, height]} "
                        f"and {most - 1} other files (others: {others}): batched augmentation needs patches of one "
                        f"size; re-tile, pass --skip_bad_files to train on the {width}x{height} ones, or pass "
                        "--augment pil")
    print(f"keeping the {most} patches of {width}x{height}, the size most have; left out: {others}")
    kept = [(path, size) for path, size in sized if size == (width, height)]
    outliers = [(path, f"image is {w}x{h}, unlike the {width}x{height} most patches have: batched augmentation "
                       "needs patches of one size") for path, (w, h) in sized if (w, h) != (width, height)]
    return kept, outliers


def rgb8(image: Image.Image, path: Path) -> Image.Image:
    """``image`` as 8-bit RGB: grey, RGBA, palette and CMYK are converted; 16-bit grey is
    scaled to 8 bits (Pillow's own conversion clips it to white); images without a fixed range
    are refused."""
    if image.mode in SIXTEEN_BIT:
        grey16 = np.asarray(image, dtype=np.uint16).astype(np.float64)
        return Image.fromarray(np.rint(grey16 / 257).astype(np.uint8), "L").convert("RGB")
    if image.mode in NO_FIXED_RANGE:
        raise DataError(f"{path}: {unsupported_mode(image.mode)}")
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Decode one patch as 8-bit RGB (see :func:`rgb8`)."""
    try:
        with Image.open(path) as image:
            image.load()
            return rgb8(image, path)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"{path}: cannot be decoded ({type(error).__name__}: {error})") from error


def uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
