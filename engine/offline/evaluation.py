"""Prequential (test-then-learn) evaluation on a time-ordered replay (issue 4).

Protocol:
  1. `time_split`: the first `train_fraction` of the events in global time order (stable) train the models;
     the rest is the replay.
  2. `prequential_replay` walks the replay in time order. Before each *positive* event (`is_positive`: a
     rating >= 4, or a positive event type) on an item the user has not seen yet, it asks the model for the
     user's top-k among all catalog items minus the user's seen items (any interaction in the training part
     or earlier in the replay, as the engine counts them), and records HR@k and NDCG@k of the held item
     (one relevant item: a hit at rank r scores 1 / log2(r + 1)). Then every event, positive or not, is
     given to the model (`learn`) and added to the seen items.
     Positive events on items the user already saw cannot be hit (seen items are excluded) and are skipped
     (counted in `ReplayResult.skipped`); so are events on items outside the catalog.
  3. Every model ranks the same candidates: `Catalog` fixes the item order, the harness owns the seen sets.

Models (all satisfy `Recommender`):
  Popularity       online counts of positive events (ties: catalog order)
  FrozenFactors    fixed user and item vectors (dot or cosine); users without a vector fall back to an
                   online Popularity, counted in details()["fallback_steps"]
  StreamrecEngine  the Engine API: ingest (online updates) then recommend with exclude_seen
  FrozenEngine     the Engine API as seeded, never ingesting (the bootstrap frozen); popularity fallback
  implicit peers   `fit_implicit` + FrozenFactors (ALS, BPR from the `implicit` package), `ImplicitALSRefit`
                   (ALS refit on everything seen every N events), `tune_implicit` (grid on the training part)
  online peers     peers.py (issue 19): iALS fold-in, EASE, item-kNN, recent popularity on the whole live history
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from streamrec.engine.api import Event
from streamrec.engine.errors import NotFound
from streamrec.engine.offline.datasets import Dataset, Interactions
from streamrec.engine.signals import event_confidences, is_positive

# ---------------------------------------------------------------------------------------------------------
# Data: catalog, split, seen sets
# ---------------------------------------------------------------------------------------------------------


class Catalog:
    """The fixed item order shared by the harness and every model (rows 0..n-1)."""

    def __init__(self, item_ids: Iterable[str]):
        self.ids = [str(i) for i in item_ids]
        self.index = {item: row for row, item in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise ValueError("duplicate item ids in the catalog")

    @classmethod
    def of(cls, dataset: Dataset) -> "Catalog":
        return cls(dataset.item_categories)

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, item_id: str) -> int | None:
        return self.index.get(item_id)


def slice_interactions(log: Interactions, start: int, stop: int) -> Interactions:
    return Interactions(log.user_ids[start:stop], log.item_ids[start:stop], log.types[start:stop],
                        log.values[start:stop], log.timestamps_ms[start:stop])


def time_split(dataset: Dataset, train_fraction: float = 0.8) -> tuple[Dataset, Interactions]:
    """(training Dataset with the same catalog, replay Interactions): the first `train_fraction` of the
    events in time order, then the rest. Interactions are already sorted by time (stable)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    log = dataset.interactions
    cut = min(max(int(round(len(log) * train_fraction)), 1), len(log) - 1)
    train = Dataset(f"{dataset.name}-train{round(train_fraction * 100)}", slice_interactions(log, 0, cut),
                    dataset.item_categories, dataset.item_attributes)
    return train, slice_interactions(log, cut, len(log))


def replay_events(log: Interactions, id_prefix: str = "replay-") -> list[Event]:
    """The replay as Events with ids distinct from the seeded training log's."""
    return list(log.events(id_prefix))


