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


def event_weight(event_type: int, value: float) -> float:
    """Signed weight of one event. Ratings: 5 -> +1, 3 -> 0, 1 -> -1 on the 1..5 scale."""
    if event_type == EventType.RATING:
        return float(np.clip((value - RATING_NEUTRAL) / 2.0, -1.0, 1.0))
    return TYPE_WEIGHTS[EventType(event_type)]


def is_positive(event_type: int, value: float) -> bool:
    """True for an event that counts as interest (popularity, evaluation). Ratings of 4 and 5 are positive."""
    if event_type == EventType.RATING:
        return value >= 4.0
    return TYPE_WEIGHTS[EventType(event_type)] > 0


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
