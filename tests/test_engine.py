"""Engine-level guarantees: replay rebuilds bit-identical state, restarts keep acknowledged work."""
from __future__ import annotations

import numpy as np
import pytest

from streamrec.engine.api import Event, EventType, ItemSpec
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import open_engine, seed_engine
from state_snapshot import state_snapshot

CONFIG = EngineConfig(dim=16, checkpoint_interval_s=3600, checkpoint_every_records=10**9)


def small_engine(path) -> Engine:
    engine = Engine(path, CONFIG)
    seed_engine(engine, synthetic(n_users=60, n_items=200, n_clusters=5, events_per_user=10))
    return engine


def traffic(seed: int, n: int) -> list[Event]:
    rng = np.random.default_rng(seed)
    types = list(EventType)
    return [
        Event(f"e{seed}-{i}", f"u{rng.integers(0, 80)}", f"i{rng.integers(0, 200)}", types[rng.integers(0, len(types))],
              float(rng.integers(1, 6)), 1_710_000_000_000 + int(rng.integers(0, 10**9)))
        for i in range(n)
    ]


def snapshot(engine: Engine) -> dict:
    return state_snapshot(engine.state)


def test_replay_rebuilds_bit_identical_state(tmp_path):
    engine = small_engine(tmp_path)
    for batch in range(6):
        engine.ingest(traffic(batch, 150))
        if batch == 2:
            engine.checkpoint()  # recovery = this checkpoint + replay of the rest
        if batch == 3:
            engine.upsert_items([ItemSpec("brand-new", ["c1"]), ItemSpec("i5", ["c2"], {"title": "renamed"})])
            engine.delete_items(["i7"])
    live = snapshot(engine)
    engine.close(checkpoint=False)
    reopened = Engine(tmp_path, CONFIG)
    assert reopened.recovered_records > 0
    assert snapshot(reopened) == live
    reopened.close()


def test_restart_keeps_acked_events_and_answers_the_same(tmp_path):
    engine = small_engine(tmp_path)
    result = engine.ingest(traffic(99, 300))
    assert result.accepted + len(result.rejections) + result.duplicates == 300
    query = engine.build_query("u3", 10)
    before = engine.recommend([query])[0]
    engine.close()  # graceful: final checkpoint
    reopened = Engine(tmp_path, CONFIG)
    assert reopened.recovered_records == 0
    after = reopened.recommend([query])[0]
    assert after.item_ids == before.item_ids and np.array_equal(after.scores, before.scores)
    again = reopened.ingest(traffic(99, 300))  # every acked id is remembered across the restart
    assert again.accepted == 0 and again.duplicates == result.accepted
    reopened.close()


def test_forget_user_survives_restart(tmp_path):
    engine = small_engine(tmp_path)
    engine.ingest([Event("f1", "forget-me", "i1", EventType.PURCHASE, 0, 1_710_000_000_000)])
    assert engine.forget_user("forget-me").events_erased == 1
    engine.close(checkpoint=False)
    reopened = Engine(tmp_path, CONFIG)
    assert reopened.state.users.row_of("forget-me") is None
    assert all(b"forget-me" not in payload for _, payload in reopened.store.iter_log())
    reopened.close()


def test_seeding_is_atomic_and_only_once(tmp_path):
    first = open_engine(tmp_path, CONFIG, "synthetic")
    version, last_seq = first.model_version, first.store.last_seq()
    first.close()
    assert not (tmp_path / "lmdb.seeding").exists()
    second = open_engine(tmp_path, CONFIG, "synthetic")
    assert second.model_version == version and second.store.last_seq() == last_seq
    second.close()


def test_write_errors_reach_the_caller_and_the_writer_keeps_going(tmp_path, monkeypatch):
    engine = small_engine(tmp_path)
    original = engine.store.append_records  # the writer's path into the log

    def broken(payloads, event_ids, user_ids):
        raise OSError("disk on fire")

    monkeypatch.setattr(engine.store, "append_records", broken)
    with pytest.raises(OSError):
        engine.ingest(traffic(1, 5))
    monkeypatch.setattr(engine.store, "append_records", original)
    assert engine.ingest(traffic(2, 5)).accepted > 0
    engine.close()


