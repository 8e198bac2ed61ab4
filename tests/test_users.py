"""The user table's derived arrays: cached seen rows stay current, batched query vectors match the rule."""
from __future__ import annotations

import time

import numpy as np

from streamrec.engine.api import Event, EventType, RecommendQuery
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import seed_engine
from streamrec.engine.state import users as users_module
from streamrec.engine.state.users import UserTable


def _table() -> UserTable:
    table = UserTable(dim=3, history_len=4)
    for user in ("a", "b", "c"):
        table.ensure(user)
    return table


def test_seen_rows_follow_the_seen_set_as_it_grows_and_is_replaced():
    table = _table()
    row = table.row_of("a")
    assert table.seen_rows(row).dtype == np.int64 and table.seen_rows(row).size == 0
    for item_row in (9, 2, 5):
        table.record(row, item_row, 0, 1.0, 1, True)
    assert table.seen_rows(row).tolist() == [2, 5, 9]  # sorted, refreshed after each growth
    table.record_events(np.array([row, row]), np.array([7, 2]), np.array([0, 0]), np.array([1.0, 1.0], np.float32),
                        np.array([2, 3]), np.array([True, True]))
    assert table.seen_rows(row).tolist() == [2, 5, 7, 9]
    table.seen[row] = {4}  # replaced wholesale, as loading a checkpoint does
    assert table.seen_rows(row).tolist() == [4]
    table.forget("a")
    reused = table.ensure("d")  # the forgotten row is reused for a new user
    assert reused == row and table.seen_rows(reused).size == 0


def test_seen_row_cache_is_bounded_by_rows_cached(monkeypatch):
    monkeypatch.setattr(users_module, "_SEEN_CACHE_ROWS", 4)
    table = _table()
    for user, item_rows in (("a", [1, 2]), ("b", [3, 4]), ("c", [5, 6])):
        for item_row in item_rows:
            table.record(table.row_of(user), item_row, 0, 1.0, 1, True)
        assert table.seen_rows(table.row_of(user)).tolist() == item_rows
        assert sum(a.size for _, a in table._seen_arrays.values()) <= 4
    table.record(table.row_of("c"), 7, 0, 1.0, 1, True)  # a refreshed entry replaces its old size in the count
    assert table.seen_rows(table.row_of("c")).tolist() == [5, 6, 7]
    assert sum(a.size for _, a in table._seen_arrays.values()) <= 4
    assert table.seen_rows(table.row_of("a")).tolist() == [1, 2]  # evicted entries are rebuilt, not lost


def test_query_vectors_are_unit_vectors_only_for_users_with_positive_interest():
    table = _table()
    a, b, c = (table.row_of(u) for u in "abc")
    table.vectors[a] = [3.0, 0.0, 4.0]
    table.positive_counts[a] = 2
    table.vectors[b] = [1.0, 1.0, 1.0]  # no positive event yet: not usable
    table.positive_counts[c] = 1  # positive, but the accumulator is still zero: not usable
    vectors, usable = table.query_vectors(np.array([a, b, c]))
    assert usable.tolist() == [True, False, False]
    assert vectors.dtype == np.float32 and np.allclose(vectors[0], [0.6, 0.0, 0.8])
    assert np.array_equal(table.query_vector(a), vectors[0])
    assert table.query_vector(b) is None and table.query_vector(c) is None


def test_an_item_seen_between_two_requests_is_excluded_from_the_second(tmp_path):
    engine = Engine(tmp_path, EngineConfig(dim=16, checkpoint_interval_s=3600))
    seed_engine(engine, synthetic(n_users=30, n_items=150, n_clusters=5, events_per_user=8))
    try:
        user = next(u for u in engine.state.users.rows if engine.state.users.query_vector(engine.state.users.rows[u]) is not None)
        query = RecommendQuery(user, 10, rerank=False)
        first = engine.recommend([query])[0].item_ids
        result = engine.ingest([Event("seen-now", user, first[0], EventType.VIEW, 1.0, int(time.time() * 1000))])
        assert result.accepted == 1, result.rejections
        second = engine.recommend([query])[0].item_ids
        assert first[0] not in second
        assert len(second) == 10
    finally:
        engine.close()
