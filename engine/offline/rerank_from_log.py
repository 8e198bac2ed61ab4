"""A reranker trained on a deployment's own log (`streamrec train-reranker --from-log DATA_DIR`, issue 20).

The examples are what the deployment showed and what came of it: impressions whose feature rows were logged
when they were answered (EngineConfig.impression_features) and that got at least one attributed click or
purchase. The features are the serving ones at answer time, so nothing the user did afterwards leaks in.

By time: the first (1 - test_fraction) of those impressions train (one list per clicked item: it, then the
shown items not clicked, the same listwise loss as rerank_training.py; the last validation_fraction of them
chooses the epoch) and the rest is the held-out tail, where the lift is measured: NDCG@10 of the clicked items
in the order served against the order the new model gives the same shown items (a logged-list replay: it can
only reorder what was shown).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from streamrec.engine.config import STORE_FOLDER
from streamrec.engine.feedback.impressions import FOLDER as IMPRESSIONS_FOLDER
from streamrec.engine.feedback.impressions import ImpressionLog
from streamrec.engine.offline.rerank_training import Impressions, TrainConfig, train_and_export
from streamrec.engine.rerank.features import feature_count
from streamrec.engine.rerank.reranker import Reranker, sidecar_path

POSITIVE = ("click", "add_to_cart", "purchase")  # outcomes that make a shown item a positive


def log_folder(data_dir: str | Path) -> Path:
    data_dir = Path(data_dir)
    for folder in (data_dir / STORE_FOLDER / IMPRESSIONS_FOLDER, data_dir / IMPRESSIONS_FOLDER, data_dir):
        if (folder / "data.mdb").exists():
            return folder
    raise FileNotFoundError(f"no impression log under {data_dir} (expected {data_dir / STORE_FOLDER / IMPRESSIONS_FOLDER})")


def logged_lists(folder: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """[(features [n, F], positive bool [n])] of the impressions with features and a positive outcome, oldest first."""
    log = ImpressionLog(folder, readonly=True)
    counts = {"impressions": 0, "with_features": 0, "with_positive": 0}
    lists = []
    try:
        for impression in log.iter_impressions():
            counts["impressions"] += 1
            features = log.features(impression.recommendation_id)
            if features is None:
                continue
            counts["with_features"] += 1
            positive = np.zeros(len(impression.item_ids), bool)
            for kind, _item, position, *_ in impression.outcomes:
                if kind in POSITIVE:
                    positive[position - 1] = True
            if positive.any() and len(features) == len(positive):
                counts["with_positive"] += 1
                lists.append((features, positive))
    finally:
        log.close()
    return lists, counts


def build_impressions(lists: list[tuple[np.ndarray, np.ndarray]], cfg: TrainConfig) -> Impressions:
    valid_from = int(len(lists) * (1.0 - cfg.validation_fraction))
    blocks = []
    out = Impressions(np.zeros(0), np.zeros(0))
    for index, (features, positive) in enumerate(lists):
        if index >= valid_from:
            out.valid_lists.append(features)
            out.valid_positive.append(int(np.flatnonzero(positive)[0]))
            continue
        negatives = np.flatnonzero(~positive)[: cfg.list_size - 1]
        for p in np.flatnonzero(positive):
            block = np.zeros((cfg.list_size, features.shape[1]), np.float32)
            rows = np.concatenate([[p], negatives])
            block[: len(rows)] = features[rows]
            blocks.append(block)
    width = lists[0][0].shape[1] if lists else 0
    out.train_lists = np.stack(blocks) if blocks else np.zeros((0, cfg.list_size, width), np.float32)
    out.train_mask = np.any(out.train_lists != 0, axis=2)
    if len(out.train_mask):
        out.train_mask[:, 0] = True
    out.train_logw = np.zeros(out.train_mask.shape, np.float32)
    out.stats = {"train_lists": len(blocks), "valid_lists": len(out.valid_lists)}
    return out


def ndcg(order: np.ndarray, positive: np.ndarray, k: int = 10) -> float:
    gains = positive[order[:k]] / np.log2(np.arange(2, min(k, len(order)) + 2))
    ideal = 1.0 / np.log2(np.arange(2, min(k, int(positive.sum())) + 2))
    return float(gains.sum() / ideal.sum()) if ideal.size else 0.0


def measure_log_lift(model_path: Path, dim: int, tail: list[tuple[np.ndarray, np.ndarray]], k: int = 10) -> dict:
    """NDCG@k of the positives in the served order vs the model's order of the same shown items, held-out tail."""
    model = Reranker(dim, provider="cpu").load(model_path)
    served, reranked = [], []
    for features, positive in tail:
        served.append(ndcg(np.arange(len(positive)), positive, k))
        reranked.append(ndcg(np.argsort(-model.score(features), kind="stable"), positive, k))
    diff = np.asarray(reranked) - np.asarray(served)
    return {"lists": len(tail), f"served_ndcg@{k}": float(np.mean(served)) if served else None,
            f"reranked_ndcg@{k}": float(np.mean(reranked)) if reranked else None,
            "ndcg_diff": float(diff.mean()) if len(diff) else None,
            "ndcg_diff_se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None,
            "lists_better": int((diff > 0).sum()), "lists_worse": int((diff < 0).sum())}


def train_reranker_from_log(data_dir: str | Path, out: Path, cfg: TrainConfig, command: str = "",
                            test_fraction: float = 0.2) -> dict:
    started = time.perf_counter()
    lists, counts = logged_lists(log_folder(data_dir))
    n_test = int(len(lists) * test_fraction)
    if len(lists) - n_test < 20:
        raise RuntimeError(f"too few logged impressions with features and a click to train on: {counts} "
                           "(serve with --impression-features > 0 and let events name their recommendation_id)")
    if lists[0][0].shape[1] != feature_count(cfg.dim):
        raise RuntimeError(f"the log's feature rows have {lists[0][0].shape[1]} columns; dimension {cfg.dim} makes "
                           f"{feature_count(cfg.dim)} (give --dim of the server that logged them)")
    train, tail = lists[: len(lists) - n_test], lists[len(lists) - n_test:]
    impressions = build_impressions(train, cfg)
    impressions.stats.update(counts)
    metadata = train_and_export(impressions, Path(out), cfg, f"log-{Path(data_dir).name}", command)
    metadata["lift"] = {"held_out_tail": measure_log_lift(Path(out), cfg.dim, tail), "test_fraction": test_fraction}
    metadata["seconds"] = round(time.perf_counter() - started, 1)
    sidecar_path(out).write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata
