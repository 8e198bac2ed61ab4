"""Fair online peers for the prequential replay (issue 19).

The peers in `evaluation.py` are frozen: a user new in the replay gets popularity until the end, so "online
beats frozen" says little. The peers here use everything the harness lets streamrec use: every replay event is
learned before the next recommendation, and each recommendation is computed from the user's WHOLE current
history (training part + replay so far). Their item-side models are fitted once on the training part (that is
what makes them cheap enough to update per event); hyperparameters are tuned on the training part only
(`tune_peer`: fit on its first 90% by time, the same online replay on its last 10%, best NDCG@k).

  IALSFoldIn        implicit's ALS item factors, frozen; the user vector is the exact iALS fold-in of the
                    user's whole history at every recommend (`ials_fold_in`, implicit's own least squares)
  EASE              Steck 2019: B = I - P diag(1/diag P), P = (X^T X + lambda I)^-1, diag(B) = 0; score = x_u B
  ItemKNN           cosine co-occurrence of items, each item's top-K neighbours; score = sum of the user's
                    history items' neighbour similarities
  RecentPopularity  positive events per item among the last W events of the stream (training tail, then replay)

All of them share the harness's candidates and seen filter (the `exclude_rows` it passes) and break ties, users
without history included, by the all-time online popularity (`rank_with_ties`), so a user with no signal gets
exactly the popularity baseline from every history-based peer.

History mapping: the one `evaluation.confidence_matrix` uses for the implicit peers. Per (user, item) the signed
sum of `signals.event_confidences`; a pair counts when that sum is > 0, with strength log1p(sum) ("confidence"
weighting) or 1 ("binary"). Any ML-100K rating counts (having rated a movie means it was watched).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from streamrec.engine.api import Event
from streamrec.engine.offline.datasets import Dataset, Interactions
from streamrec.engine.offline.evaluation import (Catalog, Popularity, confidence_matrix, fit_implicit,
                                                 prequential_replay, replay_events, time_split)
from streamrec.engine.signals import event_confidences, is_positive

# Grids searched by `tune_peer` (kept small: the whole `streamrec evaluate` should take a few minutes on 2 cores).
# Factors stay 64, like the engine's dim and the frozen ALS. On ML-100K the fold-in's validation prefers a much
# lower alpha than the frozen ALS's 20 (implicit's confidence is alpha * log1p(signed sum)), so its grid is
# centred there; alpha 50 and reg 50 never won in a wider first grid.
IALS_FOLDIN_GRID = [{"factors": 64, "regularization": r, "alpha": a, "iterations": 15}
                    for a in (0.5, 1.0, 2.0, 5.0, 20.0) for r in (1.0, 5.0, 20.0)]
EASE_GRID = [{"lambda": lam, "weighting": w} for w in ("binary", "confidence") for lam in (50.0, 200.0, 500.0, 1500.0)]
KNN_GRID = [{"neighbours": n, "weighting": "binary"} for n in (10, 25, 50, 100, 200, 400)]
RECENT_GRID = [{"window": w} for w in (500, 1000, 2000, 5000, 10000, 20000, 40000)]
# What tune_peer picked on ML-100K (first 80% by time, tuned on its last 10%); used by `streamrec evaluate --no-tune`.
IALS_FOLDIN_DEFAULT = {"factors": 64, "regularization": 5.0, "alpha": 0.5, "iterations": 15}
EASE_DEFAULT = {"lambda": 200.0, "weighting": "confidence"}
KNN_DEFAULT = {"neighbours": 200, "weighting": "binary"}
RECENT_DEFAULT = {"window": 20000}


# ---------------------------------------------------------------------------------------------------------
# Shared pieces: the users' histories and the tie-aware ranking
# ---------------------------------------------------------------------------------------------------------


def pair_weight(signed_sum: float, weighting: str) -> float:
    """A pair's weight in a history row: 0 unless its signed sum is > 0 (a net-negative pair is unobserved, as
    in confidence_matrix), then log1p(sum) ("confidence") or 1 ("binary")."""
    if signed_sum <= 0:
        return 0.0
    return float(np.log1p(signed_sum)) if weighting == "confidence" else 1.0  # np, as UserHistory.row


class UserHistory:
    """Every user's aggregated interactions so far, in the `confidence_matrix` mapping (see the module
    docstring). Kept as signed sums per pair because log1p of a sum is not additive over events."""

    def __init__(self, catalog: Catalog, log: Interactions | None = None):
        self.catalog = catalog
        self.sums: dict[str, dict[int, float]] = {}
        if log is not None:
            confidences = event_confidences(log.types, log.values)
            for user, item, confidence in zip(log.user_ids, log.item_ids, confidences):
                self._add(str(user), str(item), float(confidence))

    def _add(self, user_id: str, item_id: str, confidence: float) -> tuple[int, float, float] | None:
        row = self.catalog.row(item_id)
        if row is None:
            return None
        pairs = self.sums.setdefault(user_id, {})
        before = pairs.get(row, 0.0)
        pairs[row] = before + confidence
        return row, before, pairs[row]

    def learn(self, event: Event) -> tuple[int, float, float] | None:
        """Add one event; returns (catalog row, the pair's signed sum before, after), None off the catalog."""
        confidence = event_confidences(np.array([int(event.type)]), np.array([event.value], np.float64))[0]
        return self._add(event.user_id, event.item_id, float(confidence))

    def row(self, user_id: str, weighting: str = "confidence") -> tuple[np.ndarray, np.ndarray]:
        """(catalog rows, weights) of the pairs that count (see pair_weight)."""
        pairs = self.sums.get(user_id)
        if not pairs:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        rows = np.fromiter(pairs.keys(), np.int64, len(pairs))
        sums = np.fromiter(pairs.values(), np.float64, len(pairs))
        keep = sums > 0
        return rows[keep], (np.log1p(sums[keep]) if weighting == "confidence" else np.ones(int(keep.sum())))


def weighted_matrix(log: Interactions, catalog: Catalog, weighting: str):
    """(users x items CSR of the training part, user index) with the given weighting."""
    if weighting not in ("binary", "confidence"):
        raise ValueError(f"weighting must be binary or confidence, got {weighting!r}")
    matrix, user_index = confidence_matrix(log, catalog)
    matrix = matrix.astype(np.float64)
    if weighting == "binary":
        matrix.data[:] = 1.0
    return matrix, user_index


def rank_with_ties(scores: np.ndarray, tiebreak: np.ndarray, k: int, exclude_rows: np.ndarray) -> np.ndarray:
    """Rows of the k best scores, best first, excluded rows left out; equal scores go by `tiebreak` (higher
    first), then by row. Sparse scorers (item-kNN, a short history) leave many items at 0: ordering those by
    popularity rather than catalog order is what one would deploy, and a user without history then gets exactly
    the popularity ranking."""
    s = np.array(scores, dtype=np.float64)
    s[np.asarray(exclude_rows, np.int64)] = -np.inf
    k = min(k, len(s))
    if k <= 0:
        return np.zeros(0, np.int64)
    kth = -np.partition(-s, k - 1)[k - 1]
    candidates = np.flatnonzero(s >= kth)  # every item tied with the k-th, so the tie-break sees them all
    order = candidates[np.lexsort((candidates, -tiebreak[candidates], -s[candidates]))][:k]
    return order[np.isfinite(s[order])]


class HistoryPeer:
    """Base of the history-based peers: `learn` adds every event to the users' histories and to the all-time
    popularity (the tie-break); `recommend` ranks `user_scores`, which by default scores the user's current
    history row with `score(rows, weights)`. Subclasses set `weighting` and implement `score`."""

    weighting = "confidence"

    def __init__(self, name: str, catalog: Catalog, history: Interactions | None, params: dict):
        self.name, self.catalog, self.params = name, catalog, dict(params)
        self.history = UserHistory(catalog, history)
        self.popularity = Popularity(catalog, history)
        self.steps = self.popularity_steps = 0
        self.fit_seconds = 0.0

    def score(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def user_scores(self, user_id: str) -> np.ndarray | None:
        """Scores of every catalog item for the user's current history; None when it is empty."""
        rows, weights = self.history.row(user_id, self.weighting)
        return self.score(rows, weights) if len(rows) else None

    def learn(self, event: Event) -> None:
        self.history.learn(event)
        self.popularity.learn(event)

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        self.steps += 1
        scores = self.user_scores(user_id)
        if scores is None:  # nothing to personalise from: the tie-break alone is the online popularity ranking
            self.popularity_steps += 1
            scores = np.zeros(len(self.catalog))
        return [self.catalog.ids[r] for r in rank_with_ties(scores, self.popularity.counts, k, exclude_rows)]

    def details(self) -> dict:
        return {"params": self.params, "fit_seconds": round(self.fit_seconds, 3),
                "popularity_steps": self.popularity_steps,
                "fallback": "users without history get online popularity (also the tie-break)"}


class LinearHistoryPeer(HistoryPeer):
    """A peer whose scores are linear in the history row: scores = weights @ item_matrix[rows] (EASE, item-kNN).
    Gathering a heavy user's rows of a dense items x items matrix at every step costs megabytes of memory
    traffic, so each user's score vector is computed once and then updated by the one row whose weight an
    event changes: the same sums, in another order."""

    item_matrix: np.ndarray

    def __init__(self, name: str, catalog: Catalog, history: Interactions | None, params: dict):
        super().__init__(name, catalog, history, params)
        self.cached: dict[str, np.ndarray] = {}

    def score(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return weights @ self.item_matrix[rows]

    def user_scores(self, user_id: str) -> np.ndarray | None:
        scores = self.cached.get(user_id)
        if scores is None:
            scores = super().user_scores(user_id)
            if scores is not None:
                self.cached[user_id] = scores
        return scores

    def learn(self, event: Event) -> None:
        change = self.history.learn(event)
        self.popularity.learn(event)
        scores = self.cached.get(event.user_id)
        if change is not None and scores is not None:
            row, before, after = change
            delta = pair_weight(after, self.weighting) - pair_weight(before, self.weighting)
            if delta:
                scores += delta * self.item_matrix[row]


# ---------------------------------------------------------------------------------------------------------
# The peers
# ---------------------------------------------------------------------------------------------------------


def ials_fold_in(item_factors: np.ndarray, gram_plus_reg: np.ndarray, rows: np.ndarray, strengths: np.ndarray,
                 alpha: float) -> np.ndarray:
    """Exact iALS user vector given frozen item factors Y, in implicit's convention (confidence c = alpha * r
    on observed items, 1 elsewhere; preference 1 on observed items):
        x = (Y^T Y + reg I + Y^T (C_u - I) Y)^-1 Y^T C_u p_u,
    computed over the observed items only. gram_plus_reg = Y^T Y + reg I (shared by every user)."""
    y = item_factors[rows]
    c = alpha * np.asarray(strengths, np.float64)
    a = gram_plus_reg + (y * (c - 1.0)[:, None]).T @ y
    return np.linalg.solve(a, c @ y)


class IALSFoldIn(HistoryPeer):
    """iALS online: implicit ALS fitted on the training part gives frozen item factors; at every recommend the
    user's vector is re-solved exactly from their whole current history, so users new in the replay are
    personalised from their first event, like streamrec's. (streamrec folds in its latest 20 events and also
    nudges item vectors; this peer refolds everything and never moves items.)"""

    def __init__(self, train: Dataset, catalog: Catalog, params: dict, seed: int = 0, threads: int = 1,
                 name: str = "iALS fold-in (online)"):
        super().__init__(name, catalog, train.interactions, params)
        started = time.perf_counter()
        matrix, _ = confidence_matrix(train.interactions, catalog)
        _, item_factors = fit_implicit("als", matrix, params, seed, threads)
        self.item_factors = item_factors  # float64 copies: the fold-in solves in double precision
        self.alpha = float(params["alpha"])
        regularization = float(params["regularization"]) * np.eye(item_factors.shape[1])
        self.gram_plus_reg = item_factors.T @ item_factors + regularization
        self.fit_seconds = time.perf_counter() - started

    def user_vector(self, user_id: str) -> np.ndarray:
        rows, strengths = self.history.row(user_id, "confidence")
        if not len(rows):
            return np.zeros(self.item_factors.shape[1])
        return ials_fold_in(self.item_factors, self.gram_plus_reg, rows, strengths, self.alpha)

    def score(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.item_factors @ ials_fold_in(self.item_factors, self.gram_plus_reg, rows, weights, self.alpha)


def ease_weights(matrix, lam: float) -> np.ndarray:
    """EASE's item-item matrix (Steck 2019): B = I - P diag(1 / diag P) with P = (X^T X + lam I)^-1, i.e.
    B_ij = -P_ij / P_jj off the diagonal and 0 on it (the closed form of min |X - XB|^2 + lam |B|^2, diag B = 0)."""
    gram = np.asarray((matrix.T @ matrix).toarray(), np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b


class EASE(LinearHistoryPeer):
    """EASE on the training part's user-item matrix; scores = the user's current history row @ B."""

    def __init__(self, train: Dataset, catalog: Catalog, params: dict, name: str = "EASE (online history)"):
        super().__init__(name, catalog, train.interactions, params)
        started = time.perf_counter()
        self.weighting = params["weighting"]
        matrix, _ = weighted_matrix(train.interactions, catalog, self.weighting)
        self.item_matrix = ease_weights(matrix, float(params["lambda"]))  # B
        self.fit_seconds = time.perf_counter() - started


def knn_similarities(matrix, neighbours: int) -> np.ndarray:
    """Cosine similarity of item columns (co-occurrence over norms), self-similarity 0, each item's row
    keeping only its `neighbours` largest entries (the neighbours it lends its score to)."""
    co = np.asarray((matrix.T @ matrix).toarray(), np.float64)
    norms = np.sqrt(np.diag(co))
    sim = np.divide(co, np.outer(norms, norms), out=np.zeros_like(co), where=np.outer(norms, norms) > 0)
    sim[np.diag_indices_from(sim)] = 0.0
    if neighbours < sim.shape[1]:
        dropped = np.argpartition(-sim, neighbours, axis=1)[:, neighbours:]
        np.put_along_axis(sim, dropped, 0.0, axis=1)
    return sim


class ItemKNN(LinearHistoryPeer):
    """Item-based kNN (Sarwar 2001, Deshpande & Karypis 2004): score of item j = sum over the user's history
    items i of sim(i, j), where only i's top-K neighbours carry a similarity."""

    def __init__(self, train: Dataset, catalog: Catalog, params: dict, name: str = "item-kNN (online history)"):
        super().__init__(name, catalog, train.interactions, params)
        started = time.perf_counter()
        self.weighting = params["weighting"]
        matrix, _ = weighted_matrix(train.interactions, catalog, self.weighting)
        self.item_matrix = knn_similarities(matrix, int(params["neighbours"]))  # pruned similarities
        self.fit_seconds = time.perf_counter() - started


class RecentPopularity:
    """Items by their positive events among the last W events of the stream (the training part's tail, then
    the replay so far); ties by all-time online popularity. Follows trends that all-time counts average out."""

    def __init__(self, catalog: Catalog, history: Interactions | None, params: dict,
                 name: str = "recent popularity (online)"):
        self.name, self.catalog, self.params = name, catalog, dict(params)
        self.window = int(params["window"])
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        self.recent = np.zeros(len(catalog), np.float64)
        self.rows: deque[int] = deque()  # catalog row of each windowed event's positive, -1 when it counts nothing
        self.popularity = Popularity(catalog, history)
        if history is not None:
            start = max(len(history) - self.window, 0)
            for item, t, v in zip(history.item_ids[start:], history.types[start:], history.values[start:]):
                self._push(str(item), int(t), float(v))

    def _push(self, item_id: str, event_type: int, value: float) -> None:
        row = self.catalog.row(item_id)
        counted = row if row is not None and is_positive(event_type, value) else -1
        self.rows.append(counted)
        if counted >= 0:
            self.recent[counted] += 1
        if len(self.rows) > self.window:  # the oldest event leaves the window
            gone = self.rows.popleft()
            if gone >= 0:
                self.recent[gone] -= 1

    def learn(self, event: Event) -> None:
        self._push(event.item_id, int(event.type), event.value)
        self.popularity.learn(event)

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        return [self.catalog.ids[r] for r in rank_with_ties(self.recent, self.popularity.counts, k, exclude_rows)]

    def details(self) -> dict:
        return {"params": self.params}


# ---------------------------------------------------------------------------------------------------------
# Tuning on the training part
# ---------------------------------------------------------------------------------------------------------

PeerBuilder = Callable[[Dataset, dict], object]  # (training data, params) -> a Recommender


def builders(catalog: Catalog, seed: int = 0, threads: int = 1) -> dict[str, PeerBuilder]:
    """How each peer is built from (training data, params), by its `streamrec evaluate` key."""
    return {
        "ials-foldin": lambda data, params: IALSFoldIn(data, catalog, params, seed, threads),
        "ease": lambda data, params: EASE(data, catalog, params),
        "itemknn": lambda data, params: ItemKNN(data, catalog, params),
        "recent-pop": lambda data, params: RecentPopularity(catalog, data.interactions, params),
    }


GRIDS = {"ials-foldin": IALS_FOLDIN_GRID, "ease": EASE_GRID, "itemknn": KNN_GRID, "recent-pop": RECENT_GRID}
DEFAULTS = {"ials-foldin": IALS_FOLDIN_DEFAULT, "ease": EASE_DEFAULT, "itemknn": KNN_DEFAULT,
            "recent-pop": RECENT_DEFAULT}


def tune_peer(build: PeerBuilder, grid: Sequence[dict], train: Dataset, catalog: Catalog, k: int = 10,
              validation_fraction: float = 0.1) -> tuple[dict, list[dict]]:
    """Pick params by NDCG@k of the same online prequential replay on the last `validation_fraction` of the
    training part, the model built from the rest (as `tune_implicit`). Never looks at the replay.
    Returns (best params, all trials)."""
    fit_part, valid = time_split(train, 1.0 - validation_fraction)
    events = replay_events(valid, "tune-")
    trials = []
    for params in grid:
        result = prequential_replay(events, build(fit_part, params), k, catalog=catalog, history=fit_part.interactions)
        trials.append({"params": params, "hr": result.hr, "ndcg": result.ndcg})
    best = max(trials, key=lambda t: (t["ndcg"], t["hr"]))
    return best["params"], trials

