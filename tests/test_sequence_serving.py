"""The sequence tower served (engine/sequence/tower.py): a user's query is recomputed after their events, on
the writer (sequence_update "event") or on their next read ("read"), with the same bits either way; the same
log gives bit-identical queries after a restart, on a replica, and however the events were batched; requests
choose the user model and answers say which served; bad models and bad requests are refused by name. The tower
here is hand-built (tests/sequence_model.py); the last test loads the shipped one."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("onnx")  # builds the test tower (extra `test`)

from sequence_model import make_tower  # noqa: E402
from state_snapshot import state_snapshot  # noqa: E402

from streamrec.clients.client import StreamrecClient, make_event  # noqa: E402
from streamrec.engine import SHIPPED_SEQUENCE_MODEL, SequenceModelRejected  # noqa: E402
from streamrec.engine.api import Event, EventType  # noqa: E402
from streamrec.engine.config import EngineConfig  # noqa: E402
from streamrec.engine.engine import Engine  # noqa: E402
from streamrec.engine.errors import FailedPrecondition, InvalidArgument  # noqa: E402
from streamrec.engine.offline.datasets import synthetic  # noqa: E402
from streamrec.engine.offline.seeding import seed_engine  # noqa: E402
from streamrec.server.app import ServerConfig, StreamrecServer  # noqa: E402

DIM, LENGTH = 16, 8
BASE = EngineConfig(dim=DIM, sync=False, backend="numpy", checkpoint_interval_s=3600, checkpoint_every_records=10**9)
T0 = 1_700_000_000_000
PROBE = Path(__file__).with_name("replica_probe.py")


def config(tower: Path | None, **options) -> EngineConfig:
    return EngineConfig(**{**BASE.__dict__, "sequence_model_path": str(tower) if tower else None, **options})


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A seeded store (closed) and a tower trained in its item space: (folder, tower path, item ids)."""
    logging.getLogger("streamrec").setLevel(logging.WARNING)
    folder = tmp_path_factory.mktemp("sequence-serving")
    data = synthetic(n_users=60, n_items=200, seed=5)
    with Engine(folder / "seed" / "lmdb", BASE) as engine:
        seed_engine(engine, data)
        ids = list(data.item_categories)
        vectors = np.stack([engine.get_item(i).vector for i in ids])
    tower = make_tower(folder / "tower.onnx", ids, vectors, LENGTH)
    return folder, tower, ids


def copy_store(seeded, name: str) -> Path:
    import shutil

    folder = seeded[0] / name
    shutil.copytree(seeded[0] / "seed", folder)
    return folder / "lmdb"


def events_for(user: str, items: list[str], start: int = 0) -> list[Event]:
    types = [EventType.CLICK, EventType.RATING, EventType.VIEW, EventType.PURCHASE, EventType.SKIP]
    return [Event(f"{user}-{start + i}", user, item, types[i % 5], 4.0 if types[i % 5] == EventType.RATING else 1.0,
                  T0 + 60_000 * (start + i) ** 2) for i, item in enumerate(items)]


def recommend(engine: Engine, user: str, model: str = "sequence", k: int = 10):
    return engine.recommend([engine.build_query(user, k, user_model=model, rerank=False)])[0]


@pytest.mark.parametrize("update", ["read", "event"])
def test_each_event_moves_the_next_sequence_answer(seeded, update):
    _, tower, ids = seeded
    with Engine(copy_store(seeded, f"moves-{update}"), config(tower, sequence_update=update)) as engine:
        cold = recommend(engine, "newcomer")
        assert cold.strategy == "popular" and cold.user_model == ""
        engine.ingest(events_for("newcomer", [ids[3]]))
        first = recommend(engine, "newcomer")
        assert first.strategy == "personalized" and first.user_model == "sequence"  # from the first event
        vector = engine.state.users.sequence_vectors[engine.state.users.row_of("newcomer")].copy()
        engine.ingest(events_for("newcomer", [ids[150]], start=1))
        second = recommend(engine, "newcomer")
        moved = engine.state.users.sequence_vectors[engine.state.users.row_of("newcomer")]
        assert not np.array_equal(vector, moved)
        assert second.item_ids != first.item_ids
        assert ids[3] not in second.item_ids and ids[150] not in second.item_ids  # seen items stay excluded
        # the iALS answer is still there, per request, and says so
        assert recommend(engine, "newcomer", "ials").user_model == "ials"
        info = engine.user_model_info()
        assert info["default"] == "ials" and info["answers"]["sequence"] >= 2
        assert info["sequence"]["updates"] >= 2 and info["sequence"]["item_space_cosine"] > 0.99


