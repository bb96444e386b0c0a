"""What the machine a command runs on can give it: cores and memory.

A command that runs several processes at once (the tiler's slides, ``--workers``; the
DataLoader workers of ``mil.compute_feats``, ``--num_workers``) runs by default as many as
both hold, so that the same command neither idles a large node nor swaps a laptop, and says
how many and why.
"""
from __future__ import annotations

import os
from pathlib import Path


def cores() -> int:
    """The cores this process may run on: its CPU affinity, which a batch scheduler (SLURM,
    a container) narrows, else every core the system has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_mib() -> int:
    """Memory the system can give without swapping (Linux's MemAvailable), else its free memory, in MiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2**20


def default_processes(flag: str, peak_mib: int, each: str, sharing: int = 1) -> tuple[int, str]:
    """How many processes of ``peak_mib`` each to run at once when ``flag`` is left out: one per
    core, as many as the available memory holds, and at least one, where ``sharing`` commands
    (torchrun's processes on this node) split the machine evenly; and the console line that
    says so (``each``: what one process holds, "a slide")."""
    machine_cores, memory = cores(), available_mib()
    count = max(1, min(machine_cores // sharing, memory // (peak_mib * sharing)))
    shared = f", shared by {sharing} processes" if sharing > 1 else ""
    return count, (f"{flag} {count}: {machine_cores} core(s), {memory / 1024:.1f} GiB of memory available at "
                   f"{peak_mib} MiB {each}{shared} (pass {flag} to choose)")
