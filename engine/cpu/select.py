"""Exact top-k selection for the Numba kernels (topk.py, blas_topk.py): candidate buffers with a threshold,
compacted by partial selection, instead of a heap push per candidate.

Each (query, part) owns a buffer of `cap` candidates (row, score) and a gate. Scores arriving from the tiles or
from BLAS are float32 sums, within `margin` of the reference score float32(float64 dot) (topk._margins). A row
whose score reaches the gate is checked against the filters and appended; nothing else happens per candidate.
When the buffer is full it is compacted: a quickselect puts the keff best scores first, A = the keff-th best;
every entry >= A - band (band = 2 * margin) stays, the rest go, and A - band becomes the gate.

Why that is exact: the keff rows of the reference top-k of the rows seen so far have reference scores >= E (the
keff-th reference score) and so approximate scores >= E - margin; so A >= E - margin, and every row that can
still make the answer (reference score >= E, which only rises) has an approximate score >= E - margin >= A - band.
Only the survivors of the last compaction are rescored exactly (finish), so exact rescoring costs about keff
dot products per query instead of one per heap push, and a large k costs little more than a small one.

When the band is crowded (many near-ties: duplicated rows, constant scores), compaction by approximate scores
cannot shrink the buffer; the buffer is then rescored exactly and cut to exactly keff entries by the key
(-score, row), the reference order. Rescored entries carry _EXACT in their row so they are rescored only once.

Numba's on-disk cache keys a kernel on its own file only: after editing this file, touch topk.py and
blas_topk.py (or delete their __pycache__ entries), or their cached kernels keep the old selection.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from streamrec.engine.cpu.tiles import _bits_f32, _f32_bits

__all__ = ["SLACK", "buffers", "capacity", "compact_slot", "finish", "finish_parallel"]

_EXACT = np.int64(1) << np.int64(62)  # row flag: the stored score is already the reference score
_ROW = _EXACT - np.int64(1)
_LOW32 = np.uint64(0xFFFF_FFFF)
_SIGN = np.uint32(0x8000_0000)


SLACK = 64  # places kept free past the compaction trigger: a block of topk._scan is appended in one go


def capacity(keff: int) -> int:
    """Buffer size for a top-keff: compaction triggers at keff + max(8, keff / 2) entries (the buffer's size
    less SLACK). Past keff the entries are mostly below the new gate, so a compaction (O(keff)) frees about
    max(8, keff / 2) places: its cost per append stays flat in k, while the gate, which only rises at a
    compaction, never lags far behind the k-th best (a lagging gate lets more rows through the tiles)."""
    return keff + max(8, keff // 2) + SLACK


def buffers(nq: int, parts: int, keff: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty candidate buffers: rows int64 [nq, parts, cap], scores float32 [nq, parts, cap], counts int64
    [nq, parts, 2] (entries, entries that passed the filters)."""
    cap = capacity(keff)
    return (np.empty((nq, parts, cap), dtype=np.int64), np.empty((nq, parts, cap), dtype=np.float32),
            np.zeros((nq, parts, 2), dtype=np.int64))


@njit(inline="always", nogil=True, cache=True)
def key(score, row):
    """uint64 ordered like (-score, row); score is a non-NaN float32, row < 2**32."""
    if score == 0:
        score = np.float32(0.0)  # -0.0 == 0.0 must tie (and break by row), not sort apart
    b = _f32_bits(score)
    mono = ~b if b & _SIGN else b | _SIGN  # unsigned order == float order
    return (np.uint64(~mono) << np.uint64(32)) | np.uint64(row)


@njit(inline="always", nogil=True, cache=True)
def key_score(k):
    mono = np.uint32(~(k >> np.uint64(32)) & _LOW32)
    return _bits_f32(mono & ~_SIGN if mono & _SIGN else ~mono)


_LANES = 8  # partial sums of the reference dot product: one AVX-512 vector of float64, or two AVX2 ones


@njit(nogil=True, cache=True)
def _nth(rows, scores, c, kth):
    """Permute rows[:c], scores[:c] together so that scores[kth] is the (kth+1)-th largest, with no smaller
    score before it and no larger one after it (quickselect, Hoare partition, median-of-3 pivot); -> it."""
    lo, hi = 0, c - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        a, b, z = scores[lo], scores[mid], scores[hi]
        if a < b:
            a, b = b, a
        if b < z:
            b = z
            if a < b:
                b = a
        pivot = b  # median of the three, a value present in [lo, hi]: the scans below stop inside
        i, j = lo, hi
        while i <= j:
            while scores[i] > pivot:
                i += 1
            while scores[j] < pivot:
                j -= 1
            if i <= j:
                rows[i], rows[j] = rows[j], rows[i]
                scores[i], scores[j] = scores[j], scores[i]
                i += 1
                j -= 1
        # Now [lo, j] >= pivot >= [i, hi], and any entries between j and i equal the pivot.
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            break
    return scores[kth]