def test_the_query_is_the_model_of_the_users_latest_events(seeded):
    """The served query equals the tower run on the user's history as the API reports it."""
    _, tower, ids = seeded
    from streamrec.engine.sequence.tower import SequenceTower

    with Engine(copy_store(seeded, "direct"), config(tower, sequence_update="event")) as engine:
        engine.ingest(events_for("direct", ids[10:30]))
        users, items = engine.state.users, engine.state.items
        row = users.row_of("direct")
        expected = SequenceTower(tower, DIM).query(users.history[row], items.ids.__getitem__)
        assert users.sequence_vectors[row].tobytes() == expected.tobytes()
        assert abs(float(np.linalg.norm(expected)) - 1.0) < 1e-5


def test_same_log_gives_bit_identical_queries_however_batched_and_after_restart(seeded):
    _, tower, ids = seeded
    rng = np.random.default_rng(0)
    log = []
    for n in range(120):
        user = f"s{rng.integers(0, 25)}" if n % 3 else f"u{rng.integers(0, 60)}"  # new and seeded users
        log += events_for(user, [ids[int(rng.integers(0, len(ids)))]], start=n)
    one_by_one, batched = copy_store(seeded, "one-by-one"), copy_store(seeded, "batched")
    on_event = config(tower, sequence_update="event")
    with Engine(one_by_one, on_event) as a, Engine(batched, on_event) as b:
        for event in log:
            a.ingest([event])
        for start in range(0, len(log), 37):
            b.ingest(log[start:start + 37])
        with a.lock, b.lock:
            live_a, live_b = state_snapshot(a.state), state_snapshot(b.state)
        assert live_a["sequence"] == live_b["sequence"] and len(live_a["sequence"]) > 60
        b.close(checkpoint=False)  # as after a crash: the restart replays the log
    with Engine(batched, on_event) as restarted:
        assert restarted.recovered_records >= len(log)
        with restarted.lock:
            assert state_snapshot(restarted.state)["sequence"] == live_a["sequence"]
        restarted.checkpoint()
    with Engine(batched, on_event) as from_checkpoint:  # rebuilt from the checkpointed histories
        with from_checkpoint.lock:
            assert state_snapshot(from_checkpoint.state)["sequence"] == live_a["sequence"]


