"""The Numba update kernel must be bit-identical to the NumPy reference rule."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from streamrec.engine.cpu.update import apply_events
from streamrec.engine.online import apply_events_reference


def random_case(seed: int, users: int, items: int, events: int, dim: int):
    rng = np.random.default_rng(seed)
    accumulators = rng.normal(size=(users, dim)).astype(np.float32)
    last = np.where(rng.random(users) < 0.3, 0, rng.integers(1, 10**6, users)).astype(np.int64)
    item_vectors = rng.normal(size=(items, dim)).astype(np.float32)
    user_rows = rng.integers(0, users, events)
    item_rows = rng.integers(0, items, events)
    weights = rng.choice([-1.0, -0.3, 0.25, 0.5, 1.0, 0.37], events).astype(np.float32)
    timestamps = rng.integers(0, 10**9, events).astype(np.int64)  # out of order on purpose
    return accumulators, last, item_vectors, user_rows, item_rows, weights, timestamps


def run_both(case, half_life=2.6e9, floor=0.25):
    accumulators, last, item_vectors, user_rows, item_rows, weights, timestamps = case
    expected_acc, expected_last = accumulators.copy(), last.copy()
    apply_events_reference(expected_acc, expected_last, item_vectors, user_rows, item_rows, weights, timestamps, half_life, floor)
    got_acc, got_last = accumulators.copy(), last.copy()
    apply_events(got_acc, got_last, item_vectors, user_rows, item_rows, weights, timestamps, half_life, floor)
    return (expected_acc, expected_last), (got_acc, got_last)


@pytest.mark.parametrize("users, items, events, dim", [(1, 1, 1, 1), (5, 7, 100, 3), (50, 40, 2000, 64), (300, 10, 5, 17)])
def test_bit_identical_to_reference(users, items, events, dim):
    (ea, el), (ga, gl) = run_both(random_case(users * 7 + events, users, items, events, dim))
    assert np.array_equal(ea.view(np.uint32), ga.view(np.uint32))
    assert np.array_equal(el, gl)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), users=st.integers(1, 20), events=st.integers(0, 200),
       half_life=st.floats(1.0, 1e10), floor=st.floats(0.0, 1.0))
def test_property_bit_identical(seed, users, events, half_life, floor):
    (ea, el), (ga, gl) = run_both(random_case(seed, users, 9, events, 8), half_life, floor)
    assert np.array_equal(ea.view(np.uint32), ga.view(np.uint32)) and np.array_equal(el, gl)
