"""The errors a user can fix, and how command-line entry points report them."""
from __future__ import annotations

from typing import Callable


class UserError(Exception):
    """Bad input, options or state, with a message that names the culprit and the fix."""


def run_command(action: Callable[[], object]) -> int:
    """Run a command's work; a :class:`UserError` becomes ``error: ...`` and exit status 2."""
    try:
        action()
    except UserError as error:
        print(f"error: {error}")
        return 2
    return 0
