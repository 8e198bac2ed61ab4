"""Numba kernel of the reranking features: every (user, candidate) row of a batch in one compiled pass.

rerank/features.build_features packs the batch (flat candidate rows with per-query offsets, padded
history rows) and calls `features_kernel`; training and serving both go through that function, so they
cannot drift. `rerank/features.build_features_numpy` is the NumPy reference the kernel is tested against
(tests/test_rerank.py): the same values up to float rounding, exactly the same where a feature is a count
or a ratio of counts.

Per query: the candidates' decayed popularity, its maximum and a stable rank (mergesort, as the
reference's argsort); the user scalars; the cosines of every candidate with each recent positive /
negative item (float64 sums over the dimension in index order, rounded to float32, vectorised over the
candidates, whose vectors are transposed once, so no sum is reassociated and no BLAS is involved: a
query's values do not depend on its batch, the BLAS build or its threads). Then one pass per candidate
row: user vector, item vector and their product (float32 products, as NumPy), the scalar features and
the category overlaps. Float64 sums over the padded history follow NumPy's pairwise order
(`_pairwise_sum`) and the float32 mean of 5 cosines its ((c0+c1)+(c2+c3))+c4, so every column but the
four cosine ones equals the reference's float32 value (exactly on the development machine; log1p / log2
up to the math library's rounding elsewhere); the cosines differ from the reference's float32 BLAS
matmul by rounding only (< 3e-7 on unit vectors).

The scalar columns are fixed here (SCALAR_ORDER); rerank/features.py checks at import that they are its
SCALAR_FEATURES in the same order, so a cached compiled kernel can never write a stale layout.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

SCALAR_ORDER = (
    "retrieval_score", "retrieval_rank_frac", "retrieval_log_rank", "retrieval_score_gap",
    "item_log_interactions", "item_log2_pop_now", "item_pop_trend", "item_pop_rel", "item_pop_rank_frac",
    "item_log_hours_idle", "item_never", "item_num_categories",
    "user_log_events", "user_log_seen", "user_log_hours_idle", "user_recent_positive_frac",
    "cat_match_frac", "cat_match_recency", "hist_max_cos", "hist_mean_cos5", "hist_last_cos", "neg_max_cos",
)
MEAN_COS_ITEMS = 5  # hist_mean_cos5 averages the cosines to this many most recent positive items

_ONE = np.uint64(1)
_ZERO = np.uint64(0)


@njit(cache=True, nogil=True)
def _popcount(x):
    count = 0
    while x != _ZERO:
        x &= x - _ONE
        count += 1
    return count


@njit(cache=True, nogil=True)
def _pairwise_sum(a, n):
    """sum(a[:n]) in NumPy's order (pairwise, 8 accumulators per block of <= 128), so that float64 sums
    of the padded history round exactly like the reference's `.sum(axis=...)`."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[i]
        return res
    if n <= 128:
        r0, r1, r2, r3 = a[0], a[1], a[2], a[3]
        r4, r5, r6, r7 = a[4], a[5], a[6], a[7]
        i = 8
        while i < n - (n % 8):
            r0 += a[i]
            r1 += a[i + 1]
            r2 += a[i + 2]
            r3 += a[i + 3]
            r4 += a[i + 4]
            r5 += a[i + 5]
            r6 += a[i + 6]
            r7 += a[i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[i]
            i += 1
        return res
    half = n // 2
    half -= half % 8
    return _pairwise_sum(a, half) + _pairwise_sum(a[half:], n - half)


@njit(cache=True, nogil=True)
def features_kernel(user_vec, user_ints, user_frac, pos_rows, pos_count, neg_rows, neg_count,
                    cand, offsets, scores, vectors, log2_popularity, interactions, last_event_ms, category_bits,
                    pop_shift, now_ms, hour_ms, pop_floor, never_log_hours, recency_weights, log1p_rank, out):
    """Fill out [offsets[-1], 3 * dim + 22] (float32).

    user_vec float32 [B, dim]; user_ints int64 [B, 3] (event count, seen count, last event ms);
    user_frac float64 [B]; pos_rows / neg_rows int64 [B, H] padded, pos_count / neg_count int64 [B];
    cand int64 [R] item rows of all queries, offsets int64 [B + 1]; scores float32 [R]; the item arrays
    as in rerank/features.ItemArrays; pop_shift = now_ms / half_life_ms; recency_weights float64 [H];
    log1p_rank float32 [any]: np.log1p(float32 rank), the reference's values (computed past its end)."""
    batch, dim = user_vec.shape
    words = category_bits.shape[1]
    s0 = 3 * dim  # first scalar column
    now_f = np.float64(now_ms)
    h_pos_max = pos_rows.shape[1]
    h_neg_max = neg_rows.shape[1]
    widest = 0
    for b in range(batch):
        widest = max(widest, offsets[b + 1] - offsets[b])
    cand_t = np.empty((dim, widest), np.float64)
    acc = np.empty(widest, np.float64)
    cos_all = np.empty((widest, h_pos_max + h_neg_max), np.float32)
    hist_bits = np.empty((max(h_pos_max, 1), words), np.uint64)
    masked = np.zeros(h_pos_max, np.float64)
    weighted = np.zeros(h_pos_max, np.float64)
    for b in range(batch):
        start = offsets[b]
        n = offsets[b + 1] - start
        if n <= 0:
            continue
        denom = np.float64(max(n, 1))
        # Per query: decayed popularity of the candidates, its best value and each candidate's rank.
        pop = np.empty(n, np.float64)
        neg_pop = np.empty(n, np.float64)
        best = -np.inf
        for j in range(n):
            x = log2_popularity[cand[start + j]] - pop_shift
            if not np.isfinite(x):
                x = pop_floor
            elif x < pop_floor:
                x = pop_floor
            elif x > -pop_floor:
                x = -pop_floor
            pop[j] = x
            neg_pop[j] = -x
            if x > best:
                best = x
        order = np.argsort(neg_pop, kind="mergesort")  # stable, as the reference
        pop_rank = np.empty(n, np.int64)
        for j in range(n):
            pop_rank[order[j]] = j
        # Per query: the user's scalars and its history.
        events, seen, last_user = user_ints[b, 0], user_ints[b, 1], user_ints[b, 2]
        u_events = np.float32(math.log1p(np.float64(events)))
        u_seen = np.float32(math.log1p(np.float64(seen)))
        if last_user <= 0:
            u_idle = np.float32(never_log_hours)
        else:
            u_idle = np.float32(math.log1p(max(np.float64(now_ms - last_user), 0.0) / hour_ms))
        u_frac = np.float32(user_frac[b])
        hp = min(pos_count[b], h_pos_max)
        hn = min(neg_count[b], h_neg_max)
        hh = hp + hn
        for h in range(hp):
            r = pos_rows[b, h]
            for w in range(words):
                hist_bits[h, w] = category_bits[r, w]
        # Cosines of every candidate with every history item: float64 sums over the dimension in order,
        # vectorised over the candidates (no sum is reassociated), rounded to float32 like the reference's
        # float32 matmul. The candidates' vectors are transposed once per query for that.
        if hh > 0:
            for j in range(n):
                r = cand[start + j]
                for k in range(dim):
                    cand_t[k, j] = vectors[r, k]
            for h in range(hh):
                r = pos_rows[b, h] if h < hp else neg_rows[b, h - hp]
                for j in range(n):
                    acc[j] = 0.0
                for k in range(dim):
                    x = np.float64(vectors[r, k])
                    ck = cand_t[k]
                    for j in range(n):
                        acc[j] += ck[j] * x
                for j in range(n):
                    cos_all[j, h] = np.float32(acc[j])
        n5 = min(hp, MEAN_COS_ITEMS)
        for h in range(h_pos_max):
            masked[h] = recency_weights[h] if h < hp else 0.0
        weight_sum = max(_pairwise_sum(masked, h_pos_max), 1e-12)
        for h in range(hp, h_pos_max):
            weighted[h] = 0.0
        top_score = scores[start]
        for j in range(n):
            i = start + j
            r = cand[i]
            row = out[i]
            uv = user_vec[b]
            iv = vectors[r]
            for k in range(dim):
                row[k] = uv[k]
                row[dim + k] = iv[k]
                row[2 * dim + k] = uv[k] * iv[k]
            score = scores[i]
            rank = np.float32(j)
            row[s0 + 0] = score
            row[s0 + 1] = np.float32(np.float64(rank) / denom)
            row[s0 + 2] = log1p_rank[j] if j < len(log1p_rank) else np.float32(math.log1p(rank))
            row[s0 + 3] = top_score - score
            inter = np.float64(interactions[r])
            x = pop[j]
            row[s0 + 4] = np.float32(math.log1p(inter))
            row[s0 + 5] = np.float32(x)
            row[s0 + 6] = np.float32(x - math.log2(1.0 + inter))
            row[s0 + 7] = np.float32(x - best)
            row[s0 + 8] = np.float32(np.float64(pop_rank[j]) / denom)
            if inter == 0.0:
                row[s0 + 9] = np.float32(never_log_hours)
                row[s0 + 10] = 1.0
            else:
                row[s0 + 9] = np.float32(math.log1p(max(now_f - np.float64(last_event_ms[r]), 0.0) / hour_ms))
                row[s0 + 10] = 0.0
            ncat = 0
            for w in range(words):
                ncat += _popcount(category_bits[r, w])
            row[s0 + 11] = ncat
            row[s0 + 12] = u_events
            row[s0 + 13] = u_seen
            row[s0 + 14] = u_idle
            row[s0 + 15] = u_frac
            cos = cos_all[j]
            matches = 0
            for h in range(hp):
                shared = False
                for w in range(words):
                    if category_bits[r, w] & hist_bits[h, w] != _ZERO:
                        shared = True
                        break
                weighted[h] = masked[h] if shared else 0.0
                matches += shared
            recency = _pairwise_sum(weighted, h_pos_max) if matches else 0.0
            row[s0 + 16] = np.float32(np.float64(matches) / np.float64(max(hp, 1)))
            row[s0 + 17] = np.float32(recency / weight_sum)
            if hp > 0:
                top = cos[0]
                for h in range(1, hp):
                    if cos[h] > top:
                        top = cos[h]
                row[s0 + 18] = top
                # NumPy's pairwise order over the padded 20 (zeros past the first 5): ((c0+c1)+(c2+c3))+c4
                c = cos
                pair = (c[0] + (c[1] if n5 > 1 else np.float32(0.0))) + ((c[2] if n5 > 2 else np.float32(0.0))
                                                                        + (c[3] if n5 > 3 else np.float32(0.0)))
                total = pair + (c[4] if n5 > 4 else np.float32(0.0))
                row[s0 + 19] = np.float32(np.float64(total) / np.float64(n5))
                row[s0 + 20] = cos[0]
            else:
                row[s0 + 18] = 0.0
                row[s0 + 19] = 0.0
                row[s0 + 20] = 0.0
            if hn > 0:
                top = cos[hp]
                for h in range(hp + 1, hh):
                    if cos[h] > top:
                        top = cos[h]
                row[s0 + 21] = top
            else:
                row[s0 + 21] = 0.0
    return out
