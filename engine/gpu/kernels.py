"""Numba CUDA device functions and kernels of the GPU top-k: fused scoring and selection, the reduction of
candidate lists, and the column scatter / copy / zero kernels that keep the resident item matrix current.
Host code never runs here: topk.py launches the selection kernels, device.py the matrix kernels.

Selection works on 64-bit keys, `(order-preserving bits of the float32 score) << 32 | (2**32 - 1 - row)`:
ordering keys descending is ordering by (-score, row), every live key is distinct and non-zero, and 0 means
"no candidate". Exact ties therefore need no special care: selection over distinct keys is deterministic.

Phase 1 (`_dot_kernel`, `_scores_kernel`) is fused: a block scores a span of items for a tile of queries,
applies the filters, and keeps each query's running top-k in shared memory. New keys above the running k-th
key go to a per-query buffer; a full buffer is bitonic-sorted and merged into the running list, which lifts
the threshold, so after warm-up almost every item is rejected by one compare. Each block writes its top-k
to a small [B, blocks, kp] buffer, never the [B, N] score matrix. Phase 2 (`_keys_kernel`) runs the same
selection over those candidates, as a tree, until one list per query is left.

Shared memory holds at most `MAX_PASS_K` = 4096 keys per query; a larger k is served in passes (driven by
topk.py), each pass admitting only keys below the last key of the previous one.
"""
from __future__ import annotations

import functools
import warnings

import numba as nb
import numpy as np
from numba import config as _numba_config
from numba import cuda

MAX_PASS_K = 4096  # keys per query one pass can hold in shared memory
_CAND = 4608  # uint64 shared slots for running lists + insert buffers (36 KiB; with the query tile < 48 KiB)
_QSLOTS = 2048  # float32 shared slots for the query tile (8 KiB)

_NEG_INF = np.float32(-np.inf)
_NO_KEY = np.uint64(0)
_LO32 = np.uint64(0xFFFFFFFF)
_SIGN32 = np.uint64(0x80000000)
_SHIFT = np.uint64(32)
_ZERO64 = np.uint64(0)
_SIM = bool(_numba_config.ENABLE_CUDASIM)
# 128 registers: two 256-thread blocks per SM; at that cap ptxas (sm_90) spills at most a few words.
_DOT_OPTIONS = {} if _SIM else {"max_registers": 128}

# Small batches make small grids by design; Numba would warn on every such launch.
warnings.filterwarnings("ignore", message=r"Grid size .* will likely result in GPU under-utilization")


# ---------------------------------------------------------------------------------------------------------
# Device functions
# ---------------------------------------------------------------------------------------------------------

if _SIM:

    @cuda.jit(device=True)
    def _f32_bits(x):
        return np.float32(x).view(np.int32)

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _f32_bits(x):
        return libdevice.float_as_int(x)


@cuda.jit(device=True)
def _imin(a, b):
    # The builtin min on integers goes through a vararg overload that the CUDA target fails to compile.
    return a if a < b else b


@cuda.jit(device=True)
def _key(score, row):
    """Selection key of (score, row); 0 for -inf and NaN, which never qualify."""
    if not score > _NEG_INF:
        return _NO_KEY
    if score == 0:
        score = np.float32(0.0)  # -0.0 ties +0.0, as the floats compare
    bits = np.uint64(np.int64(_f32_bits(score)) & 0xFFFFFFFF)
    if score < 0:
        bits = ~bits & _LO32
    else:
        bits = bits | _SIGN32
    return (bits << _SHIFT) | (_LO32 - np.uint64(row))


@cuda.jit(device=True)
def _allowed(b, row, cats_t, inc, exc, inc_any, ex_ptr, ex_rows):
    """Category and per-query exclude filters (liveness is checked by the caller, before scoring)."""
    hit = False
    for w in range(cats_t.shape[0]):
        c = cats_t[w, row]
        if (c & exc[b, w]) != _ZERO64:
            return False
        if (c & inc[b, w]) != _ZERO64:
            hit = True
    if inc_any[b] != 0 and not hit:
        return False
    lo = ex_ptr[b]
    end = ex_ptr[b + 1]
    hi = end
    while lo < hi:  # the query's excluded rows are sorted
        mid = (lo + hi) // 2
        if ex_rows[mid] < row:
            lo = mid + 1
        else:
            hi = mid
    return not (lo < end and ex_rows[lo] == row)


