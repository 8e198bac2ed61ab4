"""The item side of the in-memory state: a growable matrix of unit-norm vectors plus the arrays that
top-k filtering reads (live mask, category bitsets) and time-decayed popularity."""
from __future__ import annotations

import math

import numpy as np

_WORD_BITS = 64


def grow(array: np.ndarray, rows: int, fill=0) -> np.ndarray:
    """A copy with at least `rows` rows. Readers holding the old array keep a consistent view."""
    capacity = max(rows, 2 * len(array), 64)
    grown = np.full((capacity, *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


def unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else np.zeros_like(vector, dtype=np.float32)


class ItemCatalog:
    """Rows are assigned once and never reused, so rows stored elsewhere (user histories) stay valid."""

    def __init__(self, dim: int, popularity_half_life_ms: float):
        self.dim = dim
        self.ids: list[str] = []
        self.rows: dict[str, int] = {}
        self.categories: list[list[str]] = []
        self.attributes: list[dict[str, str]] = []
        self.vectors = np.zeros((0, dim), np.float32)
        self.live = np.zeros(0, bool)  # False for deleted rows and unused capacity
        self.category_ids: dict[str, int] = {}
        self.category_names: list[str] = []
        self.category_bits = np.zeros((0, 1), np.uint64)
        # log2 of sum(weight * 2**(t / half_life)): ranks items by decayed popularity at any common time
        # without touching every item as time passes, and cannot overflow.
        self.log2_popularity = np.zeros(0, np.float64)
        self.interactions = np.zeros(0, np.int64)
        self.last_event_ms = np.zeros(0, np.int64)
        self.half_life_ms = popularity_half_life_ms
        self.dirty_rows: set[int] = set()  # rows to write at the next checkpoint
        self.device_changes: set[int] = set()  # rows to upload before the next GPU search

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def live_count(self) -> int:
        return int(self.live[: len(self)].sum())

    @property
    def words(self) -> int:
        return self.category_bits.shape[1]

    def row_of(self, item_id: str) -> int | None:
        return self.rows.get(item_id)

    def is_live(self, item_id: str) -> bool:
        row = self.rows.get(item_id)
        return row is not None and bool(self.live[row])

    # --- categories -------------------------------------------------------------------------
    def category_id(self, name: str, create: bool = False) -> int | None:
        cid = self.category_ids.get(name)
        if cid is None and create:
            cid = len(self.category_names)
            self.category_ids[name] = cid
            self.category_names.append(name)
            if cid // _WORD_BITS >= self.category_bits.shape[1]:
                wider = np.zeros((len(self.category_bits), self.category_bits.shape[1] + 1), np.uint64)
                wider[:, :-1] = self.category_bits
                self.category_bits = wider
        return cid

    def category_mask(self, names) -> np.ndarray:
        """Bitset [words] of the known categories among `names` (unknown ones match no item)."""
        bits = np.zeros(self.words, np.uint64)
        for name in names:
            cid = self.category_ids.get(name)
            if cid is not None:
                bits[cid // _WORD_BITS] |= np.uint64(1 << (cid % _WORD_BITS))
        return bits

    def _set_categories(self, row: int, names: list[str]) -> None:
        self.categories[row] = list(dict.fromkeys(names))
        ids = [self.category_id(name, create=True) for name in self.categories[row]]
        self.category_bits[row] = 0
        for cid in ids:
            self.category_bits[row, cid // _WORD_BITS] |= np.uint64(1 << (cid % _WORD_BITS))

    # --- items --------------------------------------------------------------------------------
    def _ensure_capacity(self, rows: int) -> None:
        if rows > len(self.vectors):
            self.vectors = grow(self.vectors, rows)
            self.live = grow(self.live, rows, False)
            self.category_bits = grow(self.category_bits, rows)
            self.log2_popularity = grow(self.log2_popularity, rows, -np.inf)
            self.interactions = grow(self.interactions, rows)
            self.last_event_ms = grow(self.last_event_ms, rows)

    def derived_vector(self, categories: list[str]) -> np.ndarray:
        """A starting vector for an item without one: the mean direction of live items that share its
        categories, else of the whole catalog, so it is recommendable at once."""
        n = len(self)
        live_rows = np.flatnonzero(self.live[:n])
        if len(live_rows) == 0:
            # An empty catalog has no direction to borrow: a fixed vector keeps it deterministic.
            vector = np.zeros(self.dim, np.float32)
            vector[0] = 1.0
            return vector
        mask = self.category_mask(categories)
        if mask.any():
            shared = (self.category_bits[live_rows] & mask).any(axis=1)
            if shared.any():
                live_rows = live_rows[shared]
        vector = unit(self.vectors[live_rows].astype(np.float64).sum(axis=0))
        if not vector.any():
            vector[0] = 1.0
        return vector

    def upsert(self, item_id: str, categories: list[str], attributes: dict[str, str], vector: np.ndarray | None) -> bool:
        """Create or replace an item; returns True when it was created. A deleted item comes back to life."""
        row = self.rows.get(item_id)
        created = row is None
        if vector is None:
            vector = self.derived_vector(categories)
        if created:
            row = len(self.ids)
            self._ensure_capacity(row + 1)
            self.ids.append(item_id)
            self.categories.append([])
            self.attributes.append({})
            self.rows[item_id] = row
        self._set_categories(row, categories)
        self.attributes[row] = dict(attributes)
        self.vectors[row] = unit(np.asarray(vector, np.float64))
        self.live[row] = True
        self.dirty_rows.add(row)
        self.device_changes.add(row)
        return created

    def delete(self, item_id: str) -> bool:
        row = self.rows.get(item_id)
        if row is None or not self.live[row]:
            return False
        self.live[row] = False
        self.dirty_rows.add(row)
        self.device_changes.add(row)
        return True

    def take_device_changes(self) -> np.ndarray:
        rows = np.fromiter(self.device_changes, np.int64, len(self.device_changes))
        self.device_changes.clear()
        return rows

    def record_interaction(self, row: int, weight: float, timestamp_ms: int, positive: bool, count: bool = True) -> None:
        """count=False: the online update kernel already counted it in `interactions`."""
        self.interactions[row] += count
        self.last_event_ms[row] = max(self.last_event_ms[row], timestamp_ms)
        if positive and weight > 0:
            term = math.log2(weight) + timestamp_ms / self.half_life_ms
            self.log2_popularity[row] = np.logaddexp2(self.log2_popularity[row], term)
        self.dirty_rows.add(row)

    def record_interactions(self, rows: np.ndarray, weights: np.ndarray, timestamps_ms: np.ndarray,
                            positive: np.ndarray) -> None:
        """record_interaction(count=False) for a batch of events in log order, with the same resulting bits:
        ufunc.at applies unbuffered in index order, so an item hit twice folds its terms in the same sequence
        as the per-event loop (logaddexp2 is not associative; the order must not depend on batching)."""
        np.maximum.at(self.last_event_ms, rows, timestamps_ms)
        liked = positive & (weights > 0)
        if liked.any():
            terms = np.log2(weights[liked]) + timestamps_ms[liked] / self.half_life_ms
            np.logaddexp2.at(self.log2_popularity, rows[liked], terms)
        self.dirty_rows.update(rows.tolist())

    def popularity_at(self, row: int, now_ms: int) -> float:
        """Decayed count of positive events as of now_ms."""
        value = self.log2_popularity[row] - now_ms / self.half_life_ms
        return float(2.0**value) if np.isfinite(value) else 0.0

    def popularity_scores(self) -> np.ndarray:
        """float32 [n] ranking scores, relative to the most popular item (1.0), 0 for never-liked items."""
        n = len(self)
        logs = self.log2_popularity[:n]
        finite = np.isfinite(logs)
        scores = np.zeros(n, np.float32)
        if finite.any():
            top = logs[finite].max()
            scores[finite] = np.exp2(np.maximum(logs[finite] - top, -120.0)).astype(np.float32)
        return scores