@njit(inline="always", nogil=True, cache=True)
def _dot64_rows(queries, b, items, r):
    """The reference score of (query b, row r): float32 of the float64 dot product.

    _LANES fixed partial sums (lane l sums the products j = l mod _LANES, as if zero-padded), added in a
    fixed order, and no fast-math: the result cannot depend on how LLVM inlines or vectorises a call site, so
    a row scores the same from every path (duplicated rows tie exactly). Written on the 2-D arrays: making
    row views per candidate cost reference counting dearer than the arithmetic."""
    d = queries.shape[1]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    full = d // _LANES * _LANES
    for j in range(0, full, _LANES):
        s0 += np.float64(queries[b, j]) * np.float64(items[r, j])
        s1 += np.float64(queries[b, j + 1]) * np.float64(items[r, j + 1])
        s2 += np.float64(queries[b, j + 2]) * np.float64(items[r, j + 2])
        s3 += np.float64(queries[b, j + 3]) * np.float64(items[r, j + 3])
        s4 += np.float64(queries[b, j + 4]) * np.float64(items[r, j + 4])
        s5 += np.float64(queries[b, j + 5]) * np.float64(items[r, j + 5])
        s6 += np.float64(queries[b, j + 6]) * np.float64(items[r, j + 6])
        s7 += np.float64(queries[b, j + 7]) * np.float64(items[r, j + 7])
    for j in range(full, d):
        t = np.float64(queries[b, j]) * np.float64(items[r, j])
        lane = j - full
        if lane == 0:
            s0 += t
        elif lane == 1:
            s1 += t
        elif lane == 2:
            s2 += t
        elif lane == 3:
            s3 += t
        elif lane == 4:
            s4 += t
        elif lane == 5:
            s5 += t
        else:
            s6 += t
    return np.float32(((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)))


@njit(nogil=True, cache=True)
def _rescore(rows, scores, c, b, queries, items):
    """Reference scores (_dot64_rows) for the entries not rescored yet (rows without _EXACT); non-finite ones
    become -inf."""
    for i in range(c):
        r = rows[i]
        if r & _EXACT:
            continue
        s = _dot64_rows(queries, b, items, r)
        scores[i] = s if s == s else np.float32(-np.inf)
        rows[i] = r | _EXACT


@njit(nogil=True, cache=True)
def _cut_exact(rows, scores, c, keff):
    """Entries [:c] all exact: keep the keff best by key (-score, row) first, in key order; -> new count.
    The keys (which hold the row) are built and sorted in the rows array itself: no allocation, half the
    memory traffic of an argsort."""
    keys = rows[:c].view(np.uint64)
    for i in range(c):
        keys[i] = key(scores[i], rows[i] & _ROW)
    keys.sort()
    m = min(keff, c)
    for i in range(m):
        k = keys[i]
        scores[i] = key_score(k)
        rows[i] = np.int64(k & _LOW32) | _EXACT
    return m


@njit(nogil=True, cache=True)
def _drop_filtered(rows, scores, lo, c, b, flt):
    """Drop the entries [lo, c) that the reference's filter rule rejects for query b (order kept); -> new count.
    flt is topk._Prepared.kernel_args(). Unpacked once, and the test written out in the loop: an inlined helper
    taking the arrays costs reference-count updates per entry, several times the test itself."""
    valid, ex_ptr, ex_rows, bitmap_of, bitmaps, item_cats, inc_cats, exc_cats, has_inc, has_exc = flt
    inc, exc, m = has_inc[b], has_exc[b], bitmap_of[b]
    e0, e1 = ex_ptr[b], ex_ptr[b + 1]
    j = lo
    for i in range(lo, c):
        r = rows[i] & _ROW
        ok = valid[r]
        if ok and inc:
            hit = False
            for w in range(item_cats.shape[1]):
                if item_cats[r, w] & inc_cats[b, w]:
                    hit = True
                    break
            ok = hit
        if ok and exc:
            for w in range(item_cats.shape[1]):
                if item_cats[r, w] & exc_cats[b, w]:
                    ok = False
                    break
        if ok and m >= 0:  # long exclude list: one bit per row
            ok = not (bitmaps[m, r >> 6] >> np.uint64(r & 63)) & np.uint64(1)
        elif ok and e1 > e0:  # short list, sorted: binary search
            x, y = e0, e1
            while x < y:
                mid = (x + y) >> 1
                if ex_rows[mid] < r:
                    x = mid + 1
                else:
                    y = mid
            ok = not (x < e1 and ex_rows[x] == r)
        if ok:
            rows[j], scores[j] = rows[i], scores[i]
            j += 1
    return j


