"""Every error a user can fix, and how the command-line entry points report them.

A :class:`UserError` names the culprit (a file, a flag) and the fix. The CLIs run their work
through :func:`run_command`, which prints it as one ``error: ...`` line and exits with status 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """Bad input, options or state, with a message that names the culprit and the fix."""


class ConfigError(UserError):
    """An option or config file that cannot be used."""


class DataError(UserError):
    """Bad input data (patches, tables, bags), naming the file and what to do."""


class CheckpointError(UserError):
    """A file that is missing or is not a clusiam checkpoint."""


class SlideError(UserError):
    """A slide that cannot be read or tiled as asked."""


class ExportError(UserError):
    """A checkpoint that cannot give the requested export."""


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; nothing was saved over the last good checkpoint."""


def process_rank() -> int:
    """torchrun's RANK of this process (0 without torchrun), read from the environment so that
    it is known before and after the process group exists."""
    return int(os.environ.get("RANK", "0"))


def run_command(action: Callable[[], object]) -> int:
    """Run a command's work; a :class:`UserError` becomes ``error: ...`` and exit status 2
    (``error (rank N): ...`` from the other processes of a torchrun job)."""
    try:
        action()
    except UserError as error:
        rank = process_rank()
        print(f"error{f' (rank {rank})' if rank else ''}: {message(error)}", flush=True)  # one write: ranks do not mix
        return 2
    return 0


def report_command(evaluate: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Run an evaluation command; on success show the report it wrote to ``args.out``."""
    status = run_command(lambda: evaluate(args))
    if status == 0 and process_rank() == 0:  # under torchrun, rank 0 wrote the report
        print((Path(args.out) / "report.md").read_text())
    return status


def message(error: UserError) -> str:
    """The error's own message. Raised in a DataLoader worker, it comes back with the worker's
    traceback in front ("Caught DataError in DataLoader worker process 0. Original Traceback
    ..."), which is not what the user needs to read: keep what follows the last "DataError: "."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    return text.rstrip().rsplit(f"{type(error).__name__}: ", 1)[-1]
