"""Codec round trips and the LMDB store (real LMDB in tmp_path)."""
from __future__ import annotations

import json
import math
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamrec.engine.api import Event, EventType, ItemSpec
from streamrec.engine.store import codec
from streamrec.engine.store import journal as index_journal
from streamrec.engine.store import store as store_mod
from streamrec.engine.store import layout
from streamrec.engine.store.codec import DeleteItem
from streamrec.engine.store.store import HISTORY_DTYPE, ItemRecord, LogEntry, Store, UserRecord

# --- helpers ----------------------------------------------------------------------------------


def _f64_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_event_equal(a: Event, b: Event) -> None:
    assert (a.event_id, a.user_id, a.item_id, a.type, a.timestamp_ms) == (
        b.event_id,
        b.user_id,
        b.item_id,
        b.type,
        b.timestamp_ms,
    )
    assert type(b.type) is EventType
    assert _f64_bits(a.value) == _f64_bits(b.value)  # exact, NaN and -0.0 included


def assert_spec_equal(a: ItemSpec, b: ItemSpec) -> None:
    assert (a.item_id, a.categories, a.attributes) == (b.item_id, b.categories, b.attributes)
    assert list(a.attributes) == list(b.attributes)  # order kept
    if a.vector is None:
        assert b.vector is None
    else:
        assert b.vector is not None and b.vector.dtype == np.float32
        assert np.asarray(a.vector, np.float32).tobytes() == b.vector.tobytes()


def assert_item_equal(a: ItemRecord, b: ItemRecord) -> None:
    assert (a.item_id, a.row, a.categories, a.attributes, a.deleted, a.last_event_ms, a.interactions) == (
        b.item_id,
        b.row,
        b.categories,
        b.attributes,
        b.deleted,
        b.last_event_ms,
        b.interactions,
    )
    assert _f64_bits(a.popularity) == _f64_bits(b.popularity)
    if a.vector is None:
        assert b.vector is None
    else:
        assert b.vector is not None and b.vector.dtype == np.float32
        assert a.vector.tobytes() == b.vector.tobytes()


def assert_user_equal(a: UserRecord, b: UserRecord) -> None:
    assert (a.user_id, a.event_count, a.last_event_ms, a.positive_count) == (
        b.user_id,
        b.event_count,
        b.last_event_ms,
        b.positive_count,
    )
    assert b.vector.dtype == np.float32 and a.vector.astype(np.float32).tobytes() == b.vector.tobytes()
    assert b.seen.dtype == np.int32 and np.array_equal(a.seen, b.seen)
    assert b.history.dtype == HISTORY_DTYPE and a.history.tobytes() == b.history.tobytes()


def make_item(i: int, dim: int = 4, *, vector: bool = True, deleted: bool = False) -> ItemRecord:
    vec = np.arange(dim, dtype=np.float32) + i if vector else None
    return ItemRecord(f"item-{i}", i, [f"c{i % 3}"], {"brand": f"b{i}"}, deleted, vec, 0.5 * i, 1000 + i, i)


def make_user(uid: str, dim: int = 4, n: int = 3) -> UserRecord:
    hist = np.zeros(n, HISTORY_DTYPE)
    hist["row"] = np.arange(n)
    hist["type"] = 2
    hist["value"] = 1.5
    hist["ts"] = np.arange(n, dtype=np.int64) * 1000
    return UserRecord(uid, np.full(dim, 0.25, np.float32), np.arange(n, dtype=np.int32), hist, n, 1000 * n, n // 2)


def ev_entry(eid: str, uid: str = "u", iid: str = "i", ts: int = 0) -> LogEntry:
    return LogEntry(codec.encode_event(Event(eid, uid, iid, EventType.CLICK, 1.0, ts)), eid, uid)


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "db") as s:
        yield s


# --- codec ------------------------------------------------------------------------------------

