"""Batched Numba kernel for the online learning rule of engine/state/online.py (the NumPy reference).

Events are applied strictly in log order in one compiled loop: an event's item move changes the Gram and the
item row that every later fold-in reads, so events of different users are not independent and running them
in parallel would make the result depend on batching and thread timing. Instead each event is cheap: the
fold-in is `cg_steps` warm-started CG steps of O(d^2 + history * d), the item move an O(d^2) Gram correction.
No fastmath, no parallel reductions: the same events give bit-identical state however they are batched
(live group commits and crash replay batch differently). The reference computes the same quantities with
NumPy (BLAS sums in another order), so the two agree to rounding, and the Gram bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from streamrec.engine.state.online import GRAM_SCALE, OnlineArrays, OnlineParams

_INV_SCALE = 1.0 / GRAM_SCALE


@njit(cache=True, nogil=True, inline="always")
def _decay(dt_ms, half_life_ms, floor):
    if dt_ms <= 0:
        return 1.0
    return max(0.5 ** (dt_ms / half_life_ms), floor)


@njit(cache=True, nogil=True, inline="always")
def _dot(u, v):
    """Four interleaved partial sums: a fixed order (deterministic) that still pipelines."""
    d = u.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    a = 0
    while a + 4 <= d:
        s0 += u[a] * v[a]
        s1 += u[a + 1] * v[a + 1]
        s2 += u[a + 2] * v[a + 2]
        s3 += u[a + 3] * v[a + 3]
        a += 4
    while a < d:
        s0 += u[a] * v[a]
        a += 1
    return (s0 + s1) + (s2 + s3)


@njit(cache=True, nogil=True)
def _a_times(g, reg, yh, yht, cw, n, v, out, dots):
    """out = (G + reg I + sum_h cw_h y_h y_h^T) v. Loops are element-wise (no reductions across the inner
    index), so they vectorise without fastmath and every element sums in a fixed order."""
    d = v.shape[0]
    for a in range(d):
        out[a] = reg * v[a]
    for b in range(d):  # G is symmetric: out += v_b * G[b, :]
        vb = v[b]
        for a in range(d):
            out[a] += g[b, a] * vb
    for h in range(n):
        w = _dot(yh[h], v) * cw[h]
        for a in range(d):
            out[a] += w * yh[h, a]


@njit(cache=True, nogil=True)
def _fold_in(x, g, reg, yh, yht, cw, pref, n, steps, r, p, ap, dots):
    d = x.shape[0]
    _a_times(g, reg, yh, yht, cw, n, x, ap, dots)
    for a in range(d):
        r[a] = -ap[a]
    for h in range(n):
        if pref[h] > 0.0:
            coef = 1.0 + cw[h]
            for a in range(d):
                r[a] += coef * yh[h, a]
    for a in range(d):
        p[a] = r[a]
    rs_old = _dot(r, r)
    for _ in range(steps):
        if rs_old < 1e-20:
            break
        _a_times(g, reg, yh, yht, cw, n, p, ap, dots)
        pap = _dot(p, ap)
        if pap <= 0.0:
            break
        step = rs_old / pap
        for a in range(d):
            x[a] += step * p[a]
            r[a] -= step * ap[a]
        rs_new = _dot(r, r)
        beta = rs_new / rs_old
        for a in range(d):
            p[a] = r[a] + beta * p[a]
        rs_old = rs_new


@njit(cache=True, nogil=True)
def _move_item(item_vectors, gram_fixed, gram, i, x, strength, count, alpha, item_lr, item_lr_new, old, new):
    """Returns True when the item moved."""
    d = x.shape[0]
    for a in range(d):
        old[a] = item_vectors[i, a]
    pred = _dot(x, old)
    target = 1.0 if strength > 0 else 0.0
    lr = item_lr + item_lr_new / (1.0 + count)
    coef = lr * (1.0 + alpha * abs(strength)) * (target - pred)
    for a in range(d):
        new[a] = old[a] + coef * x[a]
    norm = np.sqrt(_dot(new, new))
    if not norm > 0.0:
        return False
    for a in range(d):
        new[a] = np.float64(np.float32(new[a] / norm))
    for a in range(d):
        na = new[a] * GRAM_SCALE
        oa = old[a] * GRAM_SCALE
        for b in range(d):
            delta = np.rint(na * new[b]) - np.rint(oa * old[b])
            gram_fixed[a, b] += delta
            gram[a, b] = gram_fixed[a, b] * _INV_SCALE  # a power of two: exact
    for a in range(d):
        item_vectors[i, a] = np.float32(new[a])
    return True


@njit(cache=True, nogil=True)
def _apply(user_vectors, last_event_ms, hist_items, hist_strength, hist_ts, hist_count, item_vectors, item_live,
           item_counts, gram_fixed, gram, moved, user_rows, item_rows, strengths, timestamps_ms,
           alpha, reg, steps, half_life_ms, floor, item_lr, item_lr_new, fold_history):
    d = user_vectors.shape[1]
    hist_len = hist_items.shape[1]
    yh = np.empty((hist_len, d))
    yht = np.empty((d, hist_len))
    dots = np.empty(hist_len)
    cw = np.empty(hist_len)
    pref = np.empty(hist_len)
    x = np.empty(d)
    r = np.empty(d)
    p = np.empty(d)
    ap = np.empty(d)
    old = np.empty(d)
    new = np.empty(d)
    for e in range(len(user_rows)):
        u = user_rows[e]
        i = item_rows[e]
        ts = timestamps_ms[e]
        now = max(last_event_ms[u], ts)
        last_event_ms[u] = now
        slot = hist_count[u] % hist_len
        hist_items[u, slot] = i
        hist_strength[u, slot] = strengths[e]
        hist_ts[u, slot] = ts
        hist_count[u] += 1
        n = min(hist_count[u], hist_len, fold_history)
        for k in range(n):  # oldest first, as the reference
            h = (hist_count[u] - n + k) % hist_len
            s = np.float64(hist_strength[u, h])
            cw[k] = alpha * abs(s) * _decay(float(now - hist_ts[u, h]), half_life_ms, floor)
            pref[k] = 1.0 if s > 0 else 0.0
            row = hist_items[u, h]
            for a in range(d):
                yh[k, a] = item_vectors[row, a]
        for a in range(d):
            x[a] = user_vectors[u, a]
        _fold_in(x, gram, reg, yh, yht, cw, pref, n, steps, r, p, ap, dots)
        for a in range(d):
            user_vectors[u, a] = np.float32(x[a])
        moved[e] = -1
        if item_live[i] and _move_item(item_vectors, gram_fixed, gram, i, x, np.float64(strengths[e]),
                                       np.float64(item_counts[i]), alpha, item_lr, item_lr_new, old, new):
            moved[e] = i
        item_counts[i] += 1


def apply_events(s: OnlineArrays, user_rows, item_rows, strengths, timestamps_ms, p: OnlineParams) -> None:
    """Same contract as online.apply_events_reference; arrays are updated in place."""
    if len(user_rows) == 0:
        return
    if len(s.moved) != len(user_rows):
        raise ValueError("moved must have one slot per event")
    _apply(s.user_vectors, s.last_event_ms, s.hist_items, s.hist_strength, s.hist_ts, s.hist_count, s.item_vectors,
           s.item_live, s.item_counts, s.gram_fixed, s.gram, s.moved,
           np.ascontiguousarray(user_rows, np.int64), np.ascontiguousarray(item_rows, np.int64),
           np.ascontiguousarray(strengths, np.float32), np.ascontiguousarray(timestamps_ms, np.int64),
           float(p.alpha), float(p.reg), int(p.cg_steps), float(p.half_life_ms), float(p.decay_floor),
           float(p.item_lr), float(p.item_lr_new), int(p.history))


def warmup() -> None:
    from streamrec.engine.state.online import gram_fixed

    d, h = 4, 3
    vectors = np.eye(2, d, dtype=np.float32)
    live = np.ones(2, bool)
    g = gram_fixed(vectors, live)
    arrays = OnlineArrays(np.zeros((2, d), np.float32), np.zeros(2, np.int64), np.zeros((2, h), np.int32),
                          np.zeros((2, h), np.float32), np.zeros((2, h), np.int64), np.zeros(2, np.int64), vectors,
                          live, np.zeros(2, np.int64), g, g / GRAM_SCALE, np.zeros(3, np.int64))
    apply_events(arrays, np.array([0, 1, 0]), np.array([1, 0, 1]), np.array([0.5, -0.3, 0.7], np.float32),
                 np.array([5, 6, 7]), OnlineParams())
