"""Dynamic batching: concurrent recommendation requests (unary, batch and stream calls alike) are
gathered into one kernel call. One dispatcher thread runs batches back to back; whatever queued while
a batch ran forms the next one ("natural" batching, no added latency). Only when recent batches show
concurrency does it also wait up to max_wait_us to fill a batch, so a lone request never waits."""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

from streamrec.engine.errors import DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

Q = TypeVar("Q")
R = TypeVar("R")


@dataclass
class _Pending(Generic[Q]):
    query: Q
    deadline: float | None  # time.monotonic() value
    future: Future = field(default_factory=Future)


class BatchSizeHistogram:
    """Counts of batches by size, in power-of-two buckets (1, 2, 4, ... by upper bound)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.batches = 0
        self.requests = 0
        self._lock = threading.Lock()

    def add(self, size: int) -> None:
        bucket = 1 << max(0, (size - 1).bit_length())
        with self._lock:
            self.counts[bucket] = self.counts.get(bucket, 0) + 1
            self.batches += 1
            self.requests += size

    def snapshot(self) -> dict[int, int]:
        with self._lock:
            return dict(sorted(self.counts.items()))


class MicroBatcher(Generic[Q, R]):
    def __init__(self, run_batch: Callable[[list[Q]], list[R]], max_batch: int = 256, max_wait_us: int = 500,
                 queue_size: int = 8192, on_batch: Callable[[int], None] | None = None):
        self._run_batch = run_batch
        self._on_batch = on_batch or (lambda size: None)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_us / 1e6
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=queue_size)
        self._last_batch_size = 1
        self.histogram = BatchSizeHistogram()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="streamrec-batcher", daemon=True)
        self._thread.start()

    def submit(self, query: Q, deadline: float | None = None) -> Future:
        if self._closed:
            raise Unavailable("", "the server is shutting down")
        pending = _Pending(query, deadline)
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            raise ResourceExhausted("", f"recommendation queue full ({self._queue.maxsize} waiting); retry later") from None
        return pending.future

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(10)

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch, stop = [first], False
        busy = self._last_batch_size > 1 or not self._queue.empty()
        wait_until = time.monotonic() + self.max_wait_s if busy else 0.0
        while len(batch) < self.max_batch:
            timeout = wait_until - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            now = time.monotonic()
            live = []
            for pending in batch:
                if pending.deadline is not None and pending.deadline < now:
                    pending.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                elif pending.future.set_running_or_notify_cancel():
                    live.append(pending)
            self._last_batch_size = len(batch)
            if not live:
                continue
            self.histogram.add(len(live))
            self._on_batch(len(live))
            try:
                results = self._run_batch([p.query for p in live])
            except BaseException as error:  # every waiting caller must hear about it
                log.exception("recommendation batch of %d failed", len(live))
                for pending in live:
                    pending.future.set_exception(error)
                continue
            for pending, result in zip(live, results):
                pending.future.set_result(result)
        # Fail whatever is still queued after close so no caller waits forever.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.future.set_exception(Unavailable("", "the server is shutting down"))
