"""What checking a patch file up front costs, and what it finds.

    python benchmarks/image_check.py [--files 300] [--damaged 100]

1. Cost per file, one core, of each way to check real H&E patches cut from the CC0 slide
   (64 and 224 px, PNG and JPEG quality 90): the header and end-of-file marker only; the
   header, marker and every PNG chunk's checksum (``Image.verify``); the header, marker and a
   full decode; and what clusiam's check (:func:`clusiam.images.inspect_image`) does.
2. How many files damaged in the middle (end marker intact) each check finds: a 512-byte
   block of zeros, 4 random bytes, 64 random bytes, written over the middle half of the file.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tiffslide
from PIL import Image

from clusiam.demo import CMU_SLIDE
from clusiam.images import JPEG_END, PNG_END, inspect_image


def header_and_marker(path: Path) -> bool:
    """Whether the file opens and ends with its format's end marker (the check before this one)."""
    with Image.open(path) as image:
        fmt = image.format
    tail = path.read_bytes()[-64:]
    return tail.rstrip(b"\x00").endswith(JPEG_END) if fmt == "JPEG" else tail.endswith(PNG_END)


def verify(path: Path) -> bool:
    """The header, the end marker and every PNG chunk's checksum."""
    with Image.open(path) as image:
        image.verify()
    return header_and_marker(path)


def decode(path: Path) -> bool:
    """The header, the end marker and a full decode."""
    with Image.open(path) as image:
        image.load()
    return header_and_marker(path)


def clusiam_check(path: Path) -> bool:
    return inspect_image(path, 1)[0] is None


CHECKS = {"header + end marker": header_and_marker, "+ PNG chunk checksums": verify, "+ full decode": decode,
          "clusiam's check": clusiam_check}


def finds(check, path: Path) -> bool:
    """Whether ``check`` refuses ``path`` (by returning False or raising)."""
    try:
        return not check(path)
    except Exception:
        return True


def damage(data: bytes, kind: int, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    start = int(rng.integers(len(data) // 4, 3 * len(data) // 4))
    if kind == 0:
        data[start : start + 512] = bytes(min(512, len(data) - start))
    elif kind == 1:
        for position in rng.integers(len(data) // 4, 3 * len(data) // 4, 4):
            data[position] = int(rng.integers(0, 256))
    else:
        data[start : start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()[: len(data) - start]
    return bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--damaged", type=int, default=100)
    args = parser.parse_args()
    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for size in (64, 224):
            for fmt, options in (("PNG", {}), ("JPEG", {"quality": 90})):
                files = []
                for i in range(args.files):
                    top, left = rng.integers(0, region.shape[0] - size), rng.integers(0, region.shape[1] - size)
                    path = Path(folder) / f"{size}_{i}.{fmt.lower()}"
                    Image.fromarray(region[top : top + size, left : left + size]).save(path, fmt, **options)
                    files.append(path)
                for name, check in CHECKS.items():
                    if name.startswith("+ PNG") and fmt != "PNG":
                        continue
                    for path in files[:20]:  # warm the page cache
                        check(path)
                    started = time.perf_counter()
                    for path in files:
                        check(path)
                    milliseconds = (time.perf_counter() - started) / len(files) * 1e3
                    found = 0
                    for i in range(args.damaged):
                        damaged = Path(folder) / f"damaged.{fmt.lower()}"
                        damaged.write_bytes(damage(files[i % len(files)].read_bytes(), i % 3, rng))
                        found += finds(check, damaged)
                    print(f"{size} px {fmt:<4} {name:<26} {milliseconds:6.3f} ms/file   finds {found:3d} of "
                          f"{args.damaged} damaged files")


if __name__ == "__main__":
    main()
