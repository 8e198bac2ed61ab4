"""Offline training of the bootstrap model: iALS with parallel CG sweeps (engine/cpu/ials.py), or the SVD of
engine/offline/svd.py, with a per-epoch history (loss, and HR@10 on a held-out split when asked).

The result is what the server serves: unit item vectors (top-k is cosine), and user vectors re-solved against
those unit item vectors with the online model's fold-in parameters (see engine/state/online.py), so a user's first
online event continues from a vector of the same model instead of jumping to a different scale.

Defaults were chosen on ML-100K, dim 64, each user's last liked movie held out (HR@10 among unseen items);
see DEFAULTS below for the numbers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from streamrec.engine.cpu.ials import solve_sweep
from streamrec.engine.offline import ials
from streamrec.engine.offline.datasets import Interactions
from streamrec.engine.offline.svd import Factors, factorize
from streamrec.engine.signals import is_positive

log = logging.getLogger(__name__)

# Chosen on ML-100K (dim 64, each user's last liked movie held out, HR@10 among unseen items): iALS with unit
# items after every item sweep beat the SVD bootstrap and unnormalised items, and gains stop after ~10 epochs;
# the grid and the per-epoch curve are in benchmarks/RESULTS.md, "Figures behind design choices".
DEFAULTS = {"dim": 64, "epochs": 10, "reg": 10.0, "alpha": 10.0, "cg_steps": 3}
# Users are re-solved against the final unit item vectors with the online model's alpha and reg
# (EngineConfig.online_alpha / online_reg), so the online fold-in continues the same model.
FOLD_ALPHA, FOLD_REG = 10.0, 10.0


@dataclass
class TrainResult:
    factors: Factors  # unit rows, catalog order (items without interactions: zero rows)
    user_raw: np.ndarray  # float32 [U, d] unnormalised user vectors (the online model's state)
    method: str
    params: dict
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, loss, seconds, [hr@10]
    seconds: float = 0.0

    def model_version(self, dataset: str) -> str:
        p = self.params
        if self.method == "svd":
            return f"svd-{dataset}-d{p['dim']}-s{p['seed']}"
        return f"{self.method}-{dataset}-d{p['dim']}-e{p['epochs']}-s{p['seed']}"


def leave_last_out(interactions: Interactions) -> tuple[Interactions, dict[str, str]]:
    """Hold out each user's latest positive event on an item the user touched only that once."""
    pair_count: dict[tuple[str, str], int] = {}
    for pair in zip(interactions.user_ids, interactions.item_ids):
        pair_count[pair] = pair_count.get(pair, 0) + 1
    held: dict[str, int] = {}
    for i in range(len(interactions) - 1, -1, -1):  # sorted by time: walk back from the end
        u, item = interactions.user_ids[i], interactions.item_ids[i]
        if u not in held and pair_count[(u, item)] == 1 and is_positive(int(interactions.types[i]), float(interactions.values[i])):
            held[u] = i
    keep = np.ones(len(interactions), dtype=bool)
    keep[list(held.values())] = False
    sub = Interactions(interactions.user_ids[keep], interactions.item_ids[keep], interactions.types[keep],
                       interactions.values[keep], interactions.timestamps_ms[keep])
    return sub, {str(u): str(interactions.item_ids[i]) for u, i in held.items()}


def hit_rate(user_vectors: np.ndarray, item_vectors: np.ndarray, pairs: ials.PairMatrix, held: dict[str, str],
             k: int = 10) -> float:
    """HR@k of the held-out item, ranking unseen items by cosine (user norm does not change the ranking)."""
    users = {u: r for r, u in enumerate(pairs.user_ids)}
    items = {x: c for c, x in enumerate(pairs.item_ids)}
    norms = np.linalg.norm(item_vectors, axis=1)
    unit = item_vectors / np.where(norms > 0, norms, 1.0)[:, None]
    indptr, indices, _, _ = pairs.csr()
    hits = total = 0
    for user, item in held.items():
        row, col = users.get(user), items.get(item)
        if col is None:
            continue
        total += 1
        if row is None:
            continue
        scores = unit @ user_vectors[row]
        scores[indices[indptr[row]:indptr[row + 1]]] = -np.inf
        if not np.any(user_vectors[row]):
            continue
        hits += col in np.argpartition(-scores, k)[:k]
    return hits / max(total, 1)


