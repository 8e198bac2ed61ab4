"""Training, export and measurement of the reranking model (`streamrec train-reranker`).

Impressions come from the event log, through the prequential replay of engine/offline/evaluation.py:
  * the log is split by time: `seed` part (first `seed_fraction`), `impression` part (up to
    `train_fraction`), and the held-out `test` part (the rest, used only by `measure_lift`);
  * an engine seeded with the seed part replays the impression part (test-then-learn): at every positive
    event on an unseen item the engine retrieves `candidates` items for that user (retrieval only), and
    when the held item is among them the candidates become one impression (the held item is the positive).
    Features are built at that moment by rerank/features.build_features, the function serving uses.
  * training lists keep the positive, the `hard` best-retrieved negatives and random other negatives
    (`list_size` rows in all); the last `validation_fraction` of the impression part keeps full lists and
    picks the epoch (NDCG@10 among the candidates).

Model: a DCN-v2 style network (input standardisation folded into the graph, `cross_layers` low-rank cross
layers, then an MLP) scoring each row; listwise loss: softmax cross-entropy of the positive in its list.
Export: ONNX (opset 17, dynamic batch), `onnx.checker`, ONNX Runtime vs PyTorch on random inputs (max abs
difference <= 1e-5), then the serving validator (engine/rerank/reranker.py) must accept the file.

torch and onnx are imported only inside the functions that need them (extra `train`);
`measure_lift` needs neither (ONNX Runtime only).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.offline.datasets import Dataset
from streamrec.engine.offline.evaluation import (
    Catalog,
    StreamrecEngine,
    hit_and_ndcg,
    prequential_replay,
    replay_events,
    time_split,
)
from streamrec.engine.offline.seeding import seed_engine
from streamrec.engine.rerank.features import FEATURE_SPEC, feature_count, feature_names
from streamrec.engine.rerank.reranker import Reranker, sidecar_path

log = logging.getLogger(__name__)

EXPORT_TOLERANCE = 1e-5


@dataclass
class TrainConfig:
    dataset: str = "ml-100k"
    dim: int = 64
    seed_fraction: float = 0.6
    train_fraction: float = 0.8  # the test part (after it) is never used for training
    validation_fraction: float = 0.25  # of the impression part, by time
    candidates: int = 200
    list_size: int = 64
    hard: int = 15
    inputs: str = "dot+scalars"  # feature groups the network reads: all, dot+scalars (u*v and scalars), scalars
    cross_layers: int = 2
    cross_rank: int = 32
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    epochs: int = 12
    patience: int = 4
    batch_lists: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-5
    seed: int = 0
    threads: int = 1
    backend: str = "numba"
    # The retrieval the reranker is trained behind: "sequence" trains a sequence tower on each replay engine's
    # seed part (against its item vectors) and serves it; the reranker's user features are then its queries.
    user_model: str = "ials"


# ---------------------------------------------------------------------------------------------------------
# Replays
# ---------------------------------------------------------------------------------------------------------


class _RecordingEngine(StreamrecEngine):
    """StreamrecEngine (retrieval order only) that keeps its last answer (ids, scores, strategy) and knows
    the replay position of the event being asked about (= events learned so far)."""

    def __init__(self, engine: Engine, name: str = "retrieval"):
        super().__init__(engine, name)
        self.last = None
        self.learned = 0

    def learn(self, event) -> None:
        super().learn(event)
        self.learned += 1

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        self.flush()
        answer = self.engine.recommend([self.engine.build_query(user_id, k, rerank=False)])[0]
        self.strategies[answer.strategy] = self.strategies.get(answer.strategy, 0) + 1
        self.last = answer
        return list(answer.item_ids)


def _open_seeded(folder: Path, train: Dataset, config: EngineConfig, seed: int) -> Engine:
    """An engine seeded with `train`; with config.user_model "sequence", a tower is first trained on `train`
    alone against the seeded item vectors (folder/../tower.onnx) and the engine reopened serving it."""
    engine = Engine(folder, replace(config, user_model="ials", sequence_model_path=None))
    seed_engine(engine, train, seed)
    if config.user_model != "sequence":
        return engine
    from streamrec.engine.offline import sequence as seq

    ids, vectors = seq.engine_item_vectors(engine, list(train.item_categories))
    engine.close()
    tower = folder.parent / f"{folder.name}-tower.onnx"
    seq.fit_and_export(train, Catalog(ids), vectors, str(tower), seq.TowerParams(dim=config.dim, refit=True, seed=seed),
                       say=log.info)
    return Engine(folder, replace(config, sequence_model_path=str(tower)))


def step_features(engine: Engine, user_id: str, item_ids: list[str], scores: np.ndarray) -> np.ndarray:
    """The feature rows serving would build for this user and these retrieved candidates, now."""
    return engine.rerank_features(user_id, item_ids, scores)


@dataclass
class Impressions:
    train_lists: np.ndarray   # float32 [I, L, F]; row 0 of each list is the positive
    train_mask: np.ndarray    # bool [I, L]
    train_logw: np.ndarray = None  # float32 [I, L]: log of how many candidates each row stands for (sampled softmax)
    valid_lists: list[np.ndarray] = field(default_factory=list)  # full candidate lists, float32 [C_i, F]
    valid_positive: list[int] = field(default_factory=list)      # index of the held item in each
    stats: dict = field(default_factory=dict)


def collect_impressions(dataset: Dataset, cfg: TrainConfig, workdir: Path) -> Impressions:
    """Replay the impression part through an engine seeded with the seed part (see the module docstring)."""
    catalog = Catalog.of(dataset)
    train_part, _ = time_split(dataset, cfg.train_fraction)
    seed_part, impression_log = time_split(train_part, cfg.seed_fraction / cfg.train_fraction)
    events = replay_events(impression_log, "impression-")
    valid_from = int(len(events) * (1.0 - cfg.validation_fraction))
    engine_config = EngineConfig(dim=cfg.dim, sync=False, backend=cfg.backend, rerank_by_default=False,
                                 user_model=cfg.user_model)  # "sequence": _open_seeded trains its tower
    rng = np.random.default_rng(cfg.seed)
    train_lists: list[np.ndarray] = []
    train_logw: list[np.ndarray] = []
    out = Impressions(np.zeros(0), np.zeros(0))
    counts = {"steps": 0, "personalized": 0, "positive_in_candidates": 0, "train": 0, "valid": 0}
    engine = _open_seeded(workdir / "impressions", seed_part, engine_config, cfg.seed)
    try:
        model = _RecordingEngine(engine)

        def on_step(user_id: str, held: str, ranked: list[str]) -> None:
            counts["steps"] += 1
            answer = model.last
            if answer.strategy != "personalized":
                return
            counts["personalized"] += 1
            try:
                positive = answer.item_ids.index(held)
            except ValueError:
                return
            counts["positive_in_candidates"] += 1
            features = step_features(engine, user_id, answer.item_ids, answer.scores)
            if model.learned >= valid_from:
                out.valid_lists.append(features)
                out.valid_positive.append(positive)
                counts["valid"] += 1
                return
            others = np.delete(np.arange(len(features)), positive)
            hard = others[: cfg.hard]
            rest = others[cfg.hard:]
            extra = rng.choice(rest, size=min(len(rest), cfg.list_size - 1 - len(hard)), replace=False) if len(rest) else rest
            picks = np.concatenate([[positive], hard, np.sort(extra)]).astype(np.int64)
            block = np.zeros((cfg.list_size, features.shape[1]), np.float32)
            block[: len(picks)] = features[picks]
            train_lists.append(block)
            logw = np.zeros(cfg.list_size, np.float32)  # logQ correction: each random negative stands for len(rest)/len(extra)
            if len(extra):
                logw[1 + len(hard): len(picks)] = np.log(len(rest) / len(extra))
            train_logw.append(logw)
            counts["train"] += 1

        result = prequential_replay(events, model, k=10, on_step=on_step, catalog=catalog,
                                    history=seed_part.interactions, n_candidates=cfg.candidates)
    finally:
        engine.close(checkpoint=False)
    out.train_lists = np.stack(train_lists) if train_lists else np.zeros((0, cfg.list_size, feature_count(cfg.dim)), np.float32)
    out.train_logw = np.stack(train_logw) if train_logw else np.zeros((0, cfg.list_size), np.float32)
    out.train_mask = np.any(out.train_lists != 0, axis=2)
    out.train_mask[:, 0] = True
    out.stats = {**counts, "replay_events": len(events), "retrieval_hr@10": result.hr, "retrieval_ndcg@10": result.ndcg,
                 "seed_events": len(seed_part.interactions), "strategies": result.details.get("strategies", {})}
    log.info("impressions: %s", out.stats)
    return out


def measure_lift(dataset: Dataset, model_path: str | Path, train_fraction: float = 0.8, candidates: int = 200,
                 k: int = 10, dim: int = 64, seed: int = 0, backend: str = "numba", workdir: Path | None = None,
                 check_offline: bool = True, user_model: str = "ials") -> dict:
    """Prequential replay of the test part (after `train_fraction`) through an engine seeded with the part
    before it, with the reranker loaded. At each evaluated step the same engine state answers twice:
    retrieval only (the harness's metrics) and retrieval + rerank through the serving path
    (RerankOptions on), both over the same `candidates` retrieved items. check_offline also rebuilds the
    features of the step like training does and scores them with the model directly: the served order
    must match (train/serve parity)."""
    catalog = Catalog.of(dataset)
    train, test_log = time_split(dataset, train_fraction)
    events = replay_events(test_log, "test-")
    hits_b, gains_b = [], []
    mismatches = 0
    reranked_steps = 0
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        config = EngineConfig(dim=dim, sync=False, backend=backend, rerank_by_default=False, rerank_candidates=candidates,
                              user_model=user_model)
        engine = _open_seeded(Path(tmp) / "lift", train, config, seed)
        try:
            engine.load_reranker(model_path)
            model = _RecordingEngine(engine)
            direct = engine.reranker.model

            def on_step(user_id: str, held: str, ranked: list[str]) -> None:
                nonlocal mismatches, reranked_steps
                answer = engine.recommend([engine.build_query(user_id, k, rerank=True, candidates=candidates)])[0]
                hit, gain = hit_and_ndcg(answer.item_ids, held, k)
                hits_b.append(hit)
                gains_b.append(gain)
                if answer.reranker:
                    reranked_steps += 1
                    if check_offline:
                        last = model.last
                        scores = direct.score(step_features(engine, user_id, last.item_ids, last.scores))
                        offline = [last.item_ids[j] for j in np.argsort(-scores, kind="stable")[:k]]
                        mismatches += offline != list(answer.item_ids)

            result = prequential_replay(events, model, k=k, on_step=on_step, catalog=catalog,
                                        history=train.interactions, n_candidates=candidates)
        finally:
            engine.close(checkpoint=False)
    hr_b, ndcg_b = float(np.mean(hits_b)), float(np.mean(gains_b))
    diff = np.asarray(gains_b, np.float64) - result.gains  # paired: same step, same candidates
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return {
        "dataset": dataset.name, "train_fraction": train_fraction, "test_events": len(events),
        "evaluated_steps": result.events, "reranked_steps": reranked_steps, "candidates": candidates, "k": k,
        "retrieval": {f"hr@{k}": result.hr, f"ndcg@{k}": result.ndcg},
        "rerank": {f"hr@{k}": hr_b, f"ndcg@{k}": ndcg_b},
        "ndcg_lift_rel": (ndcg_b / result.ndcg - 1.0) if result.ndcg else None,
        "hr_lift_rel": (hr_b / result.hr - 1.0) if result.hr else None,
        "ndcg_diff": ndcg_b - result.ndcg, "ndcg_diff_se": se,  # standard error of the paired per-step difference
        "steps_better": int((diff > 0).sum()), "steps_worse": int((diff < 0).sum()),
        "strategies": result.details.get("strategies", {}), "offline_mismatches": mismatches if check_offline else None,
        "seconds": round(result.seconds, 1), "model": str(model_path), "user_model": user_model,
    }


# ---------------------------------------------------------------------------------------------------------
# Model (torch, imported lazily)
# ---------------------------------------------------------------------------------------------------------


def build_model(width: int, mean: np.ndarray, std: np.ndarray, cfg: TrainConfig):
    import torch
    from torch import nn

    class CrossLayer(nn.Module):
        """DCN-v2 low-rank cross: x_{l+1} = x0 * (U (V x_l) + b) + x_l."""

        def __init__(self, width: int, rank: int):
            super().__init__()
            self.v = nn.Linear(width, rank, bias=False)
            self.u = nn.Linear(rank, width)
            nn.init.zeros_(self.u.weight)  # starts as the identity map

        def forward(self, x0, x):
            return x0 * self.u(self.v(x)) + x

    keep = np.flatnonzero(input_mask(width, cfg))
    used = len(keep)

    class RerankNet(nn.Module):
        """Reads the columns `cfg.inputs` names (one Gather in the graph; the input stays [N, width])."""

        def __init__(self):
            super().__init__()
            self.subset = used < width
            self.register_buffer("keep", torch.as_tensor(keep, dtype=torch.int64))
            self.register_buffer("mean", torch.as_tensor(np.asarray(mean)[keep], dtype=torch.float32))
            self.register_buffer("inv_std", torch.as_tensor(1.0 / np.asarray(std)[keep], dtype=torch.float32))
            self.cross = nn.ModuleList(CrossLayer(used, cfg.cross_rank) for _ in range(cfg.cross_layers))
            layers: list[nn.Module] = []
            previous = used
            for size in cfg.hidden:
                layers += [nn.Linear(previous, size), nn.ReLU(), nn.Dropout(cfg.dropout)]
                previous = size
            layers.append(nn.Linear(previous, 1))
            self.deep = nn.Sequential(*layers)

        def forward(self, features):
            if self.subset:
                features = features.index_select(1, self.keep)
            x0 = (features - self.mean) * self.inv_std
            x = x0
            for layer in self.cross:
                x = layer(x0, x)
            return self.deep(x).reshape(-1)

    return RerankNet()


def input_mask(width: int, cfg: TrainConfig) -> np.ndarray:
    """1 for the features the network reads, 0 for ignored ones (folded into the standardisation)."""
    dim = cfg.dim
    keep = np.ones(width, np.float32)
    if cfg.inputs in ("dot+scalars", "scalars"):
        keep[: 2 * dim] = 0.0
    if cfg.inputs == "scalars":
        keep[2 * dim: 3 * dim] = 0.0
    elif cfg.inputs not in ("all", "dot+scalars"):
        raise ValueError(f"inputs must be all, dot+scalars or scalars, got {cfg.inputs!r}")
    return keep


def _ndcg_of_lists(score_fn, lists: list[np.ndarray], positives: list[int], k: int = 10) -> tuple[float, float]:
    """(HR@k, NDCG@k) of ranking each full candidate list by score_fn(features) -> scores."""
    hits, gains = [], []
    for features, positive in zip(lists, positives):
        scores = score_fn(features)
        rank = int(np.sum(scores > scores[positive]) + np.sum(scores[:positive] == scores[positive]))  # stable ties
        hits.append(rank < k)
        gains.append(1.0 / np.log2(rank + 2) if rank < k else 0.0)
    return (float(np.mean(hits)), float(np.mean(gains))) if hits else (0.0, 0.0)


def train_model(impressions: Impressions, cfg: TrainConfig):
    """Listwise training with early stopping on validation NDCG@10. Returns (model in eval mode, history)."""
    import torch

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    lists = torch.from_numpy(impressions.train_lists)
    mask = torch.from_numpy(impressions.train_mask)
    logw = torch.from_numpy(impressions.train_logw if impressions.train_logw is not None
                            else np.zeros(impressions.train_mask.shape, np.float32))
    rows = impressions.train_lists[impressions.train_mask]
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)
    width = lists.shape[2]
    model = build_model(width, mean, std, cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)

    def score_numpy(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(features)).numpy()

    baseline = _ndcg_of_lists(lambda f: -np.arange(len(f), dtype=np.float32), impressions.valid_lists, impressions.valid_positive)
    history = {"valid_retrieval": {"hr@10": baseline[0], "ndcg@10": baseline[1]}, "epochs": []}
    best, best_state, best_epoch, waited = -1.0, None, 0, 0
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(lists), generator=generator)
        total, batches = 0.0, 0
        for start in range(0, len(order), cfg.batch_lists):
            pick = order[start:start + cfg.batch_lists]
            batch, batch_mask = lists[pick], mask[pick]
            scores = model(batch.reshape(-1, width)).reshape(batch.shape[0], batch.shape[1]) + logw[pick]
            scores = scores.masked_fill(~batch_mask, float("-inf"))
            loss = -torch.log_softmax(scores, dim=1)[:, 0].mean()  # the positive is row 0 of each list
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        model.eval()
        hr, ndcg = _ndcg_of_lists(score_numpy, impressions.valid_lists, impressions.valid_positive)
        history["epochs"].append({"epoch": epoch, "loss": total / max(batches, 1), "valid_hr@10": hr, "valid_ndcg@10": ndcg})
        log.info("epoch %d: loss %.4f, valid HR@10 %.4f NDCG@10 %.4f (retrieval order %.4f / %.4f)", epoch,
                 total / max(batches, 1), hr, ndcg, *baseline)
        if ndcg > best:
            best, best_epoch, waited = ndcg, epoch, 0
            best_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    history.update(best_epoch=best_epoch, best_valid_ndcg=best, seconds=round(time.perf_counter() - started, 1))
    return model, history


def export_onnx(model, width: int, path: Path, seed: int = 0) -> dict:
    """ONNX export with a dynamic batch, onnx.checker, and ORT vs torch on random inputs (<= 1e-5)."""
    import onnx
    import onnxruntime as ort
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(2, width),), str(path), input_names=["features"], output_names=["score"],
                          dynamic_axes={"features": {0: "batch"}, "score": {0: "batch"}}, opset_version=17, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return check_onnx_matches_torch(model, path, width, seed)


def check_onnx_matches_torch(model, path: Path, width: int, seed: int = 0, sizes=(1, 7, 200, 1024)) -> dict:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    # Random rows at the scale of real features: standard normal after the model's own standardisation
    # (columns the model does not read: standard normal).
    mean = np.zeros(width, np.float32)
    scale = np.ones(width, np.float32)
    keep = model.keep.numpy()
    mean[keep] = model.mean.numpy()
    scale[keep] = 1.0 / model.inv_std.numpy()
    worst = 0.0
    for n in sizes:
        features = (mean + scale * rng.standard_normal((n, width))).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(features)).numpy()
        got = session.run(None, {"features": features})[0]
        if got.shape != expected.shape:
            raise AssertionError(f"ONNX output shape {got.shape} != torch {expected.shape} for batch {n}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
    if worst > EXPORT_TOLERANCE:
        raise AssertionError(f"ONNX Runtime differs from PyTorch by {worst:.3g} (> {EXPORT_TOLERANCE})")
    return {"max_abs_diff": worst, "batch_sizes": list(sizes), "tolerance": EXPORT_TOLERANCE}


# ---------------------------------------------------------------------------------------------------------
# The whole command
# ---------------------------------------------------------------------------------------------------------


def train_reranker(dataset: Dataset, out: Path, cfg: TrainConfig, command: str = "", lift: bool = True) -> dict:
    """Impressions -> training -> export + checks -> serving validation -> (lift on the test part) -> sidecar."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        impressions = collect_impressions(dataset, cfg, Path(tmp))
    metadata = train_and_export(impressions, Path(out), cfg, dataset.name, command)
    side = sidecar_path(out)
    if lift:
        metadata["lift"] = measure_lift(dataset, out, cfg.train_fraction, cfg.candidates, 10, cfg.dim, cfg.seed, cfg.backend,
                                        user_model=cfg.user_model)
        side.write_text(json.dumps(metadata, indent=1) + "\n")
    metadata["seconds"] = round(time.perf_counter() - started, 1)
    side.write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata


def train_and_export(impressions: Impressions, out: Path, cfg: TrainConfig, dataset_name: str, command: str) -> dict:
    """Train on the impressions, export to `out` (checked against torch and by the serving validator) and write
    the sidecar; returns its metadata."""
    if len(impressions.train_lists) == 0 or not impressions.valid_lists:
        raise RuntimeError(f"no impressions to train on: {impressions.stats}")
    model, history = train_model(impressions, cfg)
    width = feature_count(cfg.dim)
    staging = out.with_name(out.name + ".tmp")
    export = export_onnx(model, width, staging, cfg.seed)
    Reranker(cfg.dim, provider="cpu").load(staging)  # the serving validator must accept it
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    metadata = {
        "format": "streamrec-reranker", "feature_spec": FEATURE_SPEC, "dim": cfg.dim, "features": width,
        "feature_names": feature_names(cfg.dim), "input": "features", "output": "score",
        "version": f"{dataset_name}-dcn-{digest[:10]}", "sha256": digest, "dataset": dataset_name,
        "user_model": cfg.user_model,  # the retrieval it reorders: serving reranks that model's answers by default
        "model": {"kind": "DCN-v2 (low-rank cross) + MLP", "cross_layers": cfg.cross_layers, "cross_rank": cfg.cross_rank,
                  "hidden": list(cfg.hidden), "loss": "listwise softmax cross-entropy"},
        "training": {"command": command, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
                     "impressions": impressions.stats, "history": history},
        "export_check": export,
    }
    staging.replace(out)
    sidecar_path(out).write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata
