"""Numba kernels for iALS training: a parallel sweep of warm-started conjugate-gradient solves, one per row of
one side (all users given the items, or all items given the users). The NumPy reference (exact solves) is
engine/offline/ials.py `solve_sweep_reference`; with enough steps the CG result equals it to rounding.

Each row solves (G + reg I + sum_j alpha s_j y_j y_j^T) x = sum_{j: p=1} (1 + alpha s_j) y_j with G = Y^T Y
precomputed once per sweep, so a step costs O(d^2 + n_row d) (Takacs et al. 2011; the `implicit` library's
CG solver is the same idea). Rows are independent: the sweep is deterministic for any thread count.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True)
def _apply_a(g, reg, others, indices, cw, lo, hi, v, out):
    """out = (G + reg I + sum_j cw_j y_j y_j^T) v"""
    d = v.shape[0]
    for a in range(d):
        acc = reg * v[a]
        for b in range(d):
            acc += g[a, b] * v[b]
        out[a] = acc
    for n in range(lo, hi):
        j = indices[n]
        dot = 0.0
        for a in range(d):
            dot += others[j, a] * v[a]
        dot *= cw[n]
        for a in range(d):
            out[a] += dot * others[j, a]


@njit(cache=True, nogil=True)
def cg_solve_row(x, g, reg, others, indices, cw, pref, lo, hi, steps, r, p, ap):
    """Warm-started CG on one row, in place on x (float64 [d]); r, p, ap are scratch [d]."""
    d = x.shape[0]
    _apply_a(g, reg, others, indices, cw, lo, hi, x, ap)
    for a in range(d):
        r[a] = -ap[a]
    for n in range(lo, hi):
        if pref[n] > 0.0:
            j = indices[n]
            coef = 1.0 + cw[n]
            for a in range(d):
                r[a] += coef * others[j, a]
    rs_old = 0.0
    for a in range(d):
        p[a] = r[a]
        rs_old += r[a] * r[a]
    for _ in range(steps):
        if rs_old < 1e-20:
            break
        _apply_a(g, reg, others, indices, cw, lo, hi, p, ap)
        pap = 0.0
        for a in range(d):
            pap += p[a] * ap[a]
        if pap <= 0.0:
            break
        step = rs_old / pap
        rs_new = 0.0
        for a in range(d):
            x[a] += step * p[a]
            r[a] -= step * ap[a]
            rs_new += r[a] * r[a]
        beta = rs_new / rs_old
        for a in range(d):
            p[a] = r[a] + beta * p[a]
        rs_old = rs_new


@njit(cache=True, nogil=True, parallel=True)
def _sweep(rows_out, others, g, indptr, indices, strength, pref, alpha, reg, steps):
    d = rows_out.shape[1]
    cw = alpha * strength
    for r_index in prange(len(indptr) - 1):
        x = rows_out[r_index].copy()
        r = np.empty(d)
        p = np.empty(d)
        ap = np.empty(d)
        cg_solve_row(x, g, reg, others, indices, cw, pref, indptr[r_index], indptr[r_index + 1], steps, r, p, ap)
        rows_out[r_index] = x


def solve_sweep(rows: np.ndarray, others: np.ndarray, csr: tuple, alpha: float, reg: float, steps: int = 3) -> np.ndarray:
    """CG solves for every row, warm-started from `rows` (float64 [n, d], updated in place and returned)."""
    indptr, indices, strength, pref = csr
    others = np.ascontiguousarray(others, np.float64)
    g = others.T @ others
    _sweep(rows, others, g, np.ascontiguousarray(indptr, np.int64), np.ascontiguousarray(indices, np.int64),
           np.ascontiguousarray(strength, np.float64), np.ascontiguousarray(pref, np.float64), float(alpha),
           float(reg), int(steps))
    return rows