@cuda.jit(device=True)
def _log2(x):
    """log2 of a power of 2 (sizes here are powers of 2, so shifts and masks replace 64-bit divisions)."""
    lg = 0
    while (1 << lg) < x:
        lg += 1
    return lg


@cuda.jit(device=True)
def _stage(sh, off, stride, lhalf, lj, size, flip, flags, nq):
    """One bitonic compare-exchange stage at distance 2**lj on sh[q*stride + off : ... + 2**(lhalf+1)], for every
    flagged q < nq. A pair at index i is ordered descending where (i & size) == 0, unless flip."""
    j = 1 << lj
    for p in range(cuda.threadIdx.x, nq << lhalf, cuda.blockDim.x):
        q = p >> lhalf
        if flags[q] != 0:
            t = p & ((1 << lhalf) - 1)
            i = ((t >> lj) << (lj + 1)) | (t & (j - 1))
            a = q * stride + off + i
            x = sh[a]
            y = sh[a + j]
            if (x < y) == (((i & size) == 0) != flip):
                sh[a] = y
                sh[a + j] = x
    cuda.syncthreads()


@cuda.jit(device=True)
def _bitonic_sort(sh, off, stride, lg, flags, nq):
    """Sort sh[q*stride + off : ... + 2**lg] descending for every flagged q < nq."""
    for ls in range(1, lg + 1):
        for lj in range(ls - 1, -1, -1):
            _stage(sh, off, stride, lg - 1, lj, 1 << ls, False, flags, nq)


@cuda.jit(device=True)
def _bitonic_merge(sh, off, stride, lg, descending, flags, nq):
    """Sort the bitonic sequence sh[q*stride + off : ... + 2**lg] for every flagged q < nq."""
    for lj in range(lg - 1, -1, -1):
        _stage(sh, off, stride, lg - 1, lj, 1 << lg, not descending, flags, nq)


@cuda.jit(device=True)
def _flush(sh, cnt, thr, flags, nq, kp, t, kth, most):
    """Merge the flagged queries' buffers (at most `most` keys each) into their sorted running lists.

    Layout: running lists at sh[q*kp : (q+1)*kp] (descending), buffers at sh[nq*kp + q*t : ... + t].
    """
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    lg = _log2(most)  # sort only the used part of the buffers, padded to a power of 2
    length = 1 << lg
    boff = nq * kp
    for p in range(tid, nq << lg, nt):
        q = p >> lg
        i = p & (length - 1)
        if flags[q] != 0 and i >= cnt[q]:
            sh[boff + q * t + i] = _NO_KEY
    cuda.syncthreads()
    _bitonic_sort(sh, boff, t, lg, flags, nq)
    # The top m of (list tail, sorted buffer) is their elementwise max: the list tail descending against the
    # buffer ascending. That max descends (list values, all <= the head's last) then ascends (buffer values),
    # so head + new tail is bitonic and one merge sorts it. At most m list entries can be displaced.
    lkp = _log2(kp)
    lm = _imin(lg, lkp)
    m = 1 << lm
    for p in range(tid, nq << lm, nt):
        q = p >> lm
        if flags[q] != 0:
            i = p & (m - 1)
            a = q * kp + kp - m + i
            v = sh[boff + q * t + m - 1 - i]
            if v > sh[a]:
                sh[a] = v
    cuda.syncthreads()
    _bitonic_merge(sh, 0, kp, lkp, True, flags, nq)
    if tid < nq and flags[tid] != 0:
        thr[tid] = sh[tid * kp + kth - 1]  # keys at or below the k-th can never make the top k
        cnt[tid] = 0
    cuda.syncthreads()


@cuda.jit(device=True)
def _flush_if(sh, cnt, thr, flags, ctl, nq, kp, t, kth, limit):
    """Flush the queries whose buffers hold more than `limit` keys (decided by one thread, so uniformly)."""
    if cuda.threadIdx.x == 0:
        any_ = 0
        most = 0
        for q in range(nq):
            c = cnt[q]
            flags[q] = 1 if c > limit else 0
            if c > limit:
                any_ = 1
                most = c if c > most else most
        ctl[0] = any_
        ctl[1] = most
    cuda.syncthreads()
    if ctl[0] != 0:
        _flush(sh, cnt, thr, flags, nq, kp, t, kth, ctl[1])


