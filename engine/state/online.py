"""The online learning rule, as a plain NumPy reference; engine/cpu/online.py is its batched Numba kernel.

Events are applied strictly one at a time, in log order, so the state after a sequence of events does not
depend on how it was cut into batches (live group commits and crash replay cut it differently):

1. User: x_u <- iALS fold-in of the user's recent history (the last `history` events, this one included)
   against the current unit item vectors Y:
       (G + reg I + sum_h alpha c_h y_h y_h^T) x = sum_{h: s_h > 0} (1 + alpha c_h) y_h,   G = Y^T Y (live items)
   with c_h = |s_h| * decay(t_now - t_h), s_h the event's signed strength (sign(w) log1p|w| of
   signals.event_confidences; negative = SKIP/DISLIKE, preference 0: it pushes x away from that item) and
   decay = max(0.5^(dt / half_life), floor), so recent events weigh more. Solved by `cg_steps` conjugate-gradient
   steps warm-started from the previous x_u (exact fold-in: `fold_in_exact`; the first event of a user solves
   from zero, i.e. a fold-in from that one event).
2. Item: one gradient step on that event's term c (p - x.y)^2 (p = 1 for interest, 0 for rejection):
       y_i <- unit(y_i + lr_i (1 + alpha |s|) (p - x.y_i) x),   lr_i = item_lr + item_lr_new / (1 + n_i)
   (n_i = the item's interactions so far), so new items, placed by their categories, learn fast from their
   first interactions and established ones drift slowly. Deleted items are not moved.
3. The Gram G is kept as an exact fixed-point sum: each product y_a y_b of float32 coordinates is rounded to a
   multiple of 2^-30 and the integers are summed in float64 (exact below 2^53, i.e. up to 2^23 live items).
   An item move subtracts its old rounded products and adds the new ones. Exact integer sums do not depend on
   order, so G always equals `gram_fixed(Y)` recomputed from scratch: a restart rebuilds it from the
   checkpointed vectors and replays to bit-identical state without storing it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRAM_SCALE = 2.0**30  # |y_a y_b| <= 1 for unit rows: float64 holds the integer sum of up to 2^23 items exactly


@dataclass(frozen=True)
class OnlineParams:
    """Defaults = EngineConfig's (see there for the measurements that chose them)."""

    alpha: float = 10.0
    reg: float = 10.0
    cg_steps: int = 2
    half_life_ms: float = 30 * 24 * 3600 * 1000.0
    decay_floor: float = 0.25
    item_lr: float = 0.005
    item_lr_new: float = 0.02
    history: int = 20  # events of the user's history in the fold-in (at most the ring's length)


def gram_fixed(vectors: np.ndarray, live: np.ndarray) -> np.ndarray:
    """float64 [d, d] holding integers: sum over live rows of rint(y_a y_b * GRAM_SCALE)."""
    y = np.asarray(vectors, np.float64)[np.asarray(live, bool)]
    d = vectors.shape[1]
    out = np.zeros((d, d), np.float64)
    for start in range(0, len(y), 4096):  # rounding per product, as in the incremental update; sums are exact
        block = y[start:start + 4096]
        out += np.rint(block[:, :, None] * block[:, None, :] * GRAM_SCALE).sum(axis=0)
    return out


def gram_float(g_fixed: np.ndarray) -> np.ndarray:
    return g_fixed / GRAM_SCALE


def decay(dt_ms: float, half_life_ms: float, floor: float) -> float:
    if dt_ms <= 0:
        return 1.0
    return max(0.5 ** (dt_ms / half_life_ms), floor)


def history_weights(strengths: np.ndarray, timestamps: np.ndarray, now_ms: int, p: OnlineParams) -> tuple[np.ndarray, np.ndarray]:
    """(alpha * c_h, preference_h) of a user's history entries."""
    decays = np.array([decay(float(now_ms - t), p.half_life_ms, p.decay_floor) for t in timestamps])
    s = np.asarray(strengths, np.float64)
    return p.alpha * np.abs(s) * decays, (s > 0).astype(np.float64)


def fold_in_exact(g: np.ndarray, y_hist: np.ndarray, cw: np.ndarray, pref: np.ndarray, reg: float) -> np.ndarray:
    """The exact solution the CG steps approach."""
    y = np.asarray(y_hist, np.float64)
    a = g + reg * np.eye(g.shape[0]) + (y * cw[:, None]).T @ y
    return np.linalg.solve(a, ((1.0 + cw) * pref) @ y)


