"""A sequence model of each user's recent behaviour as a real-time user tower (issue 19, first model).

SASRec-style: a causal self-attention encoder over the user's last L events. Each position is the sum of
  - a learned linear projection of the item's FROZEN vector (the engine's seeded item vectors, so items whose
    vector the engine updates or derives, new items included, need no retraining),
  - an event-type embedding (the type; for a RATING, the rounded rating value as its own token),
  - a time-gap bucket embedding (log2 buckets of the gap to the previous event),
  - a position embedding (sequences are right-aligned: the latest event is always position L-1).
The output at the last position, through a linear head and unit-normalised, is the user's query vector; items
are scored by cosine against the same frozen unit item vectors, i.e. in the retrieval's item space.

Training: full-softmax cross-entropy over the catalog predicting each next POSITIVE event's item from its prefix
(items already in the window masked out, as the replay excludes seen items), on the training part of the
prequential time split only; validation per epoch on a held-out tail of that training part (HR@10/NDCG@10, each
tail event ranked from the user's last L events before it, seen items excluded).

torch is imported inside the functions that train or export, never at module import: `TowerRecommender` (the
inference side) needs only numpy and onnxruntime.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from streamrec.engine.api import Event
from streamrec.engine.offline.datasets import Interactions
from streamrec.engine.offline.evaluation import Catalog, Popularity, top_rows
from streamrec.engine.sequence.tower import FORMAT, N_GAPS, N_TYPES, gap_bucket, open_session, sidecar_path, type_token
from streamrec.engine.signals import is_positive

PROBE_ITEMS = 64  # items whose vectors the sidecar keeps, to check a serving catalog's item space


@dataclass
class UserLog:
    """One user's events in time order: item ids (catalog row + 1; 0 never occurs), type tokens, gap buckets,
    positive flags."""
    items: list[int] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)
    positive: list[bool] = field(default_factory=list)
    last_ms: int | None = None

    def add(self, row: int, event_type: int, value: float, timestamp_ms: int) -> None:
        self.items.append(row + 1)
        self.types.append(type_token(event_type, value))
        self.gaps.append(gap_bucket(None if self.last_ms is None else timestamp_ms - self.last_ms))
        self.positive.append(is_positive(int(event_type), float(value)))
        self.last_ms = int(timestamp_ms)


def user_logs(log: Interactions, catalog: Catalog, logs: dict[str, UserLog] | None = None) -> dict[str, UserLog]:
    """Every user's events (items outside the catalog skipped), appended to `logs` when given."""
    logs = {} if logs is None else logs
    for user, item, t, v, ts in zip(log.user_ids, log.item_ids, log.types, log.values, log.timestamps_ms):
        row = catalog.row(str(item))
        if row is not None:
            logs.setdefault(str(user), UserLog()).add(row, int(t), float(v), int(ts))
    return logs


