"""Features for the second stage (reranking): one row per (user, candidate), built for a whole batch of
queries at once. Training (engine/offline/rerank_training.py) and serving (engine/rerank/reranker.py) both call
`build_features` (a Numba kernel, engine/cpu/features.py), so the two cannot drift;
`build_features_numpy` is the NumPy reference it is tested against (same values up to float rounding); the model's sidecar records FEATURE_SPEC and the dimension,
and a model built for another spec or dimension is refused.

Two steps:
  * `capture_user` / `ItemArrays.of` run under the state lock and copy (users) or reference (items) the
    little each query needs: the user's unit query vector, counts, last event time and recent history;
  * `build_features` runs outside the lock on those snapshots plus the retrieved candidates: it packs the
    batch into flat arrays and one compiled call fills every row (no per-candidate Python).

Time features are measured against the state clock (the latest event timestamp the state has applied,
`state_clock_ms`), not the wall clock, so a replay of an old log (training, evaluation, the demo data set)
sees the same feature values that a live server sees for live traffic.

Row layout (float32, width 3 * dim + len(SCALAR_FEATURES)):
    [ user vector (dim) | item vector (dim) | user * item (dim) | scalars (see SCALAR_FEATURES) ]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamrec.engine.api import EventType
from streamrec.engine.cpu import features as _kernel
from streamrec.engine.signals import POSITIVE_TYPES, RATING_POSITIVE

FEATURE_SPEC = "streamrec-rerank-features-v1"

SCALAR_FEATURES = (
    "retrieval_score",          # cosine from the retrieval stage
    "retrieval_rank_frac",      # rank / number of candidates (0 = first)
    "retrieval_log_rank",       # log1p(rank)
    "retrieval_score_gap",      # top candidate's score - this score
    "item_log_interactions",    # log1p(all events on the item)
    "item_log2_pop_now",        # log2 of the time-decayed positive count at the state clock
    "item_pop_trend",           # item_log2_pop_now - log2(1 + interactions): recent share of all-time activity
    "item_pop_rel",             # item_log2_pop_now - the best among this query's candidates
    "item_pop_rank_frac",       # rank of the item's decayed popularity among the candidates / count
    "item_log_hours_idle",      # log1p(hours since the item's last event)
    "item_never",               # 1 when the item has no event at all
    "item_num_categories",
    "user_log_events",          # log1p(user's event count): activity level
    "user_log_seen",            # log1p(distinct items seen)
    "user_log_hours_idle",      # log1p(hours since the user's last event)
    "user_recent_positive_frac",  # share of the user's recent events that were positive
    "cat_match_frac",           # share of the user's recent positive items sharing a category with the item
    "cat_match_recency",        # the same, weighted by recency (0.85 ** position)
    "hist_max_cos",             # max cosine between the item and the user's recent positive items
    "hist_mean_cos5",           # mean cosine to the 5 most recent positive items
    "hist_last_cos",            # cosine to the most recent positive item
    "neg_max_cos",              # max cosine to the user's recent negative items (0 when none)
)
N_SCALARS = len(SCALAR_FEATURES)

RECENT_POSITIVES = 20  # recent positive history items the history features look at
RECENT_NEGATIVES = 10
RECENCY_DECAY = 0.85
POP_FLOOR = -40.0  # log2 popularity of an item with no positive event (instead of -inf)
NEVER_HOURS = 1e6  # idle time used when there is no event at all
_HOUR_MS = 3_600_000.0
_RATING = int(EventType.RATING)
_RECENCY_WEIGHTS = RECENCY_DECAY ** np.arange(max(RECENT_POSITIVES, 1), dtype=np.float64)  # as the reference
_EMPTY_ROWS = np.zeros(0, np.int64)
_LOG1P_RANK = np.log1p(np.arange(1024, dtype=np.float32))  # float32, as the reference computes it
_NEVER_LOG_HOURS = float(np.log1p(NEVER_HOURS))
if _kernel.SCALAR_ORDER != SCALAR_FEATURES:  # the compiled kernel writes the columns in its own fixed order
    raise ImportError("cpu/features.SCALAR_ORDER differs from rerank/features.SCALAR_FEATURES")


def feature_count(dim: int) -> int:
    return 3 * dim + N_SCALARS


def feature_names(dim: int) -> list[str]:
    return ([f"user_{j}" for j in range(dim)] + [f"item_{j}" for j in range(dim)]
            + [f"dot_{j}" for j in range(dim)] + list(SCALAR_FEATURES))


@dataclass
class UserContext:
    """What the features need from one user, copied under the state lock."""

    vector: np.ndarray           # float32 [dim], unit query vector
    event_count: int
    seen_count: int
    last_event_ms: int
    positive_rows: np.ndarray    # int64 [<= RECENT_POSITIVES], most recent first
    negative_rows: np.ndarray    # int64 [<= RECENT_NEGATIVES], most recent first
    recent_positive_frac: float


@dataclass
class ItemArrays:
    """References to the catalog arrays (rows only grow, and grown arrays are copies, so a reference
    taken under the lock stays a consistent view of rows < n)."""

    vectors: np.ndarray          # float32 [n, dim]
    log2_popularity: np.ndarray  # float64 [n]
    interactions: np.ndarray     # int64 [n]
    last_event_ms: np.ndarray    # int64 [n]
    category_bits: np.ndarray    # uint64 [n, words]
    half_life_ms: float

    @classmethod
    def of(cls, items) -> "ItemArrays":
        n = len(items)
        return cls(items.vectors[:n], items.log2_popularity[:n], items.interactions[:n], items.last_event_ms[:n],
                   items.category_bits[:n], float(items.half_life_ms))


def capture_user(users, row: int, vector: np.ndarray) -> UserContext:
    """Snapshot of user `row` (call under the state lock). `vector` is its unit query vector.
    One plain pass over the (short, bounded) history, most recent first: cheaper than building arrays."""
    history = users.history[row]
    if history:
        positives: list[int] = []
        negatives: list[int] = []
        n_positive = 0
        for item_row, event_type, value, _ in reversed(history):
            if (value >= RATING_POSITIVE) if event_type == _RATING else (event_type in POSITIVE_TYPES):
                n_positive += 1
                if len(positives) < RECENT_POSITIVES:
                    positives.append(item_row)
            elif len(negatives) < RECENT_NEGATIVES:
                negatives.append(item_row)
        positive_rows = np.array(positives, np.int64) if positives else _EMPTY_ROWS
        negative_rows = np.array(negatives, np.int64) if negatives else _EMPTY_ROWS
        frac = n_positive / len(history)
    else:
        positive_rows = negative_rows = _EMPTY_ROWS
        frac = 0.0
    return UserContext(np.asarray(vector, np.float32), int(users.event_counts[row]), len(users.seen[row]),
                       int(users.last_event_ms[row]), positive_rows, negative_rows, frac)


def state_clock_ms(items) -> int:
    """The latest event timestamp applied to the catalog (0 when none)."""
    n = len(items)
    return int(items.last_event_ms[:n].max()) if n else 0


def _pad_rows(lists: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, width] int64 rows padded with 0, and the bool mask of real entries."""
    rows = np.zeros((len(lists), max(width, 1)), np.int64)
    mask = np.zeros((len(lists), max(width, 1)), bool)
    for b, values in enumerate(lists):
        m = min(len(values), width)
        rows[b, :m] = values[:m]
        mask[b, :m] = True
    return rows, mask


