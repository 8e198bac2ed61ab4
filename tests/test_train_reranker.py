"""`streamrec train-reranker --events FILE`: a reranker trained on any interaction log (impressions simulated by
replaying it), that the serving validator accepts. Needs the training extra (torch, onnx)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from streamrec.cli import main  # noqa: E402
from streamrec.engine.offline.datasets import synthetic  # noqa: E402
from streamrec.engine.rerank.reranker import Reranker  # noqa: E402


def test_train_reranker_from_a_csv_log(tmp_path, capsys):
    log = synthetic(n_users=80, n_items=200, events_per_user=25, seed=3).interactions
    rows = ["user_id,item_id,type,value,timestamp"] + [
        f"{u},{i},{int(t)},{float(v)},{int(ts)}" for u, i, t, v, ts in
        zip(log.user_ids, log.item_ids, log.types, log.values, log.timestamps_ms)]
    (tmp_path / "shop.csv").write_text("\n".join(rows) + "\n")
    assert main(["train-reranker", "--events", str(tmp_path / "shop.csv")]) == 2  # never over the shipped model
    out = tmp_path / "model" / "reranker.onnx"
    out.parent.mkdir()
    assert main(["train-reranker", "--events", str(tmp_path / "shop.csv"), "--out", str(out), "--dim", "16",
                 "--epochs", "2", "--candidates", "50", "--backend", "numpy"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["dataset"] == "shop" and meta["user_model"] == "ials" and meta["lift"]["evaluated_steps"] > 0
    assert Reranker(16, provider="cpu").load(out).version == meta["version"]


def test_train_reranker_from_a_deployments_log(tmp_path):
    """Answers logged with their features, clicks on the users' planted clusters attributed to them: a model
    trained on that log, accepted by the validator, with the lift measured on the log's held-out tail."""
    import numpy as np

    from streamrec.engine.api import Event, EventType
    from streamrec.engine.config import EngineConfig
    from streamrec.engine.engine import Engine
    from streamrec.engine.offline.datasets import synthetic_truth
    from streamrec.engine.offline.seeding import seed_engine

    truth = synthetic_truth(60, 200, 6, seed=2)
    config = EngineConfig(dim=16, sync=False, backend="numpy", impression_features=1.0)
    rng = np.random.default_rng(0)
    with Engine(tmp_path / "data" / "lmdb", config) as engine:
        seed_engine(engine, synthetic(n_users=60, n_items=200, n_clusters=6, events_per_user=10, seed=2))
        clock = int(__import__('time').time() * 1000)
        for _ in range(4):
            for user in (f"u{u}" for u in range(60)):
                answer = engine.recommend([engine.build_query(user, 8, rerank=False)])[0]
                for rank, item in enumerate(answer.item_ids):
                    if truth.item_cluster[item] in truth.user_clusters[user] and rng.random() < 0.5 / (1 + rank):
                        clock += 1
                        engine.ingest([Event(f"{user}-{clock}", user, item, EventType.CLICK, 1.0, clock,
                                             answer.recommendation_id)])
    out = tmp_path / "from-log.onnx"
    assert main(["train-reranker", "--from-log", str(tmp_path / "data"), "--out", str(out), "--dim", "16",
                 "--epochs", "2"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    tail = meta["lift"]["held_out_tail"]
    assert meta["training"]["impressions"]["with_positive"] > 40 and tail["lists"] > 0
    assert tail["lists_better"] + tail["lists_worse"] <= tail["lists"]
    assert Reranker(16, provider="cpu").load(out).version == meta["version"]
    assert main(["train-reranker", "--from-log", str(tmp_path / "nothing"), "--out", str(out)]) != 0
