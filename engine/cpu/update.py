"""Batched Numba kernel for the online update rule in engine/online.py (the NumPy reference).

Events of one user must be applied in order (they compound), different users are independent, so the
batch is grouped by user (stable) and users are processed in parallel. Every operation is float32 in
the same order as the reference and nothing is fused (no fastmath), so results are bit-identical:
replay after a crash must rebuild exactly the same vectors.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True)
def _decay(dt_ms, half_life_ms, floor):
    if dt_ms <= 0:
        return 1.0
    return max(0.5 ** (dt_ms / half_life_ms), floor)


@njit(cache=True, nogil=True, parallel=True)
def _apply_grouped(accumulators, last_event_ms, item_vectors, user_rows, item_rows, weights, timestamps_ms,
                   order, starts, half_life_ms, floor):
    dim = accumulators.shape[1]
    for g in prange(len(starts) - 1):
        for position in range(starts[g], starts[g + 1]):
            e = order[position]
            u = user_rows[e]
            previous = last_event_ms[u]
            decay = np.float32(_decay(float(timestamps_ms[e] - previous), half_life_ms, floor) if previous else 1.0)
            w = np.float32(weights[e])
            i = item_rows[e]
            for j in range(dim):
                accumulators[u, j] = decay * accumulators[u, j] + w * item_vectors[i, j]
            last_event_ms[u] = max(previous, timestamps_ms[e])


def apply_events(accumulators, last_event_ms, item_vectors, user_rows, item_rows, weights, timestamps_ms,
                 half_life_ms: float, floor: float) -> None:
    """Same contract as online.apply_events_reference; arrays are updated in place."""
    if len(user_rows) == 0:
        return
    user_rows = np.ascontiguousarray(user_rows, np.int64)
    order = np.argsort(user_rows, kind="stable")  # groups users, keeps each user's event order
    boundaries = np.flatnonzero(np.diff(user_rows[order])) + 1
    starts = np.concatenate(([0], boundaries, [len(order)])).astype(np.int64)
    _apply_grouped(accumulators, last_event_ms, item_vectors, user_rows, np.ascontiguousarray(item_rows, np.int64),
                   np.ascontiguousarray(weights, np.float32), np.ascontiguousarray(timestamps_ms, np.int64),
                   order, starts, float(half_life_ms), float(floor))


def warmup() -> None:
    accumulators = np.zeros((2, 4), np.float32)
    apply_events(accumulators, np.zeros(2, np.int64), np.ones((2, 4), np.float32), np.array([0, 1, 0]),
                 np.array([1, 0, 1]), np.ones(3, np.float32), np.array([5, 6, 7]), 1000.0, 0.25)
