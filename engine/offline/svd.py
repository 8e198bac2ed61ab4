"""Bootstrap embeddings: a truncated SVD of the implicit user x item confidence matrix (NumPy only).

Confidence of one (user, item) pair, before scaling:
  * each event adds its signed confidence (`signals.event_confidences`: what an event means is stated there);
  * the sum is clipped at 0 (a user who viewed then disliked an item gets nothing for it) and scaled with
    log1p, so heavy repeat interactions do not dominate the factorisation;
  * each item column is divided by sqrt(number of its users) (popularity_damping=0.5), else the leading
    components mostly encode popularity and, once vectors are normalised for cosine, rank worse; so does
    counting only ratings >= 4 (benchmarks/RESULTS.md, "Figures behind design choices").
Cosine between the returned user and item vectors ranks items for a user.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from streamrec.engine.offline.datasets import Interactions
from streamrec.engine.signals import event_confidences

log = logging.getLogger(__name__)

DENSE_MAX_ENTRIES = 20_000_000  # above this many matrix cells, use the randomized sparse SVD


@dataclass
class Factors:
    user_ids: list[str]
    user_vectors: np.ndarray  # float32 [U, dim], unit rows (zero rows for users without positive signal)
    item_ids: list[str]
    item_vectors: np.ndarray  # float32 [I, dim], unit rows (zero rows for items without interactions)
    singular_values: np.ndarray  # float64 [dim], descending, zero-padded beyond the matrix rank


def factorize(
    interactions: Interactions,
    dim: int = 64,
    seed: int = 0,
    item_ids: list[str] | None = None,
    popularity_damping: float = 0.5,
) -> Factors:
    """Truncated SVD embeddings of the confidence matrix; exactly `dim` columns, deterministic given seed.

    item_ids: the catalog order of the output (items without interactions get zero vectors, interactions on
    items outside it are dropped); default: items in order of first appearance. Users are always in order of
    first appearance. popularity_damping a divides each item column by (number of its users)^a; 0 is off.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    users, items, rows, cols, vals = confidence_matrix(interactions, item_ids)
    shape = (len(users), len(items))
    if popularity_damping and len(vals):
        n_users_per_item = np.bincount(cols, minlength=shape[1]).astype(np.float64)
        vals = vals / np.maximum(n_users_per_item, 1.0)[cols] ** popularity_damping

    k = min(dim, *shape) if len(vals) else 0
    if k == 0:
        u, s, vt = np.zeros((shape[0], 0)), np.zeros(0), np.zeros((0, shape[1]))
    elif shape[0] * shape[1] <= DENSE_MAX_ENTRIES:
        dense = np.zeros(shape, dtype=np.float64)
        dense[rows, cols] = vals
        u, s, vt = np.linalg.svd(dense, full_matrices=False)
        u, s, vt = u[:, :k], s[:k], vt[:k]
    else:
        u, s, vt = randomized_svd(rows, cols, vals, shape, k, np.random.default_rng(seed))
    u, s, vt = _drop_null_components(u, s, vt, shape)
    u, vt = _fix_signs(u, vt)

    root = np.sqrt(s)
    return Factors(
        user_ids=users,
        user_vectors=_pad_normalise(u * root, dim),
        item_ids=items,
        item_vectors=_pad_normalise(vt.T * root, dim),
        singular_values=np.pad(s, (0, dim - len(s))),
    )


def confidence_matrix(
    interactions: Interactions, item_ids: list[str] | None = None
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Aggregated COO matrix (users, items, rows, cols, log1p confidences > 0); see the module docstring."""
    users, user_codes, items, item_codes = interaction_codes(interactions, item_ids)

    weights = event_confidences(interactions.types, interactions.values)
    known = item_codes >= 0
    if not known.all():
        log.warning("dropping %d events on items outside item_ids", int((~known).sum()))
    user_codes, item_codes, weights = user_codes[known], item_codes[known], weights[known]

    n_items = max(len(items), 1)
    keys, inverse = np.unique(user_codes * n_items + item_codes, return_inverse=True)
    sums = np.bincount(inverse.ravel(), weights=weights, minlength=len(keys))
    keep = sums > 0
    keys, sums = keys[keep], sums[keep]
    return users, items, keys // n_items, keys % n_items, np.log1p(sums)


def randomized_svd(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int], k: int,
    rng: np.random.Generator, n_iter: int = 4, oversample: int = 10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Halko-Martinsson-Tropp randomized SVD of a COO matrix, with QR-stabilised power iterations."""
    m, n = shape
    width = min(k + oversample, m, n)

    def a_times(x: np.ndarray) -> np.ndarray:  # A @ x, x [n, w]
        return np.stack([np.bincount(rows, weights=vals * col[cols], minlength=m) for col in x.T], axis=1)

    def at_times(y: np.ndarray) -> np.ndarray:  # A.T @ y, y [m, w]
        return np.stack([np.bincount(cols, weights=vals * col[rows], minlength=n) for col in y.T], axis=1)

    q, _ = np.linalg.qr(a_times(rng.standard_normal((n, width))))
    for _ in range(n_iter):
        q, _ = np.linalg.qr(at_times(q))
        q, _ = np.linalg.qr(a_times(q))
    ub, s, vt = np.linalg.svd(at_times(q).T, full_matrices=False)  # B = Q.T A, small [width, n]
    return (q @ ub)[:, :k], s[:k], vt[:k]


def interaction_codes(interactions: Interactions, item_ids: list[str] | None = None):
    """(users, user code per event, items, item code per event): users in order of first appearance; items as
    given (events on items outside `item_ids` get code -1) or in order of first appearance."""
    users, user_codes = _codes(interactions.user_ids)
    if item_ids is None:
        items, item_codes = _codes(interactions.item_ids)
    else:
        items = [str(i) for i in item_ids]
        index = {item: j for j, item in enumerate(items)}
        if len(index) != len(items):
            raise ValueError("item_ids has duplicates")
        item_codes = np.fromiter((index.get(str(i), -1) for i in interactions.item_ids), np.int64, len(interactions))
    return users, user_codes, items, item_codes


def _codes(ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Ids -> (distinct ids in order of first appearance, int code per entry)."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(str(i), len(index)) for i in ids), np.int64, len(ids))
    return list(index), codes


def _drop_null_components(u: np.ndarray, s: np.ndarray, vt: np.ndarray, shape: tuple[int, int]):
    """Keep only components above numerical noise, so padding beyond the rank is exact zeros."""
    if len(s) == 0:
        return u, s, vt
    r = int(np.sum(s > s[0] * max(shape) * np.finfo(np.float64).eps))
    return u[:, :r], s[:r], vt[:r]


def _fix_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SVD signs are arbitrary; make each item-side component's largest entry positive for reproducibility."""
    if vt.shape[0] == 0:
        return u, vt
    signs = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return u * signs, vt * signs[:, None]


def _pad_normalise(x: np.ndarray, dim: int) -> np.ndarray:
    out = np.zeros((x.shape[0], dim), dtype=np.float32)
    out[:, : x.shape[1]] = x
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)  # all-zero rows stay zero, no NaN
    return out
