"""The user side of the in-memory state: unnormalised user vectors (the online model's x_u, see
engine/state/online.py), full seen sets and a bounded recent history per user, kept twice: as tuples for the API and
checkpoints, and as a ring buffer of arrays (item row, signed strength, timestamp) that the update kernel reads."""
from __future__ import annotations

from collections import deque

import numpy as np

from streamrec.engine.state.catalog import grow

_SEEN_CACHE_ROWS = 8 << 20  # seen rows kept as arrays between requests, all users together (64 MiB)


class UserTable:
    def __init__(self, dim: int, history_len: int):
        self.dim = dim
        self.history_len = history_len
        self.rows: dict[str, int] = {}
        self.ids: list[str | None] = []
        self.free_rows: list[int] = []  # rows of forgotten users, reused
        self.vectors = np.zeros((0, dim), np.float32)
        self.last_event_ms = np.zeros(0, np.int64)
        self.event_counts = np.zeros(0, np.int64)
        self.positive_counts = np.zeros(0, np.int64)
        # Ring buffer of the last history_len events for the fold-in (slot = hist_count % history_len).
        self.hist_items = np.zeros((0, history_len), np.int32)
        self.hist_strength = np.zeros((0, history_len), np.float32)
        self.hist_ts = np.zeros((0, history_len), np.int64)
        self.hist_count = np.zeros(0, np.int64)
        # The sequence tower's query per user (engine/sequence/tower.py), a function of `history`; ready once
        # computed from at least one event. Allocated by enable_sequence(): no memory without a tower.
        self.sequence_enabled = False
        self.sequence_vectors = np.zeros((0, dim), np.float32)
        self.sequence_ready = np.zeros(0, bool)
        self.sequence_stamp = np.zeros(0, np.int64)  # event_counts when computed: current while they are equal
        self.seen: list[set[int]] = []
        # row -> (the seen set it was made from, its rows as a sorted int64 array): filters take arrays, and
        # a set only grows or is replaced, so same object and same size means still current.
        self._seen_arrays: dict[int, tuple[set[int], np.ndarray]] = {}
        self._seen_cached_rows = 0
        self.history: list[deque] = []
        self.dirty: set[str] = set()
        self.forgotten: set[str] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def row_of(self, user_id: str) -> int | None:
        return self.rows.get(user_id)

    def ensure(self, user_id: str) -> int:
        row = self.rows.get(user_id)
        if row is not None:
            return row
        if self.free_rows:
            row = self.free_rows.pop()
            self.ids[row] = user_id
        else:
            row = len(self.ids)
            if row >= len(self.vectors):
                self.vectors = grow(self.vectors, row + 1)
                self.last_event_ms = grow(self.last_event_ms, row + 1)
                self.event_counts = grow(self.event_counts, row + 1)
                self.positive_counts = grow(self.positive_counts, row + 1)
                self.hist_items = grow(self.hist_items, row + 1)
                self.hist_strength = grow(self.hist_strength, row + 1)
                self.hist_ts = grow(self.hist_ts, row + 1)
                self.hist_count = grow(self.hist_count, row + 1)
                if self.sequence_enabled:
                    self.sequence_vectors = grow(self.sequence_vectors, row + 1)
                    self.sequence_ready = grow(self.sequence_ready, row + 1)
                    self.sequence_stamp = grow(self.sequence_stamp, row + 1)
            self.ids.append(user_id)
            self.seen.append(set())
            self.history.append(deque(maxlen=self.history_len))
        self.rows[user_id] = row
        self.vectors[row] = 0
        self.last_event_ms[row] = 0
        self.event_counts[row] = 0
        self.positive_counts[row] = 0
        self.hist_count[row] = 0
        if self.sequence_enabled:
            self.sequence_vectors[row] = 0
            self.sequence_ready[row] = False
        self.seen[row] = set()
        self.history[row] = deque(maxlen=self.history_len)
        self.forgotten.discard(user_id)
        return row

    def enable_sequence(self) -> None:
        if not self.sequence_enabled:
            self.sequence_enabled = True
            self.sequence_vectors = np.zeros((len(self.vectors), self.dim), np.float32)
            self.sequence_ready = np.zeros(len(self.vectors), bool)
            self.sequence_stamp = np.zeros(len(self.vectors), np.int64)

    def record(self, row: int, item_row: int, event_type: int, value: float, timestamp_ms: int, positive: bool) -> None:
        self.seen[row].add(item_row)
        self.history[row].append((item_row, event_type, value, timestamp_ms))
        self.event_counts[row] += 1
        self.positive_counts[row] += positive  # last_event_ms is the online rule's: it needs the previous one
        self.dirty.add(self.ids[row])

    def record_events(self, rows: np.ndarray, item_rows: np.ndarray, types: np.ndarray, values: np.ndarray,
                      timestamps_ms: np.ndarray, positive: np.ndarray) -> None:
        """record() for a batch of events in log order: counters with one grouped add each; the seen sets and
        history deques still take one append per event, but from prebuilt tuples and bound methods."""
        np.add.at(self.event_counts, rows, 1)
        np.add.at(self.positive_counts, rows, positive.astype(np.int64))
        user_rows, items = rows.tolist(), item_rows.tolist()
        # The same Python ints and floats that record() stores, so histories compare equal after a replay.
        entries = zip(items, types.tolist(), values.tolist(), timestamps_ms.tolist())
        seen, history = self.seen, self.history
        for row, item_row, entry in zip(user_rows, items, entries):
            seen[row].add(item_row)
            history[row].append(entry)
        ids = self.ids
        self.dirty.update([ids[row] for row in set(user_rows)])

    def append_ring(self, row: int, item_row: int, strength: float, timestamp_ms: int) -> None:
        """The update kernel appends itself; this is for seeding and loading."""
        slot = self.hist_count[row] % self.history_len
        self.hist_items[row, slot], self.hist_strength[row, slot], self.hist_ts[row, slot] = item_row, strength, timestamp_ms
        self.hist_count[row] += 1

    def forget(self, user_id: str) -> bool:
        row = self.rows.pop(user_id, None)
        if row is None:
            return False
        self.ids[row] = None
        self.vectors[row] = 0
        self.hist_count[row] = 0
        if self.sequence_enabled:
            self.sequence_vectors[row] = 0
            self.sequence_ready[row] = False
        self.seen[row] = set()
        self.history[row] = deque(maxlen=self.history_len)
        self.free_rows.append(row)
        self.dirty.discard(user_id)
        self.forgotten.add(user_id)
        return True

    def query_vector(self, row: int, user_model: str = "ials") -> np.ndarray | None:
        """Unit query vector, or None while the user model has nothing for the user (see query_vectors)."""
        vectors, usable = self.query_vectors(np.array([row]), user_model)
        return vectors[0] if usable[0] else None

    def query_vectors(self, rows: np.ndarray, user_model: str = "ials") -> tuple[np.ndarray, np.ndarray]:
        """(unit query vectors float32 [len(rows), d], usable bool [len(rows)]) for a batch of rows.
        user_model "ials": the online fold-in, unusable while the user has expressed no positive interest;
        "sequence": the sequence tower's query, usable from the user's first event once computed for the
        user's current events (State.stale_sequence lists the rows to compute)."""
        if user_model == "sequence":
            if not self.sequence_enabled:
                return np.zeros((len(rows), self.dim), np.float32), np.zeros(len(rows), bool)
            current = self.sequence_ready[rows] & (self.sequence_stamp[rows] == self.event_counts[rows])
            return self.sequence_vectors[rows].copy(), current
        vectors = self.vectors[rows].astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
        usable = (self.positive_counts[rows] > 0) & (norms > 1e-12)
        return (vectors / np.where(usable, norms, 1.0)[:, None]).astype(np.float32), usable

    def seen_rows(self, row: int) -> np.ndarray:
        """The user's seen item rows, sorted, as an int64 array (cached: do not modify it)."""
        seen = self.seen[row]
        cached = self._seen_arrays.get(row)
        if cached is None or cached[0] is not seen or cached[1].size != len(seen):
            if self._seen_cached_rows + len(seen) > _SEEN_CACHE_ROWS:
                self._seen_arrays.clear()  # bounded memory; the users asked for next are cached again
                self._seen_cached_rows = 0
            stale = self._seen_arrays.get(row)
            if stale is not None:
                self._seen_cached_rows -= stale[1].size
            cached = (seen, np.sort(np.fromiter(seen, np.int64, len(seen))))
            self._seen_arrays[row] = cached
            self._seen_cached_rows += len(seen)
        return cached[1]
