"""Numba CPU backend for exact top-k with filters: the same contract and results as `topk.NumpyTopK`.
This file holds the kernels and their driver, NumbaTopK; the register tiles they call are in tiles.py.

Scoring: one fused pass over the items, parallel over item parts (handed out dynamically), with register
tiles written as LLVM vector IR (tiles.py; no loop form got LLVM to emit them):

* B < bcast_min_batch (5): "sum" tiles, dot products along d then one shuffle/add tree for 8 horizontal
  sums; 8 rows x 1 query for a lone query, so B = 1 stays memory-bound (items read exactly once).
* larger B: "broadcast" tiles, 4 rows x 16 queries (queries transposed once per call), one coordinate
  of a row broadcast against 8 queries per FMA: finished dots in the accumulators, no horizontal sums,
  so close to the FMA peak; faster than OpenBLAS sgemm on the AVX2 host it was tuned on
  (benchmarks/RESULTS.md, 'Figures behind design choices').
* optional BLAS path (B > fused_max_batch; off by default): numpy float32 matmul on cache-sized item
  chunks, then a scan of the score block. It lost to the fused kernel at every B measured here (see
  NumbaTopK), and alternating with OpenBLAS's spinning thread pool made it erratic on a loaded host.

Selection: a candidate is keyed by a uint64 ordered like (-score, row) (monotone score bits high, row
low), so a max-heap of keys per (query, part) keeps the k best and its root is the entry to beat. The
float32 scores only gate: a row is looked at when it reaches the root's score minus an error margin;
then the filters are checked (valid, category bits, the query's excludes as a bitmap or a sorted list)
and the score is recomputed as float32(float64 dot), the reference's definition. So the scores returned
are exact and bit-identical for duplicated rows whatever tile, path or batch produced them, and filters
cost nothing for rows that never reach the gate. Parts' heaps are merged with one sort per query.

Small searches (too little work for a parallel region: a served batch on a small catalog) run as one
compiled call from filter plan to merged result, since a dozen NumPy calls around the kernel cost more
than the kernel there (benchmarks/RESULTS.md, 'Figures behind design choices').
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from streamrec.engine.cpu.tiles import _bcast4x8, _bcast4x16, _bits_f32, _f32_bits, _sum4x2, _sum8x1
from streamrec.engine.retrieval.topk import Filters, HostBackend, check_k, check_search_args, empty_result

__all__ = ["NumbaTopK", "warmup"]

_EMPTY = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # heap filler: worse than any real key
_LOW32 = np.uint64(0xFFFF_FFFF)
_SIGN = np.uint32(0x8000_0000)
_MIN_BITMAP_ROWS = 256  # shorter exclude lists are always searched, not turned into bitmaps
_PARALLEL_PREP_ROWS = 1 << 20  # exclude entries from which their preparation runs in parallel
_GATE_BLOCK = 32  # score-block size of the vectorised "anything above threshold?" test
_ROW_BLOCK = 256  # fused kernels: rows kept in L2 (64 KiB at d = 64) while the queries sweep them
_QUERY_BLOCK = 64  # broadcast tiles: transposed query columns kept in L1 (16 KiB at d = 64)
# Gate-only float32 code: reassociation and FMA contraction, but not nnan/ninf (NaN and -inf checks).
_FAST = {"reassoc", "contract"}


@njit(inline="always", nogil=True, cache=True)
def _key(score, row):
    """uint64 ordered like (-score, row); score is a non-NaN float32, row < 2**32."""
    if score == 0:
        score = np.float32(0.0)  # -0.0 == 0.0 must tie (and break by row), not sort apart
    b = _f32_bits(score)
    mono = ~b if b & _SIGN else b | _SIGN  # unsigned order == float order
    return (np.uint64(~mono) << np.uint64(32)) | np.uint64(row)


@njit(inline="always", nogil=True, cache=True)
def _key_score(key):
    mono = np.uint32(~(key >> np.uint64(32)) & _LOW32)
    return _bits_f32(mono & ~_SIGN if mono & _SIGN else ~mono)


@njit(inline="always", nogil=True, cache=True)
def _gate(heap, margin):
    """Approximate score a row must reach to be looked at: the root's score minus margin."""
    top = heap[0]
    if top == _EMPTY:
        return np.float32(-np.inf)
    return _key_score(top) - margin


