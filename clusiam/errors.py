"""The errors a user can fix, and how command-line entry points report them."""
from __future__ import annotations

import os
from typing import Callable


class UserError(Exception):
    """Bad input, options or state, with a message that names the culprit and the fix."""


def run_command(action: Callable[[], object]) -> int:
    """Run a command's work; a :class:`UserError` becomes ``error: ...`` and exit status 2
    (``error (rank N): ...`` from the other processes of a torchrun job)."""
    try:
        action()
    except UserError as error:
        rank = int(os.environ.get("RANK", "0"))
        print(f"error{f' (rank {rank})' if rank else ''}: {message(error)}", flush=True)  # one write: ranks do not mix
        return 2
    return 0


def message(error: UserError) -> str:
    """The error's own message. Raised in a DataLoader worker, it comes back with the worker's
    traceback in front ("Caught DataError in DataLoader worker process 0. Original Traceback
    ..."), which is not what the user needs to read: keep what follows the last "DataError: "."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    return text.rstrip().rsplit(f"{type(error).__name__}: ", 1)[-1]
