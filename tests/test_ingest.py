"""The batched write path (issue 6): each batched step gives the same bits as its per-event form, the columnar
store append keeps append_log's contract, and a group commit mixing upserts, deletes, events and duplicates
answers and replays as before."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from streamrec.engine.api import Event, EventType, ItemSpec
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import seed_engine
from streamrec.engine.signals import event_weight, event_weights, is_positive
from streamrec.engine.state.catalog import ItemCatalog
from streamrec.engine.state.users import UserTable
from streamrec.engine.store import codec
from streamrec.engine.store.store import LogEntry, Store

CONFIG = EngineConfig(dim=16, backend="numpy", checkpoint_interval_s=3600, checkpoint_every_records=10**9)


def random_events(rng, n: int, users: int = 40, items: int = 30):
    types = rng.integers(1, len(EventType) + 1, n)
    values = rng.uniform(0, 5, n)
    values[::3] = np.round(values[::3])  # whole ratings too
    return (rng.integers(0, users, n), rng.integers(0, items, n), types, values,
            1_710_000_000_000 + rng.integers(0, 10**10, n))


def test_event_weights_match_the_scalar_functions():
    rng = np.random.default_rng(0)
    _, _, types, values, _ = random_events(rng, 5000)
    weights, positive = event_weights(types, values)
    expected = np.array([event_weight(int(t), float(v)) for t, v in zip(types, values)])
    assert weights.tobytes() == expected.tobytes()
    assert positive.tolist() == [is_positive(int(t), float(v)) for t, v in zip(types, values)]


def test_batched_bookkeeping_is_bit_identical_to_the_per_event_loop():
    rng = np.random.default_rng(1)
    users, item_rows, types, values, timestamps = random_events(rng, 3000)
    weights, positive = event_weights(types, values)
    tables = []
    for batched in (False, True):
        user_table, catalog = UserTable(8, 5), ItemCatalog(8, 14 * 24 * 3600 * 1000.0)
        for u in range(40):
            user_table.ensure(f"u{u}")
        for i in range(30):
            catalog.upsert(f"i{i}", [], {}, np.ones(8))
        if batched:
            for part in np.array_split(np.arange(3000), 7):  # batching must not matter
                user_table.record_events(users[part], item_rows[part], types[part], values[part], timestamps[part],
                                         positive[part])
                catalog.record_interactions(item_rows[part], weights[part], timestamps[part], positive[part])
        else:
            for u, i, t, v, ts, w, p in zip(users.tolist(), item_rows.tolist(), types.tolist(), values.tolist(),
                                            timestamps.tolist(), weights.tolist(), positive.tolist()):
                user_table.record(u, i, t, v, ts, p)
                catalog.record_interaction(i, w if p else 0.0, ts, p, count=False)
        tables.append((user_table, catalog))
    (old_users, old_items), (new_users, new_items) = tables
    assert new_users.seen == old_users.seen
    assert [list(h) for h in new_users.history] == [list(h) for h in old_users.history]
    assert new_users.event_counts.tobytes() == old_users.event_counts.tobytes()
    assert new_users.positive_counts.tobytes() == old_users.positive_counts.tobytes()
    assert new_users.dirty == old_users.dirty
    assert new_items.log2_popularity.tobytes() == old_items.log2_popularity.tobytes()
    assert new_items.last_event_ms.tobytes() == old_items.last_event_ms.tobytes()
    assert new_items.dirty_rows == old_items.dirty_rows


def test_encode_events_matches_encode_event():
    events = [Event(f"e{k}", "ü" * k, "i", EventType((k % 7) + 1), k / 3, 1_710_000_000_000 + k) for k in range(50)]
    assert codec.encode_events(events) == [codec.encode_event(e) for e in events]
    with pytest.raises(ValueError, match="cannot encode event 'bad'"):
        codec.encode_events(events[:2] + [Event("bad", "u", "i", EventType.VIEW, 1.0, 2**63)])


def test_append_records_keeps_the_append_log_contract(tmp_path):
    store = Store(tmp_path)
    long_id = "x" * 600  # over LMDB's key limit: hashed
    e1 = codec.encode_event(Event("e1", "u", "i", EventType.VIEW, 1.0, 1))  # forget_user reads ids from payloads
    assert store.append_records([e1, b"b", e1, b"d"], ["e1", None, "e1", ""], ["u", None, "u", long_id]) == [
        1, 2, None, 3]
    assert store.append_log([LogEntry(b"e", "e1", "u"), LogEntry(b"f", "e2", "")]) == [None, 4]
    assert store.append_records([e1], ["e1"], ["u"]) == [None]  # nothing new: the log is untouched
    assert [p for _, p in store.iter_log()] == [e1, b"b", b"d", b"f"]
    assert store.forget_user(long_id) == 1 and store.forget_user("") == 1 and store.forget_user("u") == 1
    assert [p for _, p in store.iter_log()] == [b"b"]
    assert store.append_records([e1], ["e1"], ["u"]) == [5]  # the forgotten event's key went with it
    store.close()


def test_durable_seq_is_the_log_end_when_a_group_ends_in_duplicates(tmp_path):
    """The writer takes durable_seq from the group's last written seq instead of reading the log back: a
    trailing duplicate (no seq) and an all-duplicate group must still report the log's end."""
    engine = Engine(tmp_path, CONFIG)
    seed_engine(engine, synthetic(n_users=10, n_items=20, n_clusters=2, events_per_user=3))
    now = 1_710_000_000_000

    def event(event_id, item):
        return Event(event_id, "u1", item, EventType.CLICK, 1.0, now)

    first = engine.ingest([event("d0", "i1"), event("d1", "i2")])
    assert first.durable_seq == engine.store.last_seq() == first.first_seq + 1
    trailing = engine.ingest([event("d2", "i3"), event("d0", "i1")])
    assert (trailing.accepted, trailing.duplicates) == (1, 1)
    assert trailing.durable_seq == engine.store.last_seq() == first.durable_seq + 1
    only = engine.ingest([event("d1", "i2")])
    assert (only.accepted, only.duplicates, only.durable_seq) == (0, 1, trailing.durable_seq)
    engine.close()