def _log_hours(delta_ms: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(delta_ms, 0.0) / _HOUR_MS)


def build_features(users: list[UserContext], candidates: list[np.ndarray], scores: list[np.ndarray],
                   items: ItemArrays, now_ms: int) -> np.ndarray:
    """float32 [sum(len(c) for c in candidates), feature_count(dim)]: the rows of query 0's candidates
    (in the given order), then query 1's, and so on. `candidates[b]` are item rows (>= 0) in retrieval
    order, `scores[b]` their retrieval scores. The function training and serving use (Numba kernel);
    equal to `build_features_numpy` up to float rounding."""
    batch = len(users)
    vectors = items.vectors
    dim = vectors.shape[1]
    # Fresh, writable arrays of fixed dtypes and layouts (a read-only or strided view would make Numba
    # compile another specialisation on the request path).
    if batch == 1:  # the common serving case: no concatenation
        cand = np.array(candidates[0], np.int64)
        flat_scores = np.array(scores[0], np.float32)
        offsets = np.array([0, len(cand)], np.int64)
        user_vec = np.empty((1, dim), np.float32)
        user_vec[0] = users[0].vector
    else:
        counts = [len(c) for c in candidates]
        offsets = np.zeros(batch + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        cand = np.concatenate(candidates).astype(np.int64, copy=False) if batch else np.zeros(0, np.int64)
        flat_scores = np.concatenate(scores).astype(np.float32, copy=False) if batch else np.zeros(0, np.float32)
        user_vec = np.empty((batch, dim), np.float32)
        for b, u in enumerate(users):
            user_vec[b] = u.vector
    total = int(offsets[-1])
    out = np.empty((total, feature_count(dim)), np.float32)
    if total == 0:
        return out
    if len(flat_scores) != total:
        raise ValueError(f"scores: {len(flat_scores)} values for {total} candidates")
    if cand.min() < 0 or cand.max() >= len(vectors):
        raise IndexError(f"candidate rows must be in [0, {len(vectors)})")
    user_ints = np.empty((batch, 3), np.int64)
    user_frac = np.empty(batch, np.float64)
    pos = np.zeros((batch, max(RECENT_POSITIVES, 1)), np.int64)
    neg = np.zeros((batch, max(RECENT_NEGATIVES, 1)), np.int64)
    pos_count = np.empty(batch, np.int64)
    neg_count = np.empty(batch, np.int64)
    n = len(vectors)
    for b, u in enumerate(users):
        user_ints[b, 0] = u.event_count
        user_ints[b, 1] = u.seen_count
        user_ints[b, 2] = u.last_event_ms
        user_frac[b] = u.recent_positive_frac
        p = u.positive_rows[:RECENT_POSITIVES]
        q = u.negative_rows[:RECENT_NEGATIVES]
        pos[b, : len(p)] = p
        neg[b, : len(q)] = q
        pos_count[b] = len(p)
        neg_count[b] = len(q)
    if (pos.min() < 0 or pos.max() >= n) or (neg.min() < 0 or neg.max() >= n):
        raise IndexError(f"history rows must be in [0, {n})")
    _kernel.features_kernel(
        user_vec, user_ints, user_frac, pos, pos_count, neg, neg_count, cand, offsets, flat_scores,
        _kernel_array(vectors, np.float32), _kernel_array(items.log2_popularity, np.float64),
        _kernel_array(items.interactions, np.int64), _kernel_array(items.last_event_ms, np.int64),
        _kernel_array(items.category_bits, np.uint64), float(now_ms / items.half_life_ms), int(now_ms),
        _HOUR_MS, POP_FLOOR, _NEVER_LOG_HOURS, _RECENCY_WEIGHTS, _LOG1P_RANK, out)
    return out


def _kernel_array(a: np.ndarray, dtype) -> np.ndarray:
    """`a` itself when it already has the kernel's type (C-contiguous, writable, dtype), else a copy."""
    if a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype, order="C")


