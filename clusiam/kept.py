"""What clusiam keeps between runs, outside any run folder: the verdict of each slide's
check and the channel statistics of a set of patches, so that a new run, or a resumed one,
over the same slides starts in seconds (a cohort's slides are checked once, not once per run).

Kept in ``$CLUSIAM_CACHE``, else ``$XDG_CACHE_HOME/clusiam``, else ``~/.cache/clusiam``: the
user's, since the coordinate files and slides may be read-only or in object storage, and
several runs share it. One SQLite file holds a table per kind of record, JSON by key;
SQLite lets several processes read and write it at once. Every key names what the record
was computed from (each file's path, size and modification time, the options), so a changed
file is a new key and is computed again. A cache is only a cache: one that cannot be read
or written is passed over with a warning, and everything is computed as if it were empty.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

CACHE_ENV = "CLUSIAM_CACHE"
STORE = "kept.sqlite"
CHUNK = 500  # keys per query: SQLite limits a statement's parameters


def cache_dir() -> Path:
    """Where clusiam keeps what it reuses across runs (see the module's docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clusiam"


def key_of(*parts: object) -> str:
    """A record's key: the digest of what it was computed from."""
    return hashlib.sha256(json.dumps([str(part) for part in parts]).encode()).hexdigest()


class Kept:
    """The records of one kind (a table of the store), by key."""

    warned = False  # the warning that the store cannot be used, once per process

    def __init__(self, kind: str) -> None:
        self.kind = kind

    @property
    def path(self) -> Path:
        return cache_dir() / STORE  # looked up at each use: the environment may change after import

    def get(self, keys: Iterable[str]) -> dict[str, object]:
        """The records kept under ``keys`` (those found)."""
        keys = list(keys)
        found: dict[str, object] = {}
        with self._connection() as connection:
            for start in range(0, len(keys) if connection else 0, CHUNK):
                chunk = keys[start:start + CHUNK]
                rows = connection.execute(f"SELECT key, value FROM {self.kind} WHERE key IN "
                                          f"({','.join('?' * len(chunk))})", chunk)
                found.update((key, json.loads(value)) for key, value in rows)
        return found

    def put(self, records: Mapping[str, object]) -> None:
        """Keep ``records`` (key: a JSON-serialisable value), replacing any under the same keys."""
        if not records:
            return  # nothing to write: the store is not opened (nor made)
        with self._connection() as connection:
            if connection:
                connection.executemany(f"INSERT OR REPLACE INTO {self.kind} (key, value) VALUES (?, ?)",
                                       [(key, json.dumps(value)) for key, value in records.items()])

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection | None]:
        """The store, committed on success; None where it cannot be opened (said once)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=60)
            connection.execute("PRAGMA synchronous = OFF")  # a cache: no wait for the disk per write
            connection.execute(f"CREATE TABLE IF NOT EXISTS {self.kind} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        except (OSError, sqlite3.Error) as error:
            self._give_up(error)
            yield None
            return
        try:
            with connection:  # a transaction: committed when the block ends, rolled back on an error
                yield connection
        except sqlite3.Error as error:  # damaged or locked past the timeout: as if empty
            self._give_up(error)
        finally:
            connection.close()

    def _give_up(self, error: BaseException) -> None:
        if not Kept.warned:
            Kept.warned = True
            print(f"warning: cannot use the cache {self.path} ({type(error).__name__}: {error}); going on without "
                  f"it (set {CACHE_ENV} to a writable folder to keep slide checks and statistics)", file=sys.stderr)
