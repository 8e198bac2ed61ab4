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