ids = st.text(max_size=40)
events = st.builds(
    Event,
    ids,
    ids,
    ids,
    st.sampled_from(list(EventType)),
    st.floats(width=64),
    st.integers(-(2**63), 2**63 - 1),
)
vectors = st.none() | hnp.arrays(np.float32, st.integers(0, 16), elements=st.floats(width=32))
specs = st.builds(
    ItemSpec, ids, st.lists(ids, max_size=5), st.dictionaries(ids, ids, max_size=5), vectors
)


@given(events)
def test_event_roundtrip_property(e: Event) -> None:
    assert_event_equal(e, codec.decode(codec.encode_event(e)))


@given(specs)
def test_upsert_roundtrip_property(spec: ItemSpec) -> None:
    assert_spec_equal(spec, codec.decode(codec.encode_upsert(spec)))


@given(ids)
def test_delete_roundtrip_property(item_id: str) -> None:
    assert codec.decode(codec.encode_delete(item_id)) == DeleteItem(item_id)


@pytest.mark.parametrize(
    "e",
    [
        Event("", "", "", EventType.VIEW, 0.0, 0),
        Event("é🎉\x00", "用户", "ítem\n", EventType.RATING, 4.5, -1),
        Event("a", "b", "c", EventType.DISLIKE, -0.0, 2**63 - 1),
        Event("a", "b", "c", EventType.PURCHASE, math.inf, -(2**63)),
        Event("a", "b", "c", EventType.SKIP, math.nan, 1_700_000_000_000),
        Event("a" * 10_000, "b", "c", EventType.ADD_TO_CART, 1e-308, 1),
        Event("x", "y", "z", 3, 0.1, 5),  # plain int type decodes to EventType
    ],
)
def test_event_roundtrip_edges(e: Event) -> None:
    out = codec.decode(codec.encode_event(e))
    assert isinstance(out, Event)
    assert_event_equal(e, out)


@pytest.mark.parametrize(
    "spec",
    [
        ItemSpec(""),
        ItemSpec("i", [], {}, None),
        ItemSpec("i", [], {}, np.zeros(0, np.float32)),  # empty vector is not None
        ItemSpec("i", ["", "ä"], {"": "", "k": "v🎉"}, np.array([1.0, -0.0, np.inf, np.nan], np.float32)),
        ItemSpec("i", ["a"], {"z": "1", "a": "2"}, np.arange(128, dtype=np.float64)),  # cast to float32
    ],
)
def test_upsert_roundtrip_edges(spec: ItemSpec) -> None:
    out = codec.decode(codec.encode_upsert(spec))
    assert isinstance(out, ItemSpec)
    assert_spec_equal(spec, out)


@pytest.mark.parametrize("item_id", ["", "x", "日本", "a" * 5000])
def test_delete_roundtrip_edges(item_id: str) -> None:
    assert codec.decode(codec.encode_delete(item_id)) == DeleteItem(item_id)


def test_decode_accepts_memoryview() -> None:
    e = Event("e", "u", "i", EventType.CLICK, 2.0, 3)
    assert_event_equal(e, codec.decode(memoryview(codec.encode_event(e))))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01",
        b"\x09\x01",  # unknown kind
        b"\x01\x02" + codec.encode_event(Event("e", "u", "i", EventType.VIEW, 1.0, 1))[2:],  # unknown version
        codec.encode_event(Event("e", "u", "i", EventType.VIEW, 1.0, 1))[:-1],  # truncated
        codec.encode_event(Event("e", "u", "i", EventType.VIEW, 1.0, 1)) + b"!",  # trailing
        codec.encode_upsert(ItemSpec("i", vector=np.ones(4, np.float32)))[:-2],
        codec.encode_delete("abc")[:-1],
        b"\x01\x01\x63" + codec.encode_event(Event("e", "u", "i", EventType.VIEW, 1.0, 1))[3:],  # bad event type
        b"\x03\x01\x02\x00\x00\x00\xff\xfe",  # invalid utf-8
    ],
)
def test_decode_rejects_bad_payloads(payload: bytes) -> None:
    with pytest.raises(ValueError):
        codec.decode(payload)