def test_a_mixed_group_commit_answers_and_replays_as_before(tmp_path):
    engine = Engine(tmp_path, CONFIG)
    seed_engine(engine, synthetic(n_users=30, n_items=50, n_clusters=3, events_per_user=5))
    now = 1_710_000_000_000

    def event(event_id, user, item, kind=EventType.CLICK):
        return Event(event_id, user, item, kind, 1.0, now)

    # Hold the state lock: the writer blocks applying the first op, and the rest queue into one group.
    with engine.lock:
        before = engine.store.last_seq()
        first = engine.writer.submit("events", list(enumerate([event("g0", "u1", "i1")])))
        while engine.store.last_seq() == before:  # written: the writer's group is closed, it waits for the lock
            time.sleep(0.001)
        futures = [
            engine.writer.submit("upsert", [ItemSpec("fresh", ["c1"])]),
            engine.writer.submit("events", list(enumerate([event("g1", "u2", "fresh"), event("g2", "new-user", "i2"),
                                                          event("g0", "u3", "i3"), event("g3", "u4", "nope")]))),
            engine.writer.submit("delete", ["i4", "i4", "gone"]),
            engine.writer.submit("events", list(enumerate([event("g4", "u5", "i4"), event("g1", "u6", "i5")] + [
                event(f"g{k + 5}", f"u{k}", f"i{k + 10}") for k in range(20)]))),
        ]
    first.result(10)
    upsert, events, delete, more = (f.result(10) for f in futures)
    assert max(engine.writer.group_sizes[-2:]) == 4  # they did share a group commit
    assert (upsert.created, delete.deleted, delete.not_found) == (1, 1, ["gone"])
    assert (events.accepted, events.duplicates) == (2, 1)
    assert [(r.index, r.field, r.reason) for r in events.rejections] == [(3, "item_id", "unknown item 'nope'")]
    assert (more.accepted, more.duplicates) == (20, 1)
    assert [(r.index, r.reason) for r in more.rejections] == [(0, "item 'i4' is deleted")]
    assert more.first_seq > events.first_seq > 0 and more.durable_seq == engine.store.last_seq()

    items, users = engine.state.items, engine.state.users
    live = (items.vectors[:len(items)].tobytes(), items.log2_popularity[:len(items)].tobytes(),
            {uid: (users.vectors[row].tobytes(), list(users.history[row]), sorted(users.seen[row]))
             for uid, row in users.rows.items()})
    engine.close(checkpoint=False)
    reopened = Engine(tmp_path, CONFIG)
    items, users = reopened.state.items, reopened.state.users
    assert (items.vectors[:len(items)].tobytes(), items.log2_popularity[:len(items)].tobytes(),
            {uid: (users.vectors[row].tobytes(), list(users.history[row]), sorted(users.seen[row]))
             for uid, row in users.rows.items()}) == live
    assert not math.isinf(reopened.state.items.log2_popularity[reopened.state.items.rows["fresh"]])
    reopened.close()
