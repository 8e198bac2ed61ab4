"""Session consistency: a client reads what it wrote, and never reads older state than it has seen, whichever
server process answers (`streamrec serve --replicas N`, replicas on other machines).

Every write answer carries `durable_seq` and every read answer `served_by.applied_seq`, each with the `log_id`
it counts in; the session keeps the highest seq of its log and stamps it as `min_seq` (with `log_id`) on each
read request that does not set one, so a process behind it waits until it has applied that seq (or answers
UNAVAILABLE, which the client retries), and a process serving another log refuses the token instead of
misreading it. This is MongoDB's causal session or Milvus' Session level, with the log's seq as the clock.
An answer from another log (the server's store was replaced) starts the session over on that log.
`consistency="eventual"` turns the stamping off.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

CONSISTENCY_LEVELS = ("session", "eventual")


class Session:
    def __init__(self, consistency: str = "session"):
        if consistency not in CONSISTENCY_LEVELS:
            raise ValueError(f"consistency must be one of {CONSISTENCY_LEVELS}, not {consistency!r}")
        self.enabled = consistency == "session"
        self.seq = 0  # the highest log seq this client has seen written or read
        self.log_id = ""  # the log that seq counts in ("" until an answer says)
        self._lock = threading.Lock()

    def saw(self, seq: int, log_id: str = "") -> None:
        """Take a seq (e.g. handed over from another client's ack, with its log_id)."""
        if log_id and log_id != self.log_id:
            with self._lock:
                if self.log_id:
                    log.warning("the server now serves log %s instead of %s: session starts over", log_id, self.log_id)
                    self.seq = 0
                self.log_id = log_id
        if seq > self.seq:
            with self._lock:
                self.seq = max(self.seq, seq)

    def stamp(self, request):
        """The request with min_seq (and log_id) set from the session, when it has the field and leaves it 0."""
        if self.enabled and self.seq and "min_seq" in request.DESCRIPTOR.fields_by_name and not request.min_seq:
            request.min_seq = self.seq
            request.log_id = self.log_id
        return request

    def observe(self, response):
        """Take the seq a response reports (a write's durable_seq, a read's served_by.applied_seq)."""
        fields = response.DESCRIPTOR.fields_by_name
        if "durable_seq" in fields:
            self.saw(response.durable_seq, response.log_id if "log_id" in fields else "")
        if "served_by" in fields:
            self.saw(response.served_by.applied_seq, response.served_by.log_id)
        elif "responses" in fields:
            for item in response.responses:
                self.saw(item.served_by.applied_seq, item.served_by.log_id)
        return response