def test_encode_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        codec.encode_event(Event("e", "u", "i", EventType.VIEW, 1.0, 2**63))
    with pytest.raises(ValueError):
        codec.encode_upsert(ItemSpec("i", vector=np.ones((2, 2), np.float32)))


def test_vector_helpers() -> None:
    v = np.array([1.5, -2.0, 3.25], np.float32)
    raw = codec.vector_to_bytes(v)
    assert len(raw) == 12
    out = codec.vector_from_bytes(raw)
    assert out.dtype == np.float32 and out.flags.writeable and np.array_equal(out, v)
    assert np.array_equal(codec.array_from_bytes(codec.array_to_bytes([1, 2, 3], "<i4"), "<i4"), [1, 2, 3])


# --- record packing (property tests on the packers; the store tests below cover LMDB) ---------

history_arrays = hnp.arrays(
    HISTORY_DTYPE,
    st.integers(0, 8),
    elements=st.tuples(
        st.integers(-(2**31), 2**31 - 1),
        st.integers(0, 255),
        st.floats(width=32, allow_nan=False),
        st.integers(-(2**63), 2**63 - 1),
    ),
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    ids,
    hnp.arrays(np.float32, st.integers(0, 8), elements=st.floats(width=32)),
    hnp.arrays(np.int32, st.integers(0, 8)),
    history_arrays,
    st.integers(0, 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 2**63 - 1),
)
def test_user_pack_roundtrip_property(uid, vec, seen, hist, count, last, positive) -> None:
    rec = UserRecord(uid, vec, seen, hist, count, last, positive)
    assert_user_equal(rec, store_mod._unpack_user(store_mod._pack_user(rec)))


@given(
    ids,
    st.integers(0, 2**32 - 1),
    st.lists(ids, max_size=4),
    st.dictionaries(ids, ids, max_size=4),
    st.booleans(),
    st.floats(width=64),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 2**63 - 1),
)
def test_item_pack_roundtrip_property(iid, row, cats, attrs, deleted, pop, last, n) -> None:
    rec = ItemRecord(iid, row, cats, attrs, deleted, None, pop, last, n)
    assert_item_equal(rec, store_mod._unpack_item(store_mod._pack_item(rec), None))


# --- log --------------------------------------------------------------------------------------


def test_append_log_consecutive_seqs(store: Store) -> None:
    assert store.last_seq() == 0 and store.log_count() == 0
    assert store.append_log([]) == []
    assert store.append_log([ev_entry(f"e{i}") for i in range(5)]) == [1, 2, 3, 4, 5]
    assert store.append_log([LogEntry(b"no-id"), LogEntry(b"no-id")]) == [6, 7]  # no key, no dedupe
    assert store.append_log([LogEntry(b"empty-id", event_id="")]) == [8]  # "" means no key too
    assert store.last_seq() == 8 and store.log_count() == 8
    assert [s for s, _ in store.iter_log()] == list(range(1, 9))


def test_duplicate_event_ids(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path) as s:
        assert s.append_log([ev_entry("a"), ev_entry("b"), ev_entry("a"), ev_entry("c")]) == [1, 2, None, 3]
        assert s.append_log([ev_entry("c"), ev_entry("d"), ev_entry("b")]) == [None, 4, None]
        assert s.log_count() == 4
    with Store(path) as s:  # idempotency survives reopen
        assert s.append_log([ev_entry("a"), ev_entry("d"), ev_entry("e")]) == [None, None, 5]
        ids_in_log = [codec.decode(p).event_id for _, p in s.iter_log()]
        assert ids_in_log == ["a", "b", "c", "d", "e"]


def test_long_and_empty_ids(store: Store) -> None:
    long_a, long_b = "x" * 600 + "a", "x" * 600 + "b"  # > LMDB's 511-byte key limit, same prefix
    assert store.append_log([ev_entry(long_a, uid=long_a), ev_entry(long_b, uid=""), ev_entry(long_a)]) == [
        1,
        2,
        None,
    ]
    store.write_checkpoint([ItemRecord(long_a, 0, [], {}, False, None, 0.0, 0, 0)], [make_user(long_b)], [], 2)
    assert store.load_items()[0].item_id == long_a
    assert store.load_users()[0].user_id == long_b
    assert store.forget_user(long_a) == 1
    assert store.forget_user("") == 1
    assert store.log_count() == 0