def seen_rows(log: Interactions | None, catalog: Catalog) -> dict[str, set[int]]:
    """user -> catalog rows of every item they interacted with (any event type)."""
    seen: dict[str, set[int]] = {}
    if log is None:
        return seen
    for user, item in zip(log.user_ids, log.item_ids):
        row = catalog.row(item)
        if row is not None:
            seen.setdefault(str(user), set()).add(row)
    return seen


# ---------------------------------------------------------------------------------------------------------
# Metrics and the replay loop
# ---------------------------------------------------------------------------------------------------------


def hit_and_ndcg(ranked: Sequence[str], held_item: str, k: int) -> tuple[bool, float]:
    """One relevant item: a hit at 1-based rank r <= k gives NDCG 1 / log2(r + 1); a miss gives 0."""
    for rank, item in enumerate(ranked[:k], 1):
        if item == held_item:
            return True, 1.0 / float(np.log2(rank + 1))
    return False, 0.0


@runtime_checkable
class Recommender(Protocol):
    name: str

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        """The user's top-k item ids, best first, never one of `exclude_rows` (catalog rows)."""

    def learn(self, event: Event) -> None:
        """Take one replay event into account (online models update; frozen ones may ignore it)."""


StepHook = Callable[[str, str, list[str]], None]  # (user_id, held item id, the model's ranked item ids)


@dataclass
class ReplayResult:
    model: str
    k: int
    hits: np.ndarray  # uint8 per evaluated step
    gains: np.ndarray  # float64 NDCG@k per evaluated step
    positions: np.ndarray  # int64: index in the replay of each evaluated event
    cold: np.ndarray  # bool per evaluated step: the user had no event in the training part
    replayed: int  # events learned (all of them)
    seconds: float  # wall time of the replay (recommend + learn, refits included)
    skipped: dict[str, int] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def events(self) -> int:
        return len(self.hits)

    @property
    def hr(self) -> float:
        return float(self.hits.mean()) if len(self.hits) else 0.0

    @property
    def ndcg(self) -> float:
        return float(self.gains.mean()) if len(self.gains) else 0.0

    def record(self) -> dict:
        """The JSON record: model, hr@k, ndcg@k, events (evaluated), seconds, and details."""
        segments = {}
        for label, flag in (("users_from_training", False), ("users_new_in_replay", True)):
            n, hr, ndcg = self.segment(flag)
            segments[label] = {"events": n, f"hr@{self.k}": hr, f"ndcg@{self.k}": ndcg}
        return {"model": self.model, f"hr@{self.k}": self.hr, f"ndcg@{self.k}": self.ndcg, "events": self.events,
                "seconds": round(self.seconds, 3),
                "details": {**self.details, "replayed": self.replayed, "skipped": dict(self.skipped), **segments}}

    def segment(self, cold: bool) -> tuple[int, float, float]:
        """(steps, HR, NDCG) over the steps of users new in the replay (cold=True) or known from training."""
        mask = self.cold == cold
        n = int(mask.sum())
        return n, (float(self.hits[mask].mean()) if n else 0.0), (float(self.gains[mask].mean()) if n else 0.0)

    def rolling_hr(self, window: int) -> np.ndarray:
        """Mean hit over the last `window` evaluated steps (shorter at the start)."""
        csum = np.cumsum(self.hits, dtype=np.float64)
        out = csum.copy()
        out[window:] = csum[window:] - csum[:-window]
        return out / np.minimum(np.arange(1, len(csum) + 1), window)


