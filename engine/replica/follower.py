"""A replica's apply loop: the primary's log, read from the shared LMDB store, applied to this process's State
through the same functions that applied it on the primary (write/recovery.py), so at the same applied seq the
two states are bit for bit the same.

Records are read by sequence number after the state's `applied_seq`; wake-up hints (wakeup.py) only make that
read happen sooner. Three things are not a plain apply:

- a **gap** (the next record's seq is not applied_seq + 1): records this replica never applied were erased by a
  ForgetUser, so applying what is left would not give the primary's state. The replica reloads from a
  checkpoint at or past the gap (the primary writes one right after each erasure) and replays from there;
- a **user-forgotten marker**: the same reload, from the checkpoint written with the marker, which no longer
  holds the user. The marker names no one, so the log keeps no trace of a forgotten user;
- a **reranker swap**: the same ONNX file is loaded here, before the seq advances, so a read that waits for
  that seq is reranked by the new model.

A reload builds the new State off the lock and swaps it in (`State.adopt`); reads meanwhile get the old one.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

from streamrec.engine.config import EngineConfig
from streamrec.engine.rerank.features import ItemArrays, state_clock_ms
from streamrec.engine.rerank.reranker import Reranker, RerankerRejected
from streamrec.engine.replica.wakeup import WakeupReceiver, folder_of
from streamrec.engine.state.state import State
from streamrec.engine.store import codec
from streamrec.engine.store.store import Store
from streamrec.engine.write.group_commit import current_reranker
from streamrec.engine.write.recovery import apply_log, recover

log = logging.getLogger(__name__)

_CHUNK = 4096  # records applied per hold of the engine lock: reads wait at most one chunk's apply
_RELOAD_POLL_S = 0.01


class LogFollower:
    def __init__(self, store: Store, state: State, lock: threading.RLock, reranker: Reranker, config: EngineConfig,
                 model_version: Callable[[], str], poll_s: float = 0.05):
        self.store, self.state, self.lock = store, state, lock
        self.reranker, self.config, self.model_version = reranker, config, model_version
        self.poll_s = poll_s  # read the log at least this often without a hint
        self.checkpoints = False  # this replica writes no checkpoints of its own (the primary does, in the store)
        self._log_id: str | None = None
        self.reloads = 0  # state reloads from a checkpoint (erasures seen)
        # Called with the users a reload no longer holds (forgotten: the marker names no one, the state does),
        # so what this process keeps of them elsewhere (its impression log) goes too.
        self.on_users_gone: Callable[[set[str]], None] | None = None
        self.applied_records = 0
        self.last_apply_wall = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wakeup: WakeupReceiver | None = None

    # --- lifecycle --------------------------------------------------------------------------------
    def load(self) -> int:
        """The state at start: checkpoint + log, and the reranker the primary serves. Returns records replayed."""
        swaps: list[codec.RerankerSwap] = []
        meta = current_reranker(self.store)  # read before the log: a swap logged meanwhile is in the replay
        replayed = recover(self.store, self.state, swaps.append)
        chosen = swaps[-1] if swaps else meta
        if chosen is not None:
            self._swap_reranker(chosen)
        elif self.config.reranker_path:  # a primary that never recorded one serves its configured model
            self._swap_reranker(codec.RerankerSwap(str(self.config.reranker_path), ""))
        return replayed

    def start(self) -> None:
        self._wakeup = WakeupReceiver(folder_of(self.store.path))
        self._thread = threading.Thread(target=self._run, name="streamrec-follower", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._wakeup is not None:
            self._wakeup.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wakeup.wait(self.poll_s)
            try:
                while self.catch_up():
                    pass
            except Exception:  # a bad record or a store error: log it, keep serving what is applied, retry
                log.exception("replica: applying the log failed at seq %d; retrying", self.state.applied_seq)
                self._stop.wait(1.0)

    # Whether log_end() is exact here (the shared store) or as of the last batch received (a remote copy).
    log_end_is_exact = True

    def log_end(self) -> int:
        """The last seq of the primary's log as far as this replica knows."""
        return self.store.last_seq()

    @property
    def log_id(self) -> str:
        """The log this replica's applied seq counts in (cached: every answer reports it)."""
        if self._log_id is None:
            self._log_id = self.store.log_id
        return self._log_id

    # --- applying ---------------------------------------------------------------------------------
    def catch_up(self) -> int:
        """Apply up to one chunk of what the log holds past the applied seq; returns the records applied."""
        applied = self.state.applied_seq
        if self.store.last_seq() <= applied:
            return 0
        records = list(islice(self.store.iter_log(after_seq=applied), _CHUNK))
        return self._apply(records) if records else self._erased_tail(applied)

    def _apply(self, records: list[tuple[int, bytes]]) -> int:
        expected = self.state.applied_seq + 1
        start = 0
        for index, (seq, payload) in enumerate(records):
            kind = payload[0] if payload else None
            if seq != expected or kind == codec.RecordKind.USER_FORGOTTEN:
                self._apply_run(records[start:index])
                # A gap: wait for a checkpoint covering what was erased (everything before this record); a marker:
                # the checkpoint written with it.
                self._reload(seq - 1 if seq != expected else seq)
                return index + 1
            if kind == codec.RecordKind.RERANKER:
                self._apply_run(records[start:index])
                self._swap_reranker(codec.decode(payload))
                self.state.applied_seq = seq
                start = index + 1
            expected = seq + 1
        self._apply_run(records[start:])
        return len(records)

    def _apply_run(self, records: list[tuple[int, bytes]]) -> None:
        if not records:
            return
        with self.lock:
            apply_log(self.state, records)
            if not self.checkpoints:  # what the State marks for a next checkpoint would only pile up
                self.state.clear_dirty()
        self.applied_records += len(records)
        self.last_apply_wall = time.time()

    def _erased_tail(self, applied: int) -> int:
        """last_seq moved past the applied seq but no record is left: the newest records were erased."""
        self._reload(self.store.last_seq())
        return 1

    def _reload(self, at_least: int) -> None:
        """The state from a checkpoint whose watermark is at least `at_least`, then the log after it."""
        started = time.perf_counter()
        if not self._checkpoint_covering(at_least):
            return
        fresh = State(self.config)
        swaps: list[codec.RerankerSwap] = []
        recover(self.store, fresh, swaps.append)
        fresh.clear_dirty()
        for row in range(len(fresh.items)):  # a device-resident copy of the catalog must be rebuilt whole
            fresh.items.device_changes.add(row)
        with self.lock:
            gone = set(self.state.users.rows) - set(fresh.users.rows)
            self.state.adopt(fresh)
        if gone and self.on_users_gone is not None:
            self.on_users_gone(gone)
        if swaps:
            self._swap_reranker(swaps[-1])
        self.reloads += 1
        log.info("replica: reloaded from checkpoint (erasure before seq %d) at seq %d in %.1f ms", at_least,
                 self.state.applied_seq, (time.perf_counter() - started) * 1e3)

    def _checkpoint_covering(self, at_least: int) -> bool:
        """Until the store holds a checkpoint at or past `at_least` (the primary writes one after each erasure);
        False when stopped first."""
        while self.store.checkpoint_seq() < at_least:
            if self._stop.wait(_RELOAD_POLL_S):
                return False
        return True

    def _swap_reranker(self, swap: codec.RerankerSwap) -> None:
        """The primary's model change, made here; a file this process cannot load leaves the old model serving."""
        if not swap.path:
            if self.reranker.model is not None:
                self.reranker.unload()
            return
        current = self.reranker.model
        if current is not None and str(current.path) == swap.path and (not swap.version or current.version == swap.version):
            return
        with self.lock:
            items, now_ms = ItemArrays.of(self.state.items), state_clock_ms(self.state.items)
        try:
            model = self.reranker.reload(Path(swap.path), items, now_ms, self.model_version())
        except RerankerRejected as error:
            log.error("replica: the primary's reranker %s does not load here (%s); still serving %s", swap.path,
                      error.message, current.version if current else "retrieval only")
            return
        if swap.version and model.version != swap.version:
            log.warning("replica: %s is version %s here but %s on the primary (file changed since?)", swap.path,
                        model.version, swap.version)