@njit(inline="always", nogil=True, cache=True)
def _replace_top(heap, key):
    """Max-heap of keys (root = worst kept): put key in place of the root and sift it down."""
    n = heap.size
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and heap[c + 1] > heap[c]:
            c += 1
        if heap[c] <= key:
            break
        heap[i] = heap[c]
        i = c
    heap[i] = key


@njit(inline="always", nogil=True, cache=True)
def _allowed(b, r, flt):
    """The reference's filter rule for (query b, row r); flt is _Prepared.kernel_args()."""
    valid, ex_ptr, ex_rows, bitmap_of, bitmaps, item_cats, inc_cats, exc_cats, has_inc, has_exc = flt
    if not valid[r]:
        return False
    if has_inc[b]:
        hit = False
        for w in range(item_cats.shape[1]):
            if item_cats[r, w] & inc_cats[b, w]:
                hit = True
                break
        if not hit:
            return False
    if has_exc[b]:
        for w in range(item_cats.shape[1]):
            if item_cats[r, w] & exc_cats[b, w]:
                return False
    m = bitmap_of[b]
    if m >= 0:  # long exclude list: one bit per row
        return not (bitmaps[m, r >> 6] >> np.uint64(r & 63)) & np.uint64(1)
    lo, hi = ex_ptr[b], ex_ptr[b + 1]  # short list, sorted: binary search
    while lo < hi:
        mid = (lo + hi) >> 1
        if ex_rows[mid] < r:
            lo = mid + 1
        else:
            hi = mid
    return not (lo < ex_ptr[b + 1] and ex_rows[lo] == r)


@njit(nogil=True, cache=True)
def _dot64(q, x):
    """The reference score: float32 of the float64 dot product.

    Four fixed partial sums and no fast-math, so the result cannot depend on how LLVM inlines or
    vectorises a call site: a row scores the same from every path (duplicated rows tie exactly).
    """
    s0 = s1 = s2 = s3 = 0.0
    d = q.size
    j = 0
    while j + 4 <= d:
        s0 += np.float64(q[j]) * np.float64(x[j])
        s1 += np.float64(q[j + 1]) * np.float64(x[j + 1])
        s2 += np.float64(q[j + 2]) * np.float64(x[j + 2])
        s3 += np.float64(q[j + 3]) * np.float64(x[j + 3])
        j += 4
    while j < d:
        s0 += np.float64(q[j]) * np.float64(x[j])
        j += 1
    return np.float32((s0 + s1) + (s2 + s3))


@njit(fastmath=_FAST, nogil=True, cache=True)
def _dot32(q, x):
    """float32 dot for the gate only (rows left over by the tiles)."""
    s = np.float32(0.0)
    for j in range(q.size):
        s += q[j] * x[j]
    return s


@njit(inline="always", nogil=True, cache=True)
def _offer(heap, b, r, score, rescore, queries, items, margin, gate, flt):
    """Row r reached query b's gate: filter, (re)score exactly, keep if it beats the root; -> new gate.
    Inlined (at Numba IR level; no caller is fast-math): as a call, passing the ten filter arrays cost
    more than the work (benchmarks/RESULTS.md, 'Figures behind design choices'). _dot64 stays a call, see there."""
    if not _allowed(b, r, flt):
        return gate
    if rescore:
        score = _dot64(queries[b], items[r])
    if score != score or score == -np.inf:
        return gate
    key = _key(score, r)
    if key < heap[0]:
        _replace_top(heap, key)
    return _gate(heap, margin)  # also when rejected: callers may bring a stale gate


