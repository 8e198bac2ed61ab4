"""Session consistency: a client reads what it wrote, and never reads older state than it has seen, whichever
server process answers (`streamrec serve --replicas N`).

Every write answer carries `durable_seq` and every read answer `served_by.applied_seq`; the session keeps the
highest and stamps it as `min_seq` on each read request that does not set one, so a replica behind it waits
until it has applied that seq (or answers UNAVAILABLE, which the client retries). This is MongoDB's causal
session or Milvus' Session level, with the log's seq as the clock. `consistency="eventual"` turns it off.
"""
from __future__ import annotations

import threading

CONSISTENCY_LEVELS = ("session", "eventual")


class Session:
    def __init__(self, consistency: str = "session"):
        if consistency not in CONSISTENCY_LEVELS:
            raise ValueError(f"consistency must be one of {CONSISTENCY_LEVELS}, not {consistency!r}")
        self.enabled = consistency == "session"
        self.seq = 0  # the highest log seq this client has seen written or read
        self._lock = threading.Lock()

    def saw(self, seq: int) -> None:
        if seq > self.seq:
            with self._lock:
                self.seq = max(self.seq, seq)

    def stamp(self, request):
        """The request with min_seq set to the session's seq (when it has the field and leaves it 0)."""
        if self.enabled and self.seq and "min_seq" in request.DESCRIPTOR.fields_by_name and not request.min_seq:
            request.min_seq = self.seq
        return request

    def observe(self, response):
        """Take the seq a response reports (a write's durable_seq, a read's served_by.applied_seq)."""
        fields = response.DESCRIPTOR.fields_by_name
        if "durable_seq" in fields:
            self.saw(response.durable_seq)
        if "served_by" in fields:
            self.saw(response.served_by.applied_seq)
        elif "responses" in fields:
            for item in response.responses:
                self.saw(item.served_by.applied_seq)
        return response