def build_features_numpy(users: list[UserContext], candidates: list[np.ndarray], scores: list[np.ndarray],
                         items: ItemArrays, now_ms: int) -> np.ndarray:
    """The NumPy reference of `build_features` (the implementation the shipped model was trained with):
    kept to test the kernel against, not called by training or serving."""
    dim = items.vectors.shape[1]
    batch = len(users)
    counts = np.fromiter((len(c) for c in candidates), np.int64, batch)
    total = int(counts.sum())
    out = np.empty((total, feature_count(dim)), np.float32)
    if total == 0:
        return out
    width = int(counts.max())
    cand, valid = _pad_rows(candidates, width)                       # [B, C]
    score = np.zeros(cand.shape, np.float32)
    for b, s in enumerate(scores):
        score[b, : len(s)] = s
    user_vec = np.stack([u.vector for u in users]).astype(np.float32)  # [B, d]
    item_vec = items.vectors[cand]                                     # [B, C, d]

    s = np.zeros((*cand.shape, N_SCALARS), np.float32)                # [B, C, S]
    f = {name: j for j, name in enumerate(SCALAR_FEATURES)}
    rank = np.broadcast_to(np.arange(cand.shape[1], dtype=np.float32), cand.shape)
    s[..., f["retrieval_score"]] = score
    s[..., f["retrieval_rank_frac"]] = rank / np.maximum(counts, 1)[:, None]
    s[..., f["retrieval_log_rank"]] = np.log1p(rank)
    s[..., f["retrieval_score_gap"]] = score[:, :1] - score

    interactions = items.interactions[cand].astype(np.float64)
    log2_pop = items.log2_popularity[cand] - now_ms / items.half_life_ms
    log2_pop = np.where(np.isfinite(log2_pop), np.clip(log2_pop, POP_FLOOR, -POP_FLOOR), POP_FLOOR)
    s[..., f["item_log_interactions"]] = np.log1p(interactions)
    s[..., f["item_log2_pop_now"]] = log2_pop
    s[..., f["item_pop_trend"]] = log2_pop - np.log2(1.0 + interactions)
    pop_for_max = np.where(valid, log2_pop, -np.inf)
    s[..., f["item_pop_rel"]] = log2_pop - pop_for_max.max(axis=1, keepdims=True)
    order = np.argsort(-pop_for_max, axis=1, kind="stable")
    pop_rank = np.empty_like(order)
    np.put_along_axis(pop_rank, order, np.arange(cand.shape[1])[None, :].repeat(batch, 0), axis=1)
    s[..., f["item_pop_rank_frac"]] = pop_rank / np.maximum(counts, 1)[:, None]
    last = items.last_event_ms[cand]
    never = interactions == 0
    s[..., f["item_log_hours_idle"]] = np.where(never, np.log1p(NEVER_HOURS), _log_hours(now_ms - last.astype(np.float64)))
    s[..., f["item_never"]] = never
    bits = items.category_bits[cand]                                   # [B, C, W]
    s[..., f["item_num_categories"]] = _popcount(bits).sum(axis=-1)

    user_scalars = np.array([[np.log1p(u.event_count), np.log1p(u.seen_count),
                              np.log1p(NEVER_HOURS) if u.last_event_ms <= 0 else _log_hours(float(now_ms - u.last_event_ms)),
                              u.recent_positive_frac] for u in users], np.float32)
    for j, name in enumerate(("user_log_events", "user_log_seen", "user_log_hours_idle", "user_recent_positive_frac")):
        s[..., f[name]] = user_scalars[:, j, None]

    # History: the user's recent positive (and negative) items against every candidate, one batched matmul.
    pos, pos_mask = _pad_rows([u.positive_rows for u in users], RECENT_POSITIVES)   # [B, H]
    cos = _cosines(item_vec, items.vectors[pos], counts)                               # [B, C, H]
    has_pos = pos_mask.any(axis=1)[:, None]
    s[..., f["hist_max_cos"]] = np.where(has_pos, np.where(pos_mask[:, None, :], cos, -np.inf).max(axis=2), 0.0)
    first5 = pos_mask.copy()
    first5[:, 5:] = False
    n5 = np.maximum(first5.sum(axis=1), 1)[:, None]
    s[..., f["hist_mean_cos5"]] = np.where(first5[:, None, :], cos, 0.0).sum(axis=2) / n5
    s[..., f["hist_last_cos"]] = np.where(pos_mask[:, None, :1], cos[..., :1], 0.0)[..., 0]
    shared = (bits[:, :, None, :] & items.category_bits[pos][:, None, :, :]).any(axis=-1)  # [B, C, H]
    shared &= pos_mask[:, None, :]
    weights = RECENCY_DECAY ** np.arange(pos.shape[1], dtype=np.float64)[None, :] * pos_mask
    s[..., f["cat_match_frac"]] = shared.sum(axis=2) / np.maximum(pos_mask.sum(axis=1), 1)[:, None]
    s[..., f["cat_match_recency"]] = (shared * weights[:, None, :]).sum(axis=2) / np.maximum(weights.sum(axis=1), 1e-12)[:, None]
    neg, neg_mask = _pad_rows([u.negative_rows for u in users], RECENT_NEGATIVES)
    neg_cos = _cosines(item_vec, items.vectors[neg], counts)
    has_neg = neg_mask.any(axis=1)[:, None]
    s[..., f["neg_max_cos"]] = np.where(has_neg, np.where(neg_mask[:, None, :], neg_cos, -np.inf).max(axis=2), 0.0)

    # Assemble the rows of real candidates only, in query order.
    flat = valid.ravel()
    uv = np.broadcast_to(user_vec[:, None, :], item_vec.shape)
    out[:, :dim] = uv.reshape(-1, dim)[flat]
    out[:, dim:2 * dim] = item_vec.reshape(-1, dim)[flat]
    out[:, 2 * dim:3 * dim] = (uv * item_vec).reshape(-1, dim)[flat]
    out[:, 3 * dim:] = s.reshape(-1, N_SCALARS)[flat]
    return out


def _cosines(item_vec: np.ndarray, history_vec: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B, C, H] products of each query's candidates with its history items. One matmul per query over its
    own rows only: a padded batched matmul may round differently with the batch's widest list, and a
    query's features must not depend on the requests it was batched with."""
    out = np.zeros((*item_vec.shape[:2], history_vec.shape[1]), np.float32)
    for b, count in enumerate(counts):
        out[b, :count] = item_vec[b, :count] @ history_vec[b].T
    return out


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per uint64 word, same shape."""
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(*words.shape, 8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1)