def test_iter_log_after_seq(store: Store) -> None:
    payloads = [f"p{i}".encode() for i in range(10)]
    store.append_log([LogEntry(p) for p in payloads])
    assert list(store.iter_log(7)) == [(8, b"p7"), (9, b"p8"), (10, b"p9")]
    assert list(store.iter_log(10)) == []
    assert list(store.iter_log(-5)) == list(store.iter_log(0))
    assert [p for _, p in store.iter_log()] == payloads


def test_iter_log_chunks_and_gaps(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "_ITER_CHUNK", 3)
    store.append_log([ev_entry(f"e{i}", uid="even" if i % 2 == 0 else "odd") for i in range(11)])
    assert [s for s, _ in store.iter_log()] == list(range(1, 12))
    store.forget_user("even")  # leaves gaps at odd seqs
    assert [s for s, _ in store.iter_log(2)] == [4, 6, 8, 10]


def test_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path) as s:
        s.append_log([ev_entry(f"e{i}", ts=i) for i in range(20)])
        s.put_meta("dim", b"\x04")
        s.write_checkpoint([make_item(0)], [make_user("u")], [], 10, {"model": b"v1"})
    with Store(path) as s:
        assert s.last_seq() == 20 and s.checkpoint_seq() == 10
        assert [codec.decode(p).timestamp_ms for _, p in s.iter_log(10)] == list(range(10, 20))
        assert s.get_meta("dim") == b"\x04" and s.get_meta("model") == b"v1" and s.get_meta("nope") is None
        assert_item_equal(make_item(0), s.load_items()[0])
        assert_user_equal(make_user("u"), s.load_users()[0])
        assert s.append_log([ev_entry("new")]) == [21]


# --- checkpoint -------------------------------------------------------------------------------


def test_checkpoint_roundtrip(store: Store) -> None:
    assert store.checkpoint_seq() == 0 and store.load_items() == [] and store.load_users() == []
    store.append_log([LogEntry(b"x")] * 5)
    items = [make_item(i, vector=i != 2, deleted=i == 3) for i in (4, 0, 3, 2, 1)]  # unsorted on purpose
    users = [make_user("alice"), make_user("bob", n=0), make_user("carol", dim=8, n=50)]
    store.write_checkpoint(items, users, ["nobody"], 3, {"dim": b"4"})
    assert store.checkpoint_seq() == 3 and store.get_meta("dim") == b"4"
    loaded = store.load_items()
    assert [r.row for r in loaded] == [0, 1, 2, 3, 4]
    for rec in loaded:
        assert_item_equal(next(i for i in items if i.row == rec.row), rec)
    by_id = {u.user_id: u for u in store.load_users()}
    assert set(by_id) == {"alice", "bob", "carol"}
    for u in users:
        assert_user_equal(u, by_id[u.user_id])

    # Dirty subset: update one item (drop its vector, mark deleted), delete a user, upsert another.
    upd = make_item(1, vector=False, deleted=True)
    upd.popularity, upd.interactions = 9.5, 99
    alice2 = make_user("alice", n=5)
    store.write_checkpoint([upd], [alice2, make_user("dave")], ["bob", "dave"], 5)  # deletion wins
    assert store.checkpoint_seq() == 5
    loaded = store.load_items()
    assert len(loaded) == 5
    assert_item_equal(upd, loaded[1])
    assert_item_equal(make_item(0), loaded[0])
    by_id = {u.user_id: u for u in store.load_users()}
    assert set(by_id) == {"alice", "carol"}
    assert_user_equal(alice2, by_id["alice"])
    assert store.stats()["item_vectors"] == 3  # items 0, 3, 4 still have vectors