def test_a_replica_serves_the_same_queries(seeded):
    _, tower, ids = seeded
    store = copy_store(seeded, "replicated")
    with Engine(store, config(tower, sequence_update="event")) as primary:
        primary.checkpoint()
        probe = subprocess.Popen([sys.executable, str(PROBE), str(store), str(DIM), str(64 << 20), str(tower)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert probe.stdout.readline().strip() == "ready"
            primary.ingest(events_for("r1", ids[:12]) + events_for("r2", ids[40:45]) + events_for("u3", ids[90:95]))
            primary.forget_user("r2")
            primary.ingest(events_for("r1", ids[100:103], start=12))
            probe.stdin.write("catchup\n")
            probe.stdin.flush()
            probe.stdout.readline()
            path = store.parent / "replica.pickle"
            probe.stdin.write(f"snapshot {path}\n")
            probe.stdin.flush()
            assert probe.stdout.readline().strip() == "ok"
            import pickle

            replica = pickle.loads(path.read_bytes())
            with primary.lock:
                mine = state_snapshot(primary.state)
            assert replica["sequence"] == mine["sequence"] and "r1" in mine["sequence"]
            assert "r2" not in replica["sequence"]  # forgotten on the replica too
        finally:
            probe.stdin.write("quit\n")
            probe.stdin.flush()
            probe.wait(30)


def test_a_query_computed_on_read_equals_the_one_computed_on_the_writer(seeded):
    """The same events through both modes: every user's read-time query has the event-time query's bits, a
    read computes only users whose events changed since their last one, and an event makes it stale."""
    _, tower, ids = seeded
    rng = np.random.default_rng(4)
    log = []
    for n in range(60):
        log += events_for(f"m{rng.integers(0, 12)}", [ids[int(rng.integers(0, len(ids)))]], start=n)
    users = sorted({e.user_id for e in log}) + ["u0", "u7"]  # and two seeded users with no new event
    with Engine(copy_store(seeded, "on-read"), config(tower)) as lazy, \
            Engine(copy_store(seeded, "on-event"), config(tower, sequence_update="event")) as eager:
        for start in range(0, len(log), 9):
            lazy.ingest(log[start:start + 9])
            eager.ingest(log[start:start + 9])
        assert lazy.state.sequence_updates == 0  # nothing computed before a read
        for user in users:
            a, b = recommend(lazy, user), recommend(eager, user)
            assert a.item_ids == b.item_ids and a.scores.tobytes() == b.scores.tobytes(), user
        row = lazy.state.users.row_of("m3")
        assert lazy.state.users.sequence_vectors[row].tobytes() == eager.state.users.sequence_vectors[
            eager.state.users.row_of("m3")].tobytes()
        computed = lazy.state.sequence_updates
        assert computed == len(users)
        recommend(lazy, "m3")
        assert lazy.state.sequence_updates == computed  # still current: no recomputation
        lazy.ingest(events_for("m3", [ids[77]], start=500))
        eager.ingest(events_for("m3", [ids[77]], start=500))
        assert recommend(lazy, "m3").item_ids == recommend(eager, "m3").item_ids
        assert lazy.state.sequence_updates == computed + 1


def test_forget_clears_the_sequence_query(seeded):
    _, tower, ids = seeded
    with Engine(copy_store(seeded, "forget"), config(tower, user_model="sequence")) as engine:
        engine.ingest(events_for("gone", ids[:5]))
        view = engine.get_user("gone")  # computes the query on read, as a Recommend would
        row = engine.state.users.row_of("gone")
        assert view.vector.tobytes() == engine.state.users.sequence_vectors[row].tobytes() and np.any(view.vector)
        assert recommend(engine, "gone", "").user_model == "sequence"  # the server default
        engine.forget_user("gone")
        assert recommend(engine, "gone", "").strategy == "popular"
        engine.ingest(events_for("gone", ids[50:51], start=9))  # a new life: one event, its own query
        users = engine.state.users
        row = users.row_of("gone")
        assert list(users.history[row])[0][0] == engine.state.items.rows[ids[50]] and len(users.history[row]) == 1


def test_requests_and_models_are_refused_by_name(seeded, tmp_path):
    folder, tower, ids = seeded
    with Engine(copy_store(seeded, "no-model"), BASE) as engine:
        with pytest.raises(FailedPrecondition) as error:
            recommend(engine, "1")
        assert error.value.field == "user_model"
        with pytest.raises(InvalidArgument) as error:
            engine.build_query("1", 5, user_model="transformer")
        assert error.value.field == "user_model"
    with pytest.raises(ValueError, match="sequence_model_path"):
        Engine(copy_store(seeded, "no-path"), config(None, user_model="sequence"))
    other = make_tower(tmp_path / "other.onnx", ids, np.random.default_rng(9).standard_normal((len(ids), DIM)), LENGTH)
    with pytest.raises(SequenceModelRejected, match="another item space"):
        Engine(copy_store(seeded, "other-space"), config(other))
    wide = make_tower(tmp_path / "wide.onnx", ids, np.random.default_rng(9).standard_normal((len(ids), 2 * DIM)), LENGTH)
    with pytest.raises(SequenceModelRejected, match="dimension 32; the engine's is 16"):
        Engine(copy_store(seeded, "other-dim"), config(wide))
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    (tmp_path / "broken.json").write_text(Path(tower).with_suffix(".json").read_text())
    with pytest.raises(SequenceModelRejected, match="not a loadable ONNX model"):
        Engine(copy_store(seeded, "broken"), config(tmp_path / "broken.onnx"))


def test_grpc_chooses_the_user_model_and_reports_it(seeded):
    _, tower, ids = seeded
    store = copy_store(seeded, "grpc")
    server = StreamrecServer(ServerConfig(port=0, data_dir=store.parent, dataset="none", engine=config(tower)))
    server.start()
    try:
        with StreamrecClient(f"127.0.0.1:{server.port}") as client:
            client.send_events([make_event("g1", ids[7], int(EventType.CLICK), 1.0, T0, event_id="g1-0")])
            answer = client.recommend("g1", k=5, user_model="sequence", rerank=False)
            assert answer.strategy == "personalized" and answer.served_by.user_model == "sequence"
            assert client.recommend("g1", k=5, rerank=False).served_by.user_model == "ials" or \
                client.recommend("g1", k=5, rerank=False).strategy == "popular"  # a click alone may not personalise iALS
            stats = client.stats()
            assert stats.user_model.default_model == "ials" and stats.user_model.sequence_length == LENGTH
            assert stats.user_model.answers["sequence"] >= 1 and stats.user_model.sequence_updates >= 1
            request = client.recommend_request("g1", 5)
            request.user_model = 7  # a number the proto does not name
            with pytest.raises(grpc.RpcError) as error:
                client.recommender.Recommend(request)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_model" in error.value.details()
            assert client.recommend("g1", k=3).items  # still serving
    finally:
        server.stop()


def test_the_shipped_model_fits_the_store_serve_seeds(tmp_path):
    """`serve --user-model sequence` on ML-100K: the shipped model loads against a fresh seeding and answers."""
    if not SHIPPED_SEQUENCE_MODEL.exists():
        pytest.fail(f"the shipped sequence model is missing: {SHIPPED_SEQUENCE_MODEL}")
    from streamrec.engine.offline.seeding import open_engine

    cfg = EngineConfig(sync=False, backend="numpy", user_model="sequence", sequence_model_path=str(SHIPPED_SEQUENCE_MODEL))
    with open_engine(tmp_path, cfg, "ml-100k") as engine:
        assert engine.sequence_item_cosine > 0.99
        answer = engine.recommend([engine.build_query("196", 10)])[0]
        assert answer.user_model == "sequence" and answer.strategy == "personalized" and len(answer.item_ids) == 10


def test_auto_serves_the_tower_only_where_it_fits(seeded, tmp_path):
    _, tower, ids = seeded
    with Engine(copy_store(seeded, "auto-fits"), config(tower, user_model="auto")) as engine:
        engine.ingest(events_for("a1", ids[:3]))
        assert engine.config.user_model == "sequence" and recommend(engine, "a1", "").user_model == "sequence"
        assert engine.user_model_info()["default"] == "sequence"
    other = make_tower(tmp_path / "other.onnx", ids, np.random.default_rng(3).standard_normal((len(ids), DIM)), LENGTH)
    (tmp_path / "gone.json").write_text(Path(tower).with_suffix(".json").read_text())  # a sidecar, no model file
    for model in (other, tmp_path / "gone.onnx"):
        with Engine(copy_store(seeded, f"auto-{Path(model).stem}"), config(model, user_model="auto")) as engine:
            engine.ingest(events_for("a1", ids[:3]))
            assert engine.config.user_model == "ials" and engine.state.sequence is None
            assert recommend(engine, "a1", "").user_model == "ials"
            with pytest.raises(FailedPrecondition):
                recommend(engine, "a1", "sequence")


@pytest.mark.parametrize("flags, expected", [
    ([], ("auto", str(SHIPPED_SEQUENCE_MODEL))),
    (["--user-model", "ials"], ("ials", None)),
    (["--user-model", "sequence"], ("sequence", str(SHIPPED_SEQUENCE_MODEL))),
    (["--sequence-model", "none"], ("ials", None)),
    (["--user-model", "ials", "--sequence-model", "/m.onnx"], ("ials", "/m.onnx")),
])
def test_serve_flags_choose_the_user_model(flags, expected, monkeypatch):
    from streamrec.cli import build_parser
    from streamrec.cli.serve import user_model_settings

    for name in ("STREAMREC_USER_MODEL", "STREAMREC_SEQUENCE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["serve", *flags])
    assert user_model_settings(args) == expected


def test_the_reranker_reorders_by_default_only_the_user_model_it_was_trained_behind(seeded, tmp_path):
    """The shipped reranker's user features are iALS queries: sequence answers skip it unless asked."""
    import test_rerank

    from streamrec.engine.rerank.features import FEATURE_SPEC, feature_count

    _, tower, ids = seeded
    weights = np.random.default_rng(0).standard_normal((feature_count(DIM), 1)).astype(np.float32)
    behind_ials = test_rerank.make_model(tmp_path / "ials.onnx", weights, width=feature_count(DIM),
                                         sidecar={"feature_spec": FEATURE_SPEC, "dim": DIM, "version": "r-ials"})
    behind_sequence = test_rerank.make_model(tmp_path / "seq.onnx", weights, width=feature_count(DIM),
                                             sidecar={"feature_spec": FEATURE_SPEC, "dim": DIM, "version": "r-seq",
                                                      "user_model": "sequence"})
    with Engine(copy_store(seeded, "rerank-by-model"), config(tower, reranker_path=str(behind_ials))) as engine:
        engine.ingest(events_for("rr", ids[:6]))

        def answer(model, rerank=None):
            return engine.recommend([engine.build_query("rr", 5, user_model=model, rerank=rerank)])[0]

        assert answer("ials").reranker == "r-ials"
        assert answer("sequence").reranker == "" and answer("sequence", rerank=True).reranker == "r-ials"
        assert engine.reranker_info()["user_model"] == "ials"
        engine.load_reranker(behind_sequence)
        assert answer("sequence").reranker == "r-seq" and answer("ials").reranker == ""
