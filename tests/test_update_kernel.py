"""The Numba online-update kernel against its NumPy reference (engine/state/online.py), and its determinism."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.engine.cpu.online import apply_events
from streamrec.engine.signals import signed_strength
from streamrec.engine.state.online import OnlineArrays, OnlineParams, apply_events_reference, gram_fixed, gram_float


def random_case(seed: int, users: int, items: int, events: int, dim: int, hist: int = 6):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(items, dim))
    y = (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)
    live = rng.random(items) > 0.15
    g = gram_fixed(y, live)
    arrays = OnlineArrays(
        user_vectors=np.where(rng.random((users, 1)) < 0.5, 0, rng.normal(size=(users, dim))).astype(np.float32),
        last_event_ms=np.zeros(users, np.int64), hist_items=np.zeros((users, hist), np.int32),
        hist_strength=np.zeros((users, hist), np.float32), hist_ts=np.zeros((users, hist), np.int64),
        hist_count=np.zeros(users, np.int64), item_vectors=y, item_live=live,
        item_counts=rng.integers(0, 4, items).astype(np.int64), gram_fixed=g, gram=gram_float(g),
        moved=np.zeros(events, np.int64))
    batch = (rng.integers(0, users, events), rng.integers(0, items, events),
             signed_strength(rng.choice([-1.0, -0.3, 0.25, 0.5, 1.0, 1.5], events)),
             rng.integers(1, 10**10, events).astype(np.int64))  # out of order on purpose
    return arrays, batch


def check_close(ref: OnlineArrays, got: OnlineArrays) -> None:
    for name in ("last_event_ms", "hist_items", "hist_strength", "hist_ts", "hist_count", "item_counts", "moved"):
        assert np.array_equal(getattr(ref, name), getattr(got, name)), name
    # Same maths, sums in another order (BLAS vs loops): equal to rounding.
    np.testing.assert_allclose(got.user_vectors, ref.user_vectors, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.item_vectors, ref.item_vectors, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("users, items, events, dim", [(1, 1, 1, 1), (5, 7, 100, 3), (40, 60, 1500, 32), (300, 10, 5, 17)])
def test_kernel_matches_reference(users, items, events, dim):
    arrays, batch = random_case(users * 7 + events, users, items, events, dim)
    ref, got = copy.deepcopy(arrays), copy.deepcopy(arrays)
    apply_events_reference(ref, *batch, OnlineParams(half_life_ms=3e9))
    apply_events(got, *batch, OnlineParams(half_life_ms=3e9))
    check_close(ref, got)
    assert got.moved.max() >= 0
    if dim > 1:  # a unit vector of dimension 1 cannot turn
        assert np.any(got.item_vectors != arrays.item_vectors)
    assert np.all(np.abs(np.linalg.norm(got.item_vectors, axis=1) - 1) < 1e-5)  # still unit rows
    # The Gram kept by corrections is exactly the one recomputed from the final vectors.
    assert np.array_equal(got.gram_fixed, gram_fixed(got.item_vectors, got.item_live))
    assert np.array_equal(got.gram, gram_float(got.gram_fixed))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), users=st.integers(1, 12), events=st.integers(1, 120), cuts=st.integers(1, 6),
       steps=st.integers(0, 4), hist=st.integers(1, 8))
def test_batching_does_not_change_a_bit(seed, users, events, cuts, steps, hist):
    """Live group commits and crash replay cut the same events into different batches."""
    arrays, batch = random_case(seed, users, 9, events, 8, hist)
    params = OnlineParams(cg_steps=steps, history=hist, half_life_ms=1e9)
    whole, parts = copy.deepcopy(arrays), copy.deepcopy(arrays)
    apply_events(whole, *batch, params)
    bounds = np.unique(np.r_[0, np.random.default_rng(seed).integers(0, events, cuts), events])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        parts.moved = np.zeros(hi - lo, np.int64)
        apply_events(parts, *(column[lo:hi] for column in batch), params)
    for name in ("user_vectors", "item_vectors", "gram_fixed", "gram", "hist_items", "hist_count", "item_counts"):
        assert getattr(whole, name).tobytes() == getattr(parts, name).tobytes(), name
