"""Read replicas: a replica's state equals the primary's bit for bit at the same applied seq, whatever reached the
log (events, catalog writes, erasures, reranker swaps) and however far behind the replica was. The replica runs
in a process of its own (tests/replica_probe.py), stepped from here."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from state_snapshot import state_snapshot
from streamrec.engine.api import Event, EventType, ItemSpec
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.errors import OutOfRange
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import seed_engine
from streamrec.engine.replica.wakeup import WakeupReceiver, WakeupSender
from streamrec.engine.store import codec
from streamrec.engine.store.store import LogEntry, Store

DIM = 32  # the reranker tests' models are built for it
CONFIG = EngineConfig(dim=DIM, checkpoint_interval_s=3600, checkpoint_every_records=10**9)
PROBE = Path(__file__).with_name("replica_probe.py")


class Probe:
    """A replica process applying the store's log only when told to (`catchup`)."""

    def __init__(self, store_dir: Path, map_bytes: int | None = None):
        args = [sys.executable, str(PROBE), str(store_dir), str(DIM)] + ([str(map_bytes)] if map_bytes else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.folder = store_dir.parent

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def catchup(self) -> dict:
        return json.loads(self._ask("catchup"))

    def snapshot(self) -> dict:
        path = self.folder / "replica-snapshot.pickle"
        assert self._ask(f"snapshot {path}") == "ok"
        return pickle.loads(path.read_bytes())

    def close(self) -> None:
        self._ask("quit")
        self.proc.wait(30)


def seeded(path: Path) -> Engine:
    engine = Engine(path, CONFIG)
    seed_engine(engine, synthetic(n_users=60, n_items=200, n_clusters=5, events_per_user=10))
    return engine


def traffic(seed: int, n: int, users: int = 80) -> list[Event]:
    rng = np.random.default_rng(seed)
    types = list(EventType)
    return [Event(f"e{seed}-{i}", f"u{rng.integers(0, users)}", f"i{rng.integers(0, 200)}",
                  types[rng.integers(0, len(types))], float(rng.integers(1, 6)),
                  1_710_000_000_000 + int(rng.integers(0, 10**9))) for i in range(n)]


@pytest.fixture()
def primary(tmp_path):
    engine = seeded(tmp_path / "lmdb")
    yield engine
    engine.close()


def test_replica_equals_the_primary_bit_for_bit_after_every_kind_of_write(primary):
    probe = Probe(primary.data_dir)
    try:
        for batch in range(5):
            primary.ingest(traffic(batch, 120))
            if batch == 1:
                primary.upsert_items([ItemSpec("brand-new", ["c1"]), ItemSpec("i5", ["c2"], {"title": "renamed"})])
                primary.delete_items(["i7"])
                primary.ingest([Event("on-new", "u1", "brand-new", EventType.PURCHASE, 0, 1_710_000_000_000)])
            if batch == 3:
                primary.checkpoint()  # the replica goes on from its own state, not the new checkpoint
            status = probe.catchup()
            assert status["applied_seq"] == primary.state.applied_seq == primary.store.last_seq()
            assert probe.snapshot() == state_snapshot(primary.state)
        assert status["reloads"] == 0
    finally:
        probe.close()


def test_a_replica_started_late_recovers_then_follows(primary):
    primary.ingest(traffic(10, 300))
    probe = Probe(primary.data_dir)  # checkpoint + the log after it
    try:
        assert probe.snapshot() == state_snapshot(primary.state)
        primary.ingest(traffic(11, 50))
        probe.catchup()
        assert probe.snapshot() == state_snapshot(primary.state)
    finally:
        probe.close()


@pytest.mark.parametrize("replica_applied_them", [True, False], ids=["applied", "never-applied"])
def test_a_forgotten_user_vanishes_from_replicas(primary, replica_applied_them):
    """The marker makes the replica reload from the checkpoint written with it, whether it had applied the
    erased records or finds them gone (a gap before the marker): it ends equal to the primary, without the user."""
    probe = Probe(primary.data_dir)
    try:
        victim = [Event(f"v{i}", "victim", f"i{i}", EventType.PURCHASE, 0, 1_710_000_000_000 + i) for i in range(5)]
        primary.ingest(traffic(20, 100) + victim + traffic(21, 100))
        if replica_applied_them:
            probe.catchup()
        result = primary.forget_user("victim")
        assert result.events_erased == 5
        primary.ingest(traffic(22, 50))
        status = probe.catchup()
        assert status["reloads"] >= 1 and status["applied_seq"] == primary.state.applied_seq > result.durable_seq
        replica = probe.snapshot()
        assert "victim" not in replica["users"]
        assert replica == state_snapshot(primary.state)
        log = b"".join(payload for _, payload in primary.store.iter_log())
        assert b"victim" not in log  # the marker names no one
    finally:
        probe.close()


def test_reranker_swaps_reach_replicas_at_their_seq(primary, tmp_path):
    from test_rerank import FEATURE_SPEC, make_model

    good = make_model(tmp_path / "good.onnx", sidecar={"feature_spec": FEATURE_SPEC, "dim": DIM, "version": "good-v1"})
    other = make_model(tmp_path / "other.onnx", seed=3,
                       sidecar={"feature_spec": FEATURE_SPEC, "dim": DIM, "version": "other-v2"})
    probe = Probe(primary.data_dir)
    try:
        assert probe.catchup()["reranker"] is None
        loaded = primary.load_reranker(good)
        status = probe.catchup()
        assert status["reranker"] == "good-v1" and status["applied_seq"] == loaded["durable_seq"]
        primary.load_reranker(other)
        assert probe.catchup()["reranker"] == "other-v2"
        unloaded = primary.unload_reranker()
        status = probe.catchup()
        assert status["reranker"] is None and status["applied_seq"] == unloaded["durable_seq"]
        primary.load_reranker(good)
    finally:
        probe.close()
    late = Probe(primary.data_dir)  # a replica (re)started later serves what the primary serves now
    try:
        assert late.catchup()["reranker"] == "good-v1"
    finally:
        late.close()


def test_a_replica_adopts_a_map_the_primary_grew(tmp_path):
    store = Store(tmp_path, initial_map_size=256 << 10)
    vector = np.ones(DIM, np.float32) / np.sqrt(DIM)
    upsert = lambda i: LogEntry(codec.encode_upsert(ItemSpec(f"item-{i}", ["c"], {"blob": "x" * 2000}, vector)))  # noqa: E731
    store.append_log([upsert(i) for i in range(10)])
    probe = Probe(tmp_path, map_bytes=256 << 10)  # this mapping is outgrown below
    try:
        for start in range(10, 2010, 500):
            store.append_log([upsert(i) for i in range(start, start + 500)])
        assert store.stats()["map_size"] > 2 * (256 << 10)
        status = probe.catchup()
        assert status["applied_seq"] == store.last_seq() == 2010
    finally:
        probe.close()
        store.close()


def test_min_seq_is_waited_for_refused_beyond_the_log(primary):
    ack = primary.ingest(traffic(30, 5))
    primary.wait_applied(ack.durable_seq)  # applied already: returns at once
    with pytest.raises(OutOfRange) as error:
        primary.wait_applied(primary.store.last_seq() + 1)
    assert error.value.field == "min_seq"


def test_wakeups_reach_live_replicas_and_drop_dead_ones(tmp_path):
    sender = WakeupSender(tmp_path)
    receiver = WakeupReceiver(tmp_path)
    try:
        assert sender.replicas == 1
        sender.send()
        assert receiver.wait(1.0)
        assert not receiver.wait(0.01)  # hints are consumed
        os.mkfifo(tmp_path / "424242.fifo")  # a FIFO without a reader: the remains of a replica killed -9
        sender._listed_mtime = None  # directory mtimes are coarse: list again now
        sender.send()
        assert not (tmp_path / "424242.fifo").exists() and sender.replicas == 1
    finally:
        receiver.close()
        sender.close()
    assert not list(tmp_path.glob("*.fifo"))


def test_control_records_round_trip():
    assert codec.decode(codec.encode_user_forgotten([3, 9, 2**40])) == codec.UserForgotten([3, 9, 2**40])
    assert codec.decode(codec.encode_user_forgotten([])) == codec.UserForgotten([])
    assert codec.decode(codec.encode_reranker("/m/a.onnx", "v1")) == codec.RerankerSwap("/m/a.onnx", "v1")
    with pytest.raises(ValueError):
        codec.decode(codec.encode_user_forgotten([1, 2])[:-1])  # truncated


def test_a_token_of_another_log_is_refused_not_misread(primary):
    from streamrec.engine.errors import FailedPrecondition

    assert primary.served_by().log_id == primary.store.log_id != ""
    with pytest.raises(FailedPrecondition) as error:
        primary.wait_applied(1, log_id="another-primarys-log")
    assert error.value.field == "log_id"
    primary.wait_applied(1, log_id=primary.store.log_id)  # its own log: served


def test_the_session_follows_one_log_and_starts_over_on_another():
    from streamrec.clients.session import Session
    from streamrec.v1 import events_pb2, recommend_pb2

    session = Session()
    session.observe(events_pb2.EventAck(durable_seq=40, log_id="A"))
    request = session.stamp(recommend_pb2.RecommendRequest(user_id="u"))
    assert (request.min_seq, request.log_id) == (40, "A")
    session.observe(events_pb2.EventAck(durable_seq=7, log_id="B"))  # the store was replaced: a new clock
    assert (session.seq, session.log_id) == (7, "B")
    assert Session("eventual").stamp(recommend_pb2.RecommendRequest(user_id="u")).min_seq == 0
