"""What was shown, and what the user did with it: the impression log and event attribution (issue 20).

Every recommendation answer gets a `recommendation_id`; the impression (user, items in order, scores, the
models that answered, the experiment arm, the time) is queued here and written by one thread into an LMDB
environment of its own (`<store>/impressions`), batched, off the request path. When the queue is full the
impression is dropped and counted (`shed`): serving never waits for this log.

An event that names a recommendation_id is attributed after its commit: when the impression exists, is the
same user's, holds the event's item and is younger than the attribution window, the outcome is added to the
impression and to its arm's totals. Otherwise it is counted as unattributed, by reason; the event itself is
accepted either way.

Retention keeps the newest `max_records` impressions younger than `max_age_ms`; ForgetUser erases a user's
impressions. Arm totals (impressions, outcomes by event type) are anonymous counts and stay.

Several processes of one machine (a primary and its replicas) share the environment (LMDB serialises their
writers); a replica on another machine keeps its own, and the primary cannot attribute outcomes to it.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from streamrec.engine.api import Event, EventType
from streamrec.engine.store.lmdb_env import MAX_READERS

log = logging.getLogger(__name__)

FOLDER = "impressions"
# features: the reranker's feature rows of a sampled share of impressions (float16), for training from the log
_DBS = ("impressions", "by_time", "by_user", "totals", "experiments", "features")  # experiments: experiments.py
_SHAPE = struct.Struct("<II")
_TS = struct.Struct(">Q")
CLOCK_SKEW_MS = 60_000  # an event stamped by the client may read up to this much before the server's impression
# Per arm: impressions, attributed events, events by type, and impressions with at least one click ("clicked") or
# purchase ("converted"): the numerators of CTR and conversion, which are proportions of impressions.
_COUNTS = ("impressions", "attributed", "clicked", "converted", *(t.name.lower() for t in EventType))
_FIRST = {"click": "clicked", "purchase": "converted"}


@dataclass
class Impression:
    recommendation_id: str  # 32 hex digits
    user_id: str
    item_ids: list[str]
    scores: list[float]
    shown_ms: int
    model_version: str = ""
    user_model: str = ""
    reranker: str = ""
    experiment: str = ""
    arm: str = ""
    outcomes: list = field(default_factory=list)  # [event type, item_id, position (1-based), event ms, event_id]


@dataclass(frozen=True)
class RetentionPolicy:
    max_records: int = 1_000_000
    max_age_ms: int = 30 * 24 * 3600 * 1000
    attribution_window_ms: int = 24 * 3600 * 1000


def new_recommendation_id() -> str:
    return os.urandom(16).hex()


def _key(recommendation_id: str) -> bytes | None:
    try:
        raw = bytes.fromhex(recommendation_id)
    except ValueError:
        return None
    return raw if len(raw) == 16 else None


class ImpressionLog:
    def __init__(self, folder: str | Path, policy: RetentionPolicy = RetentionPolicy(), queue_size: int = 65_536,
                 sync: bool = True, map_size: int = 1 << 30, readonly: bool = False):
        """readonly: for reading a log another process writes (training from it); no writer thread."""
        self.folder = Path(folder)
        if not readonly:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.policy = policy
        self.env = lmdb.open(str(self.folder), map_size=map_size, max_dbs=len(_DBS), max_readers=MAX_READERS,
                             sync=sync, metasync=sync, readonly=readonly, create=not readonly)
        self.env.reader_check()
        self.dbs = {}
        for name in _DBS:
            try:
                self.dbs[name] = self.env.open_db(name.encode(), dupsort=(name == "by_user"), create=not readonly)
            except lmdb.NotFoundError:  # read-only, and the writer never made it
                self.dbs[name] = None
        self.readonly = readonly
        self.counters: Counter = Counter()  # this process: recorded, shed, attributed, unattributed_*, pruned
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0
        self._thread = threading.Thread(target=self._run, name="streamrec-impressions", daemon=True)
        if not readonly:
            self._thread.start()

    # --- the request path (never blocks) ----------------------------------------------------------
    def record(self, impression: Impression, features: np.ndarray | None = None) -> bool:
        """Queue an impression (with the reranker's feature rows of its items, when sampled); False (and
        counted) when the queue is full."""
        return self._offer(("impression", (impression, features)))

    def attribute(self, events: list[Event]) -> None:
        """Queue committed events that name a recommendation_id for attribution."""
        named = [e for e in events if e.recommendation_id]
        if named:
            self._offer(("events", named))

    def _offer(self, item) -> bool:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.counters["shed"] += 1
            return False
        return True

    # --- reads and erasure (any thread) --------------------------------------------------------------
    def get(self, recommendation_id: str) -> Impression | None:
        key = _key(recommendation_id)
        if key is None:
            return None
        with self.env.begin() as txn:
            raw = txn.get(key, db=self.dbs["impressions"])
        return Impression(**json.loads(raw)) if raw is not None else None

    def features(self, recommendation_id: str) -> np.ndarray | None:
        """The feature rows logged with the impression (float32 [items, features]), or None."""
        key = _key(recommendation_id)
        if key is None or self.dbs["features"] is None:
            return None
        with self.env.begin() as txn:
            raw = txn.get(key, db=self.dbs["features"])
        if raw is None:
            return None
        rows, cols = _SHAPE.unpack_from(raw)
        return np.frombuffer(raw, np.float16, rows * cols, _SHAPE.size).reshape(rows, cols).astype(np.float32)

    def iter_impressions(self):
        """Every impression kept, oldest first."""
        with self.env.begin() as txn:
            for time_key in txn.cursor(db=self.dbs["by_time"]).iternext(values=False):
                raw = txn.get(time_key[8:], db=self.dbs["impressions"])
                if raw is not None:
                    yield Impression(**json.loads(raw))

    def user_impressions(self, user_id: str) -> list[Impression]:
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.dbs["by_user"])
            keys = list(cursor.iternext_dup()) if cursor.set_key(user_id.encode()) else []
            return [Impression(**json.loads(raw)) for raw in (txn.get(k, db=self.dbs["impressions"]) for k in keys)
                    if raw is not None]

    def forget(self, user_id: str) -> int:
        """Erase every impression of the user (queued ones first reach the log); returns how many."""
        self.flush()
        with self.env.begin(write=True) as txn:
            cursor = txn.cursor(db=self.dbs["by_user"])
            keys = list(cursor.iternext_dup()) if cursor.set_key(user_id.encode()) else []
            for key in keys:
                raw = txn.get(key, db=self.dbs["impressions"])
                if raw is not None:
                    txn.delete(_TS.pack(json.loads(raw)["shown_ms"]) + key, db=self.dbs["by_time"])
                    txn.delete(key, db=self.dbs["impressions"])
                    txn.delete(key, db=self.dbs["features"])
            txn.delete(user_id.encode(), db=self.dbs["by_user"])
        return len(keys)

    def totals(self) -> dict[str, dict[str, int]]:
        """"experiment/arm" ("/" when none) -> counts of impressions, attributed events and events by type."""
        with self.env.begin() as txn:
            return {key.decode(): json.loads(raw) for key, raw in txn.cursor(db=self.dbs["totals"])}

    def size(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.dbs["impressions"])["entries"]

    def flush(self, timeout_s: float = 10.0) -> None:
        """Return once everything queued before the call is written."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while (self._queue.unfinished_tasks or self._busy) and time.monotonic() < deadline:
                self._idle.wait(0.01)

    def close(self) -> None:
        if not self.readonly:
            self.flush()
            self._stop.set()
            self._thread.join(5)
        self.env.close()

    # --- the writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        writes = 0
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < 1024:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._idle:
                self._busy += 1
            try:
                self._write(batch)
                writes += len(batch)
                if writes >= 1000:
                    writes = 0
                    self.prune()
            except Exception:  # noqa: BLE001 - this log must never take serving down
                log.exception("impression log: a batch of %d failed", len(batch))
                self.counters["failed"] += len(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _write(self, batch: list) -> None:
        with self.env.begin(write=True) as txn:
            for kind, payload in batch:
                if kind == "impression":
                    self._put(txn, *payload)
                else:
                    for event in payload:
                        self._attribute(txn, event)

    def _put(self, txn, impression: Impression, features: np.ndarray | None) -> None:
        key = _key(impression.recommendation_id)
        if features is not None:
            txn.put(key, _SHAPE.pack(*features.shape) + np.asarray(features, np.float16).tobytes(), db=self.dbs["features"])
        txn.put(key, json.dumps(asdict(impression), separators=(",", ":")).encode(), db=self.dbs["impressions"])
        txn.put(_TS.pack(impression.shown_ms) + key, b"", db=self.dbs["by_time"])
        txn.put(impression.user_id.encode(), key, db=self.dbs["by_user"])
        self._count(txn, impression, "impressions")
        self.counters["recorded"] += 1

    def _attribute(self, txn, event: Event) -> None:
        key = _key(event.recommendation_id)
        raw = txn.get(key, db=self.dbs["impressions"]) if key is not None else None
        if raw is None:
            self.counters["unattributed_unknown_id"] += 1  # never shown, pruned, forgotten or malformed
            return
        impression = Impression(**json.loads(raw))
        if impression.user_id != event.user_id:
            self.counters["unattributed_other_user"] += 1
            return
        if event.item_id not in impression.item_ids:
            self.counters["unattributed_not_shown"] += 1
            return
        if not -CLOCK_SKEW_MS <= event.timestamp_ms - impression.shown_ms <= self.policy.attribution_window_ms:
            self.counters["unattributed_outside_window"] += 1
            return
        if any(outcome[4] == event.event_id for outcome in impression.outcomes):
            return  # a retried event: attributed once
        position = impression.item_ids.index(event.item_id) + 1
        kind = EventType(int(event.type)).name.lower()
        first = _FIRST.get(kind) if not any(o[0] == kind for o in impression.outcomes) else None
        impression.outcomes.append([kind, event.item_id, position, event.timestamp_ms, event.event_id])
        txn.put(key, json.dumps(asdict(impression), separators=(",", ":")).encode(), db=self.dbs["impressions"])
        self._count(txn, impression, "attributed", kind, *([first] if first else []))
        self.counters["attributed"] += 1

    def _count(self, txn, impression: Impression, *names: str) -> None:
        key = f"{impression.experiment}/{impression.arm}".encode()
        raw = txn.get(key, db=self.dbs["totals"])
        counts = json.loads(raw) if raw is not None else dict.fromkeys(_COUNTS, 0)
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        txn.put(key, json.dumps(counts).encode(), db=self.dbs["totals"])

    def prune(self, now_ms: int | None = None) -> int:
        """Delete impressions beyond the retention policy, oldest first; returns how many."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        oldest_kept = now_ms - self.policy.max_age_ms
        with self.env.begin(write=True) as txn:
            excess = txn.stat(self.dbs["impressions"])["entries"] - self.policy.max_records
            doomed = []  # oldest first, found before deleting (no deletes under the open cursor)
            for time_key in txn.cursor(db=self.dbs["by_time"]).iternext(values=False):
                if len(doomed) >= excess and _TS.unpack(time_key[:8])[0] >= oldest_kept:
                    break
                doomed.append(time_key)
            for time_key in doomed:
                key = time_key[8:]
                raw = txn.get(key, db=self.dbs["impressions"])
                if raw is not None:
                    txn.delete(json.loads(raw)["user_id"].encode(), key, db=self.dbs["by_user"])
                    txn.delete(key, db=self.dbs["impressions"])
                    txn.delete(key, db=self.dbs["features"])
                txn.delete(time_key, db=self.dbs["by_time"])
        self.counters["pruned"] += len(doomed)
        return len(doomed)

    def info(self) -> dict:
        """What Stats.impressions reports: sizes, this process's counters, the policy and the arms' totals."""
        return {"enabled": True, "arms": self.totals(), "stored": self.size(), "queued": self._queue.qsize(), **dict(self.counters),
                "max_records": self.policy.max_records, "max_age_ms": self.policy.max_age_ms,
                "attribution_window_ms": self.policy.attribution_window_ms}