def prequential_replay(
    test_events: Iterable[Event],
    model: Recommender,
    k: int = 10,
    on_step: StepHook | None = None,
    *,
    catalog: Catalog,
    history: Interactions | None = None,
    n_candidates: int | None = None,
) -> ReplayResult:
    """Test-then-learn replay (see the module docstring).

    history: the training interactions (they make up the initial seen sets). n_candidates: ask the model
    for this many items (>= k) and pass them all to `on_step`; metrics always use the first k.
    """
    want = max(k, n_candidates or k)
    seen = seen_rows(history, catalog)
    hits: list[int] = []
    gains: list[float] = []
    positions: list[int] = []
    cold: list[bool] = []
    trained_users = set(seen)
    skipped = {"repeat": 0, "unknown_item": 0}
    replayed = 0
    started = time.perf_counter()
    for position, event in enumerate(test_events):
        row = catalog.row(event.item_id)
        user_seen = seen.setdefault(event.user_id, set())
        if is_positive(event.type, event.value):
            if row is None:
                skipped["unknown_item"] += 1
            elif row in user_seen:
                skipped["repeat"] += 1
            else:
                exclude = np.fromiter(user_seen, np.int64, len(user_seen))
                ranked = list(model.recommend(event.user_id, want, exclude))
                hit, gain = hit_and_ndcg(ranked, event.item_id, k)
                hits.append(hit)
                gains.append(gain)
                positions.append(position)
                cold.append(event.user_id not in trained_users)
                if on_step is not None:
                    on_step(event.user_id, event.item_id, ranked)
        model.learn(event)
        replayed += 1
        if row is not None:
            user_seen.add(row)
    finish = getattr(model, "finish", None)
    if finish is not None:
        finish()
    details = model.details() if hasattr(model, "details") else {}
    return ReplayResult(model.name, k, np.array(hits, np.uint8), np.array(gains, np.float64),
                        np.array(positions, np.int64), np.array(cold, bool), replayed, time.perf_counter() - started, skipped, details)


# ---------------------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------------------


def top_rows(scores: np.ndarray, k: int, exclude_rows: np.ndarray) -> np.ndarray:
    """Rows of the k best scores, best first, excluded rows left out; equal scores: smaller row first."""
    s = np.array(scores, dtype=np.float64)
    s[np.asarray(exclude_rows, np.int64)] = -np.inf
    k = min(k, len(s))
    if k <= 0:
        return np.zeros(0, np.int64)
    kth = -np.partition(-s, k - 1)[k - 1]
    above = np.flatnonzero(s > kth)
    tied = np.flatnonzero(s == kth)[: k - len(above)]
    rows = np.concatenate([above, tied])
    rows = rows[np.lexsort((rows, -s[rows]))]
    return rows[np.isfinite(s[rows])]


class Popularity:
    """Items by their count of positive events so far (training part, then online)."""

    def __init__(self, catalog: Catalog, history: Interactions | None = None, name: str = "popularity"):
        self.name, self.catalog = name, catalog
        self.counts = np.zeros(len(catalog), np.float64)
        if history is not None:
            for item, t, v in zip(history.item_ids, history.types, history.values):
                self._count(str(item), int(t), float(v))

    def _count(self, item_id: str, event_type: int, value: float) -> None:
        row = self.catalog.row(item_id)
        if row is not None and is_positive(event_type, value):
            self.counts[row] += 1

    def learn(self, event: Event) -> None:
        self._count(event.item_id, event.type, event.value)

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        return [self.catalog.ids[r] for r in top_rows(self.counts, k, exclude_rows)]


class FrozenFactors:
    """A fixed factor model: score = user . item (metric "dot") or their cosine ("cosine"). Users with no
    vector (new in the replay, or without signal in training) get the online Popularity instead."""

    def __init__(self, name: str, catalog: Catalog, user_vectors: dict[str, np.ndarray], item_vectors: np.ndarray,
                 history: Interactions | None = None, metric: str = "dot", details: dict | None = None):
        if metric not in ("dot", "cosine"):
            raise ValueError(f"metric must be dot or cosine, got {metric!r}")
        items = np.asarray(item_vectors, np.float64)
        if items.shape[0] != len(catalog):
            raise ValueError(f"item_vectors has {items.shape[0]} rows, the catalog {len(catalog)}")
        users = {u: np.asarray(v, np.float64) for u, v in user_vectors.items() if np.any(v)}
        if metric == "cosine":
            items = _unit_rows(items)
            users = {u: v / np.linalg.norm(v) for u, v in users.items()}
        self.name, self.catalog, self.metric = name, catalog, metric
        self.items, self.users = items, users
        self.fallback = Popularity(catalog, history)
        self.steps = self.fallback_steps = 0
        self._details = dict(details or {})

    def learn(self, event: Event) -> None:
        self.fallback.learn(event)  # the factors stay frozen

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        self.steps += 1
        vector = self.users.get(user_id)
        if vector is None:
            self.fallback_steps += 1
            return self.fallback.recommend(user_id, k, exclude_rows)
        return [self.catalog.ids[r] for r in top_rows(self.items @ vector, k, exclude_rows)]

    def details(self) -> dict:
        return {**self._details, "metric": self.metric, "fallback_steps": self.fallback_steps,
                "fallback": "online popularity for users without a vector"}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


