"""The sequence user tower (engine/offline/sequence.py): ONNX export round trip and deterministic inference,
on a tiny random model (fast; skipped without torch)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from streamrec.engine.api import Event, EventType  # noqa: E402
from streamrec.engine.offline import sequence as seq  # noqa: E402
from streamrec.engine.offline.datasets import build_interactions  # noqa: E402
from streamrec.engine.offline.evaluation import Catalog  # noqa: E402

LENGTH, DIM, ITEMS = 12, 16, 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((ITEMS, DIM)).astype(np.float32)
    model = seq.build_model(vectors, LENGTH, DIM, blocks=2, heads=2, dropout=0.1, seed=0)
    with torch.no_grad():  # move off the identity/zero init so the check exercises every weight
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    path = str(tmp_path_factory.mktemp("seq") / "tower.onnx")
    seq.export_onnx(model, path, LENGTH)
    return model, vectors, path


def test_export_round_trip_matches_torch(tiny):
    model, _, path = tiny
    assert seq.check_export(model, path, LENGTH, trials=16, seed=1) < 1e-4


def test_full_and_empty_padding_windows_match_torch(tiny):
    model, _, path = tiny
    session = seq.open_session(path)
    for n in (1, LENGTH):
        feeds = {name: np.zeros((1, LENGTH), np.int64) for name in ("items", "types", "gaps", "mask")}
        feeds["items"][0, LENGTH - n:] = np.arange(1, n + 1)
        feeds["types"][0, LENGTH - n:] = seq.type_token(int(EventType.RATING), 4.0)
        feeds["gaps"][0, LENGTH - n:] = 3
        feeds["mask"][0, LENGTH - n:] = 1
        with torch.no_grad():
            expected = model(*(torch.from_numpy(feeds[k]) for k in ("items", "types", "gaps", "mask"))).numpy()
        got = session.run(["query"], feeds)[0]
        assert np.max(np.abs(expected - got)) < 1e-4
        assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_same_history_gives_bit_identical_vectors(tiny):
    _, vectors, path = tiny
    catalog = Catalog([f"i{j}" for j in range(ITEMS)])
    log = build_interactions(["u"] * 20, [f"i{j % ITEMS}" for j in range(20)], [int(EventType.RATING)] * 20,
                             [float(1 + j % 5) for j in range(20)], [1000 * 60 * j * j for j in range(20)])
    towers = [seq.TowerRecommender(path, vectors, catalog, log, LENGTH) for _ in range(2)]
    first, second = towers[0].query("u"), towers[0].query("u")
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() == towers[1].query("u").tobytes()  # a fresh session too
    # learning the same event keeps the two towers identical; the answer excludes the given rows
    for tower in towers:
        tower.learn(Event("e", "u", "i25", EventType.RATING, 5.0, 1000 * 60 * 400 + 1))
    assert towers[0].query("u").tobytes() == towers[1].query("u").tobytes()
    ranked = towers[0].recommend("u", 5, np.array([0, 1, 2], np.int64))
    assert len(ranked) == 5 and not {"i0", "i1", "i2"} & set(ranked)
    assert towers[0].query("nobody") is None  # no history: the tower answers with popularity
    assert len(towers[0].recommend("nobody", 3, np.zeros(0, np.int64))) == 3


def test_training_windows_target_each_next_positive_once():
    catalog = Catalog([f"i{j}" for j in range(ITEMS)])
    n = 30
    log = build_interactions(["u"] * n, [f"i{j}" for j in range(n)], [int(EventType.RATING)] * n,
                             [5.0 if j % 2 else 2.0 for j in range(n)], list(range(n)))
    logs = seq.user_logs(log, catalog)
    windows = seq.training_windows(logs, 8, 4)
    targets = windows["targets"][windows["targets"] > 0] - 1
    assert sorted(targets.tolist()) == [j for j in range(1, n) if j % 2]  # every positive after the first event
    assert windows["items"].shape[1] == 8 and np.all((windows["mask"] > 0) == (windows["items"] > 0))


def test_gap_buckets_and_type_tokens_in_range():
    assert seq.gap_bucket(None) == 1
    assert all(2 <= seq.gap_bucket(g) < seq.N_GAPS for g in (0, 1, 10**3, 10**6, 10**12, 10**18))
    assert all(0 < seq.type_token(t, v) < seq.N_TYPES for t in range(1, 8) for v in (0.0, 1.0, 5.0, 9.0))


def test_train_sequence_for_a_store_from_a_csv_log_serves(tmp_path):
    """`streamrec train-sequence --store DIR --events log.csv --out F`: a model in that store's item space that
    the engine loads and answers with."""
    from streamrec.cli import train_sequence
    from streamrec.engine.config import EngineConfig
    from streamrec.engine.engine import Engine
    from streamrec.engine.offline.datasets import synthetic
    from streamrec.engine.offline.seeding import seed_engine

    data = synthetic(n_users=40, n_items=120, seed=2)
    config = EngineConfig(dim=DIM, sync=False, backend="numpy")
    with Engine(tmp_path / "data" / "lmdb", config) as engine:
        seed_engine(engine, data)
    log = data.interactions
    rows = ["user_id,item_id,type,value,timestamp"] + [
        f"{u},{i},{int(t)},{float(v)},{int(ts)}" for u, i, t, v, ts in
        zip(log.user_ids, log.item_ids, log.types, log.values, log.timestamps_ms)]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "model" / "tower.onnx"
    assert train_sequence.main(["--store", str(tmp_path / "data"), "--events", str(tmp_path / "log.csv"),
                                "--out", str(out), "--epochs", "2", "--length", "8", "--blocks", "1",
                                "--threads", "1"]) == 0
    serving = EngineConfig(dim=DIM, sync=False, backend="numpy", user_model="sequence", sequence_model_path=str(out))
    with Engine(tmp_path / "data" / "lmdb", serving) as engine:
        assert engine.sequence_item_cosine > 0.99
        user = str(log.user_ids[0])
        answer = engine.recommend([engine.build_query(user, 5, rerank=False)])[0]
        assert answer.user_model == "sequence" and len(answer.item_ids) == 5
