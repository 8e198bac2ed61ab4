"""What an event means, stated once: its signed weight, whether it counts as interest, its confidence for the
factorisations and its signed strength for the online rule. Serving (state, rerank features), training and
evaluation all import these; none keeps a copy.

Weights by type: VIEW .25, CLICK .5, ADD_TO_CART .8, PURCHASE 1, SKIP -.3, DISLIKE -1. A RATING's weight comes
from its value: 5 -> +1, 3 -> 0, 1 -> -1 on the 1..5 scale. A RATING's confidence is 1 + 0.5 * weight: having
rated an item is itself a sign of interest (it was watched), so even low ratings count, high ones more.
Interest (`is_positive`): a type of positive weight, or a rating of 4 or 5.

The scalar and the vectorised forms compute the same IEEE operations on float64 values, so live ingestion and
replay may use either and get the same bits.
"""
from __future__ import annotations

import numpy as np

from streamrec.engine.api import EventType

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
RATING_POSITIVE = 4.0  # ratings at or above this count as interest
RATING_BASE, RATING_SCALE = 1.0, 0.5  # a rating's confidence: RATING_BASE + RATING_SCALE * its weight

# Keyed by plain int: these run for every ingested event, and EventType(x) lookups cost more than the rest.
_WEIGHT_OF_TYPE = {int(t): w for t, w in TYPE_WEIGHTS.items()}
_RATING = int(EventType.RATING)
# Types that are interest whatever their value (RATING is decided by its value), for per-event loops.
POSITIVE_TYPES = frozenset(t for t, w in _WEIGHT_OF_TYPE.items() if w > 0)


def event_weight(event_type: int, value: float) -> float:
    """Signed weight of one event."""
    if event_type == _RATING:
        return float(min(max((value - RATING_NEUTRAL) / 2.0, -1.0), 1.0))
    return _WEIGHT_OF_TYPE[int(event_type)]


def is_positive(event_type: int, value: float) -> bool:
    """True for an event that counts as interest (popularity, evaluation, rerank features)."""
    if event_type == _RATING:
        return value >= RATING_POSITIVE
    return _WEIGHT_OF_TYPE[int(event_type)] > 0


# Indexed by type number (RATING's entry is unused: its weight comes from the value), for event_weights.
_WEIGHT_TABLE = np.array([_WEIGHT_OF_TYPE.get(t, 0.0) for t in range(max(EventType) + 1)], np.float64)


def event_weights(types: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(event_weight, is_positive) of many events at once: float64 and bool arrays."""
    types = np.asarray(types, np.int64)
    values = np.asarray(values, np.float64)
    weights = _WEIGHT_TABLE[types]  # types are validated EventType numbers
    positive = weights > 0
    rating = types == _RATING
    if rating.any():
        rated = values[rating]
        weights[rating] = np.minimum(np.maximum((rated - RATING_NEUTRAL) / 2.0, -1.0), 1.0)
        positive[rating] = rated >= RATING_POSITIVE
    return weights, positive


def positive_mask(types: np.ndarray, values: np.ndarray) -> np.ndarray:
    """is_positive of many events at once."""
    return event_weights(types, values)[1]


def event_confidences(types: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-event signed confidence: event_weight, except RATING -> RATING_BASE + RATING_SCALE * event_weight.
    Vectorised without a loop over types: it runs on every group commit (via the online strengths), often for
    a few events."""
    types = np.asarray(types, np.int64)
    out, _ = event_weights(types, values)
    rating = types == _RATING
    out[rating] = RATING_BASE + RATING_SCALE * out[rating]
    return out


def signed_strength(confidence: np.ndarray | float) -> np.ndarray:
    """sign(w) * log1p(|w|) of the per-event confidence: float32."""
    w = np.asarray(confidence, np.float64)
    return (np.sign(w) * np.log1p(np.abs(w))).astype(np.float32)


def event_strengths(types, values) -> np.ndarray:
    """Signed strength of each event for the online model (values read as float32, as the history stores them,
    so a replay from a checkpoint computes the same bits)."""
    return signed_strength(event_confidences(np.asarray(types, np.int64), np.asarray(values, np.float32)))
