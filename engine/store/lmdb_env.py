"""One LMDB environment with growing map and the gate that makes growing safe; the store opens two of these."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class _ResizeGate:
    """Any number of transactions at once, but set_mapsize runs only when none is open."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# Reader-table slots. The first process to open an environment fixes the table's size for every process attached
# to it, and py-lmdb holds one slot per open read transaction (MDB_NOTLS), so the primary and every replica open
# with the same generous size: a slot is 64 bytes of the lock file.
MAX_READERS = 1024


class LmdbEnv:
    """An LMDB environment (a folder) whose map doubles when full.

    LMDB requires that no transaction of this process is open during ``set_mapsize``, so every transaction
    passes a gate that growing closes. Keep readers from spinning while a writer runs: with py-lmdb 3 a
    write-transaction abort (the MapFullError path) waits for other threads' in-flight LMDB calls.

    ``readonly``: a replica process attached to the environment another process writes. When that process has
    grown the map beyond this one's mapping, LMDB refuses new transactions (MapResizedError) until this process
    adopts the new size; `read` does so and retries.
    """

    def __init__(self, path: Path, *, sync: bool, initial_map_size: int, min_key_size: int,
                 readonly: bool = False) -> None:
        if readonly:
            if not (path / "data.mdb").exists():
                raise FileNotFoundError(f"no LMDB environment in {path}")
        else:
            path.mkdir(parents=True, exist_ok=True)
        self.readonly = readonly
        self.env = lmdb.open(str(path), map_size=initial_map_size, max_dbs=16, subdir=True, sync=sync, readahead=False,
                             readonly=readonly, max_readers=MAX_READERS)
        max_key = self.env.max_key_size()
        if max_key < min_key_size:  # ids are hashed to fit min_key_size; a smaller build would reject keys
            self.env.close()
            raise RuntimeError(f"LMDB built with max key size {max_key} < {min_key_size}")
        self._gate = _ResizeGate()
        # An existing environment may already be larger than initial_map_size; LMDB adopts its size.
        self._map_size: int = self.env.info()["map_size"]
        self.closed = False

    def write(self, fn: Callable[[lmdb.Transaction], _T]) -> _T:
        """Run fn in one write transaction; when the map is full, abort, double the map, rerun fn.

        fn must therefore be re-runnable: it may only read its arguments, never consume iterators
        or mutate caller state.
        """
        while True:
            attempt_size = self._map_size
            try:
                with self._gate.shared(), self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow(attempt_size)

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        while True:
            with self._gate.shared():
                try:
                    txn = self.env.begin(write=False)
                except lmdb.MapResizedError:  # another process grew the map: adopt its size, then retry
                    txn = None
                if txn is not None:
                    with txn:
                        yield txn
                    return
            self._adopt_map_size()

    def _adopt_map_size(self) -> None:
        with self._gate.exclusive():
            self.env.set_mapsize(0)  # 0: the size the file's meta page records
            self._map_size = self.env.info()["map_size"]
        logger.info("LMDB map grown by another process; adopted %d bytes", self._map_size)

    def reader_check(self) -> int:
        """Free the reader slots of processes that died (kill -9) with a transaction open: such a slot pins the
        pages it saw, so the file would grow without bound. Returns the slots freed."""
        with self._gate.shared():
            return self.env.reader_check()

    def _grow(self, seen_size: int) -> None:
        with self._gate.exclusive():
            if self._map_size != seen_size:  # another writer already grew it
                return
            self.env.set_mapsize(self._map_size * 2)
            self._map_size = self.env.info()["map_size"]
        logger.info("LMDB map full at %d bytes; grew to %d", seen_size, self._map_size)

    def sizes(self) -> tuple[int, int]:
        """(map size, bytes of pages in use)."""
        with self._gate.shared():  # not while the map is being resized
            info = self.env.info()
            return info["map_size"], (info["last_pgno"] + 1) * self.env.stat()["psize"]

    def close(self) -> None:
        if self.closed:
            return
        with self._gate.exclusive():  # let in-flight transactions finish first
            self.closed = True
            self.env.close()
