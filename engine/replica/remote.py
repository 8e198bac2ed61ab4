"""A replica on another machine: the same follower (follower.py), reading its own copy of the primary's log
(store/copy.py) that a copier thread fills from the network (a `LogSource`: server/replication.py over gRPC).

    start:    a copy that follows this log already -> recover from it (checkpoint + local log)
              otherwise                            -> Snapshot from the primary into the copy, then recover
    running:  TailLog(from = the copy's last seq) -> append to the copy -> apply (gap, marker and reranker
              rules as on one machine) -> a checkpoint of the copy when due (write/checkpointer.py)
    erasure:  the marker's seqs are erased from the copy, and a new Snapshot covering the marker replaces the
              copy's checkpointed state, so the forgotten user leaves this machine too
    models:   a reranker the log names is fetched from the primary into <copy>/models/ and loaded from there

Restarted, a replica resumes from its own last seq; only a copy of another log (another primary, or none yet)
is replaced by a Snapshot.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from streamrec.engine.api import SnapshotData
from streamrec.engine.errors import InvalidArgument, OtherLog
from streamrec.engine.replica.follower import LogFollower
from streamrec.engine.store import codec
from streamrec.engine.store.copy import LogCopy
from streamrec.engine.store.records import _unpack_user, unpack_item_transfer
from streamrec.engine.write.checkpointer import Checkpointer

log = logging.getLogger(__name__)

COPY_OF_KEY = "copy_of"  # store meta of a copy: the log_id it follows ("" or absent: no snapshot taken yet)
_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # reconnect back-off while the primary is unreachable


class LogSource(Protocol):
    """Where a remote replica gets the primary's state and log (server/replication.py: over gRPC)."""

    def snapshot(self, at_least_seq: int) -> SnapshotData: ...

    def tail(self, from_seq: int, log_id: str) -> Iterator[tuple[list[tuple[int, bytes]], int]]:
        """Batches of (seq, payload) after from_seq, each with the primary's last seq; OtherLog when the
        primary's log is not `log_id`."""
        ...

    def fetch_model(self, path: str, into: Path) -> Path: ...

    def close(self) -> None:
        """Ends a tail() in progress (its iterator raises or stops)."""
        ...


class RemoteFollower(LogFollower):
    def __init__(self, store: LogCopy, source: LogSource, checkpointer: Checkpointer, *args, **kwargs):
        super().__init__(store, *args, **kwargs)
        self.source = source
        self._other_log = False
        self._copy_of: str | None = None
        self.checkpointer = checkpointer
        self.checkpoints = True  # the copy keeps checkpoints of its own, so a restart resumes from it
        self.primary_last = 0  # the primary's last seq as of the last batch (an idle stream sends one a second)
        self.snapshots = 0

    log_end_is_exact = False

    def log_end(self) -> int:
        return max(self.store.last_seq(), self.primary_last)

    @property
    def log_id(self) -> str:
        return self.copy_of

    @property
    def copy_of(self) -> str:
        """The log this copy follows ("" before its first snapshot); cached, every answer reports it."""
        if self._copy_of is None:
            self._copy_of = (self.store.get_meta(COPY_OF_KEY) or b"").decode()
        return self._copy_of

    def load(self) -> int:
        if not self.copy_of:
            self._take_snapshot(0)
        stored_dim = int(self.store.get_meta("dim") or self.config.dim)
        if stored_dim != self.config.dim:
            raise InvalidArgument("dim", f"the primary's vectors have dimension {stored_dim}, this replica was "
                                         f"started with {self.config.dim}: start it with --dim {stored_dim}")
        return super().load()

    def start(self) -> None:  # no wake-up FIFO: the stream itself wakes this one
        self._thread = threading.Thread(target=self._copy_forever, name="streamrec-remote-follower", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.source.close()
        super().close()
        self.checkpointer.tick(True)  # the copier (this copy's one writer) has stopped: a last checkpoint
        self.checkpointer.close()

    def _copy_forever(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                for batch, primary_last in self.source.tail(self.store.last_seq(), self.copy_of):
                    if self._stop.is_set():
                        return
                    attempt = 0
                    self.store.append_at([r for r in batch if r[0] > self.store.last_seq()])
                    while self.catch_up():
                        pass
                    self.primary_last = max(self.primary_last, primary_last)
                    self.checkpointer.count(len(batch))
                    self.checkpointer.tick(False)
            except OtherLog as error:  # the primary was replaced by one with another log: start over from it
                log.warning("remote replica: %s; replacing this copy with a snapshot", error)
                self._reload(0, other_log=True)
            except Exception as error:  # the primary restarted, the network failed: reconnect from our last seq
                if self._stop.is_set():
                    return
                delay = _RETRY_S[min(attempt, len(_RETRY_S) - 1)]
                attempt += 1
                log.warning("remote replica: log stream ended (%s); reconnecting in %.1f s", error, delay)
                self._stop.wait(delay)

    def _reload(self, at_least: int, other_log: bool = False) -> None:
        self._other_log = other_log
        super()._reload(at_least)

    def _checkpoint_covering(self, at_least: int) -> bool:
        """Erasure or gap: erase what the marker lists from the copy, then a snapshot covering it replaces the
        copy's checkpointed state (the forgotten user is in neither afterwards)."""
        marker = self._record(at_least)
        if isinstance(marker, codec.UserForgotten):
            self.store.erase_seqs(marker.erased_seqs)
        self._take_snapshot(at_least, drop_log=self._other_log)
        return True

    def _record(self, seq: int):
        for found, payload in self.store.iter_log(after_seq=seq - 1):
            return codec.decode(payload) if found == seq else None
        return None

    def _take_snapshot(self, at_least: int, drop_log: bool = False) -> None:
        self.checkpointer.wait()  # a checkpoint of the old state must not land after the snapshot
        started = time.perf_counter()
        snap = self.source.snapshot(at_least)
        items = [unpack_item_transfer(blob) for blob in snap.items]
        users = [_unpack_user(blob) for blob in snap.users]
        self.store.replace_checkpoint(snap.watermark, items, users, {**snap.meta, COPY_OF_KEY: snap.log_id.encode()},
                                      drop_log=drop_log)
        self.store.adopt_log_id(snap.log_id)
        self._copy_of = snap.log_id
        self.snapshots += 1
        log.info("remote replica: snapshot at seq %d (%d items, %d users) copied in %.1f ms", snap.watermark,
                 len(items), len(users), (time.perf_counter() - started) * 1e3)

    def _swap_reranker(self, swap: codec.RerankerSwap) -> None:
        """The model the primary names lives on its machine: copy it here first."""
        if swap.path and not (swap.version == "" and Path(swap.path).is_file()):  # "": this machine's configured one
            try:
                local = self.source.fetch_model(swap.path, Path(self.store.path) / "models")
            except Exception as error:  # noqa: BLE001 - the old model keeps serving
                log.error("remote replica: cannot fetch reranker %s from the primary (%s)", swap.path, error)
                return
            swap = codec.RerankerSwap(str(local), swap.version)
        super()._swap_reranker(swap)
