"""Atomic file writes: every checkpoint, export, feature file, bag and report goes through here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


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