def test_checkpoint_accepts_generators_and_row_moves(store: Store) -> None:
    store.write_checkpoint((make_item(i) for i in range(3)), iter([]), iter([]), 0)
    moved = make_item(1)
    moved.row = 7
    store.write_checkpoint([moved], [], [], 0)
    assert [(r.item_id, r.row) for r in store.load_items()] == [("item-0", 0), ("item-2", 2), ("item-1", 7)]
    st_ = store.stats()
    assert st_["item_rows"] == 3 and st_["item_vectors"] == 3


def test_checkpoint_rejects_bad_input(store: Store) -> None:
    store.append_log([LogEntry(b"x")])
    store.write_checkpoint([make_item(0)], [], [], 1)
    clash = make_item(5)
    clash.row = 0
    with pytest.raises(ValueError, match="row 0"):
        store.write_checkpoint([make_item(1), clash], [], [], 1)
    with pytest.raises(ValueError, match="watermark"):
        store.write_checkpoint([], [], [], 2)  # beyond the log
    with pytest.raises(ValueError, match="reserved"):
        store.write_checkpoint([], [], [], 1, {"checkpoint_seq": b"0"})
    with pytest.raises(ValueError):
        store.put_meta("last_seq", b"0")
    bad_hist = make_user("u")
    bad_hist.history = np.zeros(2, [("a", "<i4")])
    with pytest.raises(ValueError):
        store.write_checkpoint([], [bad_hist], [], 1)
    # Nothing of the failed checkpoints was written.
    assert [r.item_id for r in store.load_items()] == ["item-0"] and store.load_users() == []


# --- index journal ----------------------------------------------------------------------------

journal_keys = st.none() | st.binary(min_size=1, max_size=511)


@given(st.integers(1, 2**63), st.lists(st.tuples(journal_keys, journal_keys), max_size=50))
def test_index_journal_roundtrip_property(first_seq: int, keys: list) -> None:
    idem_keys, user_keys = [k for k, _ in keys], [u for _, u in keys]
    assert index_journal.decode(index_journal.encode(first_seq, idem_keys, user_keys)) == (first_seq, idem_keys, user_keys)


def test_index_journal_rejects_trailing_bytes() -> None:
    with pytest.raises(ValueError, match="left over"):
        index_journal.decode(index_journal.encode(1, [b"a"], [None]) + b"x")


def _tree_entries(s: Store) -> dict[str, int]:
    """Entries in the idem / user_log trees and the journal themselves (stats() adds the journal's keys)."""
    out = {}
    for name in ("idem", "user_log", "index_journal"):
        env, db = s._dbs[name]
        with env.read() as txn:
            out[name] = txn.stat(db)["entries"]
    return out


def test_index_keys_wait_in_the_journal_then_merge(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path) as s:
        assert s.append_log([ev_entry("a", uid="u1"), ev_entry("b", uid="u2")]) == [1, 2]
        assert s.append_log([LogEntry(b"no-keys"), ev_entry("c", uid="u1")]) == [3, 4]
        assert s.append_log([LogEntry(b"no-keys-at-all")]) == [5]  # nothing to journal
        assert _tree_entries(s) == {"idem": 0, "user_log": 0, "index_journal": 2}  # one record per keyed commit
        assert s.pending_index_entries == 6
        assert s.stats()["idem"] == 3 and s.stats()["user_log"] == 3
        assert s.append_log([ev_entry("c"), ev_entry("d")]) == [None, 6]  # dedupe against the journal
    with Store(path) as s:  # reopened: the journal is read back
        assert s.pending_index_entries == 8
        assert s.append_log([ev_entry("a"), ev_entry("d"), ev_entry("e")]) == [None, None, 7]
        s.merge_index()
        assert s.pending_index_entries == 0
        assert _tree_entries(s) == {"idem": 5, "user_log": 5, "index_journal": 0}
        assert s.stats()["idem"] == 5 and s.stats()["user_log"] == 5
        assert s.append_log([ev_entry("a"), ev_entry("e"), ev_entry("f")]) == [None, None, 8]  # dedupe against the tree
        s.write_checkpoint([], [], [], 8)  # a checkpoint merges too
        assert s.pending_index_entries == 0 and _tree_entries(s)["index_journal"] == 0
    with Store(path) as s:
        assert s.pending_index_entries == 0
        assert s.append_log([ev_entry(k) for k in "abcdef"]) == [None] * 6