# ---------------------------------------------------------------------------------------------------------
# streamrec itself, through the Engine API
# ---------------------------------------------------------------------------------------------------------


class StreamrecEngine:
    """The engine as served: `learn` queues the event, `recommend` first ingests the queued events (so the
    answer reflects every earlier event, exactly as one ingest per event would) then asks the engine for
    the top-k with exclude_seen (the engine's own seen items, which equal the harness's: both count every
    interaction). verify_seen=True checks that equality at every step (slow; for tests)."""

    def __init__(self, engine, name: str = "streamrec online", verify_seen: bool = False):
        self.engine, self.name, self.verify_seen = engine, name, verify_seen
        self.pending: list[Event] = []
        self.strategies: dict[str, int] = {}

    def learn(self, event: Event) -> None:
        self.pending.append(event)

    def flush(self) -> None:
        if not self.pending:
            return
        result = self.engine.ingest(self.pending)
        if result.rejections or result.accepted + result.duplicates != len(self.pending):
            raise RuntimeError(f"the engine did not accept the replay events: {result.rejections[:3]}")
        self.pending = []

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        self.flush()
        answer = self.engine.recommend([self.engine.build_query(user_id, k)])[0]
        self.strategies[answer.strategy] = self.strategies.get(answer.strategy, 0) + 1
        if self.verify_seen:
            self._check_seen(user_id, exclude_rows)
        return list(answer.item_ids)

    def _check_seen(self, user_id: str, exclude_rows: np.ndarray) -> None:
        try:
            engine_seen = self.engine.get_user(user_id, history_limit=0).seen_items
        except NotFound:
            engine_seen = 0
        if engine_seen != len(exclude_rows):
            raise AssertionError(f"{user_id}: engine excludes {engine_seen} seen items, harness {len(exclude_rows)}")

    def finish(self) -> None:
        self.flush()

    def details(self) -> dict:
        return {"strategies": dict(self.strategies), "model_version": self.engine.model_version}


class FrozenEngine:
    """The engine as seeded (the bootstrap model), never updated: `learn` only feeds an online Popularity,
    which answers instead whenever the engine itself would fall back to popular items (users it has no
    vector for). The harness's seen items are passed explicitly, since the engine's own do not grow.
    Scores are whatever the engine's retrieval computes, so this does not depend on how seeding trains."""

    def __init__(self, engine, catalog: Catalog, history: Interactions | None = None,
                 name: str = "streamrec bootstrap (frozen)"):
        self.engine, self.catalog, self.name = engine, catalog, name
        self.fallback = Popularity(catalog, history)
        self.steps = self.fallback_steps = 0

    def learn(self, event: Event) -> None:
        self.fallback.learn(event)

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        self.steps += 1
        query = self.engine.build_query(user_id, k, exclude_seen=False,
                                        exclude_item_ids=[self.catalog.ids[r] for r in exclude_rows])
        answer = self.engine.recommend([query])[0]
        if answer.strategy == "popular":
            self.fallback_steps += 1
            return self.fallback.recommend(user_id, k, exclude_rows)
        return list(answer.item_ids)

    def details(self) -> dict:
        return {"model_version": self.engine.model_version, "fallback_steps": self.fallback_steps,
                "fallback": "online popularity where the engine would serve popular items"}


