"""The primary's side of replication to other machines: what a remote replica reads through the server's
ReplicationService (a snapshot, the log after a seq, the reranking model files the log names)."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

from streamrec.engine.api import SnapshotData
from streamrec.engine.errors import NotFound, OtherLog, OutOfRange, Unavailable
from streamrec.engine.rerank.reranker import sidecar_path
from streamrec.engine.state.state import State
from streamrec.engine.store.records import _pack_user, pack_item_for_transfer
from streamrec.engine.store.store import Store
from streamrec.engine.write.group_commit import current_reranker

_SHIPPED_META = ("dim", "model_version", "reranker")  # the store meta a replica needs besides the records


class LogFeed:
    """Readers (one per replica stream) may be inside any method when the engine closes: `close` refuses new
    calls, wakes the waiting ones and returns once none is reading the store any more."""

    def __init__(self, store: Store, state: State, checkpoint: Callable[[], int], lock: threading.RLock):
        self.store, self.state, self.checkpoint, self.lock = store, state, checkpoint, lock
        self._readers = threading.Condition()
        self._active = 0
        self._closed = False
        self.snapshots_served = 0  # a replica elsewhere copying everything: its first start, or an erasure

    @contextmanager
    def _reading(self) -> Iterator[None]:
        with self._readers:
            if self._closed:
                raise Unavailable("", "the primary is shutting down; reconnect to it once it is back")
            self._active += 1
        try:
            yield
        finally:
            with self._readers:
                self._active -= 1
                self._readers.notify_all()

    def close(self) -> None:
        with self._readers:
            self._closed = True
        self.state.applied_seq = self.state.applied_seq  # wakes the tails waiting for a record
        with self._readers:
            self._readers.wait_for(lambda: self._active == 0, timeout=10)

    @property
    def log_id(self) -> str:
        with self._reading():
            return self.store.log_id

    def last_seq(self) -> int:
        with self._reading():
            return self.store.last_seq()

    def snapshot(self, at_least_seq: int) -> SnapshotData:
        """The checkpointed state at a watermark covering `at_least_seq` (a checkpoint is forced when the last one
        does not), read in one transaction."""
        if at_least_seq > self.last_seq():
            raise OutOfRange("at_least_seq", f"{at_least_seq} is beyond the log (last seq {self.last_seq()})")
        if self.store.checkpoint_seq() < at_least_seq:
            self.checkpoint()
        log_id = self.log_id
        with self._reading():
            watermark, items, users = self.store.load_checkpoint()
            meta = {key: value for key in _SHIPPED_META if (value := self.store.get_meta(key)) is not None}
        self.snapshots_served += 1
        return SnapshotData(log_id, watermark, meta, [pack_item_for_transfer(i) for i in items],
                            [_pack_user(u) for u in users])

    def records_after(self, seq: int, log_id: str, limit: int = 4096) -> list[tuple[int, bytes]]:
        if log_id and log_id != self.log_id:
            raise OtherLog("log_id", f"this primary serves log {self.log_id}, not {log_id}")
        last = self.last_seq()
        if seq > last:
            raise OutOfRange("from_seq", f"{seq} is beyond the log (last seq {last})")
        with self._reading():
            return list(islice(self.store.iter_log(after_seq=seq), limit))

    def wait_after(self, seq: int, timeout_s: float) -> bool:
        """True once a record after `seq` is committed and applied here (False after timeout_s or at close)."""
        return self.state.wait_applied(seq + 1, timeout_s) and not self._closed

    def model_files(self, path: str) -> list[tuple[str, Path]]:
        """("model", file) and ("sidecar", file) of the reranker the log names; any other path: NotFound (this
        serves the model the primary serves, not its disk)."""
        with self._reading():
            recorded = current_reranker(self.store)
        if recorded is None or not recorded.path or recorded.path != path:
            raise NotFound("path", f"{path!r} is not the reranker this primary's log names")
        model = Path(path)
        files = [("model", model)]
        if sidecar_path(model).is_file():
            files.append(("sidecar", sidecar_path(model)))
        return files
