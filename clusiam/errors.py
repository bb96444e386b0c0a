"""Every error a user can fix, and how the command-line entry points report them.

A :class:`UserError` names the culprit (a file, a flag) and the fix. The CLIs run their work
through :func:`run_command`, which prints it as one ``error: ...`` line and exits with status 2;
anything else is a bug and keeps its traceback. Their options are parsed by a
:class:`CommandParser`, so that a refused option is such an error too, and a number option
states its range where it is defined, with :class:`InRange`; its ``--help`` shows each
option's default. What they print counts things with :func:`counted` ("1 slide").
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn


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


class DiskFullError(UserError):
    """A write that ran out of space (or quota); what was there before it is intact."""


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
        text = message(error).replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever a file is named
        print(f"error{f' (rank {rank})' if rank else ''}: {text}", flush=True)  # one write: ranks do not mix
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


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` that ends each option's help with its default, ``(default: 0.5)``, so that
    what a left-out option does is read where the option is: not where the help already
    shows it (``%(default)s``), nor for a switch (off unless given), nor for a default of
    None, whose meaning the help says in words ("default: from the checkpoint")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if "%(default)" in help or default is None or default is argparse.SUPPRESS or switch:
            return help
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{help} (default: {shown.replace('%', '%%')})"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are :class:`ConfigError` rather than usage and exit: a
    refused option becomes one ``error: ...`` line like any other user error, and a config file
    read through the parser can put its own name in front of the message. Its ``--help``
    shows the defaults (:class:`DefaultsFormatter`)."""

    def __init__(self, *args, formatter_class: type[argparse.HelpFormatter] = DefaultsFormatter, **options) -> None:
        super().__init__(*args, formatter_class=formatter_class, **options)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


class InRange(argparse.Action):
    """A number option with its range stated where it is defined:
    ``add_argument("--lr", type=float, action=InRange, above=0)``; also ``at_least``,
    ``below`` and ``at_most``. A value outside the range (each value, with ``nargs``) is
    refused naming the flag and the rule, ``--lr must be above 0 (got -0.1)``, before any
    work; values a config file passes through the same parser are checked alike. ``--help``
    shows the rule. NaN and infinity lie in no range (an infinite rate or weight only fails
    steps later). Defaults are the code's own and are not checked (None stays "unset")."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, above: float | None = None,
                 at_least: float | None = None, below: float | None = None, at_most: float | None = None,
                 **options) -> None:
        if (above is not None and at_least is not None) or (below is not None and at_most is not None):
            raise ValueError(f"{dest}: give one lower bound (above or at_least) and one upper bound (below or at_most)")
        self.above, self.at_least, self.below, self.at_most = above, at_least, below, at_most
        self.rule = range_rule(above, at_least, below, at_most)
        options["help"] = f"{options['help']} (must be {self.rule})" if options.get("help") else f"must be {self.rule}"
        super().__init__(option_strings, dest, **options)

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return ((self.above is None or value > self.above) and (self.at_least is None or value >= self.at_least)
                and (self.below is None or value < self.below) and (self.at_most is None or value <= self.at_most))

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values,
                 option_string: str | None = None) -> None:
        for value in values if isinstance(values, list) else [values]:
            if not self.admits(value):
                parser.error(f"{option_string or self.dest} must be {self.rule} (got {value})")
        setattr(namespace, self.dest, values)


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` with its noun, plural unless it is one, for what a command prints: ``1 slide``,
    ``2 slides``, ``1,024 patches`` (``plural``: where it is not the noun and an "s")."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def range_rule(above: float | None, at_least: float | None, below: float | None, at_most: float | None) -> str:
    """The rule in words: one bound as ``above 0`` or ``at least 1``, two as an interval, ``in [0, 1)``."""
    low = f"({above}" if above is not None else f"[{at_least}" if at_least is not None else None
    high = f"{below})" if below is not None else f"{at_most}]" if at_most is not None else None
    if low and high:
        return f"in {low}, {high}"
    bounds = {"above": above, "at least": at_least, "below": below, "at most": at_most}
    return next(f"{words} {bound}" for words, bound in bounds.items() if bound is not None)


def report_command_line(evaluate: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
                        argv: Sequence[str] | None) -> int:
    """:func:`report_command` for the options in ``argv``: one that ``parser`` (a
    :class:`CommandParser`) refuses is reported like any user error, one line and status 2."""
    parsed: list[argparse.Namespace] = []  # carries the options out of run_command
    status = run_command(lambda: parsed.append(parser.parse_args(argv)))
    return status or report_command(evaluate, parsed[0])