# ---------------------------------------------------------------------------------------------------------
# The `implicit` peers
# ---------------------------------------------------------------------------------------------------------


def confidence_matrix(log: Interactions, catalog: Catalog, user_index: dict[str, int] | None = None):
    """(CSR users x catalog items of log1p summed confidences, user id -> row). user_index grows in place."""
    from scipy.sparse import csr_matrix

    user_index = {} if user_index is None else user_index
    users = np.fromiter((user_index.setdefault(str(u), len(user_index)) for u in log.user_ids), np.int64, len(log))
    items = np.fromiter((catalog.index.get(str(i), -1) for i in log.item_ids), np.int64, len(log))
    weights = event_confidences(log.types, log.values)
    known = items >= 0
    n_items = max(len(catalog), 1)
    keys, inverse = np.unique(users[known] * n_items + items[known], return_inverse=True)
    sums = np.bincount(inverse.ravel(), weights=weights[known], minlength=len(keys))
    keep = sums > 0
    keys, sums = keys[keep], np.log1p(sums[keep])
    matrix = csr_matrix((sums.astype(np.float32), (keys // n_items, keys % n_items)),
                        shape=(len(user_index), len(catalog)))
    return matrix, user_index


# Grids searched by tune_implicit on the training part only (factors fixed at 64 like the engine's dim).
ALS_GRID = [{"factors": 64, "regularization": r, "alpha": a, "iterations": it}
            for a in (1.0, 5.0, 20.0, 50.0) for r in (0.05, 0.5, 5.0) for it in (15, 30)]
BPR_GRID = [{"factors": 64, "learning_rate": lr, "regularization": r, "iterations": it}
            for lr in (0.01, 0.05, 0.1) for r in (0.001, 0.01) for it in (100, 300)]
# What tune_implicit picked on ML-100K (first 80% by time, tuned on its last 10%); used by --no-tune.
ALS_DEFAULT = {"factors": 64, "regularization": 0.5, "alpha": 20.0, "iterations": 30}
BPR_DEFAULT = {"factors": 64, "learning_rate": 0.01, "regularization": 0.01, "iterations": 100}


def implicit_available() -> str | None:
    """None when `implicit` imports, else the reason it does not."""
    try:
        import implicit.cpu.als  # noqa: F401
        import implicit.cpu.bpr  # noqa: F401
    except ImportError as error:
        return f"`implicit` is not importable ({error}); pip install 'implicit>=0.7' (extras bench, test)"
    return None


def fit_implicit(kind: str, matrix, params: dict, seed: int = 0, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fit implicit's CPU ALS ("als") or BPR ("bpr") on a users x items CSR; returns (user, item) factors
    (BPR's carry its item-bias column, so dot products are its scores)."""
    from threadpoolctl import threadpool_limits

    if kind == "als":
        from implicit.cpu.als import AlternatingLeastSquares as Model
    elif kind == "bpr":
        from implicit.cpu.bpr import BayesianPersonalizedRanking as Model
    else:
        raise ValueError(f"kind must be als or bpr, got {kind!r}")
    with threadpool_limits(threads):  # also quiets implicit's warning about a multi-threaded BLAS
        model = Model(**params, random_state=seed, num_threads=threads)
        model.fit(matrix, show_progress=False)
    return np.asarray(model.user_factors, np.float64), np.asarray(model.item_factors, np.float64)


def implicit_model(kind: str, train: Dataset, catalog: Catalog, params: dict, seed: int = 0, threads: int = 1,
                   name: str | None = None, details: dict | None = None) -> FrozenFactors:
    """A frozen implicit model trained on `train` (dot-product scores, popularity for unknown users)."""
    started = time.perf_counter()
    matrix, user_index = confidence_matrix(train.interactions, catalog)
    user_factors, item_factors = fit_implicit(kind, matrix, params, seed, threads)
    users = {u: user_factors[row] for u, row in user_index.items()}
    info = {"params": params, "fit_seconds": round(time.perf_counter() - started, 3), **(details or {})}
    return FrozenFactors(name or f"implicit {kind.upper()} (frozen)", catalog, users, item_factors,
                         train.interactions, "dot", info)


def tune_implicit(kind: str, train: Dataset, catalog: Catalog, grid: Sequence[dict], k: int = 10, seed: int = 0,
                  threads: int = 1, validation_fraction: float = 0.1) -> tuple[dict, list[dict]]:
    """Pick params by NDCG@k of the same frozen prequential replay on the last `validation_fraction` of the
    training part, fitting on the rest. Never looks at the replay. Returns (best params, all trials)."""
    fit_part, valid = time_split(train, 1.0 - validation_fraction)
    events = replay_events(valid, "tune-")
    trials = []
    for params in grid:
        model = implicit_model(kind, fit_part, catalog, params, seed, threads)
        result = prequential_replay(events, model, k, catalog=catalog, history=fit_part.interactions)
        trials.append({"params": params, "hr": result.hr, "ndcg": result.ndcg})
    best = max(trials, key=lambda t: (t["ndcg"], t["hr"]))
    return best["params"], trials


class ImplicitALSRefit:
    """implicit ALS refit from scratch on every event seen so far (training + replay), every `every` replay
    events: an upper-bound-ish baseline whose cost (refits, seconds) is reported in details()."""

    def __init__(self, train: Dataset, catalog: Catalog, params: dict, every: int = 1000, seed: int = 0,
                 threads: int = 1, name: str | None = None):
        self.name = name or f"implicit ALS (refit every {every})"
        self.catalog, self.params, self.every, self.seed, self.threads = catalog, params, every, seed, threads
        log = train.interactions
        self.columns = [list(log.user_ids), list(log.item_ids), list(log.types), list(log.values)]
        self.since_refit = 0
        self.refits = -1  # the first fit (training part only) is not a refit
        self.refit_seconds = 0.0
        self.fallback_steps = 0
        self.model: FrozenFactors | None = None
        self.fallback = Popularity(catalog, log)
        self._refit()
        self.fit_seconds, self.refit_seconds = self.refit_seconds, 0.0

    def _refit(self) -> None:
        started = time.perf_counter()
        users, items, types, values = self.columns
        log = Interactions(np.array(users, object), np.array(items, object), np.array(types, np.uint8),
                           np.array(values, np.float32), np.zeros(len(users), np.int64))
        matrix, user_index = confidence_matrix(log, self.catalog)
        user_factors, item_factors = fit_implicit("als", matrix, self.params, self.seed, self.threads)
        self.model = FrozenFactors(self.name, self.catalog, {u: user_factors[r] for u, r in user_index.items()},
                                   item_factors, None, "dot")
        self.model.fallback = self.fallback  # shared online counts for users the last refit did not know
        self.refits += 1
        self.refit_seconds += time.perf_counter() - started
        self.since_refit = 0

    def learn(self, event: Event) -> None:
        for column, value in zip(self.columns, (event.user_id, event.item_id, int(event.type), event.value)):
            column.append(value)
        self.fallback.learn(event)
        self.since_refit += 1
        if self.since_refit >= self.every:
            self._refit()

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        self.fallback_steps += user_id not in self.model.users
        return self.model.recommend(user_id, k, exclude_rows)

    def details(self) -> dict:
        return {"params": self.params, "every": self.every, "fit_seconds": round(self.fit_seconds, 3),
                "refits": self.refits, "refit_seconds": round(self.refit_seconds, 3),
                "fallback_steps": self.fallback_steps,
                "fallback": "online popularity for users unknown at the last refit"}
