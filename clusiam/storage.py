"""Where slides and coordinate files live: a local path, or an fsspec URL (``s3://``,
``gs://``, ``https://``, ``memory://``; ``file://`` is a local path).

    location("s3://lab-bucket/camelyon16/slides")   # a UPath: the pathlib API over fsspec
    location("/data/slides")                          # a Path

A URL is a :class:`upath.UPath`, so the code that names, joins and lists paths works on both;
only opening differs (:func:`open_binary`). Remote files are read through fsspec's block
cache (``blockcache``, :data:`BLOCK_SIZE` blocks, :data:`BLOCKS` of them kept per open file),
so that what a reader asks for twice (a slide's header and tile index, neighbouring tiles
in one block) is fetched once, while the handle stays open in the slide source's cache as a
local file's does. Credentials and endpoints come from the environment, where fsspec and
the cloud libraries look for them (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``FSSPEC_S3_*``...); ``s3://`` needs s3fs and ``gs://``
gcsfs (``pip install clusiam[cloud]``).
"""
from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import BinaryIO

from clusiam.errors import ConfigError, DataError

BLOCK_SIZE = 1 << 18  # 256 KiB: a few JPEG tiles of a row, or a slice of a tile index, per request
BLOCKS = 32  # blocks kept per open remote file (8 MiB)


def is_url(text: str | os.PathLike) -> bool:
    return "://" in str(text) and not str(text).startswith("file://")


def location(text: str | os.PathLike) -> Path:
    """``text`` as a path: a :class:`~pathlib.Path` when local (``file://`` included), else an
    fsspec :class:`upath.UPath`; a URL whose protocol has no fsspec implementation installed
    is a :class:`ConfigError` naming the package."""
    if isinstance(text, Path) and not is_url(text):
        return text
    text = str(text)
    if not is_url(text):
        return Path(text.removeprefix("file://"))
    from upath import UPath

    try:
        return UPath(text)
    except (ImportError, ValueError) as error:
        raise ConfigError(f"{text}: cannot read this URL ({error}); install fsspec's package for it (s3fs for "
                          "s3://, gcsfs for gs://: pip install clusiam[cloud])") from None


def is_local(path: Path) -> bool:
    return not hasattr(path, "fs")


def join(folder: Path, name: str) -> Path:
    """``name`` (a URL, or a path relative to ``folder``) as a path; ``..`` is resolved in a URL,
    as object stores would not."""
    if is_url(name):
        return location(name)
    if is_local(folder):
        return folder / name
    if posixpath.isabs(name):
        raise DataError(f"{name} is a local path, but {folder} is read from {folder.protocol}://: record it "
                        f"relative to {folder} or as a URL")
    for part in name.split("/"):
        folder = folder.parent if part == ".." else folder if part in ("", ".") else folder / part
    return folder


def filesystem(path: Path):
    """The fsspec filesystem of a remote ``path``, this process's own: a DataLoader worker forked
    from a process that had one must not use its connections (fsspec makes a new instance
    after a fork; ``path.fs`` would be the parent's)."""
    import fsspec

    return fsspec.filesystem(path.protocol, **path.storage_options)


def open_binary(path: Path) -> BinaryIO:
    """``path`` opened for reading bytes; a remote file through fsspec's block cache."""
    if is_local(path):
        return open(path, "rb")
    return filesystem(path).open(path.path, "rb", block_size=BLOCK_SIZE, cache_type="blockcache",
                                 cache_options={"maxblocks": BLOCKS})


def readable(path: Path) -> Path | BinaryIO:
    """What a reader that takes a file name or a file object (tifffile, tiffslide, h5py) is
    given: a local path itself (its own file access is fastest), else the opened remote file."""
    return path if is_local(path) else open_binary(path)


def absolute(path: Path) -> str:
    """``path`` as it names one file from anywhere: a local path made absolute (links not
    resolved), a URL as it is."""
    return os.path.abspath(path) if is_local(path) else str(path)


def version(path: Path) -> str:
    """What changes when the file at ``path`` does: its size and modification time (nanoseconds
    locally), for a remote file its ETag where the store gives one."""
    if is_local(path):
        status = path.stat()
        return f"{status.st_size}\t{status.st_mtime_ns}"
    info = filesystem(path).info(path.path)
    return f"{info.get('size')}\t{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"


def list_files(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """The files under a remote ``root`` at any depth whose lower-cased suffix is in ``extensions``."""
    base = root.path.rstrip("/")
    found = [name for name in root.fs.find(base) if posixpath.splitext(name)[1].lower() in extensions]
    return [root / name[len(base):].lstrip("/") for name in found]
