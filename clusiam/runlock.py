"""One run per folder: the lock a pretraining run holds on its ``--save_path`` for its whole life.

The lock is a file, ``SAVE_PATH/run.lock``, created with ``O_CREAT | O_EXCL`` (atomic on
local disks and on NFS v3 and later, the shared file systems clusters use) and holding who
made it: host, PID, the process's start time and, under torchrun and SLURM, the job's id. A second
run that finds it refuses, naming the holder. While the run lives, a thread touches the
file every minute (its heartbeat), so that a lock left behind can be told from a live one:

- on the same host, the holder's process is gone (or its PID now belongs to a younger process);
- on another host, nothing touched the file for ten minutes;
- under a torchrun restart (``--max_restarts``), the lock belongs to the same job;
- in a SLURM job that SLURM requeued (``SLURM_RESTART_COUNT``), the lock was left by an earlier
  run of the same job, which SLURM ended before it requeued the job.

Such a lock is taken over, and the run says so. Under torchrun only rank 0 holds the lock.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from clusiam.errors import ConfigError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), to tell a PID that was
    reused from the process that wrote a lock; None where /proc does not say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, started: str | None) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return started is None or process_start(pid) in (None, started)


def slurm_restarts() -> int:
    """How many times SLURM has requeued this job (0 outside SLURM). A requeued job may start on
    another node minutes after it was preempted, before its old lock looks stale."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def read_record(path: Path) -> dict:
    """A lock file's record; {} for one being written right now, or damaged (judged by its age alone)."""
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


class RunLock:
    """The lock on one run folder; :meth:`acquire` it, :meth:`release` it when the run ends."""

    def __init__(self, folder: Path, flag: str = "--save_path") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.flag = flag  # the option that names the folder, for the refusal
        self.record = {
            "host": socket.gethostname(), "pid": os.getpid(), "process_start": process_start(os.getpid()),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "torchrun_job": os.environ.get("TORCHELASTIC_RUN_ID"), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": slurm_restarts(), "token": secrets.token_hex(8),
        }
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock; return None, or why the folder is in use by another run (a refusal
        to show the user). A lock left behind is taken over, with a notice."""
        for _ in range(5):  # a lock that vanishes or is replaced while we look: look again
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None or ("token" not in holder and holder["age_s"] < 5):  # gone, or being written
                    time.sleep(0.2)
                    continue
                reason = self.left_behind(holder)
                if reason is None:
                    return self.busy(holder)
                self.take_over(holder, reason)
                continue
            with os.fdopen(handle, "w") as file:
                json.dump(self.record, file)
            self._heartbeat = threading.Thread(target=self._beat, name="run-lock heartbeat", daemon=True)
            self._heartbeat.start()
            return None
        return f"{self.path} keeps changing while this run tries to take it: is another run starting there?"

    def in_use(self) -> str | None:
        """Why the folder is in use by another live run (what :meth:`acquire` would refuse with),
        or None; takes nothing, so a run can say so before anything else about the folder."""
        holder = self.holder()
        if holder is None or self.left_behind(holder) is not None:
            return None
        return self.busy(holder)

    def busy(self, holder: dict) -> str:
        return (f"{self.path.parent} is in use by another run: host {holder.get('host')}, PID {holder.get('pid')}, "
                f"started {holder.get('started')} (lock file {self.path}). Wait for it to end, or pass another "
                f"{self.flag}")

    def holder(self) -> dict | None:
        """The record in the lock file, with its age in seconds; None if it is gone."""
        try:
            return {**read_record(self.path), "age_s": time.time() - self.path.stat().st_mtime}
        except FileNotFoundError:
            return None

    def left_behind(self, holder: dict) -> str | None:
        """Why the holder's lock no longer guards a live run, or None while it may."""
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if restarted and holder.get("torchrun_job") and holder["torchrun_job"] == self.record["torchrun_job"]:
            return "it belongs to this torchrun job, restarted after a failure"
        if (holder.get("slurm_job") and holder["slurm_job"] == self.record["slurm_job"]
                and holder.get("slurm_restart", 0) < self.record["slurm_restart"]):
            return "it was left by this SLURM job before SLURM requeued it"
        if holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int):
            if not alive(holder["pid"], holder.get("process_start")):
                return f"its process (PID {holder['pid']}) is no longer running"
            return None
        if holder["age_s"] > STALE_AFTER_S:
            return f"nothing has touched it for {holder['age_s'] / 60:.0f} minutes"
        return None

    def take_over(self, holder: dict, reason: str) -> None:
        """Move the holder's lock aside, unless another run replaced it meanwhile."""
        aside = self.path.with_name(f"{LOCK_NAME}.left-behind.{self.record['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if read_record(aside).get("token") != holder.get("token"):  # not the lock we judged: put it back
            os.rename(aside, self.path)
            return
        aside.unlink()
        print(f"note: taking over the lock {self.path} of host {holder.get('host')}, PID {holder.get('pid')}, "
              f"started {holder.get('started')}: {reason}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # gone or unreachable for a moment; the next beat tries again
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this run's."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        holder = self.holder()
        if holder is not None and holder.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)


@contextmanager
def holding(folder: Path, flag: str) -> Iterator[None]:
    """Hold ``folder``'s lock (one process, no torchrun) for the block; a folder another live
    run holds is refused as a :class:`~clusiam.errors.ConfigError` naming that run."""
    lock = RunLock(folder, flag)
    refusal = lock.acquire()
    if refusal is not None:
        raise ConfigError(refusal)
    try:
        yield
    finally:
        lock.release()
