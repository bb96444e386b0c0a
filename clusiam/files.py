"""Files on disk: finding them, telling them apart, and writing them atomically.

Every checkpoint, export, feature file, bag and report is written through
:func:`write_atomically`; caches and resume checks identify their inputs with
:func:`file_digest` (a file's bytes) or :func:`file_list_key` (a list of files).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from clusiam.errors import DataError


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


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_list_key(files: Sequence[Path]) -> str:
    """A digest of the exact file list (path, size, modification time)."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(temporary)`` beside ``path``, then one rename onto ``path``: a crash or an error
    never leaves a half-written file under the final name, nor the temporary behind. The
    temporary keeps the suffix (``last.tmp.pth``), for writers that add or check one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