def fold_in_cg(x0: np.ndarray, g: np.ndarray, y_hist: np.ndarray, cw: np.ndarray, pref: np.ndarray, reg: float, steps: int) -> np.ndarray:
    y = np.asarray(y_hist, np.float64)

    def a_times(v):
        return g @ v + reg * v + ((y @ v) * cw) @ y

    x = np.array(x0, np.float64)
    r = ((1.0 + cw) * pref) @ y - a_times(x)
    p = r.copy()
    rs_old = float(r @ r)
    for _ in range(steps):
        if rs_old < 1e-20:
            break
        ap = a_times(p)
        pap = float(p @ ap)
        if pap <= 0.0:
            break
        step = rs_old / pap
        x += step * p
        r -= step * ap
        rs_new = float(r @ r)
        p = r + (rs_new / rs_old) * p
        rs_old = rs_new
    return x


@dataclass
class OnlineArrays:
    """The state the rule reads and writes (views of the UserTable / ItemCatalog arrays)."""

    user_vectors: np.ndarray  # float32 [U, d]
    last_event_ms: np.ndarray  # int64 [U]
    hist_items: np.ndarray  # int32 [U, H] ring buffer of item rows
    hist_strength: np.ndarray  # float32 [U, H] signed strengths
    hist_ts: np.ndarray  # int64 [U, H]
    hist_count: np.ndarray  # int64 [U] events appended so far (slot = count % H)
    item_vectors: np.ndarray  # float32 [N, d] unit rows
    item_live: np.ndarray  # bool [N]
    item_counts: np.ndarray  # int64 [N] interactions so far
    gram_fixed: np.ndarray  # float64 [d, d] of integers (see gram_fixed)
    gram: np.ndarray  # float64 [d, d] == gram_fixed / GRAM_SCALE
    moved: np.ndarray  # int64 [E] out: the item row event e moved, or -1


def apply_events_reference(s: OnlineArrays, user_rows, item_rows, strengths, timestamps_ms, p: OnlineParams) -> None:
    """Apply events in order (see the module docstring); arrays are updated in place."""
    hist_len = s.hist_items.shape[1]
    for e, (u, i, strength, ts) in enumerate(zip(user_rows, item_rows, strengths, timestamps_ms)):
        now = max(int(s.last_event_ms[u]), int(ts))
        s.last_event_ms[u] = now
        slot = s.hist_count[u] % hist_len
        s.hist_items[u, slot], s.hist_strength[u, slot], s.hist_ts[u, slot] = i, strength, ts
        s.hist_count[u] += 1
        n = min(int(s.hist_count[u]), hist_len, p.history)
        order = [(s.hist_count[u] - n + k) % hist_len for k in range(n)]  # oldest first
        cw, pref = history_weights(s.hist_strength[u, order], s.hist_ts[u, order], now, p)
        x = fold_in_cg(s.user_vectors[u], s.gram, s.item_vectors[s.hist_items[u, order]], cw, pref, p.reg, p.cg_steps)
        s.user_vectors[u] = x.astype(np.float32)
        s.moved[e] = i if s.item_live[i] and move_item(s, int(i), x, float(strength), p) else -1
        s.item_counts[i] += 1


def move_item(s: OnlineArrays, i: int, x: np.ndarray, strength: float, p: OnlineParams) -> bool:
    old = s.item_vectors[i].astype(np.float64)
    target = 1.0 if strength > 0 else 0.0
    lr = p.item_lr + p.item_lr_new / (1.0 + float(s.item_counts[i]))
    moved = old + lr * (1.0 + p.alpha * abs(strength)) * (target - float(x @ old)) * x
    norm = float(np.sqrt(moved @ moved))
    if not norm > 0.0:
        return False
    new = (moved / norm).astype(np.float32).astype(np.float64)
    s.gram_fixed += np.rint(np.outer(new, new) * GRAM_SCALE) - np.rint(np.outer(old, old) * GRAM_SCALE)
    s.gram[:] = gram_float(s.gram_fixed)
    s.item_vectors[i] = new.astype(np.float32)
    return True