def window(user: UserLog, length: int, end: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The last `length` events before index `end` (default: all), right-aligned and left-padded with 0:
    (items, types, gaps, mask) int64 [length] each."""
    end = len(user.items) if end is None else end
    start = max(0, end - length)
    n = end - start
    out = np.zeros((4, length), np.int64)
    if n:
        out[0, length - n:] = user.items[start:end]
        out[1, length - n:] = user.types[start:end]
        out[2, length - n:] = user.gaps[start:end]
        out[3, length - n:] = 1
    return out[0], out[1], out[2], out[3]


def training_windows(logs: dict[str, UserLog], length: int, stride: int | None = None) -> dict[str, np.ndarray]:
    """Sliding windows over every user's events. targets[b, t] = catalog row + 1 of event t+1 of the window
    when it is positive (0: no target). Windows after the first only train their last `stride` positions, so
    every next event is a target once, with at least length - stride events of context where the user has them."""
    stride = stride or length // 2
    rows = {"items": [], "types": [], "gaps": [], "mask": [], "targets": []}
    for user in logs.values():
        n = len(user.items)
        ends = list(range(min(n, length + 1), n + 1, stride))
        if not ends or ends[-1] != n:
            ends.append(n)
        previous_end = 0
        for end in ends:  # window of inputs [end - 1 - length, end - 1), targets shifted by one
            if end < 2:
                continue
            items, types, gaps, mask = window(user, length, end - 1)
            targets = np.zeros(length, np.int64)
            first = max(end - 1 - length, 0)
            for j in range(max(first, previous_end - 1), end - 1):  # input j predicts event j + 1
                if user.positive[j + 1]:
                    targets[length - (end - 1 - j)] = user.items[j + 1]
            previous_end = end
            for key, value in zip(rows, (items, types, gaps, mask, targets)):
                rows[key].append(value)
    return {key: np.stack(value) if value else np.zeros((0, length), np.int64) for key, value in rows.items()}


def validation_steps(logs: dict[str, UserLog], tail: Interactions, catalog: Catalog, length: int) -> dict[str, np.ndarray]:
    """The tail replayed like the harness: every positive event on an item the user has not seen gives a step
    (window of the user's events before it, target row, seen rows); every event then joins the user's log.
    Mutates `logs` (pass a copy)."""
    steps = {"items": [], "types": [], "gaps": [], "mask": [], "target": [], "seen": []}
    for user_id, item, t, v, ts in zip(tail.user_ids, tail.item_ids, tail.types, tail.values, tail.timestamps_ms):
        row = catalog.row(str(item))
        if row is None:
            continue
        user = logs.setdefault(str(user_id), UserLog())
        if is_positive(int(t), float(v)) and (row + 1) not in user.items and user.items:
            for key, value in zip(steps, (*window(user, length), row)):
                steps[key].append(value)
            steps["seen"].append(np.unique(np.array(user.items, np.int64) - 1))
        user.add(row, int(t), float(v), int(ts))
    out = {key: np.stack(value) for key, value in steps.items() if key not in ("seen", "target")}
    out["target"] = np.array(steps["target"], np.int64)
    out["seen"] = steps["seen"]
    return out


# ---------------------------------------------------------------------------------------------------------
# The model (torch, offline only)
# ---------------------------------------------------------------------------------------------------------


def build_model(item_vectors: np.ndarray, length: int = 50, dim: int = 64, blocks: int = 2, heads: int = 2,
                dropout: float = 0.2, seed: int = 0):
    """The encoder over frozen `item_vectors` [N, dim] (unit rows, catalog order). Its forward takes
    (items, types, gaps, mask) int64 [B, L] and returns unit query vectors [B, dim] (or, with all_positions,
    [B, L, dim])."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    table = np.zeros((len(item_vectors) + 1, item_vectors.shape[1]), np.float32)
    table[1:] = _unit(np.asarray(item_vectors, np.float64))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
            self.drop = nn.Dropout(dropout)

        def forward(self, x, bias):
            b, l, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, l, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
            scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(dim // heads)) + bias
            attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, l, dim)
            x = x + self.drop(self.out(attended))
            return x + self.drop(self.ffn(self.norm2(x)))

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.from_numpy(table))  # frozen: a buffer, not a parameter
            self.project = nn.Linear(dim, dim)
            with torch.no_grad():
                self.project.weight.copy_(torch.eye(dim))
                self.project.bias.zero_()
            self.types = nn.Embedding(N_TYPES, dim, padding_idx=0)
            self.gaps = nn.Embedding(N_GAPS, dim, padding_idx=0)
            self.positions = nn.Embedding(length, dim)
            for emb in (self.types, self.gaps, self.positions):
                nn.init.normal_(emb.weight, std=0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, dim)
            self.drop = nn.Dropout(dropout)
            self.log_scale = nn.Parameter(torch.tensor(math.log(15.0)))
            self.register_buffer("causal", torch.tril(torch.ones(length, length, dtype=torch.bool)))
            self.register_buffer("eye", torch.eye(length, dtype=torch.bool))
            self.length = length

        def forward(self, items, types, gaps, mask, all_positions: bool = False):
            x = self.project(self.table[items]) + self.types(types) + self.gaps(gaps)
            x = x + self.positions.weight.unsqueeze(0)
            x = self.drop(x)
            valid = mask.bool().unsqueeze(1)  # [B, 1, L] keys
            allowed = (self.causal.unsqueeze(0) & valid) | self.eye.unsqueeze(0)  # pads attend to themselves
            bias = torch.where(allowed, 0.0, -1e9).unsqueeze(1)
            for block in self.blocks:
                x = block(x, bias)
            h = self.head(self.norm(x if all_positions else x[:, -1]))
            return torch.nn.functional.normalize(h, dim=-1)

        def logits(self, queries):
            return torch.exp(self.log_scale) * queries @ self.table[1:].T

    return Tower()


@dataclass
class TrainReport:
    history: list[dict]
    best_epoch: int
    seconds: float
    params: dict


def train_tower(model, train: dict[str, np.ndarray], valid: dict[str, np.ndarray] | None, epochs: int = 30,
                batch: int = 128, lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0, k: int = 10,
                progress: bool = True, patience: int = 5) -> TrainReport:
    """Adam on full-softmax cross-entropy (see the module docstring); keeps the weights of the epoch with the
    best validation NDCG@k (early stopping after `patience` epochs without improvement)."""
    import copy

    import torch

    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tensors = {key: torch.from_numpy(value) for key, value in train.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    history, best, best_state, best_epoch = [], -1.0, None, 0
    bar = _progress(epochs, progress)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = rng.permutation(len(tensors["items"]))
        total_loss = total_targets = 0.0
        for start in range(0, len(order), batch):
            idx = torch.from_numpy(order[start:start + batch])
            items, targets = tensors["items"][idx], tensors["targets"][idx]
            if not bool((targets > 0).any()):
                continue
            keep = targets > 0
            b_idx, t_idx = keep.nonzero(as_tuple=True)
            queries = model(items, tensors["types"][idx], tensors["gaps"][idx], tensors["mask"][idx], all_positions=True)
            logits = model.logits(queries[b_idx, t_idx])  # [T, N]: only the positions with a target
            # the window's items up to each target's position (what the replay excludes, as far as the window sees)
            upto = (torch.arange(items.shape[1]).unsqueeze(0) <= t_idx.unsqueeze(1)).float()
            seen = torch.zeros(len(b_idx), logits.shape[1] + 1).scatter_add_(1, items[b_idx], upto)[:, 1:] > 0
            goal = targets[b_idx, t_idx] - 1
            seen[torch.arange(len(goal)), goal] = False
            loss = torch.nn.functional.cross_entropy(logits.masked_fill(seen, -1e4), goal)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            total_loss += loss.item() * len(goal)
            total_targets += len(goal)
        row = {"epoch": epoch, "loss": total_loss / max(total_targets, 1), "seconds": time.perf_counter() - t0}
        if valid is not None:
            row.update(evaluate_steps(model, valid, k))
            if row[f"ndcg@{k}"] > best:
                best, best_epoch = row[f"ndcg@{k}"], epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(row)
        if bar is not None:
            bar.set_postfix({key: round(v, 4) for key, v in row.items() if key not in ("epoch", "seconds")})
            bar.update(1)
        if valid is not None and epoch - best_epoch >= patience:
            break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainReport(history, best_epoch or len(history), time.perf_counter() - started,
                       {"epochs": epochs, "batch": batch, "lr": lr, "weight_decay": weight_decay, "seed": seed})


def evaluate_steps(model, steps: dict, k: int = 10, batch: int = 512) -> dict:
    """HR@k / NDCG@k of the validation steps (seen items excluded), torch forward in eval mode."""
    import torch

    model.eval()
    hits, gains = [], []
    with torch.no_grad():
        for start in range(0, len(steps["target"]), batch):
            sl = slice(start, start + batch)
            q = model(*(torch.from_numpy(steps[key][sl]) for key in ("items", "types", "gaps", "mask")))
            scores = (q @ model.table[1:].T).numpy()
            for row, target, seen in zip(scores, steps["target"][sl], steps["seen"][sl]):
                row[seen] = -np.inf
                rank = int(np.sum(row > row[target]))
                hits.append(rank < k)
                gains.append(1.0 / math.log2(rank + 2) if rank < k else 0.0)
    model.train()
    return {f"hr@{k}": float(np.mean(hits)), f"ndcg@{k}": float(np.mean(gains))}


def export_onnx(model, path: str, length: int) -> None:
    """Export the eval-mode model with fixed [1, length] int64 inputs items, types, gaps, mask -> query [1, d]."""
    import torch

    model.eval()
    example = tuple(torch.zeros((1, length), dtype=torch.int64) for _ in range(4))
    example[0][0, -1], example[3][0, -1] = 1, 1
    torch.onnx.export(model, example, path, input_names=["items", "types", "gaps", "mask"], output_names=["query"],
                      opset_version=17, dynamo=False)


@dataclass
class TowerParams:
    length: int = 50
    dim: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.2
    epochs: int = 40
    batch: int = 128
    lr: float = 2e-3
    valid_fraction: float = 0.1  # the tail of the training events that chooses the epoch count
    refit: bool = False  # then retrain on every training event for that many epochs
    seed: int = 0
    k: int = 10
    threads: int = 2
    progress: bool = True


def fit_and_export(train, catalog: Catalog, item_vectors: np.ndarray, onnx_path: str, params: TowerParams,
                   say=print) -> dict:
    """Train a tower on `train` (a Dataset; its last valid_fraction validates), export it to `onnx_path`, check
    the export against torch and write the serving sidecar. Returns what training measured."""
    import torch

    from streamrec.engine.offline.evaluation import time_split

    p = params
    torch.set_num_threads(p.threads)
    fit_part, tail = time_split(train, 1.0 - p.valid_fraction)
    windows = training_windows(user_logs(fit_part.interactions, catalog), p.length)
    valid = validation_steps(user_logs(fit_part.interactions, catalog), tail, catalog, p.length)
    say(f"training windows {len(windows['items'])} ({int((windows['targets'] > 0).sum())} targets), "
        f"validation steps {len(valid['target'])}")
    model = build_model(item_vectors, p.length, p.dim, p.blocks, p.heads, p.dropout, p.seed)
    report = train_tower(model, windows, valid, p.epochs, p.batch, p.lr, seed=p.seed, k=p.k, progress=p.progress)
    info = {"history": report.history, "best_epoch": report.best_epoch, "train_seconds": round(report.seconds, 1),
            "windows": len(windows["items"]), "validation_steps": len(valid["target"])}
    best = report.history[report.best_epoch - 1]
    say(f"best epoch {report.best_epoch}: validation HR@{p.k} {best[f'hr@{p.k}']:.4f} "
        f"NDCG@{p.k} {best[f'ndcg@{p.k}']:.4f} ({report.seconds:.0f} s)")
    if p.refit:
        windows = training_windows(user_logs(train.interactions, catalog), p.length)
        model = build_model(item_vectors, p.length, p.dim, p.blocks, p.heads, p.dropout, p.seed)
        refit = train_tower(model, windows, None, report.best_epoch, p.batch, p.lr, seed=p.seed, k=p.k,
                            progress=p.progress)
        info.update(refit_epochs=report.best_epoch, refit_seconds=round(refit.seconds, 1))
        say(f"refit on the whole training part for {report.best_epoch} epochs ({refit.seconds:.0f} s)")
    export_onnx(model, onnx_path, p.length)
    info["onnx_max_abs_diff"] = check_export(model, onnx_path, p.length)
    say(f"exported {onnx_path}; torch vs onnxruntime max abs diff {info['onnx_max_abs_diff']:.2e}")
    if info["onnx_max_abs_diff"] >= 1e-4:
        raise RuntimeError(f"ONNX export differs from torch by {info['onnx_max_abs_diff']}")
    write_sidecar(onnx_path, catalog.ids, item_vectors, p.length, train.name,
                  {k: v for k, v in info.items() if k != "history"})
    return info


def engine_item_vectors(engine, item_ids) -> tuple[list[str], np.ndarray]:
    """(the ids among `item_ids` that `engine` holds live with a vector, those vectors) through the Engine API."""
    from streamrec.engine.errors import NotFound

    found, vectors = [], []
    for item_id in item_ids:
        try:
            view = engine.get_item(item_id)
        except NotFound:
            continue
        if not view.deleted and np.any(view.vector):
            found.append(item_id)
            vectors.append(np.asarray(view.vector, np.float32))
    return found, (np.stack(vectors) if vectors else np.zeros((0, engine.dim), np.float32))


def write_sidecar(path: str, item_ids: list[str], item_vectors: np.ndarray, length: int, dataset: str,
                  training: dict | None = None) -> dict:
    """The serving metadata beside the ONNX file (engine/sequence/tower.py reads it): the table's item ids in
    order and a probe of their unit vectors, evenly spread over the table."""
    import hashlib
    import json
    from pathlib import Path

    units = _unit(np.asarray(item_vectors, np.float64))
    picks = np.unique(np.linspace(0, len(item_ids) - 1, min(PROBE_ITEMS, len(item_ids))).astype(int))
    picks = [int(p) for p in picks if np.any(units[p])]
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    meta = {"format": FORMAT, "version": f"sequence-{dataset}-{digest}", "dataset": dataset, "length": length,
            "dim": int(units.shape[1]), "item_ids": [str(i) for i in item_ids],
            "probe": {"item_ids": [str(item_ids[p]) for p in picks],
                      "vectors": [[round(float(x), 6) for x in units[p]] for p in picks]},
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "training": training or {}}
    sidecar_path(path).write_text(json.dumps(meta) + "\n")
    return meta


def check_export(model, path: str, length: int, trials: int = 8, seed: int = 0) -> float:
    """Max abs difference between torch and onnxruntime on random right-aligned inputs."""
    import torch

    session = open_session(path)
    rng = np.random.default_rng(seed)
    worst = 0.0
    n_items = model.table.shape[0] - 1
    model.eval()
    for _ in range(trials):
        n = int(rng.integers(1, length + 1))
        feeds = {name: np.zeros((1, length), np.int64) for name in ("items", "types", "gaps", "mask")}
        feeds["items"][0, length - n:] = rng.integers(1, n_items + 1, n)
        feeds["types"][0, length - n:] = rng.integers(1, N_TYPES, n)
        feeds["gaps"][0, length - n:] = rng.integers(1, N_GAPS, n)
        feeds["mask"][0, length - n:] = 1
        with torch.no_grad():
            expected = model(*(torch.from_numpy(feeds[k]) for k in ("items", "types", "gaps", "mask"))).numpy()
        got = session.run(["query"], feeds)[0]
        worst = max(worst, float(np.max(np.abs(expected - got))))
    return worst


# ---------------------------------------------------------------------------------------------------------
# The prequential replay of an exported tower (onnxruntime only, no torch)
# ---------------------------------------------------------------------------------------------------------


class TowerRecommender:
    """A `Recommender` for the prequential replay: the user's query vector is the ONNX tower over their last L
    events (training part + replay so far), items ranked by cosine against the frozen unit item vectors.
    Users with no event yet get the online popularity. shuffle=True permutes each window's events (the
    order ablation; deterministic per step)."""

    def __init__(self, onnx_path: str, item_vectors: np.ndarray, catalog: Catalog, history: Interactions | None,
                 length: int, name: str = "sequence tower (ONNX)", shuffle: bool = False, seed: int = 0):
        self.session, self.length, self.catalog, self.name = open_session(onnx_path), length, catalog, name
        self.items = _unit(np.asarray(item_vectors, np.float64)).astype(np.float32)
        self.logs = user_logs(history, catalog) if history is not None else {}
        self.fallback = Popularity(catalog, history)
        self.shuffle, self.rng = shuffle, np.random.default_rng(seed)
        self.steps = self.fallback_steps = 0
        self.inference_seconds = 0.0

    def query(self, user_id: str) -> np.ndarray | None:
        user = self.logs.get(user_id)
        if user is None or not user.items:
            return None
        items, types, gaps, mask = window(user, self.length)
        if self.shuffle:
            n = int(mask.sum())
            order = np.concatenate([np.arange(self.length - n), self.length - n + self.rng.permutation(n)])
            items, types, gaps = items[order], types[order], gaps[order]
        feeds = {"items": items[None], "types": types[None], "gaps": gaps[None], "mask": mask[None]}
        t0 = time.perf_counter()
        vector = self.session.run(["query"], feeds)[0][0]
        self.inference_seconds += time.perf_counter() - t0
        return vector

    def learn(self, event: Event) -> None:
        self.fallback.learn(event)
        row = self.catalog.row(event.item_id)
        if row is not None:
            self.logs.setdefault(event.user_id, UserLog()).add(row, int(event.type), event.value, event.timestamp_ms)

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        self.steps += 1
        vector = self.query(user_id)
        if vector is None:
            self.fallback_steps += 1
            return self.fallback.recommend(user_id, k, exclude_rows)
        scores = self.items @ vector
        return [self.catalog.ids[r] for r in top_rows(scores, k, exclude_rows)]

    def details(self) -> dict:
        return {"length": self.length, "shuffle": self.shuffle, "fallback_steps": self.fallback_steps,
                "inference_ms_per_step": round(1000 * self.inference_seconds / max(self.steps, 1), 4),
                "fallback": "online popularity for users with no event yet"}


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="sequence tower", unit="epoch")