@njit(nogil=True, cache=True)
def _cut(rows, scores, c, keff, band):
    """Move the entries that can still make the top-keff (score >= keff-th best - band) to the front;
    -> (their count, that threshold). Needs c > keff."""
    thr = _nth(rows, scores, c, keff - 1) - band
    j = keff
    for i in range(keff, c):
        if scores[i] >= thr:
            rows[j], scores[j] = rows[i], scores[i]
            j += 1
    return j, thr


@njit(nogil=True, cache=True)
def compact(rows, scores, c, checked, keff, band, gate, b, rescore, queries, items, flt):
    """The full buffer rows/scores[:c], of which [:checked] passed the filters already: drop the rows the
    filters reject, then shrink it to the entries that can still make query b's top-keff;
    -> (new count, new gate). See the module docstring for why nothing needed is dropped."""
    c = _drop_filtered(rows, scores, checked, c, b, flt)
    if c <= keff:
        return c, gate
    j, thr = _cut(rows, scores, c, keff, band)
    if j - keff <= (rows.size - SLACK - keff) // 2:
        return j, thr
    # Crowded band: rank these entries by the reference key, keep exactly keff.
    if rescore:
        _rescore(rows, scores, j, b, queries, items)
    else:
        for i in range(j):
            rows[i] |= _EXACT
    j = _cut_exact(rows, scores, j, keff)
    return j, scores[j - 1] - band


@njit(nogil=True, cache=True)
def compact_slot(crow, cscore, cnt, keff, qi, p, b, band, gate, rescore, queries, items, flt):
    """compact the full buffer of slot qi (query b), part p, of crow/cscore [nq, parts, cap] with counts
    cnt [nq, parts, 2]; -> the new gate.

    Callers append inline (cnt[qi, p, 0] += 1 after writing the entry) and call this when the count reaches
    cap: passing the buffers and the ten filter arrays to a function per candidate (or inlining one at IR
    level, which copies them) costs reference-count updates several times dearer than the append."""
    c, gate = compact(crow[qi, p], cscore[qi, p], cnt[qi, p, 0], cnt[qi, p, 1], keff, band, gate, b, rescore,
                      queries, items, flt)
    cnt[qi, p, 0] = c
    cnt[qi, p, 1] = c
    return gate


@njit(nogil=True, cache=True)
def _finish_one(rows, scores, counts, q, b, keff, band, gate, rescore, queries, items, flt, out_rows, out_scores):
    """Query b's buffers of all parts (rows/scores [parts, cap], counts [parts, 2]) -> its first keff answers
    in out_*[q]. gate: the best gate any part reached (valid for all of them), applied while gathering."""
    total = 0
    for p in range(counts.shape[0]):
        total += counts[p, 0]
    if total == 0:
        return
    if counts.shape[0] == 1:  # one part: work in its buffer, which is not used again
        cr, cs = rows[0], scores[0]
        c = _drop_filtered(cr, cs, counts[0, 1], counts[0, 0], b, flt)
    else:
        cr = np.empty(total, dtype=np.int64)
        cs = np.empty(total, dtype=np.float32)
        c = 0
        for p in range(counts.shape[0]):
            m = _drop_filtered(rows[p], scores[p], counts[p, 1], counts[p, 0], b, flt)
            for i in range(m):
                if scores[p, i] >= gate:
                    cr[c] = rows[p, i]
                    cs[c] = scores[p, i]
                    c += 1
    if c > keff:  # the same cut as a compaction, over all parts at once
        c = _cut(cr, cs, c, keff, band)[0]
    if rescore:
        _rescore(cr, cs, c, b, queries, items)
    c = _cut_exact(cr, cs, c, keff)
    for i in range(c):
        s = cs[i]
        if s == -np.inf:  # filtered by its reference score (only possible when rescored)
            break
        out_rows[q, i] = cr[i] & _ROW
        out_scores[q, i] = s


@njit(nogil=True, cache=True)
def finish(rows, scores, counts, gates, q0, keff, bands, rescore, queries, items, flt, out_rows, out_scores):
    """Buffers [nq, parts, cap] of queries q0 .. q0+nq (shared gates [nq]) -> out_*[q] (rows of out: the
    block's queries)."""
    for q in range(counts.shape[0]):
        _finish_one(rows[q], scores[q], counts[q], q, q0 + q, keff, bands[q0 + q], gates[q], rescore, queries,
                    items, flt, out_rows, out_scores)


@njit(parallel=True, nogil=True, cache=True)
def finish_parallel(rows, scores, counts, gates, q0, keff, bands, rescore, queries, items, flt, out_rows,
                    out_scores):
    """finish, with the queries spread over the threads (big batches with several parts each)."""
    for q in prange(counts.shape[0]):
        _finish_one(rows[q], scores[q], counts[q], q, q0 + q, keff, bands[q0 + q], gates[q], rescore, queries,
                    items, flt, out_rows, out_scores)
