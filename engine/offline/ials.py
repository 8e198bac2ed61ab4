"""Implicit-feedback ALS (iALS, Hu, Koren & Volinsky 2008) as plain NumPy references.

Every Numba kernel in engine/cpu/ials.py (training sweeps) and engine/cpu/online.py (online fold-in) is tested
against these functions.

Model. Each observed (user, item) pair has a preference p (1 = interest, 0 = rejection) and a strength s >= 0;
every unobserved pair counts as p = 0 with confidence 1. The confidence of an observed pair is c = 1 + alpha*s.
    loss = sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + reg (|X|^2 + |Y|^2)
Signed per-event strengths come from `signals.event_confidences` (VIEW .25 .. PURCHASE 1, RATING 1+0.5*w, so
any rating is a sign the item was consumed; SKIP -.3, DISLIKE -1). A pair's signed sum > 0 gives p = 1, < 0 gives
p = 0 with extra confidence (negative feedback pushes the user's vector away from the item), and the strength is
log1p(|sum|), so repeats do not dominate.

With G = Y^T Y, the exact solve for one user (the "fold-in") is
    (G + reg I + sum_obs alpha s_i y_i y_i^T) x = sum_{obs, p=1} (1 + alpha s_i) y_i
which costs O(n_u d^2 + d^3) instead of touching every item.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamrec.engine.offline.datasets import Interactions
from streamrec.engine.offline.svd import interaction_codes
from streamrec.engine.signals import event_confidences


@dataclass
class PairMatrix:
    """Aggregated observed pairs in CSR form, by user (and the transpose, by item)."""

    user_ids: list[str]
    item_ids: list[str]
    rows: np.ndarray  # int64 [nnz] user of each pair
    cols: np.ndarray  # int64 [nnz] item of each pair
    strength: np.ndarray  # float64 [nnz] log1p(|signed sum|) > 0
    pref: np.ndarray  # float64 [nnz] 1.0 (interest) or 0.0 (rejection)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.user_ids), len(self.item_ids)

    def csr(self, by_item: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, indices, strength, pref) with rows = users (or items when by_item), indices sorted."""
        major, minor = (self.cols, self.rows) if by_item else (self.rows, self.cols)
        n = self.shape[1] if by_item else self.shape[0]
        order = np.lexsort((minor, major))
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(major, minlength=n), out=indptr[1:])
        return indptr, minor[order].astype(np.int64), self.strength[order], self.pref[order]


def pair_matrix(interactions: Interactions, item_ids: list[str] | None = None) -> PairMatrix:
    """Aggregate events into (user, item) pairs; users in order of first appearance, items as given (events
    on items outside `item_ids` are dropped) or in order of first appearance."""
    users, user_codes, items, item_codes = interaction_codes(interactions, item_ids)
    signed = event_confidences(interactions.types, interactions.values)
    known = item_codes >= 0
    user_codes, item_codes, signed = user_codes[known], item_codes[known], signed[known]
    n_items = max(len(items), 1)
    keys, inverse = np.unique(user_codes * n_items + item_codes, return_inverse=True)
    sums = np.bincount(inverse.ravel(), weights=signed, minlength=len(keys))
    keep = sums != 0
    keys, sums = keys[keep], sums[keep]
    return PairMatrix(users, items, keys // n_items, keys % n_items, np.log1p(np.abs(sums)), (sums > 0).astype(np.float64))


def gram(factors: np.ndarray) -> np.ndarray:
    f = np.asarray(factors, np.float64)
    return f.T @ f


def solve_row(others: np.ndarray, gram_matrix: np.ndarray, indices: np.ndarray, strength: np.ndarray,
              pref: np.ndarray, alpha: float, reg: float) -> np.ndarray:
    """Exact least-squares vector of one row (user or item) given the other side's factors and their Gram."""
    y = np.asarray(others, np.float64)[indices]
    cw = alpha * np.asarray(strength, np.float64)
    a = gram_matrix + reg * np.eye(gram_matrix.shape[0]) + (y * cw[:, None]).T @ y
    b = ((1.0 + cw) * pref) @ y
    return np.linalg.solve(a, b)


def solve_sweep_reference(others: np.ndarray, csr: tuple, alpha: float, reg: float) -> np.ndarray:
    """Exact solves for every row of one side: float64 [rows, d]."""
    indptr, indices, strength, pref = csr
    g = gram(others)
    out = np.zeros((len(indptr) - 1, others.shape[1]))
    for r in range(len(indptr) - 1):
        lo, hi = indptr[r], indptr[r + 1]
        out[r] = solve_row(others, g, indices[lo:hi], strength[lo:hi], pref[lo:hi], alpha, reg)
    return out


def ials_epoch_reference(x: np.ndarray, y: np.ndarray, pairs: PairMatrix, alpha: float, reg: float) -> tuple[np.ndarray, np.ndarray]:
    """One exact alternating epoch: users given items, then items given users."""
    x = solve_sweep_reference(y, pairs.csr(), alpha, reg)
    y = solve_sweep_reference(x, pairs.csr(by_item=True), alpha, reg)
    return x, y


def loss(x: np.ndarray, y: np.ndarray, pairs: PairMatrix, alpha: float, reg: float) -> float:
    """The full weighted loss over all user x item cells (computed without materialising them), per pair
    of the observed matrix so runs on different data sizes compare."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    everything = float(np.sum(gram(x) * gram(y)))  # sum over all cells of (x.y)^2 (p = 0, c = 1)
    pred = np.einsum("ij,ij->i", x[pairs.rows], y[pairs.cols])
    c = 1.0 + alpha * pairs.strength
    observed = float(np.sum(c * (pairs.pref - pred) ** 2 - pred**2))
    penalty = reg * float(np.sum(x * x) + np.sum(y * y))
    return (everything + observed + penalty) / max(len(pairs.rows), 1)