@cuda.jit(device=True)
def _reset(sh, cnt, thr, nq, kp):
    tid = cuda.threadIdx.x
    for i in range(tid, nq * kp, cuda.blockDim.x):
        sh[i] = _NO_KEY
    if tid < nq:
        cnt[tid] = 0
        thr[tid] = _NO_KEY
    cuda.syncthreads()


@cuda.jit(device=True)
def _push(sh, cnt, q, nq, kp, t, key):
    pos = cuda.atomic.add(cnt, q, 1)  # never overflows: flushed while more than t - blockDim are held
    sh[nq * kp + q * t + pos] = key


@cuda.jit(device=True)
def _write(sh, out, b0, nq, kp, blk):
    lkp = _log2(kp)
    for p in range(cuda.threadIdx.x, nq * kp, cuda.blockDim.x):
        q = p >> lkp
        out[b0 + q, blk, p & (kp - 1)] = sh[p]


@cuda.jit(device=True)
def _load_queries(qs, queries, b0, nq, j0):
    """qs[q, j] = queries[b0 + q, j0 + j], zero outside the batch / dimension."""
    qt, qc = qs.shape
    d = queries.shape[1]
    for p in range(cuda.threadIdx.x, qt * qc, cuda.blockDim.x):
        q = p // qc
        j = p - q * qc
        v = np.float32(0.0)
        if q < nq and j0 + j < d:
            v = queries[b0 + q, j0 + j]
        qs[q, j] = v
    cuda.syncthreads()


# ---------------------------------------------------------------------------------------------------------
# Kernels. Grid: x = query (tile), y = block of items (or of candidates). No thread returns early: every
# thread takes part in every syncthreads.
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _dot_kernel(qt: int):
    """Phase 1 for `search`: scores items [d, capacity] (float32 or float16) against qt queries per block."""
    qc = _QSLOTS // qt  # query floats per tile slot; longer queries are streamed in chunks of qc

    @cuda.jit(**_DOT_OPTIONS)
    def kernel(queries, vec_t, live, cats_t, inc, exc, inc_any, ex_ptr, ex_rows, upper, n, span, kth, kp, t, out):
        sh = cuda.shared.array(_CAND, nb.uint64)
        qs = cuda.shared.array((qt, qc), nb.float32)  # 2-D: one index computation per j serves all queries
        cnt = cuda.shared.array(qt, nb.int32)
        thr = cuda.shared.array(qt, nb.uint64)
        flags = cuda.shared.array(qt, nb.int32)
        ctl = cuda.shared.array(2, nb.int32)
        acc = cuda.local.array(qt, nb.float32)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        d = queries.shape[1]
        b0 = cuda.blockIdx.x * qt
        nq = _imin(qt, queries.shape[0] - b0)
        lo = cuda.blockIdx.y * span
        hi = _imin(n, lo + span)
        _reset(sh, cnt, thr, nq, kp)
        whole = d <= qc
        if whole:
            _load_queries(qs, queries, b0, nq, 0)
        for base in range(lo, hi, nt):
            _flush_if(sh, cnt, thr, flags, ctl, nq, kp, t, kth, t - nt)
            row = base + tid
            ok = row < hi and live[row] != 0
            for q in range(qt):
                acc[q] = 0.0
            for j0 in range(0, d, qc):
                if not whole:
                    cuda.syncthreads()  # everyone is done with the previous chunk
                    _load_queries(qs, queries, b0, nq, j0)
                if ok:
                    for j in range(_imin(qc, d - j0)):
                        x = np.float32(vec_t[j0 + j, row])  # coalesced: consecutive threads, consecutive rows
                        for q in range(qt):
                            acc[q] += qs[q, j] * x
            if ok:
                for q in range(qt):
                    if q < nq:
                        b = b0 + q
                        key = _key(acc[q], row)
                        if key > thr[q] and key < upper[b]:
                            if _allowed(b, row, cats_t, inc, exc, inc_any, ex_ptr, ex_rows):
                                _push(sh, cnt, q, nq, kp, t, key)
            cuda.syncthreads()
        _flush_if(sh, cnt, thr, flags, ctl, nq, kp, t, kth, 0)
        _write(sh, out, b0, nq, kp, cuda.blockIdx.y)

    return kernel


