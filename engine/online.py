"""The online update rule, as a plain NumPy reference (the kernels issue adds a batched Numba kernel
that must match it).

Each event pulls the user's accumulator towards the item (or pushes it away for negative events):

    acc_u <- max(0.5 ** (dt / half_life), floor) * acc_u + weight(type, value) * item_vector

dt is the time since the user's previous event, taken from event timestamps (never the wall clock),
so replaying the same log rebuilds bit-identical vectors. The query vector is acc_u / |acc_u|.
"""
from __future__ import annotations

import numpy as np


def decay_factor(dt_ms: float, half_life_ms: float, floor: float) -> float:
    if dt_ms <= 0:
        return 1.0
    return max(0.5 ** (dt_ms / half_life_ms), floor)


def apply_events_reference(
    accumulators: np.ndarray,  # float32 [U, d], updated in place
    last_event_ms: np.ndarray,  # int64 [U], updated in place
    item_vectors: np.ndarray,  # float32 [N, d]
    user_rows: np.ndarray,  # int64 [E]
    item_rows: np.ndarray,  # int64 [E]
    weights: np.ndarray,  # float32 [E]
    timestamps_ms: np.ndarray,  # int64 [E]
    half_life_ms: float,
    floor: float,
) -> None:
    """Apply events in order; events of the same user compound, so order matters."""
    for u, i, w, ts in zip(user_rows, item_rows, weights, timestamps_ms):
        previous = last_event_ms[u]
        decay = decay_factor(float(ts - previous), half_life_ms, floor) if previous else 1.0
        accumulators[u] = (np.float32(decay) * accumulators[u] + np.float32(w) * item_vectors[i]).astype(np.float32)
        last_event_ms[u] = max(previous, ts)