@njit(nogil=True, cache=True)
def _take_hits(hits, sums, rows, b, bb, r, q0, p, gates, heaps, queries, items, margins, flt):
    """Offer the lanes of a sum tile that passed their gate (lane i: row r + i % rows, query (b, bb)[i // rows])."""
    for i in range(8):
        if hits >> i & 1:
            q = b if i < rows else bb
            s = sums[i]
            if s >= gates[q - q0]:  # the gate may have risen since the tile was scored
                gates[q - q0] = _offer(heaps[q - q0, p], q, r + i % rows, s, True, queries, items, margins[q],
                                       gates[q - q0], flt)


@njit(parallel=True, nogil=True, cache=True)
def _fused_sum(queries, q0, items, heaps, margins, flt):
    """Queries q0 .. q0+nq into heaps [nq, parts, keff]; part p scans rows [n*p/parts, n*(p+1)/parts)."""
    parts = heaps.shape[1]
    n = items.shape[0]
    for p in prange(parts):
        _sum_part(queries, q0, items, n * p // parts, n * (p + 1) // parts, p, heaps, margins, flt)


@njit(nogil=True, cache=True)
def _sum_part(queries, q0, items, lo, hi, p, heaps, margins, flt):
    """One part of _fused_sum, in row blocks that stay in L2: query pairs take two 4x2 tiles per 8 rows,
    an odd last query an 8x1 tile, so a lone query costs ~1 FMA per loaded float and stays memory-bound.

    Kept out of the prange body and split into one function per tile shape: with both shapes in one
    loop nest the 8x1 loop ran slower (register allocation), which shows at B = 1
    (benchmarks/RESULTS.md, 'Figures behind design choices').
    """
    nq = heaps.shape[0]
    gates = np.full(nq, -np.inf, dtype=np.float32)
    sums = np.empty(8, dtype=np.float32)
    for r0 in range(lo, hi, _ROW_BLOCK):
        r1 = min(hi, r0 + _ROW_BLOCK)
        tiled = r0 + (r1 - r0) // 8 * 8
        if nq >= 2:
            _sum_pairs(queries, q0, items, r0, tiled, p, gates, sums, heaps, margins, flt)
        if nq % 2:
            _sum_single(queries, q0, items, r0, tiled, p, gates, sums, heaps, margins, flt)
        for r in range(tiled, r1):  # < 8 rows left in the block
            for b in range(q0, q0 + nq):
                s = _dot32(queries[b], items[r])
                if s >= gates[b - q0]:
                    gates[b - q0] = _offer(heaps[b - q0, p], b, r, s, True, queries, items, margins[b],
                                           gates[b - q0], flt)


@njit(nogil=True, cache=True)
def _sum_pairs(queries, q0, items, lo, hi, p, gates, sums, heaps, margins, flt):
    """Rows lo .. hi (a multiple of 8 apart) against the query pairs of the block."""
    last = q0 + heaps.shape[0] - 1
    for r in range(lo, hi, 8):
        for b in range(q0, last, 2):
            for half in range(0, 8, 4):
                hits = _sum4x2(queries, b, b + 1, items, r + half, gates[b - q0], gates[b + 1 - q0], sums)
                if hits:
                    _take_hits(hits, sums, 4, b, b + 1, r + half, q0, p, gates, heaps, queries, items, margins, flt)


@njit(nogil=True, cache=True)
def _sum_single(queries, q0, items, lo, hi, p, gates, sums, heaps, margins, flt):
    """Rows lo .. hi (a multiple of 8 apart) against the block's last query."""
    b = q0 + heaps.shape[0] - 1
    for r in range(lo, hi, 8):
        hits = _sum8x1(queries, b, b, items, r, gates[b - q0], gates[b - q0], sums)
        if hits:
            _take_hits(hits, sums, 8, b, b, r, q0, p, gates, heaps, queries, items, margins, flt)


@njit(nogil=True, cache=True)
def _take_bcast(mask, width, out, col, r, q0, p, gates, heaps, queries, items, margins, flt):
    """Offer the lanes of a broadcast tile that passed their gate (bit ri * width + c: row r + ri, column
    col + c of the query block starting at q0)."""
    for bit in range(4 * width):
        if mask >> np.uint64(bit) & np.uint64(1):
            c = col + bit % width
            s = out[bit]
            if s >= gates[c]:  # the gate may have risen since the tile was scored
                gates[c] = _offer(heaps[c, p], q0 + c, r + bit // width, s, True, queries, items, margins[q0 + c],
                                  gates[c], flt)


@njit(parallel=True, nogil=True, cache=True)
def _fused_bcast(qt, q0, queries, items, heaps, margins, flt):
    """_fused_sum with the broadcast tiles: qt [d, nqpad] holds queries q0 .. q0+nq transposed and
    zero-padded to a multiple of 8 (pad columns get an +inf gate, so they never hit)."""
    parts = heaps.shape[1]
    n = items.shape[0]
    for p in prange(parts):
        _bcast_part(qt, q0, queries, items, n * p // parts, n * (p + 1) // parts, p, heaps, margins, flt)


@njit(nogil=True, cache=True)
def _bcast_part(qt, q0, queries, items, lo, hi, p, heaps, margins, flt):
    """One part of _fused_bcast: rows go in blocks that stay in L2 while blocks of query columns that
    fit L1 sweep over them."""
    nq = heaps.shape[0]
    nqpad = qt.shape[1]
    gates = np.full(nqpad, np.inf, dtype=np.float32)
    gates[:nq] = -np.inf
    out = np.empty(64, dtype=np.float32)
    for r0 in range(lo, hi, _ROW_BLOCK):
        r1 = min(hi, r0 + _ROW_BLOCK)
        tiled = r0 + (r1 - r0) // 4 * 4
        for c0 in range(0, nqpad, _QUERY_BLOCK):
            c1 = min(nqpad, c0 + _QUERY_BLOCK)
            for r in range(r0, tiled, 4):
                col = c0
                while col + 16 <= c1:
                    mask = _bcast4x16(qt, col, items, r, gates, out)
                    if mask:
                        _take_bcast(mask, 16, out, col, r, q0, p, gates, heaps, queries, items, margins, flt)
                    col += 16
                if col < c1:
                    mask = _bcast4x8(qt, col, items, r, gates, out)
                    if mask:
                        _take_bcast(mask, 8, out, col, r, q0, p, gates, heaps, queries, items, margins, flt)
        for r in range(tiled, r1):  # < 4 rows left in the block
            for c in range(nq):
                s = _dot32(queries[q0 + c], items[r])
                if s >= gates[c]:
                    gates[c] = _offer(heaps[c, p], q0 + c, r, s, True, queries, items, margins[q0 + c],
                                      gates[c], flt)


@njit(nogil=True, cache=True)
def _scan(srow, lo, hi, row0, b, rescore, queries, items, heap, gate, margin, flt):
    """Offer srow[lo:hi] (scores of rows row0+lo ..) to query b's heap; -> the gate afterwards."""
    j = lo
    while j < hi:
        stop = min(j + _GATE_BLOCK, hi)
        hits = 0
        for i in range(j, stop):  # branch-free so it vectorises; NaN never counts
            hits += srow[i] >= gate
        if hits:
            for i in range(j, stop):
                if srow[i] >= gate:
                    gate = _offer(heap, b, row0 + i, srow[i], rescore, queries, items, margin, gate, flt)
        j = stop
    return gate


@njit(parallel=True, nogil=True, cache=True)
def _select_parallel(scores, shared, row0, q0, rescore, queries, items, heaps, gates, margins, flt):
    """Offer scores [nq or 1 (shared), c] of rows row0 .. row0+c to heaps [nq, parts, keff] of queries
    q0 .. q0+nq; part p takes columns [c*p/parts, c*(p+1)/parts). gates [nq, parts] carry over calls."""
    nq, parts = heaps.shape[0], heaps.shape[1]
    c = scores.shape[1]
    for task in prange(nq * parts):
        bl = task // parts
        p = task - bl * parts
        gates[bl, p] = _scan(scores[0] if shared else scores[bl], c * p // parts, c * (p + 1) // parts, row0,
                             q0 + bl, rescore, queries, items, heaps[bl, p], gates[bl, p], margins[q0 + bl], flt)


@njit(nogil=True, cache=True)
def _select_serial(scores, shared, row0, q0, rescore, queries, items, heaps, gates, margins, flt):
    """_select_parallel in the calling thread: for small inputs, and for the BLAS path, where a Numba
    thread pool alternating with OpenBLAS's (both spin after their work) made it several times slower."""
    nq, parts = heaps.shape[0], heaps.shape[1]
    c = scores.shape[1]
    for task in range(nq * parts):
        bl = task // parts
        p = task - bl * parts
        gates[bl, p] = _scan(scores[0] if shared else scores[bl], c * p // parts, c * (p + 1) // parts, row0,
                             q0 + bl, rescore, queries, items, heaps[bl, p], gates[bl, p], margins[q0 + bl], flt)


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


def _merge(heaps: np.ndarray, out_rows: np.ndarray, out_scores: np.ndarray) -> None:
    """Best k keys of each query's parts (heaps [nq, parts, keff]), decoded into out [nq, k] (padding stays).

    NumPy's sort, not Numba's: several times faster on the parts * k keys of a large k.
    """
    k = out_rows.shape[1]
    keys = np.sort(heaps.reshape(heaps.shape[0], -1), axis=1)[:, :k]
    kept = keys != _EMPTY
    mono = (~keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where(mono & _SIGN, mono & ~_SIGN, ~mono)
    out_rows[:, : keys.shape[1]] = np.where(kept, (keys & _LOW32).astype(np.int64), -1)
    out_scores[:, : keys.shape[1]] = np.where(kept, bits.view(np.float32), -np.inf)


@njit(nogil=True, cache=True)
def _merge_serial(heaps, out_rows, out_scores):
    """_merge in one compiled call, for the small heaps of single-part searches."""
    k = out_rows.shape[1]
    for q in range(heaps.shape[0]):
        keys = np.sort(heaps[q].ravel())
        for j in range(min(k, keys.size)):
            if keys[j] == _EMPTY:
                break
            out_rows[q, j] = np.int64(keys[j] & _LOW32)
            out_scores[q, j] = _key_score(keys[j])


@njit(nogil=True, cache=True)
def _margins(queries):
    """Gate slack per query: a bound on |float32 dot - exact| for item norms <= 2.

    Any float32 summation of d products errs by at most ~d * 2**-24 * sum|q_j x_j| <= d * 2**-24 |q| |x|.
    Items with larger norms stay correct up to near-ties (a row within ~1e-5 of the k-th may be missed).
    """
    b, d = queries.shape
    out = np.empty(b, dtype=np.float32)
    for q in range(b):
        s = 0.0
        for j in range(d):
            s += np.float64(queries[q, j]) * np.float64(queries[q, j])
        out[q] = np.float32((d + 16) * 2.0**-23 * np.sqrt(s))
    return out


@njit(nogil=True, cache=True)
def _search_serial(queries, items, keff, bcast_min_batch, query_block, flt, out_rows, out_scores):
    """search() for work too small for a parallel region, in one compiled call: per query block, one part
    over all rows with the tile shape the block's size calls for, then the merge."""
    b, d = queries.shape
    n = items.shape[0]
    margins = _margins(queries)
    for q0 in range(0, b, query_block):
        nq = min(b, q0 + query_block) - q0
        heaps = np.full((nq, 1, keff), _EMPTY, dtype=np.uint64)
        if nq < bcast_min_batch:
            _sum_part(queries, q0, items, 0, n, 0, heaps, margins, flt)
        else:
            qt = np.zeros((d, (nq + 7) // 8 * 8), dtype=np.float32)
            qt[:, :nq] = queries[q0:q0 + nq].T
            _bcast_part(qt, q0, queries, items, 0, n, 0, heaps, margins, flt)
        _merge_serial(heaps, out_rows[q0:q0 + nq], out_scores[q0:q0 + nq])


class NumbaTopK(HostBackend):
    """Numba backend (name "numba"); see the module docstring. Tuned on a shared 2-core AVX2 EPYC.

    fused_max_batch: None (default) scores every batch with the fused kernel; an int sends bigger batches
        to the BLAS path. The crossover never came: the BLAS path was slower at every batch size measured,
        as sgemm alone costs more per (row, query) than the broadcast tile, and the score block still has
        to be scanned (benchmarks/RESULTS.md, 'Figures behind design choices'). Worth trying where BLAS has AVX-512.
    bcast_min_batch: smallest query block scored with broadcast tiles rather than sum tiles. Sum tiles win
        at B <= 2 (no padding of the query side), are even at 3-4, broadcast tiles win from ~5, by more the
        larger the block (benchmarks/RESULTS.md, 'Figures behind design choices').
    query_block: queries per pass over the items (bounds heap memory: query_block * parts * k * 8 bytes).
    block_bytes: size of one float32 [queries, chunk] score block on the BLAS path.
    parts_per_thread: item parts per thread, handed out dynamically so that a thread slowed by other
        processes does not hold up the call; min_part_rows: the smallest part.
    min_parallel_work: below this many multiply-adds a call runs in the calling thread: a parallel
        region's barrier costs more than such a call, and far more whenever the host is loaded and a
        worker thread is descheduled (benchmarks/RESULTS.md, 'Figures behind design choices').
    """

    name = "numba"

    def __init__(self, fused_max_batch: int | None = None, bcast_min_batch: int = 5, query_block: int = 512,
                 block_bytes: int = 4 << 20, parts_per_thread: int = 4, min_part_rows: int = 1024,
                 min_parallel_work: int = 1 << 23) -> None:
        if min(query_block, block_bytes, parts_per_thread, min_part_rows) < 1 or bcast_min_batch < 0:
            raise ValueError("query_block, block_bytes, parts_per_thread, min_part_rows must be >= 1")
        if fused_max_batch is not None and fused_max_batch < 0:
            raise ValueError(f"fused_max_batch must be >= 0 or None, got {fused_max_batch}")
        self.fused_max_batch = fused_max_batch
        self.bcast_min_batch = int(bcast_min_batch)
        self.query_block = int(query_block)
        self.block_bytes = int(block_bytes)
        self.parts_per_thread = int(parts_per_thread)
        self.min_part_rows = int(min_part_rows)
        self.min_parallel_work = int(min_parallel_work)

    def warmup(self) -> None:
        """The Engine calls this at start (as for the CUDA backend): every kernel specialisation compiled or
        loaded from Numba's cache now, not on the first request."""
        warmup()

    def search(
        self, queries: np.ndarray, items: np.ndarray, k: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]:
        queries, items, k = check_search_args(queries, items, k, filters)
        b, n = queries.shape[0], items.shape[0]
        out_rows, out_scores = empty_result(b, k)
        if b == 0 or n == 0:
            return out_rows, out_scores
        _check_rows(n)
        prep, keff = _Prepared(filters), min(k, n)
        fused = self.fused_max_batch is None or b <= self.fused_max_batch
        first_block = min(b, self.query_block)
        if fused and self._parts(n, 1, keff, n * queries.shape[1] * max(first_block, 4)) == 1:
            # Later blocks are no bigger than the first, so every block runs as one part.
            _search_serial(queries, items, keff, self.bcast_min_batch, self.query_block, prep.kernel_args(),
                           out_rows, out_scores)
            return out_rows, out_scores
        margins = _margins(queries)
        for q0 in range(0, b, self.query_block):
            nq = min(b, q0 + self.query_block) - q0
            parts = self._parts(n, 1, keff, n * queries.shape[1] * max(nq, 4))
            if fused and nq < self.bcast_min_batch:
                heaps = self._heaps(nq, parts, keff)
                if parts == 1:
                    _sum_part(queries, q0, items, 0, n, 0, heaps, margins, prep.kernel_args())
                else:
                    with numba.parallel_chunksize(1):
                        _fused_sum(queries, q0, items, heaps, margins, prep.kernel_args())
            elif fused:
                heaps = self._heaps(nq, parts, keff)
                qt = np.zeros((queries.shape[1], -(-nq // 8) * 8), dtype=np.float32)
                qt[:, :nq] = queries[q0:q0 + nq].T
                if parts == 1:
                    _bcast_part(qt, q0, queries, items, 0, n, 0, heaps, margins, prep.kernel_args())
                else:
                    with numba.parallel_chunksize(1):
                        _fused_bcast(qt, q0, queries, items, heaps, margins, prep.kernel_args())
            else:
                heaps = self._blas_pass(queries, q0, nq, items, keff, margins, prep)
            _merge(heaps, out_rows[q0:q0 + nq], out_scores[q0:q0 + nq])
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
        margins = np.zeros(b, dtype=np.float32)  # scores are given, so the gate is exact
        none = np.zeros((1, 1), dtype=np.float32)  # no rescoring: queries and items are never read
        for q0 in range(0, b, self.query_block):
            nq = min(b, q0 + self.query_block) - q0
            parts = self._parts(n, nq, keff, n * nq)
            heaps = self._heaps(nq, parts, keff)
            gates = np.full((nq, parts), -np.inf, dtype=np.float32)
            args = (scores if shared else scores[q0:q0 + nq], shared, 0, q0, False, none, none, heaps, gates,
                    margins, prep.kernel_args())
            if nq * parts == 1:
                _select_serial(*args)
            else:
                with numba.parallel_chunksize(1):
                    _select_parallel(*args)
            _merge(heaps, out_rows[q0:q0 + nq], out_scores[q0:q0 + nq])
        return out_rows, out_scores

    def _blas_pass(self, queries, q0, nq, items, keff, margins, prep) -> np.ndarray:
        """Heaps [nq, 1, keff] of queries q0 .. q0+nq from float32 BLAS scores of item chunks."""
        n = items.shape[0]
        qb = queries[q0:q0 + nq]
        chunk = min(n, max(256, self.block_bytes // (4 * nq)))
        heaps = self._heaps(nq, 1, keff)
        gates = np.full((nq, 1), -np.inf, dtype=np.float32)
        block = np.empty((nq, chunk), dtype=np.float32)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            s = block if hi - lo == chunk else np.empty((nq, hi - lo), dtype=np.float32)
            np.matmul(qb, items[lo:hi].T, out=s)
            _select_serial(s, False, lo, q0, True, queries, items, heaps, gates, margins, prep.kernel_args())
        return heaps

    def _parts(self, n: int, tasks: int, keff: int, work: int) -> int:
        """Item parts per task (query): enough (tasks * parts) to keep every thread busy, but each part at
        least min_part_rows and 64 * keff rows, so that heaps and the merge stay small next to the scan.
        One part, run in the calling thread, when the work (~multiply-adds) is too small to be worth a
        parallel region: its barrier costs more, and far more when a worker thread is descheduled."""
        if work < self.min_parallel_work:
            return 1
        want = -(-numba.get_num_threads() * self.parts_per_thread // tasks)
        return max(1, min(want, n // self.min_part_rows, n // (64 * keff)))

    @staticmethod
    def _heaps(nq: int, parts: int, keff: int) -> np.ndarray:
        return np.full((nq, parts, keff), _EMPTY, dtype=np.uint64)


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
        for backend in (NumbaTopK(bcast_min_batch=8, **opts), NumbaTopK(bcast_min_batch=0, **opts),
                        NumbaTopK(fused_max_batch=0)):
            backend.search(q, items, 2, f)
        NumbaTopK(**opts).rank_scores(items[:, 0], 2, f)
        NumbaTopK(**opts).rank_scores(q @ items.T, 2, f)
    prep = _Prepared(f)  # and the parallel preparation of big exclude lists
    _split_excludes_parallel(f.exclude_indptr, f.exclude_rows, n, prep.bitmap_of, prep.bitmaps, prep.ex_ptr,
                             prep.ex_rows, 2)