def test_checkpoint_merges_a_frozen_generation_while_the_writer_appends(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path) as s:
        s.append_log([ev_entry("a", uid="u1"), ev_entry("b", uid="u2")])
        s.append_log([ev_entry("c", uid="u1")])
        frozen = s.freeze_index()  # writer thread: the keys so far go to the checkpoint
        s.append_log([ev_entry("d", uid="u3")])  # a new generation, not part of the merge
        thread = threading.Thread(target=s.write_checkpoint, args=([], [], [], 4), kwargs={"index": frozen})
        thread.start()
        thread.join()
        assert s.checkpoint_seq() == 4
        assert _tree_entries(s) == {"idem": 3, "user_log": 3, "index_journal": 3}  # journal trimmed by the writer
        assert s.pending_index_entries == 2  # only "d"
        assert s.append_log([ev_entry(k) for k in "abcde"]) == [None] * 4 + [5]  # merged and pending keys both
        assert _tree_entries(s)["index_journal"] == 2  # the merged records went with that append
    with Store(path) as s:
        assert s.pending_index_entries == 4  # "d" and "e", read back from the journal
        assert s.append_log([ev_entry(k) for k in "abcdef"]) == [None] * 5 + [6]


def test_keys_merged_before_a_crash_but_still_journaled_merge_again_harmlessly(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path) as s:
        s.append_log([ev_entry("a", uid="u1"), ev_entry("b", uid="u1")])
        s.write_checkpoint([], [], [], 2, index=s.freeze_index())  # merged; the journal waits for the next append
        assert _tree_entries(s) == {"idem": 2, "user_log": 2, "index_journal": 1}
    with Store(path) as s:  # as after a crash before that append
        assert s.pending_index_entries == 4
        s.merge_index()
        assert _tree_entries(s) == {"idem": 2, "user_log": 2, "index_journal": 0}  # no entry twice
        assert s.append_log([ev_entry("a"), ev_entry("c")]) == [None, 3]
        assert s.forget_user("u1") == 2


def test_index_merges_itself_past_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "_PENDING_INDEX_CAP", 10)
    with Store(tmp_path / "db") as s:
        s.append_log([ev_entry(f"e{i}") for i in range(4)])  # 8 entries: below the cap
        assert s.pending_index_entries == 8
        s.append_log([ev_entry(f"f{i}") for i in range(2)])  # 12: merged after the commit
        assert s.pending_index_entries == 0 and _tree_entries(s)["idem"] == 6
        assert s.append_log([ev_entry("e0"), ev_entry("f1"), ev_entry("g")]) == [None, None, 7]


def test_forget_user_erases_merged_and_journaled_records(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path) as s:
        s.append_log([ev_entry("a1", uid="alice"), ev_entry("b1", uid="bob")])
        s.merge_index()
        s.append_log([ev_entry("a2", uid="alice"), ev_entry("b2", uid="bob")])  # still in the journal
        assert s.forget_user("alice") == 2
        assert [codec.decode(p).event_id for _, p in s.iter_log()] == ["b1", "b2"]
        assert s.stats()["idem"] == 2 and s.stats()["user_log"] == 2
    with Store(path) as s:
        assert s.append_log([ev_entry("a1", uid="alice"), ev_entry("a2", uid="alice"), ev_entry("b2")]) == [5, 6, None]