@cuda.jit
def _scores_kernel(scores, live, cats_t, inc, exc, inc_any, ex_ptr, ex_rows, upper, n, span, kth, kp, t, out):
    """Phase 1 for `rank_scores`: given scores [B, N], or [1, N] shared by the batch; one query per block."""
    sh = cuda.shared.array(_CAND, nb.uint64)
    cnt = cuda.shared.array(1, nb.int32)
    thr = cuda.shared.array(1, nb.uint64)
    flags = cuda.shared.array(1, nb.int32)
    ctl = cuda.shared.array(2, nb.int32)
    b = cuda.blockIdx.x
    srow = 0 if scores.shape[0] == 1 else b
    lo = cuda.blockIdx.y * span
    hi = _imin(n, lo + span)
    _reset(sh, cnt, thr, 1, kp)
    for base in range(lo, hi, cuda.blockDim.x):
        _flush_if(sh, cnt, thr, flags, ctl, 1, kp, t, kth, t - cuda.blockDim.x)
        row = base + cuda.threadIdx.x
        if row < hi and live[row] != 0:
            key = _key(scores[srow, row], row)
            if key > thr[0] and key < upper[b]:
                if _allowed(b, row, cats_t, inc, exc, inc_any, ex_ptr, ex_rows):
                    _push(sh, cnt, 0, 1, kp, t, key)
        cuda.syncthreads()
    _flush_if(sh, cnt, thr, flags, ctl, 1, kp, t, kth, 0)
    _write(sh, out, b, 1, kp, cuda.blockIdx.y)


@cuda.jit
def _keys_kernel(keys, n, span, kth, kp, t, out):
    """Phase 2: top kth of each span of candidate keys [B, C] (already filtered) -> out [B, blocks, kp]."""
    sh = cuda.shared.array(_CAND, nb.uint64)
    cnt = cuda.shared.array(1, nb.int32)
    thr = cuda.shared.array(1, nb.uint64)
    flags = cuda.shared.array(1, nb.int32)
    ctl = cuda.shared.array(2, nb.int32)
    b = cuda.blockIdx.x
    lo = cuda.blockIdx.y * span
    hi = _imin(n, lo + span)
    _reset(sh, cnt, thr, 1, kp)
    for base in range(lo, hi, cuda.blockDim.x):
        _flush_if(sh, cnt, thr, flags, ctl, 1, kp, t, kth, t - cuda.blockDim.x)
        i = base + cuda.threadIdx.x
        if i < hi:
            key = keys[b, i]
            if key > thr[0]:
                _push(sh, cnt, 0, 1, kp, t, key)
        cuda.syncthreads()
    _flush_if(sh, cnt, thr, flags, ctl, 1, kp, t, kth, 0)
    _write(sh, out, b, 1, kp, cuda.blockIdx.y)


@cuda.jit
def _scatter_cols(dst, idx, src):
    """dst[:, idx[i]] = src[:, i]; consecutive threads take consecutive i (coalesced for runs of rows)."""
    m = idx.shape[0]
    for p in range(cuda.grid(1), src.shape[0] * m, cuda.gridsize(1)):
        j = p // m
        i = p - j * m
        dst[j, idx[i]] = src[j, i]


@cuda.jit
def _copy_cols(dst, src):
    """dst[:, :src.shape[1]] = src (device-to-device growth)."""
    c = src.shape[1]
    for p in range(cuda.grid(1), src.shape[0] * c, cuda.gridsize(1)):
        j = p // c
        dst[j, p - j * c] = src[j, p - j * c]


@cuda.jit
def _zero(dst):
    c = dst.shape[1]
    for p in range(cuda.grid(1), dst.shape[0] * c, cuda.gridsize(1)):
        j = p // c
        dst[j, p - j * c] = 0
