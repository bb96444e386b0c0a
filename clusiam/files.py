"""Files on disk: finding them, telling them apart, writing them atomically, and the
output folders the commands write into.

Every checkpoint, export, feature file, bag and report is written through
:func:`write_atomically`; caches (the JSON ones through :func:`read_cache` and
:func:`write_cache`) and resume checks identify their inputs with :func:`file_digest` (a
file's bytes) or :func:`file_list_key` (a list of files). A write that
runs out of space is a :class:`DiskFullError` naming the file, not a traceback.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from clusiam.errors import ConfigError, DataError, DiskFullError
from clusiam.runlock import alive
from clusiam.storage import is_local, list_files, location


def find_files(root: str | os.PathLike, extensions: Sequence[str], noun: str, folder_advice: str,
               empty_advice: str) -> list[Path]:
    """All files under ``root`` (a folder, or a URL: :mod:`clusiam.storage`) at any depth whose
    suffix is one of ``extensions``, sorted for a stable order; a missing folder or no match
    is a :class:`DataError` with advice."""
    root = location(root)
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"{root} {state}: {folder_advice}")
    if is_local(root):
        found = list(scan_files(str(root), tuple(extensions)))
        found.sort(key=lambda path: path.split(os.sep))  # part by part, the order of sorted Paths, at less cost
        found = [Path(path) for path in found]
    else:
        found = sorted(list_files(root, tuple(extensions)), key=lambda path: str(path).split("/"))
    if not found:
        raise DataError(f"no {noun} ({', '.join(extensions)}) found under {root}: {empty_advice}")
    return found


def scan_files(folder: str, extensions: tuple[str, ...]) -> Iterator[str]:
    """The paths of the files under ``folder`` whose lower-cased suffix is in ``extensions``.
    ``os.scandir`` tells files from folders without a stat per file, which ``Path.rglob`` with
    ``is_file`` does not (benchmarks/startup.py times both). Like ``rglob``, it does not
    descend into linked folders, keeps linked files and passes over folders it may not read;
    a link that leads nowhere (dangling, or a loop) is kept too, for the check to name it."""
    try:
        entries = os.scandir(folder)
    except PermissionError:
        return
    with entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from scan_files(entry.path, extensions)
            elif os.path.splitext(entry.name)[1].lower() in extensions and (entry.is_symlink() or entry.is_file()):
                yield entry.path


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_list_key(files: Sequence[Path]) -> str:
    """A digest of the exact file list (absolute path, size, modification time). The path is
    made absolute without resolving links: ``resolve`` costs a system call per folder of
    each path (seconds for 100,000 patches), and a file reached through another link only
    misses the cache."""
    digest = hashlib.sha256()
    for path in files:
        try:
            stat = os.stat(path)
        except OSError:  # a link that leads nowhere: its own entry, which the check names
            stat = os.lstat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_cache(path: Path) -> dict:
    """The record a JSON cache holds; empty when there is none or it is damaged (a cache is
    only a cache: what it held is computed again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_cache(path: Path, record: dict) -> None:
    """Store ``record`` as JSON in ``path``, atomically (two processes never see half of it)."""
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(record)))


# Out of space, out of quota, or over the file-size limit: the write cannot finish, and the fix is room.
NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EFBIG: "file too large for the limit on this system"}


def out_of_room(error: BaseException) -> str | None:
    """Why ``error`` (or an error it was raised from) means the disk had no room, or None.
    HDF5 and other C libraries report it only in their message."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in NO_ROOM:
            return NO_ROOM[error.errno]
        for text in ("No space left on device", "Disk quota exceeded"):
            if text in str(error):
                return text[0].lower() + text[1:]
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def reporting_full_disk(path: Path) -> Iterator[None]:
    """Turn a write into ``path`` that runs out of room into a :class:`DiskFullError` naming it."""
    existed = path.exists()
    try:
        yield
    except Exception as error:
        reason = out_of_room(error)
        if reason is None:
            raise
        kept = f"the {path.name} that was there is intact" if existed else "nothing was written"
        raise DiskFullError(f"{reason} while writing {path}: free space on that disk (or raise the quota) and "
                            f"run again; {kept}") from None


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(temporary)`` beside ``path``, then one rename onto ``path``: a crash, a full disk
    or an error never leaves a half-written file under the final name, nor the temporary
    behind. The temporary's name is unique to this write (two processes writing one file
    never rename each other's) and keeps the suffix (``last.tmp.<unique>.pth``), for writers
    that add or check one. ``write`` may make a folder there instead (a hub export), which
    then replaces an empty folder ``path``."""
    path = Path(path)
    make_folder(path.parent, "output folder")
    temporary = path.with_name(f"{path.stem}.tmp.{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        with reporting_full_disk(path):
            write(temporary)
            os.replace(temporary, path)
    finally:
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


# write_atomically's temporaries: <stem>.tmp.<pid>-<8 hex>[<suffix>]
TEMPORARY = re.compile(r"\.tmp\.(\d+)-[0-9a-f]{8}(\.[^.]*)?$")


def remove_left_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries :func:`write_atomically` left in ``folder`` when its writer was
    killed mid-write (their PID runs no process on this host any more); return them."""
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = TEMPORARY.search(path.name)
        if match and not alive(int(match.group(1)), None):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, an output folder that cannot be one: a file, a folder under a
    file, or a place this process may not write. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder: pass a folder (it is created if needed)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is read-only or not writable by this user; "
                          "pass a folder you can write to")
    return path


def make_folder(path: Path, flag: str) -> Path:
    """``mkdir -p`` of an output folder, whose failure (a read-only file system, say) names the flag."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{flag} {path} cannot be created ({error.strerror}): pass a folder you can "
                          "write to") from None
    return path
