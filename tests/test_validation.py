"""Event validation: the batch-at-a-time check accepts exactly the batches the per-event rules accept."""
from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.engine.api import Event
from streamrec.engine.config import Limits
from streamrec.engine.validation import event_problem, split_events

LIMITS = Limits()
NOW_MS = int(time.time() * 1000)

good_ids = st.text(alphabet="abcxyz019-_:", min_size=1, max_size=12)
any_ids = st.one_of(
    good_ids,
    st.just(""),
    st.just("a" * (LIMITS.max_id_bytes + 1)),
    st.just("é" * (LIMITS.max_id_bytes // 2 + 1)),  # short in characters, too long in bytes
    st.just("ok\x00"), st.just("tab\there"), st.just("ünï"), st.just("\ud800"),
)
types = st.one_of(st.integers(1, 7), st.sampled_from([0, 8, -1, 99]))
values = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([0.0, 5.0, 5.5, -0.5, float("nan"), float("inf"), 1e39]))
stamps = st.one_of(st.just(0), st.integers(NOW_MS - 10**9, NOW_MS), st.sampled_from([1, NOW_MS + 10**10]))


@st.composite
def events(draw, ids):
    return Event(draw(ids), draw(ids), draw(ids), draw(types), draw(values), draw(stamps))


def reference(batch: list[Event]) -> tuple[list[int], list[tuple[int, str, str]]]:
    """The per-event rules applied one by one, timestamps filled as split_events fills them."""
    now = int(time.time() * 1000)
    good, bad = [], []
    for index, event in enumerate(batch):
        if event.timestamp_ms == 0:
            event.timestamp_ms = now
        problem = event_problem(event, LIMITS, now)
        if problem:
            bad.append((index, *problem))
        else:
            good.append(index)
    return good, bad


def copies(batch: list[Event]) -> list[Event]:
    return [Event(e.event_id, e.user_id, e.item_id, e.type, e.value, e.timestamp_ms) for e in batch]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(events(good_ids), events(any_ids)), max_size=40))
def test_split_events_matches_per_event_rules(batch):
    good, rejected = split_events(copies(batch), LIMITS)
    expected_good, expected_bad = reference(copies(batch))
    assert [i for i, _ in good] == expected_good
    assert [(r.index, r.field, r.reason) for r in rejected] == expected_bad


def test_clean_batch_takes_every_event_and_fills_timestamps():
    batch = [Event(f"e{i}", f"u{i % 3}", f"i{i}", 1 + i % 7, 4.0, 0 if i % 2 else NOW_MS) for i in range(100)]
    good, rejected = split_events(batch, LIMITS)
    assert rejected == [] and [i for i, _ in good] == list(range(100))
    assert all(e.timestamp_ms >= NOW_MS for _, e in good)


DEFECTS = {  # one bad field in an otherwise clean batch: each must reach the per-event path and be named
    "empty id": (dict(user_id=""), "user_id"),
    "long id": (dict(item_id="x" * (LIMITS.max_id_bytes + 1)), "item_id"),
    "control character": (dict(event_id="e\x7f"), "event_id"),
    "unknown type": (dict(type=42), "type"),
    "nan value": (dict(value=float("nan")), "value"),
    "huge value": (dict(value=1e39), "value"),
    "rating above 5": (dict(type=5, value=5.5), "value"),
    "rating below 0": (dict(type=5, value=-0.1), "value"),
    "before the epoch limit": (dict(timestamp_ms=-5), "timestamp_ms"),
    "far future": (dict(timestamp_ms=NOW_MS + 10**10), "timestamp_ms"),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_one_defect_in_a_clean_batch_is_named(defect):
    change, field = DEFECTS[defect]
    batch = [Event(f"e{i}", f"u{i}", f"i{i}", 5, 4.0, NOW_MS) for i in range(50)]
    fields = {**{f: getattr(batch[37], f) for f in ("event_id", "user_id", "item_id", "type", "value", "timestamp_ms")}, **change}
    batch[37] = Event(**fields)
    good, rejected = split_events(batch, LIMITS)
    assert [(r.index, r.field) for r in rejected] == [(37, field)]
    assert len(good) == 49