def test_records_trigger_waits_for_the_last_checkpoints_share(tmp_path):
    """After checkpoint_every_records, a checkpoint still waits until the writer has run 1/share times as long as
    the last one took, so slow checkpoints cannot take over the writer under sustained ingest."""
    import dataclasses

    config = dataclasses.replace(CONFIG, checkpoint_every_records=100, checkpoint_max_share=0.1)
    engine = Engine(tmp_path, config)
    seed_engine(engine, synthetic(n_users=60, n_items=200, n_clusters=5, events_per_user=10))
    try:
        seeded_at = engine.store.checkpoint_seq()
        engine.checkpointer._last_s = 60.0  # as if the last one took a minute: due only after ten
        engine.ingest(traffic(0, 150))
        engine.ingest(traffic(1, 10))  # the writer looks again after each group
        engine.ingest(traffic(1, 10))  # resent (duplicates): acked only after the writer's look at the group before
        # A checkpoint started by mistake is either still being written on its thread or has advanced the seq.
        assert engine.checkpointer._running is None
        assert engine.store.checkpoint_seq() == seeded_at
        engine.checkpointer._last_s = 0.0
        engine.ingest(traffic(2, 10))
        _wait_for(lambda: engine.store.checkpoint_seq() > seeded_at)
    finally:
        engine.close()


def _background_checkpoints(engine: Engine, monkeypatch, gate=None, fail_once=False) -> list:
    """Counts the checkpoints written off the writer thread; `gate` holds them until set, `fail_once` breaks the first."""
    import threading

    original, calls = engine.store.write_checkpoint, []

    def write_checkpoint(*args, index=None, **kwargs):
        if index is not None:  # given only to a checkpoint written on the checkpoint thread
            calls.append(threading.current_thread().name)
            if gate is not None:
                assert gate.wait(10)
            if fail_once and len(calls) == 1:
                raise OSError("disk on fire")
        return original(*args, index=index, **kwargs)

    monkeypatch.setattr(engine.store, "write_checkpoint", write_checkpoint)
    return calls


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert condition()


def test_a_checkpoint_being_written_blocks_neither_commits_nor_recommendations(tmp_path, monkeypatch):
    import dataclasses
    import threading

    engine = Engine(tmp_path, dataclasses.replace(CONFIG, checkpoint_every_records=100))
    seed_engine(engine, synthetic(n_users=60, n_items=200, n_clusters=5, events_per_user=10))
    gate = threading.Event()
    calls = _background_checkpoints(engine, monkeypatch, gate)
    try:
        seeded_at = engine.store.checkpoint_seq()
        engine.ingest(traffic(0, 150))  # due: a checkpoint starts and waits at the gate
        _wait_for(lambda: calls)
        for batch in range(1, 4):  # acknowledged while the checkpoint is still open
            assert engine.ingest(traffic(batch, 50)).accepted > 0
            assert engine.recommend([engine.build_query("u3", 5)])[0].item_ids
        assert engine.store.checkpoint_seq() == seeded_at and len(calls) == 1  # one at a time
        gate.set()
        _wait_for(lambda: engine.store.checkpoint_seq() > seeded_at)
        assert calls[0].startswith("streamrec-checkpoint")
        live = snapshot(engine)
    finally:
        gate.set()
        engine.close(checkpoint=False)
    reopened = Engine(tmp_path, CONFIG)  # that checkpoint + replay of what came during and after it
    assert reopened.recovered_records > 0
    assert snapshot(reopened) == live
    again = reopened.ingest(traffic(2, 50))  # keys of commits made during the merge still deduplicate
    assert again.accepted == 0 and again.duplicates > 0
    reopened.close()


def test_a_failed_background_checkpoint_leaves_its_changes_to_the_next(tmp_path, monkeypatch):
    import dataclasses

    engine = Engine(tmp_path, dataclasses.replace(CONFIG, checkpoint_every_records=100))
    seed_engine(engine, synthetic(n_users=60, n_items=200, n_clusters=5, events_per_user=10))
    calls = _background_checkpoints(engine, monkeypatch, fail_once=True)
    seeded_at = engine.store.checkpoint_seq()
    engine.ingest(traffic(0, 150))  # due: this checkpoint fails after its snapshot cleared the dirty marks
    _wait_for(lambda: calls and engine.checkpointer._running.done())
    assert engine.store.checkpoint_seq() == seeded_at
    engine.ingest(traffic(1, 20))
    engine.checkpoint()  # must write what the failed one held as well as the new changes
    live = snapshot(engine)
    engine.close(checkpoint=False)
    reopened = Engine(tmp_path, CONFIG)
    assert reopened.recovered_records == 0  # everything comes from the checkpoint, nothing from replay
    assert snapshot(reopened) == live
    reopened.close()
