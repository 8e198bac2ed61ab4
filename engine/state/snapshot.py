"""What a checkpoint writes, copied out of the live state under the engine lock, so that the records are built and
written on another thread while events keep changing the state. Only the copy stops the writer (and Recommend);
it is mostly the changed users' seen sets and histories (benchmarks/RESULTS.md, "Figures behind design choices")."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamrec.engine.gil import yielding
from streamrec.engine.store.store import HISTORY_DTYPE, ItemRecord, UserRecord


@dataclass
class ItemColumns:
    """Changed item rows; ids, category lists and attribute dicts are the catalog's own objects (an upsert
    replaces them, nothing changes them in place), the numbers are copies."""
    rows: list[int]
    ids: list[str]
    categories: list[list[str]]
    attributes: list[dict[str, str]]
    live: np.ndarray
    vectors: np.ndarray
    popularity: np.ndarray
    last_event_ms: np.ndarray
    interactions: np.ndarray

    def records(self) -> list[ItemRecord]:
        columns = zip(self.rows, self.ids, self.categories, self.attributes, self.live.tolist(), self.vectors,
                      self.popularity.tolist(), self.last_event_ms.tolist(), self.interactions.tolist())
        return [ItemRecord(item_id=item_id, row=row, categories=categories, attributes=attributes, deleted=not live,
                           vector=vector, popularity=popularity, last_event_ms=last_ms, interactions=interactions)
                for row, item_id, categories, attributes, live, vector, popularity, last_ms, interactions in yielding(columns)]


@dataclass
class UserColumns:
    """Changed users: copies of their vectors, counters, seen sets and histories."""
    ids: list[str]
    vectors: np.ndarray
    seen: list[set[int]]
    histories: list[tuple]
    event_counts: np.ndarray
    last_event_ms: np.ndarray
    positive_counts: np.ndarray

    def records(self) -> list[UserRecord]:
        columns = zip(self.ids, self.vectors, self.seen, self.histories, self.event_counts.tolist(),
                      self.last_event_ms.tolist(), self.positive_counts.tolist())
        return [UserRecord(user_id=user_id, vector=vector, seen=_sorted_rows(seen),
                           history=np.fromiter(history, HISTORY_DTYPE, len(history)), event_count=count,
                           last_event_ms=last_ms, positive_count=positive)
                for user_id, vector, seen, history, count, last_ms, positive in yielding(columns)]


@dataclass
class CheckpointSnapshot:
    watermark: int  # the log seq the state reflected when copied
    items: ItemColumns
    users: UserColumns
    forgotten: list[str]

    def records(self) -> tuple[list[ItemRecord], list[UserRecord], list[str]]:
        return self.items.records(), self.users.records(), self.forgotten


def _sorted_rows(rows: set[int]) -> np.ndarray:
    out = np.fromiter(rows, np.int32, len(rows))
    out.sort()
    return out