def fold_in_users(item_unit: np.ndarray, pairs: ials.PairMatrix, alpha: float = FOLD_ALPHA, reg: float = FOLD_REG,
                  warm: np.ndarray | None = None, steps: int | None = None) -> np.ndarray:
    """Every user's vector solved against fixed (unit) item vectors: float64 [U, d]."""
    d = item_unit.shape[1]
    x = np.zeros((pairs.shape[0], d)) if warm is None else np.array(warm, np.float64)
    return solve_sweep(x, item_unit, pairs.csr(), alpha, reg, steps or 2 * d)


def train(interactions: Interactions, method: str = "ials", dim: int = DEFAULTS["dim"], epochs: int = DEFAULTS["epochs"],
          reg: float = DEFAULTS["reg"], alpha: float = DEFAULTS["alpha"], seed: int = 0, progress: bool = True,
          validation: dict[str, str] | None = None, item_ids: list[str] | None = None,
          cg_steps: int = DEFAULTS["cg_steps"], fold_alpha: float = FOLD_ALPHA, fold_reg: float = FOLD_REG,
          unit_items: bool = True) -> TrainResult:
    """Train embeddings; `validation` maps user id -> held-out item (see `leave_last_out`) for HR@10 per epoch."""
    started = time.perf_counter()
    params = dict(dim=dim, epochs=epochs, reg=reg, alpha=alpha, seed=seed, cg_steps=cg_steps,
                  fold_alpha=fold_alpha, fold_reg=fold_reg, unit_items=unit_items)
    pairs = ials.pair_matrix(interactions, item_ids)
    if method == "svd":
        f = factorize(interactions, dim=dim, seed=seed, item_ids=pairs.item_ids)
        user_raw = _refold(f.item_vectors, pairs, f.user_ids, fold_alpha, fold_reg)
        history = [{"epoch": 1, "seconds": time.perf_counter() - started}]
        if validation:
            history[0]["hr@10"] = hit_rate(user_raw, f.item_vectors, pairs, validation)
        return TrainResult(_factors(pairs, user_raw, f.item_vectors), user_raw.astype(np.float32), method,
                           params, history, time.perf_counter() - started)
    if method != "ials":
        raise ValueError(f"unknown method '{method}' (choose ials or svd)")
    if dim < 1 or epochs < 0:
        raise ValueError("need dim >= 1 and epochs >= 0")

    rng = np.random.default_rng(seed)
    n_users, n_items = pairs.shape
    x = rng.standard_normal((n_users, dim)) * 0.01
    y = rng.standard_normal((n_items, dim)) * 0.01
    by_user, by_item = pairs.csr(), pairs.csr(by_item=True)
    history: list[dict] = []
    bar = _progress(epochs, progress)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        solve_sweep(x, y, by_user, alpha, reg, cg_steps)
        solve_sweep(y, x, by_item, alpha, reg, cg_steps)
        if unit_items:  # train the model that is served: cosine, so item vectors of unit length
            y = _unit(y)
        row = {"epoch": epoch, "loss": ials.loss(x, y, pairs, alpha, reg), "seconds": time.perf_counter() - t0}
        if validation:
            row["hr@10"] = hit_rate(x, y, pairs, validation)
        history.append(row)
        if bar is not None:
            bar.set_postfix({k: round(v, 4) for k, v in row.items() if k not in ("epoch", "seconds")})
            bar.update(1)
    if bar is not None:
        bar.close()
    y[np.diff(by_item[0]) == 0] = 0  # items without interactions: zero rows (the catalog derives them)
    item_unit = _unit(y)
    user_raw = fold_in_users(item_unit, pairs, fold_alpha, fold_reg)
    if validation and history:
        history[-1]["hr@10 (served)"] = hit_rate(user_raw, item_unit, pairs, validation)
    return TrainResult(_factors(pairs, user_raw, item_unit), user_raw.astype(np.float32), method, params, history,
                       time.perf_counter() - started)


def _refold(item_vectors, pairs, user_ids, alpha, reg) -> np.ndarray:
    assert list(user_ids) == pairs.user_ids
    return fold_in_users(np.asarray(item_vectors, np.float64), pairs, alpha, reg)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)


def _factors(pairs: ials.PairMatrix, user_raw: np.ndarray, item_unit: np.ndarray) -> Factors:
    return Factors(pairs.user_ids, _unit(user_raw).astype(np.float32), pairs.item_ids,
                   np.asarray(item_unit, np.float32), np.zeros(item_unit.shape[1]))


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety: training works without tqdm
        return None
    return tqdm(total=total, desc="iALS", unit="epoch")
