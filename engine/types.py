"""Plain data types shared by the engine, the store and the datasets (no gRPC, no protobuf here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class EventType(IntEnum):
    """Same numbers as streamrec.v1.EventType, so conversion is a cast."""

    VIEW = 1
    CLICK = 2
    ADD_TO_CART = 3
    PURCHASE = 4
    RATING = 5
    SKIP = 6
    DISLIKE = 7


# Signed strength of each event type: positive pulls the user towards the item, negative pushes away.
# RATING is derived from its value (see event_weight).
TYPE_WEIGHTS = {
    EventType.VIEW: 0.25,
    EventType.CLICK: 0.5,
    EventType.ADD_TO_CART: 0.8,
    EventType.PURCHASE: 1.0,
    EventType.SKIP: -0.3,
    EventType.DISLIKE: -1.0,
}

RATING_MIN, RATING_MAX = 0.0, 5.0
RATING_NEUTRAL = 3.0
# Keyed by plain int: these run for every ingested event, and EventType(x) lookups cost more than the rest.
_WEIGHT_OF_TYPE = {int(t): w for t, w in TYPE_WEIGHTS.items()}
_RATING = int(EventType.RATING)


def event_weight(event_type: int, value: float) -> float:
    """Signed weight of one event. Ratings: 5 -> +1, 3 -> 0, 1 -> -1 on the 1..5 scale."""
    if event_type == _RATING:
        return float(min(max((value - RATING_NEUTRAL) / 2.0, -1.0), 1.0))
    return _WEIGHT_OF_TYPE[int(event_type)]


def is_positive(event_type: int, value: float) -> bool:
    """True for an event that counts as interest (popularity, evaluation). Ratings of 4 and 5 are positive."""
    if event_type == _RATING:
        return value >= 4.0
    return _WEIGHT_OF_TYPE[int(event_type)] > 0


# Indexed by type number (RATING's entry is unused: its weight comes from the value), for event_weights.
_WEIGHT_TABLE = np.array([_WEIGHT_OF_TYPE.get(t, 0.0) for t in range(max(EventType) + 1)], np.float64)


def event_weights(types: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(event_weight, is_positive) of many events at once: float64 and bool arrays, the same bits as the scalar
    functions (same IEEE operations on float64 values), so live ingestion and replay may use either."""
    types = np.asarray(types, np.int64)
    values = np.asarray(values, np.float64)
    weights = _WEIGHT_TABLE[types]  # types are validated EventType numbers
    positive = weights > 0
    rating = types == _RATING
    if rating.any():
        rated = values[rating]
        weights[rating] = np.minimum(np.maximum((rated - RATING_NEUTRAL) / 2.0, -1.0), 1.0)
        positive[rating] = rated >= 4.0
    return weights, positive


@dataclass(slots=True)
class Event:
    event_id: str
    user_id: str
    item_id: str
    type: EventType
    value: float
    timestamp_ms: int


@dataclass(slots=True)
class ItemSpec:
    """An item as a client describes it: vector None means "derive one from categories or the catalog mean"."""

    item_id: str
    categories: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    vector: np.ndarray | None = None


@dataclass
class Interactions:
    """A columnar interaction log, sorted by timestamp (stable)."""

    user_ids: np.ndarray  # object array of str
    item_ids: np.ndarray  # object array of str
    types: np.ndarray  # uint8 EventType values
    values: np.ndarray  # float32
    timestamps_ms: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.user_ids)

    def events(self, id_prefix: str):
        """Yield Event objects with deterministic ids (prefix + position), for seeding the log."""
        for i in range(len(self)):
            yield Event(
                f"{id_prefix}{i}",
                str(self.user_ids[i]),
                str(self.item_ids[i]),
                EventType(int(self.types[i])),
                float(self.values[i]),
                int(self.timestamps_ms[i]),
            )


@dataclass
class Dataset:
    name: str
    interactions: Interactions
    item_categories: dict[str, list[str]]  # every item of the catalog, even without interactions
    item_attributes: dict[str, dict[str, str]]