def _single_environment_store(path: Path, fmt: bytes) -> None:
    """A store as formats 1 and 2 wrote it: every database in one environment. Format 2 adds the journal, here holding
    the keys of record 2 (format 1 had every key in the trees)."""
    import lmdb

    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        db = {name: env.open_db(name.encode(), txn=txn, **flags) for name, flags in
              {**layout._LOG_DBS, **layout._STATE_DBS}.items()}
        seq = store_mod._SEQ.pack
        txn.put(seq(1), ev_entry("a", uid="alice").payload, db=db["log"])
        txn.put(b"a", seq(1), db=db["idem"])
        txn.put(b"alice", seq(1), db=db["user_log"])
        txn.put(b"alice", store_mod._pack_user(make_user("alice")), db=db["users"])
        item = make_item(0)
        txn.put(b"item-0", store_mod._pack_item(item), db=db["items"])
        txn.put(store_mod._ROW.pack(0), b"item-0", db=db["item_rows"])
        txn.put(store_mod._ROW.pack(0), codec.vector_to_bytes(item.vector), db=db["item_vectors"])
        txn.put(seq(2), ev_entry("b", uid="bob").payload, db=db["log"])
        if fmt == b"\x02":
            txn.put(seq(2), index_journal.encode(2, [b"b"], [b"bob"]), db=db["index_journal"])
        else:
            txn.put(b"b", seq(2), db=db["idem"])
            txn.put(b"bob", seq(2), db=db["user_log"])
        for key, value in {"store_format": fmt, "last_seq": seq(2), "checkpoint_seq": seq(1), "model": b"m1"}.items():
            txn.put(key.encode(), value, db=db["meta"])
    env.close()


@pytest.mark.parametrize("fmt", [b"\x01", b"\x02"])
def test_single_environment_store_is_upgraded(tmp_path: Path, fmt: bytes) -> None:
    import lmdb

    path = tmp_path / "db"
    _single_environment_store(path, fmt)
    for _ in range(2):  # the second open finds format 3 and changes nothing
        with Store(path) as s:
            assert s.get_meta("store_format") == b"\x03"
            assert s.get_meta("model") == b"m1" and s.checkpoint_seq() == 1 and s.last_seq() == 2
            assert [u.user_id for u in s.load_users()] == ["alice"]
            assert [(it.item_id, it.vector.tolist()) for it in s.load_items()] == [("item-0", make_item(0).vector.tolist())]
            assert [seq for seq, _ in s.iter_log()] == [1, 2]
            assert s.stats()["idem"] == 2 and s.stats()["user_log"] == 2
    with Store(path) as s:
        assert s.append_log([ev_entry("a"), ev_entry("b"), ev_entry("c")]) == [None, None, 3]
        assert s.forget_user("bob") == 1  # found through the user index, journaled (format 2) or merged
        assert [seq for seq, _ in s.iter_log()] == [1, 3]
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin() as txn:  # the moved databases are gone from the log environment
        assert {key for key, _ in txn.cursor()} == {b"log", b"index_journal", b"meta"}
    env.close()


def test_unknown_store_format_is_refused(tmp_path: Path) -> None:
    import lmdb

    path = tmp_path / "db"
    Store(path).close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"store_format", b"\x09", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(ValueError, match="not supported"):
        Store(path)


# --- forget_user ------------------------------------------------------------------------------


def test_forget_user(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path) as s:
        entries = [ev_entry(f"e{i}", uid="alice" if i % 3 == 0 else "bob") for i in range(9)]
        entries.append(LogEntry(codec.encode_upsert(ItemSpec("new-item")), user_id=None))
        assert s.append_log(entries) == list(range(1, 11))
        s.write_checkpoint([], [make_user("alice"), make_user("bob")], [], 10)
        assert s.forget_user("alice") == 3
        assert s.forget_user("alice") == 0
        assert s.forget_user("nobody") == 0
        remaining = [(seq, codec.decode(p)) for seq, p in s.iter_log()]
        assert [seq for seq, _ in remaining] == [2, 3, 5, 6, 8, 9, 10]
        assert all(not isinstance(r, Event) or r.user_id == "bob" for _, r in remaining)
        assert [u.user_id for u in s.load_users()] == ["bob"]
        st_ = s.stats()
        assert st_["idem"] == 6 and st_["user_log"] == 6 and st_["log"] == 7
    with Store(path) as s:
        assert s.log_count() == 7
        # Chosen behaviour: the forgotten user's idempotency keys are erased with the data, so a
        # resend of a forgotten event_id is accepted as new; bob's keys still deduplicate.
        assert s.append_log([ev_entry("e0", uid="alice"), ev_entry("e1", uid="bob")]) == [11, None]


