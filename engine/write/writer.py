"""Group commit: every mutation goes through one writer thread, which folds whatever is queued into a
single LMDB transaction, applies it to memory in log order, and only then completes the callers'
futures. One writer means one total order, which is the order replay uses after a crash."""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from streamrec.engine.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


class OpKind(str, Enum):
    """What a queued write does. The first three share group transactions; the others run alone."""

    EVENTS = "events"  # payload: [(index in the caller's batch, Event)], validated
    UPSERT = "upsert"  # payload: [ItemSpec]
    DELETE = "delete"  # payload: [item_id]
    FORGET = "forget"  # payload: user_id
    CHECKPOINT = "checkpoint"  # payload: None
    SEED = "seed"  # payload: (items, events, user_ids, user_vectors, model_version)
    RERANKER = "reranker"  # payload: (path, version) of the model now serving; path "" = unloaded

    @property
    def exclusive(self) -> bool:
        """Runs alone, outside a group transaction: erasure and seeding write the checkpointed state themselves."""
        return self in (OpKind.FORGET, OpKind.CHECKPOINT, OpKind.SEED, OpKind.RERANKER)


@dataclass
class Op:
    kind: OpKind
    payload: Any
    future: Future = field(default_factory=Future)
    # Turns the commit's result into the caller's, on the writer thread: one future per call instead of a
    # second one chained to this (a 1-event stream message paid for both).
    finish: Callable[[Any], Any] | None = None

    def complete(self, result: Any) -> None:
        self.future.set_result(result if self.finish is None else self.finish(result))

    @property
    def exclusive(self) -> bool:
        return self.kind.exclusive


class GroupCommitWriter:
    def __init__(
        self,
        commit_group: Callable[[list[Op]], None],
        run_exclusive: Callable[[Op], Any],
        maybe_checkpoint: Callable[[bool], None],
        queue_size: int,
        max_group_ops: int,
        idle_tick_s: float = 1.0,
    ):
        self._commit_group = commit_group
        self._run_exclusive = run_exclusive
        self._maybe_checkpoint = maybe_checkpoint
        self._queue: queue.Queue[Op | None] = queue.Queue(maxsize=queue_size)
        self._max_group = max_group_ops
        self._idle_tick_s = idle_tick_s
        self._thread = threading.Thread(target=self._run, name="streamrec-writer", daemon=True)
        self._closed = False
        self._final_checkpoint = True
        self.group_sizes: list[int] = []  # recent group sizes, for stats

    def start(self) -> None:
        self._thread.start()

    def submit(self, kind: OpKind | str, payload: Any, timeout_s: float = 5.0,
               finish: Callable[[Any], Any] | None = None) -> Future:
        if self._closed:
            raise Unavailable("", "the engine is shutting down")
        op = Op(OpKind(kind), payload, finish=finish)
        try:
            self._queue.put(op, timeout=timeout_s)
        except queue.Full:
            raise ResourceExhausted("", f"write queue full ({self._queue.maxsize} pending operations); retry later") from None
        return op.future

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout_s: float = 30.0, final_checkpoint: bool = True) -> None:
        """Finish every queued op, take a final checkpoint (unless told not to), stop."""
        if self._closed:
            return
        self._closed = True
        self._final_checkpoint = final_checkpoint
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=self._idle_tick_s)
            except queue.Empty:
                self._safely(self._maybe_checkpoint, False)
                continue
            if first is None:
                break
            group = [first]
            while not first.exclusive and len(group) < self._max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                if nxt.exclusive:
                    self._commit(group)
                    group = [nxt]
                    break
                group.append(nxt)
            self._commit(group)
            self._safely(self._maybe_checkpoint, False)
        if self._final_checkpoint:
            self._safely(self._maybe_checkpoint, True)

    def _commit(self, group: list[Op]) -> None:
        started = time.perf_counter()
        try:
            if len(group) == 1 and group[0].exclusive:
                group[0].complete(self._run_exclusive(group[0]))
            else:
                self._commit_group(group)
        except BaseException as exc:  # the callers must hear about it; the writer keeps going
            log.exception("write failed; %d operation(s) not acknowledged", len(group))
            for op in group:
                if not op.future.done():
                    op.future.set_exception(exc)
        self.group_sizes.append(len(group))
        del self.group_sizes[:-1024]
        log.debug("committed %d op(s) in %.2f ms", len(group), (time.perf_counter() - started) * 1e3)

    @staticmethod
    def _safely(fn: Callable[[bool], None], final: bool) -> None:
        try:
            fn(final)
        except Exception:
            log.exception("checkpoint failed; the log still holds every event, will retry")
