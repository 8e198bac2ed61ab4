"""Checkpoints: when one is due, what it copies, and where it is written.

A checkpoint makes the state on disk catch up with the log, so a restart replays only the records after its
watermark. Under the engine lock it copies what changed since the last one (`State.checkpoint_snapshot`); the
records are then built and written on the checkpoint thread while the writer goes on committing (the store keeps
the checkpointed state in an LMDB environment of its own). At most one checkpoint runs at a time.

Invariants:
- Every method but `_write` runs on the writer thread (or before it starts, or after it stops).
- A checkpoint that fails hands its rows back to the state (`State.mark_dirty`), so the next one writes them;
  nothing is lost meanwhile, since the log holds every record after the last watermark.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from streamrec.engine.config import EngineConfig
from streamrec.engine.observer import EngineObserver
from streamrec.engine.state.snapshot import CheckpointSnapshot
from streamrec.engine.state.state import State
from streamrec.engine.store.store import Store

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, store: Store, state: State, lock: threading.RLock, config: EngineConfig,
                 observer: EngineObserver):
        self.store, self.state, self.lock = store, state, lock
        self.config, self.observer = config, observer
        self.records_since = 0  # log records written since the last snapshot
        self.last_wall = time.time()  # when the last checkpoint was written (time.time())
        self._last_at = time.monotonic()  # when the last snapshot was taken
        self._last_s = 0.0  # how long the last checkpoint took: paces the records trigger
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="streamrec-checkpoint")
        self._running: Future | None = None

    def count(self, records: int) -> None:
        """The writer wrote `records` more log records."""
        self.records_since += records

    def now(self) -> int:
        """A checkpoint written before returning (forced, after an erasure or seeding, at close); its watermark."""
        self.wait()
        started = time.perf_counter()
        return self._write(self._snapshot(), None, started)

    def tick(self, final: bool) -> None:
        """The writer's hook after each group and when idle: start a checkpoint on the checkpoint thread when
        one is due. `final` (the writer is stopping): write one now if anything is unwritten."""
        if final:
            if self.records_since or self._running is not None:
                self.now()
            return
        if not self.records_since:
            return
        if self._running is not None:
            if not self._running.done():
                return
            self.wait()  # collects (and logs) how it ended
        config, since = self.config, time.monotonic() - self._last_at
        due = since >= config.checkpoint_interval_s or (
            self.records_since >= config.checkpoint_every_records
            and since * config.checkpoint_max_share >= self._last_s)
        if due:
            started = time.perf_counter()
            snapshot = self._snapshot()
            index = self.store.freeze_index()  # the keys of every commit so far, merged by the same transaction
            self._running = self._thread.submit(self._write, snapshot, index, started)

    def wait(self) -> None:
        """Until the running checkpoint (if any) has ended; a failure is logged, its rows are already back."""
        running, self._running = self._running, None
        if running is not None:
            try:
                running.result()
            except Exception:
                log.exception("checkpoint failed; the log still holds every event, will retry")

    def close(self) -> None:
        self.wait()  # a checkpoint still writing must finish before the store closes
        self._thread.shutdown()

    def _snapshot(self) -> CheckpointSnapshot:
        with self.lock:  # copies only: the records are built off the lock
            snapshot = self.state.checkpoint_snapshot()
        self._last_at = time.monotonic()
        self.records_since = 0
        return snapshot

    def _write(self, snapshot: CheckpointSnapshot, index, started: float) -> int:
        """Build and write the snapshot's records; index is None on the writer thread (see Store.write_checkpoint)."""
        try:
            item_records, user_records, forgotten = snapshot.records()
            self.store.write_checkpoint(item_records, user_records, forgotten, snapshot.watermark, index=index)
        except BaseException:
            with self.lock:
                self.state.mark_dirty(snapshot)  # the next checkpoint writes them; the log holds every event
            raise
        self._last_s = time.perf_counter() - started
        self.last_wall = time.time()
        self.observer.checkpoint(self._last_s, len(item_records), len(user_records))
        log.info("checkpoint at seq %d: %d items, %d users written in %.1f ms", snapshot.watermark, len(item_records),
                 len(user_records), self._last_s * 1e3)
        return snapshot.watermark
