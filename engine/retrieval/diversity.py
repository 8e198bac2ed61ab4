"""Diversity by re-selection (issue 20): the answer's k items are picked greedily from a larger pool of ranked
candidates (retrieval order, or the reranker's), by maximal marginal relevance over the live item vectors and
under a cap on items per category.

Each pick maximises (1 - lambda) * relevance - lambda * (the highest cosine to an item already picked), relevance
being the pool's scores scaled to [0, 1]: the scale of cosines, model scores and popularity differ, and one
lambda should mean the same trade-off whichever stage ranked the pool. Ties go to the earlier item of the pool,
so lambda 0 gives the plain order and every answer is a function of the pool alone (no randomness).
The cap is a hard constraint: an item in a category that already holds max_per_category picks is never taken,
even when that leaves the answer shorter than k.
"""
from __future__ import annotations

import numpy as np

POOL_FACTOR, POOL_MIN = 4, 50  # candidates ranked per diversified request: max(POOL_FACTOR * k, POOL_MIN)


def wanted(query) -> bool:
    return query.mmr_lambda > 0.0 or query.max_per_category > 0


def pool_size(k: int, max_k: int) -> int:
    """Ranked candidates a diversified request of k items chooses from (never fewer than k, never more than
    max_k unless k itself is: a larger pool would cost more than any request may ask)."""
    return max(k, min(max(POOL_FACTOR * k, POOL_MIN), max_k))


def category_incidence(category_bits: np.ndarray) -> np.ndarray:
    """bool [P, C]: pool item p is in the pool's c-th category. Columns of categories no pool item has are dropped."""
    bits = np.ascontiguousarray(category_bits, np.uint64)
    incidence = np.unpackbits(bits.view(np.uint8), axis=1).astype(bool)
    return incidence[:, incidence.any(axis=0)]


def select(scores: np.ndarray, vectors: np.ndarray, category_bits: np.ndarray, k: int, mmr_lambda: float,
           max_per_category: int) -> np.ndarray:
    """Positions in the pool (int64, in pick order) of at most k picks.

    scores: float [P], the pool's ranking scores, best first; vectors: float [P, d] unit item vectors;
    category_bits: uint64 [P, words], the catalog's category bitsets of the pool items."""
    size = len(scores)
    k = min(k, size)
    if k == 0 or (mmr_lambda <= 0.0 and max_per_category <= 0):
        return np.arange(k, dtype=np.int64)
    relevance = np.asarray(scores, np.float64)
    low, high = relevance.min(), relevance.max()
    relevance = (relevance - low) / (high - low) if high > low else np.zeros(size)
    if mmr_lambda > 0.0:
        # float64 products of the stored float32 vectors: the same cosines for the same pool on any BLAS.
        unit = np.asarray(vectors, np.float64)
        similarity = unit @ unit.T
        closest = np.full(size, -1.0)  # no pick yet: the same offset for everyone, so the first pick is the most relevant
    capped = max_per_category > 0
    if capped:
        incidence = category_incidence(category_bits)
        counts = np.zeros(incidence.shape[1], np.int64)
    available = np.ones(size, bool)
    picks: list[int] = []
    for _ in range(k):
        value = (1.0 - mmr_lambda) * relevance - mmr_lambda * closest if mmr_lambda > 0.0 else relevance.copy()
        value[~available] = -np.inf
        pick = int(np.argmax(value))  # first of equal values: the earlier item of the pool
        if not available[pick]:
            break  # the cap has closed every remaining candidate
        picks.append(pick)
        available[pick] = False
        if mmr_lambda > 0.0:
            np.maximum(closest, similarity[pick], out=closest)
        if capped and incidence.shape[1]:
            counts += incidence[pick]
            full = counts >= max_per_category
            if full.any():
                available &= ~incidence[:, full].any(axis=1)
    return np.array(picks, np.int64)
