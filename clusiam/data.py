"""Patch folders: finding images, checking them up front, reading them as RGB, and the
per-channel statistics the views are normalised with.

Any layout works as long as patches are image files somewhere under the root, including
the authors' ``root/<class>/<slide>/<patch>.png``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clusiam.atomic import write_atomically
from clusiam.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
JPEG_END = b"\xff\xd9"  # end-of-image marker
CHECK_CHUNK = 4096


class DataError(UserError):
    """Bad training data, with a message that names the file and what to do."""


def find_files(root: str | os.PathLike, extensions: Sequence[str], noun: str, folder_advice: str,
               empty_advice: str) -> list[Path]:
    """All files under ``root`` at any depth whose suffix is one of ``extensions``, sorted
    for a stable order; a missing folder or no match is a :class:`DataError` with advice."""
    root = Path(root)
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"{root} {state}: {folder_advice}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    if not files:
        raise DataError(f"no {noun} ({', '.join(extensions)}) found under {root}: {empty_advice}")
    return files


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
                        problem = (f"image is {size[0]}x{size[1]}, unlike the {expected_size[0]}x{expected_size[1]} of "
                                   f"{good[0]}: batched augmentation needs patches of one size; re-tile, or pass --augment pil")
                if problem is None:
                    good.append(path)
                elif not skip_bad_files:
                    raise DataError(f"{path}: {problem}. Fix or remove it, or pass --skip_bad_files to leave bad files out")
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


class PatchDataset(Dataset):
    """Patch files, each passed through ``transform`` after decoding to RGB."""

    def __init__(self, files: Sequence[Path], transform: Callable[[Image.Image], object]) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.files[index]))


def uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def file_list_key(files: Sequence[Path]) -> str:
    """A digest of the exact file list (path, size, modification time)."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _pixel_moments(image: Image.Image) -> torch.Tensor:
    """Per-channel sum, sum of squares (float64) and the pixel count of one image."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0)
    count = torch.tensor([float(pixels.shape[0])], dtype=torch.float64)
    return torch.cat([pixels.sum(0), (pixels**2).sum(0), count])


def channel_statistics(files: Sequence[Path], num_workers: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every pixel of exactly ``files`` (values in [0, 1])."""
    loader = DataLoader(
        PatchDataset(files, _pixel_moments), batch_size=64, num_workers=num_workers, shuffle=False
    )
    total = torch.zeros(7, dtype=torch.float64)
    for moments in tqdm(loader, desc="channel statistics", unit="batch"):
        total += moments.sum(0)
    count = total[6]
    mean = total[:3] / count
    std = (total[3:6] / count - mean**2).clamp(min=0).sqrt()
    return mean.tolist(), std.tolist()


def cached_channel_statistics(
    files: Sequence[Path], cache_path: Path, num_workers: int = 0
) -> tuple[list[float], list[float]]:
    """:func:`channel_statistics`, reused from ``cache_path`` when it was computed over the
    same file list (same paths, sizes and modification times) and recomputed otherwise."""
    key = file_list_key(files)
    if cache_path.is_file():
        try:
            cached = json.loads(cache_path.read_text())
        except ValueError:  # a damaged cache is only a cache: compute the statistics again
            cached = {}
        if cached.get("file_list_key") == key:
            return cached["mean"], cached["std"]
    mean, std = channel_statistics(files, num_workers)
    record = {"file_list_key": key, "num_files": len(files), "mean": mean, "std": std}
    write_atomically(cache_path, lambda temporary: temporary.write_text(json.dumps(record)))
    return mean, std


@dataclass
class LabelledPatches:
    """Patch files with a class label and the slide each comes from."""

    paths: list[Path]
    labels: list[str]
    slides: list[str]


def read_labelled_patches(source: str | os.PathLike) -> LabelledPatches:
    """Labelled patches from a folder laid out ``root/<class>/<slide>/<patch>`` or from a
    CSV with columns ``path, label, slide`` (relative paths are taken from the CSV's folder).
    Every patch must belong to a slide; a listed file that does not exist is an error."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        rows = read_csv_rows(source, ("path", "label", "slide"))
        paths = [source.parent / row["path"] for row in rows]
        absent = [p for p in paths if not p.is_file()]
        if absent:
            raise DataError(f"{source}: {len(absent)} listed files do not exist, e.g. {absent[0]}")
        labels, slides = [row["label"].strip() for row in rows], [row["slide"].strip() for row in rows]
        unassigned = [row["path"] for row, label, slide in zip(rows, labels, slides) if not label or not slide]
        if unassigned:
            raise DataError(f"{source}: {len(unassigned)} rows have no slide or label, e.g. {unassigned[0]}")
        return LabelledPatches(paths, labels, slides)
    files = find_images(source, "--train / --test")
    shallow = [p for p in files if len(p.relative_to(source).parts) < 3]
    if shallow:
        raise DataError(
            f"{shallow[0]} is not in a <class>/<slide>/ folder under {source} ({len(shallow)} such files): "
            "lay patches out as root/<class>/<slide>/<patch>, or list them in a CSV with path, label, slide"
        )
    parts = [p.relative_to(source).parts for p in files]
    return LabelledPatches(files, [part[0] for part in parts], [part[1] for part in parts])


def split_overlap(train: LabelledPatches, test: LabelledPatches) -> list[str]:
    """What leaks between a training and a test split: slides in both, and test files
    identical (same bytes) to training files. Only files whose size matches a file on the
    other side are hashed, each once, so this stays linear in the number of files."""
    problems = []
    shared_slides = sorted(set(train.slides) & set(test.slides))
    if shared_slides:
        problems.append(f"{len(shared_slides)} slide(s) are in both train and test, e.g. {', '.join(shared_slides[:3])}")
    train_sizes = {path: path.stat().st_size for path in train.paths}
    test_sizes = {path: path.stat().st_size for path in test.paths}
    shared_sizes = set(train_sizes.values()) & set(test_sizes.values())
    train_by_digest = {file_digest(path): path for path, size in train_sizes.items() if size in shared_sizes}
    identical = []
    for path, size in test_sizes.items():
        if size in shared_sizes and (match := train_by_digest.get(file_digest(path))) is not None:
            identical.append((path, match))
    if identical:
        test_path, train_path = identical[0]
        problems.append(f"{len(identical)} test file(s) are identical to training files, e.g. {test_path} = {train_path}")
    return problems


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_csv_rows(path: str | os.PathLike, columns: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV with a header, refusing a missing file, missing columns, no rows or a
    row whose fields do not match the header. A UTF-8 byte-order mark (Excel's "CSV UTF-8")
    is fine."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = reader.fieldnames or []
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: save it as CSV (UTF-8)") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: needs columns {', '.join(columns)}; missing {', '.join(missing)}")
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():  # more fields than the header, or fewer
            raise DataError(f"{path}, line {line}: not the header's {len(header)} fields "
                            "(a comma inside a value needs quotes)")
    return rows


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def read_table(path: str | os.PathLike, columns: tuple[str, str]) -> dict[str, str]:
    """A two-column CSV as a dict, with clear errors for a missing file, missing columns
    or a slide listed twice."""
    table: dict[str, str] = {}
    for row in read_csv_rows(path, columns):
        key, value = row[columns[0]].strip(), row[columns[1]].strip()
        if key in table:
            raise DataError(f"{path}: slide {key} is listed twice")
        table[key] = value
    return table