def test_seqs_never_reused_after_forget(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with Store(path) as s:
        s.append_log([ev_entry("a", uid="bob"), ev_entry("b", uid="alice"), ev_entry("c", uid="alice")])
        assert s.forget_user("alice") == 2  # erases the two newest records
        assert s.last_seq() == 3
        assert s.append_log([ev_entry("d", uid="bob")]) == [4]
        assert s.forget_user("bob") == 2  # erases everything
        assert s.log_count() == 0 and s.last_seq() == 4
    with Store(path) as s:
        assert s.last_seq() == 4
        assert s.append_log([ev_entry("e")]) == [5]


# --- map growth, concurrency, crash -----------------------------------------------------------


def test_map_growth_keeps_all_data(tmp_path: Path) -> None:
    path = tmp_path / "db"
    small = 64 << 10
    blob = bytes(range(256)) * 2
    with Store(path, initial_map_size=small) as s:
        seqs: list[int | None] = []
        for b in range(10):
            seqs += s.append_log([LogEntry(blob + f"{b}.{i}".encode(), f"e{b}.{i}", f"u{i % 7}") for i in range(200)])
        assert seqs == list(range(1, 2001))
        items = [make_item(i, dim=64) for i in range(300)]
        users = [make_user(f"u{i}", dim=64, n=100) for i in range(50)]
        s.write_checkpoint(items, users, [], 2000)
        stats = s.stats()
        assert stats["map_size"] >= small * 16  # at least four doublings
        assert stats["used_bytes"] <= stats["map_size"]
        assert s.forget_user("u3") > 0
    with Store(path, initial_map_size=small) as s:  # a smaller requested map does not lose data
        log = list(s.iter_log())
        assert len(log) == 2000 - sum(1 for i in range(200) if i % 7 == 3) * 10
        assert all(p.startswith(blob) for _, p in log)
        assert len(s.load_items()) == 300 and len(s.load_users()) == 49  # u3 was forgotten
        assert_item_equal(items[123], s.load_items()[123])
        assert s.append_log([LogEntry(blob * 50, "more")]) == [2001]


def test_concurrent_readers_during_resizes(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()
    with Store(tmp_path / "db", initial_map_size=64 << 10) as s:

        def reader() -> None:
            try:
                while not stop.is_set():
                    seqs = [seq for seq, _ in s.iter_log()]
                    assert seqs == list(range(1, len(seqs) + 1))
                    s.stats()
                    # Pause between reads: py-lmdb 3 makes a write-txn abort (our MapFullError path)
                    # wait for other threads' in-flight calls, so back-to-back readers starve it.
                    # The engine itself reads only at start-up.
                    stop.wait(0.002)
            except BaseException as exc:  # surfaced in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for b in range(40):
                s.append_log([LogEntry(b"z" * 300, f"{b}.{i}") for i in range(50)])
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors
        assert s.log_count() == 2000 and s._log_env.sizes()[0] > 64 << 10


_CHILD = r"""
import json, os, signal, sys
from streamrec.engine.store.store import LogEntry, Store
from streamrec.engine.store import codec
from streamrec.engine.api import Event, EventType
s = Store(sys.argv[1])
seqs = []
for b in range(3):
    seqs += s.append_log([
        LogEntry(codec.encode_event(Event(f"e{b}.{i}", "u", "i", EventType.VIEW, 1.0, i)), f"e{b}.{i}", "u")
        for i in range(100)
    ])
sys.stdout.write(json.dumps(seqs) + "\n")
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: only what commit made durable
"""


def test_append_durable_across_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "db"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    seqs = json.loads(proc.stdout.decode().strip())
    assert seqs == list(range(1, 301))
    with Store(path) as s:
        log = list(s.iter_log())
        assert [seq for seq, _ in log] == seqs
        assert codec.decode(log[-1][1]).event_id == "e2.99"
        assert s.append_log([ev_entry("e1.5"), ev_entry("fresh")]) == [None, 301]
