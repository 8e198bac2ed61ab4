"""Numba CPU backend for exact top-k with filters: the same contract and results as `topk.NumpyTopK`.
This file holds the kernels and their driver, NumbaTopK; the register tiles they call are in tiles.py.

Scoring: one fused pass over the items, parallel over item parts (handed out dynamically) or, for a block
of >= 2 * threads * group_min_width queries, over groups of queries (each query then has one gate over all
rows), with register tiles written as LLVM vector IR (tiles.py; no loop form got LLVM to emit them):

* B < bcast_min_batch (5): "sum" tiles, dot products along d then one shuffle/add tree for 8 horizontal
  sums (4 rows x 2 queries, 8 x 1 for an odd last query); a lone query goes row by row instead, each dot
  vectorised along d, which streams the matrix in order and stays memory-bound (items read exactly once).
* larger B: "broadcast" tiles, 4 rows x 16 queries (queries transposed once per call), one coordinate
  of a row broadcast against 8 queries per FMA: finished dots in the accumulators, no horizontal sums,
  so close to the FMA peak; faster than OpenBLAS sgemm on the AVX2 host it was tuned on
  (benchmarks/RESULTS.md, 'Figures behind design choices').
* BLAS path: numpy's float32 matmul into a cache-sized [queries, chunk] score block, then a scan of the
  block by the selection (below), one gate per query. It lost everywhere on the AVX2 host the tiles were
  tuned on, and wins at large batches where numpy's OpenBLAS has AVX-512 kernels; which path a call takes
  is measured per host (dispatch.py), not fixed (benchmarks/RESULTS.md, 'CPU top-k against tuned faiss').

Selection (select.py): each (query, part) keeps a buffer of candidates and a gate. The float32 scores only
gate: a row reaching the gate is appended, nothing more; a full buffer is compacted by a quickselect to the
rows within an error band of its k-th best (so large k costs about what small k does, unlike a heap push
per candidate). Only the survivors are checked against the filters (valid, category bits, the query's
excludes as a bitmap or a sorted list) and, at the end, rescored as float32(float64 dot), the reference's
definition, and ordered by a uint64 key like (-score, row). So the scores returned are exact and
bit-identical for duplicated rows whatever tile, path or batch produced them, and filters cost nothing for
rows that never reach the gate.

Small searches (too little work for a parallel region: a served batch on a small catalog) run as one
compiled call from filter plan to merged result, since a dozen NumPy calls around the kernel cost more
than the kernel there (benchmarks/RESULTS.md, 'Figures behind design choices').
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from streamrec.engine.cpu.dispatch import blas_wins, crossover
from streamrec.engine.cpu.select import SLACK, buffers, capacity, compact_slot, finish, finish_parallel
from streamrec.engine.cpu.tiles import _bcast4x8, _bcast4x16, _cttz64, _sum4x2, _sum8x1
from streamrec.engine.retrieval.topk import Filters, HostBackend, check_k, check_search_args, empty_result

__all__ = ["NumbaTopK", "warmup"]

_MIN_BITMAP_ROWS = 256  # shorter exclude lists are always searched, not turned into bitmaps
_PARALLEL_PREP_ROWS = 1 << 20  # exclude entries from which their preparation runs in parallel
_GATE_BLOCK = SLACK  # score-block size of the vectorised "anything above threshold?" test
_ROW_BLOCK = 256  # fused kernels: rows kept in L2 (64 KiB at d = 64) while the queries sweep them
_QUERY_BLOCK = 64  # broadcast tiles: transposed query columns kept in L1 (16 KiB at d = 64)
# Gate-only float32 code: reassociation and FMA contraction, but not nnan/ninf (NaN and -inf checks).
_FAST = {"reassoc", "contract"}


@njit(fastmath=_FAST, nogil=True, cache=True)
def _dot32(q, x):
    """float32 dot for the gate only (rows left over by the tiles)."""
    s = np.float32(0.0)
    for j in range(q.size):
        s += q[j] * x[j]
    return s


@njit(inline="always", nogil=True, cache=True)
def _raise_shared(sel, qi, gate):
    """Publish a part's new gate to the other parts of query slot qi (sel[4], shared by all parts); -> gate.

    Any part's gate is valid for the whole query: it is keff rows of that part that a row must beat. Parts
    run on different threads and write this without atomics: a racing write may store the lower of two
    gates, which is still valid, only less tight."""
    shared = sel[4]
    if gate > shared[qi]:
        shared[qi] = gate
    return gate


@njit(nogil=True, cache=True)
def _lower_gates(sel, gates, nq):
    """Take up the other parts' gates (raise the local gates [nq] to the shared ones), once per row block:
    with several parts per query each part would otherwise let through what the others already beat."""
    shared = sel[4]
    for c in range(nq):
        if shared[c] > gates[c]:
            gates[c] = shared[c]


@njit(nogil=True, cache=True)
def _take_one(s, r, b, qi, p, gates, sel, queries, items, bands, flt):
    """Row r with gate score s for query b (slot qi), part p: appended if it reaches the gate (rows the tiles
    leave over; a call per row is fine there)."""
    if s >= gates[qi] and s != -np.inf:
        crow, cscore, cnt = sel[0], sel[1], sel[2]
        n = cnt[qi, p, 0]
        crow[qi, p, n] = r
        cscore[qi, p, n] = s
        cnt[qi, p, 0] = n + 1
        if n + 1 >= crow.shape[2] - SLACK:
            gates[qi] = _raise_shared(sel, qi, compact_slot(crow, cscore, cnt, sel[3], qi, p, b, bands[b], gates[qi],
                                                            True, queries, items, flt))


@njit(nogil=True, cache=True)
def _append_hits(hits, sums, rows, b, bb, r, q0, p, gates, crow, cscore, cnt):
    """Append the lanes of a sum tile that passed their gate (lane i: row r + i % rows, query (b, bb)[i // rows])
    to their buffers; -> whether a buffer reached its compaction trigger (the caller compacts then). Only the
    buffers are passed, not the filter arrays, queries and items: passing those per hit tile cost more than
    the appends."""
    full = False
    lim = crow.shape[2] - SLACK
    for i in range(8):
        if hits >> i & 1:
            q = b if i < rows else bb
            s = sums[i]
            qi = q - q0
            if s >= gates[qi] and s != -np.inf:  # the gate may have risen since the tile was scored
                c = cnt[qi, p, 0]
                crow[qi, p, c] = r + i % rows
                cscore[qi, p, c] = s
                cnt[qi, p, 0] = c + 1
                full |= c + 1 >= lim
    return full


@njit(nogil=True, cache=True)
def _compact_full(c0, c1, q0, p, gates, sel, queries, items, bands, flt):
    """Compact the buffers of query slots c0 .. c1 (part p) that reached their trigger; new gates into gates."""
    crow, cscore, cnt = sel[0], sel[1], sel[2]
    lim = crow.shape[2] - SLACK
    for qi in range(c0, min(c1, cnt.shape[0])):
        if cnt[qi, p, 0] >= lim:
            gates[qi] = _raise_shared(sel, qi, compact_slot(crow, cscore, cnt, sel[3], qi, p, q0 + qi, bands[q0 + qi],
                                                            gates[qi], True, queries, items, flt))


@njit(parallel=True, nogil=True, cache=True)
def _fused_sum(queries, q0, items, sel, bands, flt):
    """Queries q0 .. q0+nq into buffers sel [nq, parts, ...]; part p scans rows [n*p/parts, n*(p+1)/parts)."""
    parts = sel[2].shape[1]
    n = items.shape[0]
    for p in prange(parts):
        _sum_part(queries, q0, items, n * p // parts, n * (p + 1) // parts, p, sel, bands, flt)


@njit(nogil=True, cache=True)
def _sum_part(queries, q0, items, lo, hi, p, sel, bands, flt):
    """One part of _fused_sum, in row blocks that stay in L2: query pairs take two 4x2 tiles per 8 rows,
    an odd last query an 8x1 tile; a block of one query goes row by row (_rows_part1).

    Kept out of the prange body and split into one function per tile shape: with both shapes in one
    loop nest the 8x1 loop ran slower (register allocation), which shows at B = 1
    (benchmarks/RESULTS.md, 'Figures behind design choices').
    """
    nq = sel[2].shape[0]
    if nq == 1:  # a lone query: row by row (see _row_dots1)
        _rows_part1(queries, q0, items, lo, hi, p, sel, bands, flt)
        return
    gates = np.full(nq, -np.inf, dtype=np.float32)
    sums = np.empty(8, dtype=np.float32)
    for r0 in range(lo, hi, _ROW_BLOCK):
        r1 = min(hi, r0 + _ROW_BLOCK)
        _lower_gates(sel, gates, nq)
        tiled = r0 + (r1 - r0) // 8 * 8
        if nq >= 2:
            _sum_pairs(queries, q0, items, r0, tiled, p, gates, sums, sel, bands, flt)
        if nq % 2:
            _sum_single(queries, q0, items, r0, tiled, p, gates, sums, sel, bands, flt)
        for r in range(tiled, r1):  # < 8 rows left in the block
            for b in range(q0, q0 + nq):
                _take_one(_dot32(queries[b], items[r]), r, b, b - q0, p, gates, sel, queries, items, bands, flt)


@njit(fastmath=_FAST, nogil=True, cache=True)
def _row_dots1(queries, b, items, r0, r1, out):
    """out[i] = float32 dot of query b and row r0 + i, for the gate only: one row after the other, each dot
    vectorised along d, so a lone query streams the matrix in order. The 8x1 sum tile (8 rows side by side)
    read a matrix out of DRAM at less than half this rate on one core (100k x 128: 5.1 ms against 2.1 ms).
    Scoring 2-4 queries row by row lost to the 4x2 sum tiles in cache, so only a lone query comes here."""
    d = queries.shape[1]
    for i in range(r1 - r0):
        s = np.float32(0.0)
        for j in range(d):
            s += queries[b, j] * items[r0 + i, j]
        out[i] = s


@njit(nogil=True, cache=True)
def _rows_part1(queries, b, items, lo, hi, p, sel, bands, flt):
    """A lone query b (slot 0 of sel) over rows lo .. hi: gate scores of a row block into a small buffer, then
    the vectorised gate scan of it (_scan: appends, compacts, shares the gate with the other parts)."""
    buf = np.empty(_ROW_BLOCK, dtype=np.float32)
    gate = np.float32(-np.inf)
    for r0 in range(lo, hi, _ROW_BLOCK):
        r1 = min(hi, r0 + _ROW_BLOCK)
        _row_dots1(queries, b, items, r0, r1, buf)
        gate = _scan(buf, 0, r1 - r0, r0, 0, p, b, True, queries, items, sel, gate, bands[b], flt)


@njit(nogil=True, cache=True)
def _sum_pairs(queries, q0, items, lo, hi, p, gates, sums, sel, bands, flt):
    """Rows lo .. hi (a multiple of 8 apart) against the query pairs of the block."""
    last = q0 + sel[2].shape[0] - 1
    for r in range(lo, hi, 8):
        for b in range(q0, last, 2):
            for half in range(0, 8, 4):
                hits = _sum4x2(queries, b, b + 1, items, r + half, gates[b - q0], gates[b + 1 - q0], sums)
                if hits and _append_hits(hits, sums, 4, b, b + 1, r + half, q0, p, gates, sel[0], sel[1], sel[2]):
                    _compact_full(b - q0, b - q0 + 2, q0, p, gates, sel, queries, items, bands, flt)


@njit(nogil=True, cache=True)
def _sum_single(queries, q0, items, lo, hi, p, gates, sums, sel, bands, flt):
    """Rows lo .. hi (a multiple of 8 apart) against the block's last query."""
    b = q0 + sel[2].shape[0] - 1
    for r in range(lo, hi, 8):
        hits = _sum8x1(queries, b, b, items, r, gates[b - q0], gates[b - q0], sums)
        if hits and _append_hits(hits, sums, 8, b, b, r, q0, p, gates, sel[0], sel[1], sel[2]):
            _compact_full(b - q0, b - q0 + 1, q0, p, gates, sel, queries, items, bands, flt)


@njit(nogil=True, cache=True)
def _append_bcast(mask, width, out, col, r, p, gates, crow, cscore, cnt):
    """Append the lanes of a broadcast tile that passed their gate (bit ri * width + c: row r + ri, query slot
    col + c) to their buffers, one step per set bit; -> whether a buffer reached its compaction trigger (at
    most 4 appends per slot per tile, well inside select.SLACK)."""
    full = False
    lim = crow.shape[2] - SLACK
    while mask:
        bit = _cttz64(mask)
        mask &= mask - np.uint64(1)
        qi = col + bit % width
        s = out[bit]
        if s >= gates[qi] and s != -np.inf:  # the gate may have risen since the tile was scored
            n = cnt[qi, p, 0]
            crow[qi, p, n] = r + bit // width
            cscore[qi, p, n] = s
            cnt[qi, p, 0] = n + 1
            full |= n + 1 >= lim
    return full


@njit(parallel=True, nogil=True, cache=True)
def _fused_bcast(qt, q0, queries, items, sel, bands, flt):
    """_fused_sum with the broadcast tiles: qt [d, nqpad] holds queries q0 .. q0+nq transposed and
    zero-padded to a multiple of 8 (pad columns get an +inf gate, so they never hit)."""
    parts = sel[2].shape[1]
    n = items.shape[0]
    for p in prange(parts):
        _bcast_part(qt, q0, queries, items, n * p // parts, n * (p + 1) // parts, p, sel, bands, flt)


@njit(parallel=True, nogil=True, cache=True)
def _fused_bcast_groups(qts, q0, queries, items, sel, bands, flt):
    """_fused_bcast with the threads over groups of queries instead of parts of the items: qts [G, d, w] holds
    group g = queries q0 + g*w .. transposed and zero-padded, each group scans all rows as one part. Each query
    then keeps one buffer with one gate that has seen every row so far: parts would each let through what
    their own k-th best lets through, several times the candidates at a large k."""
    groups, w = qts.shape[0], qts.shape[2]
    nq = sel[2].shape[0]
    n = items.shape[0]
    for g in prange(groups):
        a = g * w
        z = min(nq, a + w)
        sub = (sel[0][a:z], sel[1][a:z], sel[2][a:z], sel[3], sel[4][a:z])
        _bcast_part(qts[g], q0 + a, queries, items, 0, n, 0, sub, bands, flt)


@njit(nogil=True, cache=True)
def _bcast_part(qt, q0, queries, items, lo, hi, p, sel, bands, flt):
    """One part of _fused_bcast: rows go in blocks that stay in L2 while blocks of query columns that
    fit L1 sweep over them."""
    nq = sel[2].shape[0]
    crow, cscore, cnt = sel[0], sel[1], sel[2]
    nqpad = qt.shape[1]
    gates = np.full(nqpad, np.inf, dtype=np.float32)
    gates[:nq] = -np.inf
    out = np.empty(64, dtype=np.float32)
    for r0 in range(lo, hi, _ROW_BLOCK):
        r1 = min(hi, r0 + _ROW_BLOCK)
        _lower_gates(sel, gates, nq)
        tiled = r0 + (r1 - r0) // 4 * 4
        for c0 in range(0, nqpad, _QUERY_BLOCK):
            c1 = min(nqpad, c0 + _QUERY_BLOCK)
            for r in range(r0, tiled, 4):
                col = c0
                while col + 16 <= c1:
                    mask = _bcast4x16(qt, col, items, r, gates, out)
                    if mask and _append_bcast(mask, 16, out, col, r, p, gates, crow, cscore, cnt):
                        _compact_full(col, col + 16, q0, p, gates, sel, queries, items, bands, flt)
                    col += 16
                if col < c1:
                    mask = _bcast4x8(qt, col, items, r, gates, out)
                    if mask and _append_bcast(mask, 8, out, col, r, p, gates, crow, cscore, cnt):
                        _compact_full(col, col + 8, q0, p, gates, sel, queries, items, bands, flt)
        for r in range(tiled, r1):  # < 4 rows left in the block
            for c in range(nq):
                _take_one(_dot32(queries[q0 + c], items[r]), r, q0 + c, c, p, gates, sel, queries, items, bands, flt)


@njit(nogil=True, cache=True)
def _scan(srow, lo, hi, row0, qi, p, b, rescore, queries, items, sel, gate, band, flt):
    """Append the entries of srow[lo:hi] (scores of rows row0+lo ..) that reach the gate to query b's buffer
    (slot qi, part p); -> the gate afterwards. Blocks of _GATE_BLOCK scores are tested first, vectorised (NaN
    never counts; indexing a slice by range() counters, which LLVM vectorises where a while-loop index was 8x
    slower). A block with many hits is appended branch-free (every entry written, the count advanced by the
    test), so a block needs _GATE_BLOCK free places, made by compacting first (select.capacity leaves room)."""
    crow, cscore, cnt = sel[0], sel[1], sel[2]
    cap = crow.shape[2]
    rq, sq = crow[qi, p], cscore[qi, p]
    n = cnt[qi, p, 0]
    gate = max(gate, sel[4][qi])
    seg = srow[lo:hi]
    m = hi - lo
    for t in range(-(-m // _GATE_BLOCK)):
        j = t * _GATE_BLOCK
        stop = min(j + _GATE_BLOCK, m)
        if stop - j == _GATE_BLOCK:
            hits = 0
            for i in range(_GATE_BLOCK):
                hits += seg[j + i] >= gate
        else:
            hits = _GATE_BLOCK
        if hits == 0:
            continue
        if n > cap - _GATE_BLOCK:
            cnt[qi, p, 0] = n
            gate = _raise_shared(sel, qi, compact_slot(crow, cscore, cnt, sel[3], qi, p, b, band, gate, rescore,
                                                       queries, items, flt))
            n = cnt[qi, p, 0]
        r0 = row0 + lo
        if hits > 4:  # early on, when most pass: no branch to mispredict
            for i in range(j, stop):
                s = seg[i]
                rq[n] = r0 + i
                sq[n] = s
                n += (s >= gate) & (s != -np.inf)
        else:  # the usual case: a few hits, found by a branch that is rarely taken
            for i in range(j, stop):
                s = seg[i]
                if s >= gate and s != -np.inf:
                    rq[n] = r0 + i
                    sq[n] = s
                    n += 1
    cnt[qi, p, 0] = n
    return gate


@njit(parallel=True, nogil=True, cache=True)
def _select_parallel(scores, shared, row0, q0, rescore, queries, items, sel, gates, bands, flt):
    """Offer scores [nq or 1 (shared), c] of rows row0 .. row0+c to the buffers sel [nq, parts, ...] of queries
    q0 .. q0+nq; part p takes columns [c*p/parts, c*(p+1)/parts). gates [nq, parts] carry over calls."""
    nq, parts = sel[2].shape[0], sel[2].shape[1]
    c = scores.shape[1]
    for task in prange(nq * parts):
        bl = task // parts
        p = task - bl * parts
        gates[bl, p] = _scan(scores[0] if shared else scores[bl], c * p // parts, c * (p + 1) // parts, row0, bl, p,
                             q0 + bl, rescore, queries, items, sel, gates[bl, p], bands[q0 + bl], flt)


@njit(nogil=True, cache=True)
def _select_serial(scores, shared, row0, q0, rescore, queries, items, sel, gates, bands, flt):
    """_select_parallel in the calling thread: for small inputs, and for the BLAS path, where a Numba
    thread pool alternating with OpenBLAS's (both spin after their work) made it several times slower."""
    nq, parts = sel[2].shape[0], sel[2].shape[1]
    c = scores.shape[1]
    for task in range(nq * parts):
        bl = task // parts
        p = task - bl * parts
        gates[bl, p] = _scan(scores[0] if shared else scores[bl], c * p // parts, c * (p + 1) // parts, row0, bl, p,
                             q0 + bl, rescore, queries, items, sel, gates[bl, p], bands[q0 + bl], flt)


@njit(nogil=True, cache=True)
def _split_excludes(ptr, rows, n, bitmap_of, bitmaps, ex_ptr, ex_rows, b0, b1):
    """Excludes of queries b0 .. b1 into their bitmap (bitmap_of[b] >= 0; rows outside [0, n) skipped) or
    copied into their segment ex_rows[ex_ptr[b]:ex_ptr[b + 1]] and sorted (out-of-range rows may stay:
    no row in [0, n) ever matches them)."""
    for b in range(b0, b1):
        m = bitmap_of[b]
        if m >= 0:
            for j in range(ptr[b], ptr[b + 1]):
                r = rows[j]
                if 0 <= r < n:
                    bitmaps[m, r >> 6] |= np.uint64(1) << np.uint64(r & 63)
            continue
        seg = ex_rows[ex_ptr[b]:ex_ptr[b + 1]]
        seg[:] = rows[ptr[b]:ptr[b + 1]]
        for j in range(1, seg.size):
            if seg[j] < seg[j - 1]:  # sort only when not sorted already
                seg.sort()
                break


@njit(parallel=True, nogil=True, cache=True)
def _split_excludes_parallel(ptr, rows, n, bitmap_of, bitmaps, ex_ptr, ex_rows, chunks):
    nb = ptr.size - 1
    for c in prange(chunks):
        _split_excludes(ptr, rows, n, bitmap_of, bitmaps, ex_ptr, ex_rows, nb * c // chunks, nb * (c + 1) // chunks)


@njit(nogil=True, cache=True)
def _plan_excludes(ptr, rows, n, include_cats, exclude_cats, split):
    """_Prepared's arrays in one call (a dozen small NumPy calls cost more than the work on small batches):
    bitmap_of, bitmaps, ex_ptr, ex_rows, has_inc, has_exc; the excludes are split in too when `split`."""
    b = ptr.size - 1
    min_bitmap = max(_MIN_BITMAP_ROWS, n // 512)
    bitmap_of = np.full(b, -1, dtype=np.int64)
    ex_ptr = np.zeros(b + 1, dtype=np.int64)
    long = 0
    for q in range(b):
        length = ptr[q + 1] - ptr[q]
        if length >= min_bitmap:
            bitmap_of[q] = long
            long += 1
            length = 0
        ex_ptr[q + 1] = ex_ptr[q] + length
    bitmaps = np.zeros((long, (n + 63) // 64), dtype=np.uint64)
    ex_rows = np.empty(ex_ptr[b], dtype=np.int64)
    if split:
        _split_excludes(ptr, rows, n, bitmap_of, bitmaps, ex_ptr, ex_rows, 0, b)
    has_inc = np.zeros(b, dtype=np.bool_)
    has_exc = np.zeros(b, dtype=np.bool_)
    for q in range(b):
        for w in range(include_cats.shape[1]):
            has_inc[q] |= include_cats[q, w] != 0
            has_exc[q] |= exclude_cats[q, w] != 0
    return bitmap_of, bitmaps, ex_ptr, ex_rows, has_inc, has_exc


class _Prepared:
    """Filter arrays in the form the kernels take, built once per call in one pass over the excludes.

    Each query's excludes become either a bitmap over the rows (long lists: one bit test per candidate,
    no sort) or a sorted copy for binary search. Lists of >= max(256, N / 512) entries get a bitmap: at
    most 8x the list's own bytes, and the lists left to sort stay short (Numba's sort is slow on long ones).
    The pass runs in the calling thread unless the lists are big: on a loaded host a parallel region can
    wait milliseconds for a descheduled worker, more than a small pass costs.
    """

    def __init__(self, filters: Filters) -> None:
        ptr, rows = filters.exclude_indptr, filters.exclude_rows
        parallel = rows.size >= _PARALLEL_PREP_ROWS
        (self.bitmap_of, self.bitmaps, self.ex_ptr, self.ex_rows, self.has_inc,
         self.has_exc) = _plan_excludes(ptr, rows, filters.num_items, filters.include_cats, filters.exclude_cats,
                                        not parallel)
        if parallel:
            _split_excludes_parallel(ptr, rows, filters.num_items, self.bitmap_of, self.bitmaps, self.ex_ptr,
                                     self.ex_rows, min(filters.num_queries, 4 * numba.get_num_threads()))
        self.filters = filters

    def kernel_args(self) -> tuple:
        f = self.filters
        return (f.valid, self.ex_ptr, self.ex_rows, self.bitmap_of, self.bitmaps, f.item_cats, f.include_cats,
                f.exclude_cats, self.has_inc, self.has_exc)




@njit(nogil=True, cache=True)
def _bands(queries):
    """Selection band per query: twice a bound on |float32 dot - reference score| for item norms <= 2.

    Any float32 summation of d products errs by at most ~d * 2**-24 * sum|q_j x_j| <= d * 2**-24 |q| |x|.
    Items with larger norms stay correct up to near-ties (a row within ~1e-5 of the k-th may be missed).
    """
    b, d = queries.shape
    out = np.empty(b, dtype=np.float32)
    for q in range(b):
        s = 0.0
        for j in range(d):
            s += np.float64(queries[q, j]) * np.float64(queries[q, j])
        out[q] = np.float32(2 * (d + 16) * 2.0**-23 * np.sqrt(s))
    return out


@njit(nogil=True, cache=True)
def _search_serial(queries, items, keff, cap, bcast_min_batch, query_block, flt, out_rows, out_scores):
    """search() for work too small for a parallel region, in one compiled call: per query block, one part
    over all rows with the tile shape the block's size calls for, then the finish."""
    b, d = queries.shape
    n = items.shape[0]
    bands = _bands(queries)
    for q0 in range(0, b, query_block):
        nq = min(b, q0 + query_block) - q0
        sel = (np.empty((nq, 1, cap), dtype=np.int64), np.empty((nq, 1, cap), dtype=np.float32),
               np.zeros((nq, 1, 2), dtype=np.int64), keff, np.full(nq, -np.inf, dtype=np.float32))
        if nq < bcast_min_batch:
            _sum_part(queries, q0, items, 0, n, 0, sel, bands, flt)
        else:
            qt = np.zeros((d, (nq + 7) // 8 * 8), dtype=np.float32)
            qt[:, :nq] = queries[q0:q0 + nq].T
            _bcast_part(qt, q0, queries, items, 0, n, 0, sel, bands, flt)
        finish(sel[0], sel[1], sel[2], sel[4], q0, keff, bands, True, queries, items, flt, out_rows[q0:q0 + nq],
               out_scores[q0:q0 + nq])


class NumbaTopK(HostBackend):
    """Numba backend (name "numba"); see the module docstring.

    fused_max_batch: "auto" (default) asks the measured dispatch table (dispatch.py) which path wins for the
        call's (d, B, k); None scores every batch with the fused kernel; an int sends bigger batches to the
        BLAS path (0: every batch).
    bcast_min_batch: smallest query block scored with broadcast tiles rather than sum tiles. Sum tiles win
        at B <= 2 (no padding of the query side), are even at 3-4, broadcast tiles win from ~5, by more the
        larger the block (benchmarks/RESULTS.md, 'Figures behind design choices').
    query_block: queries per pass over the items (bounds buffer memory: query_block * parts * (2k + 64) * 12 bytes).
    block_bytes: size of one float32 [queries, chunk] score block on the BLAS path.
    blas_parallel_select: on the BLAS path, scan each score block with Numba's threads (True) or in the
        calling thread (False); "auto": threads from blas_parallel_min_batch queries on.
    parts_per_thread: item parts per thread, handed out dynamically so that a thread slowed by other
        processes does not hold up the call; min_part_rows: the smallest part.
    min_parallel_work: below this many multiply-adds a call runs in the calling thread: a parallel
        region's barrier costs more than such a call, and far more whenever the host is loaded and a
        worker thread is descheduled (benchmarks/RESULTS.md, 'Figures behind design choices').
    group_min_width: a query block of at least 2 * threads * this many queries is split over the threads by
        queries (each query one part, one gate over all rows) instead of by item parts.
    """

    name = "numba"

    def __init__(self, fused_max_batch: int | None | str = "auto", bcast_min_batch: int = 5,
                 query_block: int = 512, block_bytes: int = 4 << 20, blas_parallel_select: bool | str = "auto",
                 blas_parallel_min_batch: int = 64, parts_per_thread: int = 4, min_part_rows: int = 1024,
                 min_parallel_work: int = 1 << 23, group_min_width: int = 32) -> None:
        if min(query_block, block_bytes, parts_per_thread, min_part_rows) < 1 or bcast_min_batch < 0:
            raise ValueError("query_block, block_bytes, parts_per_thread, min_part_rows must be >= 1")
        if not (fused_max_batch in ("auto", None) or (isinstance(fused_max_batch, int) and fused_max_batch >= 0)):
            raise ValueError(f"fused_max_batch must be an int >= 0, None or 'auto', got {fused_max_batch!r}")
        if blas_parallel_select not in ("auto", True, False) or blas_parallel_min_batch < 1:
            raise ValueError("blas_parallel_select must be 'auto', True or False; blas_parallel_min_batch >= 1")
        self.fused_max_batch = fused_max_batch
        self.bcast_min_batch = int(bcast_min_batch)
        self.query_block = int(query_block)
        self.block_bytes = int(block_bytes)
        self.blas_parallel_select = blas_parallel_select
        self.blas_parallel_min_batch = int(blas_parallel_min_batch)
        self.parts_per_thread = int(parts_per_thread)
        self.min_part_rows = int(min_part_rows)
        self.min_parallel_work = int(min_parallel_work)
        self.group_min_width = int(group_min_width)

    def warmup(self) -> None:
        """The Engine calls this at start (as for the CUDA backend): every kernel specialisation compiled or
        loaded from Numba's cache now, not on the first request."""
        warmup()

    @staticmethod
    def tune(d: int, k: int) -> int:
        """Measure which path wins for dimension d and the top k (once per process and (d, k class); call at
        start-up); -> the smallest batch that takes the BLAS path (dispatch.NEVER: none). Unmeasured shapes
        run fused."""
        return crossover(d, k, measure=True)

    def uses_blas(self, b: int, d: int, k: int, n: int) -> bool:
        """Whether a search of b queries of dimension d for the top k of n rows takes the BLAS path."""
        if self.fused_max_batch is None:
            return False
        if self.fused_max_batch == "auto":
            return blas_wins(b, d, k, n)
        return b > self.fused_max_batch

    def search(
        self, queries: np.ndarray, items: np.ndarray, k: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]:
        queries, items, k = check_search_args(queries, items, k, filters)
        b, n = queries.shape[0], items.shape[0]
        out_rows, out_scores = empty_result(b, k)
        if b == 0 or n == 0:
            return out_rows, out_scores
        _check_rows(n)
        d = queries.shape[1]
        prep, keff = _Prepared(filters), min(k, n)
        first_block = min(b, self.query_block)
        fused = not self.uses_blas(first_block, d, keff, n)
        if fused and self._parts(n, 1, keff, n * d * max(first_block, 4)) == 1:
            # Later blocks are no bigger than the first, so every block runs as one part.
            _search_serial(queries, items, keff, capacity(keff), self.bcast_min_batch, self.query_block,
                           prep.kernel_args(), out_rows, out_scores)
            return out_rows, out_scores
        bands = _bands(queries)
        for q0 in range(0, b, self.query_block):
            nq = min(b, q0 + self.query_block) - q0
            if not fused:
                self._blas_pass(queries, q0, nq, items, keff, bands, prep, out_rows, out_scores)
                continue
            parts = self._parts(n, 1, keff, n * d * max(nq, 4))
            sel = _selection(nq, parts, keff)
            if nq < self.bcast_min_batch:
                if parts == 1:
                    _sum_part(queries, q0, items, 0, n, 0, sel, bands, prep.kernel_args())
                else:
                    with numba.parallel_chunksize(1):
                        _fused_sum(queries, q0, items, sel, bands, prep.kernel_args())
            elif parts > 1 and (width := self._group_width(nq)):
                groups = -(-nq // width)
                qts = np.zeros((groups, d, width), dtype=np.float32)
                for g in range(groups):
                    part = queries[q0 + g * width:q0 + min(nq, (g + 1) * width)]
                    qts[g, :, :len(part)] = part.T
                sel = _selection(nq, 1, keff)
                parts = 1
                with numba.parallel_chunksize(1):
                    _fused_bcast_groups(qts, q0, queries, items, sel, bands, prep.kernel_args())
            else:
                qt = np.zeros((d, -(-nq // 8) * 8), dtype=np.float32)
                qt[:, :nq] = queries[q0:q0 + nq].T
                if parts == 1:
                    _bcast_part(qt, q0, queries, items, 0, n, 0, sel, bands, prep.kernel_args())
                else:
                    with numba.parallel_chunksize(1):
                        _fused_bcast(qt, q0, queries, items, sel, bands, prep.kernel_args())
            self._finish(sel, q0, keff, bands, True, queries, items, prep, out_rows, out_scores, parts)
        return out_rows, out_scores

    def rank_scores(self, scores: np.ndarray, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        k = check_k(k)
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        if scores.ndim == 1:
            b, shared = filters.num_queries, True
            scores = scores.reshape(1, -1)
        elif scores.ndim == 2:
            b, shared = scores.shape[0], False
        else:
            raise ValueError(f"scores must be [N] or [B, N], got shape {scores.shape}")
        n = scores.shape[1]
        filters.check(b, n)
        out_rows, out_scores = empty_result(b, k)
        if b == 0 or n == 0:
            return out_rows, out_scores
        _check_rows(n)
        prep, keff = _Prepared(filters), min(k, n)
        bands = np.zeros(b, dtype=np.float32)  # scores are given, so the gate is exact
        none = np.zeros((1, 1), dtype=np.float32)  # no rescoring: queries and items are never read
        for q0 in range(0, b, self.query_block):
            nq = min(b, q0 + self.query_block) - q0
            parts = self._parts(n, nq, keff, n * nq)
            sel = _selection(nq, parts, keff)
            gates = np.full((nq, parts), -np.inf, dtype=np.float32)
            args = (scores if shared else scores[q0:q0 + nq], shared, 0, q0, False, none, none, sel, gates,
                    bands, prep.kernel_args())
            if nq * parts == 1:
                _select_serial(*args)
            else:
                with numba.parallel_chunksize(1):
                    _select_parallel(*args)
            self._finish(sel, q0, keff, bands, False, none, none, prep, out_rows, out_scores, parts)
        return out_rows, out_scores

    def _blas_pass(self, queries, q0, nq, items, keff, bands, prep, out_rows, out_scores) -> None:
        """Queries q0 .. q0+nq into out_*: float32 BLAS scores of one cache-sized item chunk at a time, each
        block scanned by the selection before the next is computed (one part per query: one gate each)."""
        n = items.shape[0]
        qb = queries[q0:q0 + nq]
        chunk = min(n, max(256, self.block_bytes // (4 * nq)))
        sel = _selection(nq, 1, keff)
        gates = np.full((nq, 1), -np.inf, dtype=np.float32)
        block = np.empty((nq, chunk), dtype=np.float32)
        par = self.blas_parallel_select
        par = nq >= self.blas_parallel_min_batch if par == "auto" else bool(par)
        select = _select_parallel if par else _select_serial
        flt = prep.kernel_args()
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            s = block if hi - lo == chunk else np.empty((nq, hi - lo), dtype=np.float32)
            np.matmul(qb, items[lo:hi].T, out=s)
            select(s, False, lo, q0, True, queries, items, sel, gates, bands, flt)
        self._finish(sel, q0, keff, bands, True, queries, items, prep, out_rows, out_scores, 1 + par)

    def _finish(self, sel, q0, keff, bands, rescore, queries, items, prep, out_rows, out_scores, parts) -> None:
        """select.finish of a query block into out_*; across threads when the block is big."""
        nq = sel[2].shape[0]
        fn = finish_parallel if nq * parts * keff >= 1 << 14 and nq > 1 else finish
        fn(sel[0], sel[1], sel[2], sel[4], q0, keff, bands, rescore, queries, items, prep.kernel_args(),
           out_rows[q0:q0 + nq],
           out_scores[q0:q0 + nq])

    def _group_width(self, nq: int) -> int:
        """Queries per group when the threads should split the queries rather than the items (0: they should
        not): from group_min_width queries per group with 2 groups per thread (a multiple of 16, the
        broadcast tile's width)."""
        threads = numba.get_num_threads()
        if threads < 2 or nq < 2 * threads * self.group_min_width:
            return 0
        return -(-nq // (2 * threads * 16)) * 16

    def _parts(self, n: int, tasks: int, keff: int, work: int) -> int:
        """Item parts per task (query): enough (tasks * parts) to keep every thread busy, but each part at
        least min_part_rows and 16 * keff rows, so that buffers and the finish stay small next to the scan.
        One part, run in the calling thread, when the work (~multiply-adds) is too small to be worth a
        parallel region: its barrier costs more, and far more when a worker thread is descheduled."""
        if work < self.min_parallel_work:
            return 1
        per = self.parts_per_thread if keff <= 32 else 1  # each part lets through about k log(rows / k) rows
        want = -(-numba.get_num_threads() * per // tasks)
        return max(1, min(want, n // self.min_part_rows, n // (16 * keff)))


def _selection(nq: int, parts: int, keff: int) -> tuple:
    """The `sel` tuple the kernels take: select.buffers, keff, and one gate per query shared by its parts."""
    return (*buffers(nq, parts, keff), keff, np.full(nq, -np.inf, dtype=np.float32))


def _check_rows(n: int) -> None:
    if n >= 1 << 32:
        raise ValueError(f"at most 2**32 - 1 items are supported, got {n}")


def warmup() -> None:
    """Compile (or load from the cache) every kernel specialisation on tiny inputs."""
    rng = np.random.default_rng(0)
    n = 300
    q = rng.standard_normal((3, 4)).astype(np.float32)
    items = rng.standard_normal((n, 4)).astype(np.float32)
    # A long exclude list (bitmap) next to short ones (binary search), and categories.
    f = Filters.build([True] * n, [list(range(n)), [], [2, 2]], [[0], [64], []] * 100, [[0], [], []],
                      [[], [64], []])
    for work in (0, 1 << 62):  # parallel drivers (several parts even here) and calling-thread versions
        opts = dict(min_parallel_work=work, min_part_rows=1)
        for backend in (NumbaTopK(bcast_min_batch=8, fused_max_batch=None, **opts),
                        NumbaTopK(bcast_min_batch=0, fused_max_batch=None, **opts),
                        NumbaTopK(fused_max_batch=0, blas_parallel_select=False),
                        NumbaTopK(fused_max_batch=0, blas_parallel_select=True)):
            backend.search(q, items, 2, f)
            backend.search(q, items, 300, f)  # the finish across threads
        NumbaTopK(**opts).rank_scores(items[:, 0], 2, f)
        NumbaTopK(**opts).rank_scores(q @ items.T, 2, f)
    wide = rng.standard_normal((4 * numba.get_num_threads(), 4)).astype(np.float32)  # queries split over threads
    NumbaTopK(fused_max_batch=None, bcast_min_batch=0, group_min_width=1, min_parallel_work=0,
              min_part_rows=1).search(wide, items, 2, Filters.none(len(wide), n))
    prep = _Prepared(f)  # and the parallel preparation of big exclude lists
    _split_excludes_parallel(f.exclude_indptr, f.exclude_rows, n, prep.bitmap_of, prep.bitmaps, prep.ex_ptr,
                             prep.ex_rows, 2)
