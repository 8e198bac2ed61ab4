"""Exact filtered cosine top-k on a CUDA GPU (Numba kernels), with the item matrix resident on the device.

Selection works on 64-bit keys, `(order-preserving bits of the float32 score) << 32 | (2**32 - 1 - row)`:
ordering keys descending is ordering by (-score, row), every live key is distinct and non-zero, and 0 means
"no candidate". Exact ties therefore need no special care: selection over distinct keys is deterministic.

Phase 1 (`_dot_kernel`, `_scores_kernel`) is fused: a block scores a span of items for a tile of queries,
applies the filters, and keeps each query's running top-k in shared memory. New keys above the running k-th
key go to a per-query buffer; a full buffer is bitonic-sorted and merged into the running list, which lifts
the threshold, so after warm-up almost every item is rejected by one compare. Each block writes its top-k
to a small [B, blocks, kp] buffer, never the [B, N] score matrix. Phase 2 (`_keys_kernel`) runs the same
selection over those candidates, as a tree, until one list per query is left.

Shared memory holds at most `MAX_PASS_K` = 4096 keys per query; a larger k is served in passes, each pass
admitting only keys below the last key of the previous one.

Scores are float32 dot products accumulated in float32 in a fixed order, so a (query, row) pair gets the
same score whatever the batch, tile or k; they can differ from the float64-accumulated NumPy reference in
the last bits (and by the float16 rounding of the items with float16 storage).
"""
from __future__ import annotations

import functools
import math
import threading
import warnings

import numba as nb
import numpy as np
from numba import config as _numba_config
from numba import cuda

from streamrec.engine.gpu import CUDA_AVAILABLE
from streamrec.engine.retrieval.topk import Filters, check_search_args

__all__ = ["CUDA_AVAILABLE", "MAX_PASS_K", "CudaTopK", "DeviceItemMatrix"]

MAX_PASS_K = 4096  # keys per query one pass can hold in shared memory
_CAND = 4608  # uint64 shared slots for running lists + insert buffers (36 KiB; with the query tile < 48 KiB)
_QSLOTS = 2048  # float32 shared slots for the query tile (8 KiB)
_TILES = (8, 4, 2, 1)  # queries per block in phase 1, the most that fit
_MAX_GRID_Y = 65535
_UPLOAD_ROWS = 1 << 18  # rows per host -> device staging chunk
_MAX_ROWS = 1 << 32  # keys hold the row in 32 bits

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


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _check_k(k: int) -> int:
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def _padded(b: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((b, k), -1, dtype=np.int64), np.full((b, k), _NEG_INF, dtype=np.float32)


def _pad_words(bits: np.ndarray, words: int) -> np.ndarray:
    """uint64 [n, words]: bits truncated or zero-extended to `words` columns."""
    out = np.zeros((bits.shape[0], words), dtype=np.uint64)
    w = min(words, bits.shape[1])
    out[:, :w] = bits[:, :w]
    return out


def _decode(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys uint64 [B, kk] (descending, 0 = none) -> (rows int64 [B, k], scores float32 [B, k])."""
    rows, scores = _padded(keys.shape[0], k)
    kk = keys.shape[1]
    hit = keys != 0
    hi = (keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where((hi & np.uint32(0x80000000)) != 0, hi & np.uint32(0x7FFFFFFF), ~hi).astype(np.uint32)
    row = (np.uint64(0xFFFFFFFF) - (keys & np.uint64(0xFFFFFFFF))).astype(np.int64)
    rows[:, :kk] = np.where(hit, row, -1)
    scores[:, :kk] = np.where(hit, bits.view(np.float32), _NEG_INF)
    return rows, scores


def _launch_1d(kernel, total: int, threads: int, *args) -> None:
    """Grid-stride launch; the simulator gets one block, as each of its blocks costs a Python thread per thread."""
    if total > 0:
        kernel[min(math.ceil(total / threads), 1 if _SIM else 1024), threads](*args)


def _sm_count() -> int:
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # the simulator's device has no attributes
        return 1


class _Workspace:
    """Device scratch reused from call to call. Numba pays a cudaMalloc and a blocking copy per
    `to_device`/`device_array`, and thousands of Python calls per search for device-array views; on an H100
    that host work, not the kernels, was most of a small search. So per-call inputs travel packed, in one
    copy from a pinned buffer, outputs land in named buffers that only grow, and every device view (one per
    offset, dtype and shape) is made once and kept. Not thread-safe: its owner serialises calls."""

    _ALIGN = 256  # bytes; keeps every packed array aligned for any element type
    _MAX_VIEWS = 4096  # cached views before the cache starts over (shapes vary with the batch)

    def __init__(self) -> None:
        self._host = None  # pinned uint8 staging buffer
        self._dev = None  # device uint8 buffer the packed inputs are copied into
        self._named: dict[str, object] = {}
        self._views: dict[tuple, object] = {}

    def upload(self, *arrays: np.ndarray) -> list:
        """Device views of `arrays` (each non-empty), valid until the next upload."""
        offsets, total = [], 0
        for a in arrays:
            if a.nbytes == 0:
                raise ValueError("zero-size arrays cannot be packed")
            offsets.append(total)
            total += -(-a.nbytes // self._ALIGN) * self._ALIGN
        if self._dev is None or self._dev.shape[0] < total:
            size = _pow2(max(total, 1 << 16))
            self._host = cuda.pinned_array(size, dtype=np.uint8)
            self._dev = cuda.device_array(size, dtype=np.uint8)
            self._views.clear()
        for a, off in zip(arrays, offsets):
            self._host[off : off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        self._view("dev", 0, (total,), np.uint8).copy_to_device(self._view("host", 0, (total,), np.uint8))
        return [self._view("dev", off, a.shape, a.dtype) for a, off in zip(arrays, offsets)]

    def buffer(self, name: str, shape: tuple[int, ...], dtype) -> object:
        """A device array of `shape` backed by the named buffer (its contents are whatever was left there;
        other shapes of the same name alias the same bytes)."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        buf = self._named.get(name)
        if buf is None or buf.shape[0] < nbytes:
            self._named[name] = cuda.device_array(_pow2(max(nbytes, 1 << 12)), dtype=np.uint8)
            self._views.clear()
        return self._view(name, 0, shape, dtype)

    def _view(self, base: str, offset: int, shape: tuple[int, ...], dtype) -> object:
        key = (base, offset, shape, np.dtype(dtype).str)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self._MAX_VIEWS:
                self._views.clear()
            buf = self._dev if base == "dev" else self._host if base == "host" else self._named[base]
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            view = self._views[key] = buf[offset : offset + nbytes].view(dtype).reshape(shape)
        return view


class _QueryFilters:
    """Per-call, per-query filter arrays: category bitsets and sorted in-range excludes, on the host in
    kernel-argument order (inc, exc, inc_any, ex_ptr, ex_rows); they travel in one packed upload."""

    def __init__(self, filters: Filters, n_items: int, words: int) -> None:
        b = filters.num_queries
        ptr = filters.exclude_indptr
        query_of = np.repeat(np.arange(b, dtype=np.int64), np.diff(ptr))
        rows = filters.exclude_rows
        keep = (rows >= 0) & (rows < n_items)  # a stale id excludes nothing
        query_of, rows = query_of[keep], rows[keep]
        order = np.lexsort((rows, query_of))  # sorted rows per query, for the kernel's binary search
        indptr = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(np.bincount(query_of, minlength=b), out=indptr[1:])
        padded_rows = np.zeros(_pow2(max(1, len(rows))), dtype=np.int64)  # never empty; few distinct sizes
        padded_rows[: len(rows)] = rows[order]
        # "any include bit" is decided on all words: a category no item has still filters everything out.
        inc_any = filters.include_cats.any(axis=1).astype(np.uint8)
        self.arrays = (_pad_words(filters.include_cats, words), _pad_words(filters.exclude_cats, words),
                       inc_any, indptr, padded_rows)


class DeviceItemMatrix:
    """The item matrix, live mask and category bitsets, resident on the GPU and updated in place.

    Vectors are stored transposed, [dim, capacity], so that threads scoring consecutive rows read
    consecutive addresses; float16 storage halves the memory traffic (scores still accumulate in float32).
    Category bitsets are [words, capacity] (at least one word), the live mask uint8 [capacity].
    """

    def __init__(self, dim: int, dtype=np.float32, min_capacity: int = 1024, threads_per_block: int = 256) -> None:
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"storage dtype must be float32 or float16, got {self.dtype}")
        self.min_capacity = max(1, int(min_capacity))
        self.threads = int(threads_per_block)
        self.capacity = 0
        self.n_rows = 0
        self.words = 0
        self.vectors = None  # device [dim, capacity]
        self.live = None  # device uint8 [capacity]
        self.cats = None  # device uint64 [words, capacity]
        # Transfer accounting, so callers and tests can see that syncs stay incremental.
        self.full_uploads = 0
        self.rows_uploaded = 0
        self.grows = 0

    def sync(
        self,
        host_vectors: np.ndarray,
        host_live: np.ndarray,
        host_category_bits: np.ndarray,
        n_rows: int,
        changed_rows: np.ndarray,
    ) -> None:
        """Make rows [0, n_rows) match the host arrays, uploading only `changed_rows` (plus rows new since the
        last sync). The first sync uploads everything; growth past capacity doubles it device-to-device."""
        vectors = np.asarray(host_vectors)
        live = np.asarray(host_live)
        cats = np.asarray(host_category_bits)
        n_rows = int(n_rows)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"host_vectors must be [rows, {self.dim}], got {vectors.shape}")
        if cats.ndim != 2:
            raise ValueError(f"host_category_bits must be [rows, words], got {cats.shape}")
        if not 0 <= n_rows <= min(len(vectors), len(live), len(cats)):
            raise ValueError(f"n_rows={n_rows} exceeds the host arrays ({len(vectors)}, {len(live)}, {len(cats)})")
        words = max(1, cats.shape[1])
        if self.vectors is None:
            self._allocate(max(n_rows, self.min_capacity), words)
            self.full_uploads += 1
            rows = np.arange(n_rows, dtype=np.int64)
        else:
            if n_rows > self.capacity:
                self._grow(max(2 * self.capacity, n_rows))
            if words > self.words:
                self._widen(words, cats, n_rows)
            rows = np.union1d(np.asarray(changed_rows, dtype=np.int64).ravel(), np.arange(self.n_rows, n_rows))
            rows = rows[(rows >= 0) & (rows < n_rows)]
        self._upload(rows, vectors, live, cats)
        self.n_rows = n_rows

    def _allocate(self, capacity: int, words: int) -> None:
        self.capacity, self.words = capacity, words
        self.vectors = cuda.device_array((self.dim, capacity), dtype=self.dtype)
        self.live = cuda.device_array(capacity, dtype=np.uint8)
        self.cats = cuda.device_array((words, capacity), dtype=np.uint64)
        self._zero(self.live.reshape(1, capacity))
        self._zero(self.cats)

    def _grow(self, capacity: int) -> None:
        old_vectors, old_live, old_cats, old_capacity = self.vectors, self.live, self.cats, self.capacity
        self._allocate(capacity, self.words)
        self._copy(self.vectors, old_vectors)
        self._copy(self.live.reshape(1, capacity), old_live.reshape(1, old_capacity))
        self._copy(self.cats, old_cats)
        self.grows += 1

    def _widen(self, words: int, cats: np.ndarray, n_rows: int) -> None:
        """More category words: a new (small) bitset array, re-uploaded whole."""
        self.words = words
        self.cats = cuda.device_array((words, self.capacity), dtype=np.uint64)
        self._zero(self.cats)
        for lo in range(0, n_rows, _UPLOAD_ROWS):
            rows = np.arange(lo, min(n_rows, lo + _UPLOAD_ROWS), dtype=np.int64)
            idx = cuda.to_device(rows)
            self._scatter(self.cats, idx, np.ascontiguousarray(_pad_words(cats[rows], words).T))

    def _upload(self, rows: np.ndarray, vectors: np.ndarray, live: np.ndarray, cats: np.ndarray) -> None:
        for lo in range(0, len(rows), _UPLOAD_ROWS):
            chunk = rows[lo : lo + _UPLOAD_ROWS]
            idx = cuda.to_device(chunk)
            self._scatter(self.vectors, idx, np.ascontiguousarray(vectors[chunk].T, dtype=self.dtype))
            self._scatter(self.live.reshape(1, self.capacity), idx, live[chunk].astype(np.uint8).reshape(1, -1))
            self._scatter(self.cats, idx, np.ascontiguousarray(_pad_words(cats[chunk].astype(np.uint64), self.words).T))
            self.rows_uploaded += len(chunk)

    def _scatter(self, dst, idx, host_src: np.ndarray) -> None:
        _launch_1d(_scatter_cols, host_src.size, self.threads, dst, idx, cuda.to_device(host_src))

    def _copy(self, dst, src) -> None:
        _launch_1d(_copy_cols, src.shape[0] * src.shape[1], self.threads, dst, src)

    def _zero(self, dst) -> None:
        _launch_1d(_zero, dst.shape[0] * dst.shape[1], self.threads, dst)


def _words(rows: np.ndarray) -> np.ndarray:
    """float32 rows as integer words for a bitwise compare (8-byte words when the row length allows)."""
    return rows.view(np.uint64) if rows.shape[1] % 2 == 0 else rows.view(np.uint32)


class _HostMirror:
    """For the host-array protocol path: what the device matrix holds, to find rows changed in place.

    Callers may update their item array in place between calls, so neither the array's identity nor its
    address says whether the device copy is current; a bitwise row diff does, and only changed rows move.
    The diff reads the whole matrix on the host each call (about memcpy speed): callers that know their
    changed rows should use DeviceItemMatrix.sync and CudaTopK.search_resident instead.
    """

    def __init__(self, matrix: DeviceItemMatrix) -> None:
        self.matrix = matrix
        self.n = 0
        self.vectors = np.zeros((0, matrix.dim), dtype=np.float32)
        self.valid = np.zeros(0, dtype=np.bool_)
        self.cats = np.zeros((0, 0), dtype=np.uint64)

    def sync(self, items: np.ndarray, valid: np.ndarray, cats: np.ndarray) -> None:
        n = len(items)
        words = max(self.cats.shape[1], cats.shape[1])
        cats = _pad_words(cats, words) if cats.shape[1] != words else cats
        if self.cats.shape[1] != words:
            self.cats = _pad_words(self.cats, words)
        common = min(n, self.n)
        changed = [np.arange(common, n, dtype=np.int64)]
        for lo in range(0, common, 1 << 15):  # chunks bound the temporaries
            hi = min(common, lo + (1 << 15))
            diff = (_words(self.vectors[lo:hi]) != _words(items[lo:hi])).any(axis=1)
            diff |= self.valid[lo:hi] != valid[lo:hi]
            diff |= (self.cats[lo:hi] != cats[lo:hi]).any(axis=1)
            changed.append(np.flatnonzero(diff) + lo)
        rows = np.sort(np.concatenate(changed))
        if n > len(self.vectors):
            cap = max(n, 2 * len(self.vectors))
            grow = cap - len(self.vectors)
            self.vectors = np.concatenate([self.vectors, np.zeros((grow, self.matrix.dim), np.float32)])
            self.valid = np.concatenate([self.valid, np.zeros(grow, np.bool_)])
            self.cats = np.concatenate([self.cats, np.zeros((grow, words), np.uint64)])
        self.vectors[rows] = items[rows]
        self.valid[rows] = valid[rows]
        self.cats[rows] = cats[rows]
        self.n = n
        self.matrix.sync(items, valid, cats, n, rows)


class CudaTopK:
    """TopKBackend on a CUDA GPU; `search_resident` searches a DeviceItemMatrix kept in sync by the caller.

    threads_per_block: a power of 2 up to 256 (below 32 only for the simulator); items_per_block: a fixed
    span of items (and candidates) per block instead of one sized to fill the GPU (tests use it to force
    many blocks); max_pass_k: keys a pass keeps per query (a power of 2, at most MAX_PASS_K), larger k
    take several passes. Kernels compile on first use (seconds each): call warmup() at start-up.
    """

    name = "cuda"

    def __init__(
        self,
        storage_dtype=np.float32,
        threads_per_block: int = 256,
        items_per_block: int | None = None,
        max_pass_k: int = MAX_PASS_K,
        blocks_per_sm: int = 4,
    ) -> None:
        if not CUDA_AVAILABLE:
            raise RuntimeError("the cuda top-k backend needs a CUDA GPU that numba.cuda can use; none was found")
        if threads_per_block not in (1, 2, 4, 8, 16, 32, 64, 128, 256):  # below 32 only makes sense in the simulator
            raise ValueError(f"threads_per_block must be a power of 2 up to 256, got {threads_per_block}")
        if max_pass_k < 1 or max_pass_k > MAX_PASS_K or max_pass_k & (max_pass_k - 1):
            raise ValueError(f"max_pass_k must be a power of 2 in [1, {MAX_PASS_K}], got {max_pass_k}")
        if items_per_block is not None and items_per_block < 1:
            raise ValueError(f"items_per_block must be >= 1, got {items_per_block}")
        self.storage_dtype = np.dtype(storage_dtype)
        self.threads = int(threads_per_block)
        self.buffer = 2 * self.threads  # insert buffer per query: a flush is due only every other tile or so
        self.items_per_block = items_per_block
        self.max_pass_k = int(max_pass_k)
        self.target_blocks = max(1, int(blocks_per_sm) * _sm_count())
        self._lock = threading.RLock()  # one search at a time: the workspace and the mirror are shared
        self._mirror: _HostMirror | None = None
        self._work = _Workspace()  # queries, filters and candidate buffers
        self._bounds = _Workspace()  # each pass's upper bounds (uploaded while the queries stay put)

    # --- TopKBackend ---------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, items: np.ndarray, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        queries, items, k = check_search_args(queries, items, k, filters)
        if queries.shape[0] == 0 or items.shape[0] == 0:
            return _padded(queries.shape[0], k)
        with self._lock:  # one cached device matrix per backend instance
            if self._mirror is None or self._mirror.matrix.dim != items.shape[1]:
                matrix = DeviceItemMatrix(items.shape[1], self.storage_dtype, 1, self.threads)
                self._mirror = _HostMirror(matrix)
            self._mirror.sync(items, filters.valid, filters.item_cats)
            return self.search_resident(queries, k, filters, self._mirror.matrix)

    def rank_scores(self, scores: np.ndarray, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        k = _check_k(k)
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim == 1:
            b, table = filters.num_queries, scores.reshape(1, -1)
        elif scores.ndim == 2:
            b, table = scores.shape[0], scores
        else:
            raise ValueError(f"scores must be [N] or [B, N], got shape {scores.shape}")
        n = scores.shape[-1]
        filters.check(b, n)
        if b == 0 or n == 0:
            return _padded(b, k)
        words = max(1, filters.words)
        cats_t = np.ascontiguousarray(_pad_words(filters.item_cats, words).T)
        qf = _QueryFilters(filters, n, words)
        with self._lock:
            table, live, cats_t, *filter_args = self._work.upload(
                np.ascontiguousarray(table), filters.valid.astype(np.uint8), cats_t, *qf.arrays)

            def launch(qt, kth, kp, upper, span, blocks):
                out = self._work.buffer("cand", (b, blocks, kp), np.uint64)
                _scores_kernel[(b, blocks), self.threads](
                    table, live, cats_t, *filter_args, upper, n, span, kth, kp, self.buffer, out
                )
                return "cand"

            return _decode(self._top_keys(b, n, k, launch, tiled=False), k)

    # --- resident path -------------------------------------------------------------------------------

    def search_resident(
        self, queries: np.ndarray, k: int, filters: Filters, matrix: DeviceItemMatrix
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the device matrix; filters.valid and filters.item_cats are ignored (the device's live
        mask and bitsets are used), the per-query excludes and category sets are uploaded."""
        k = _check_k(k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != matrix.dim:
            raise ValueError(f"need queries [B, {matrix.dim}], got {queries.shape}")
        b, n = queries.shape[0], matrix.n_rows
        if filters.num_queries != b:
            raise ValueError(f"filters are for B={filters.num_queries}; got B={b}")
        if b == 0 or n == 0:
            return _padded(b, k)
        qf = _QueryFilters(filters, n, matrix.words)
        with self._lock:
            d_queries, *filter_args = self._work.upload(queries, *qf.arrays)

            def launch(qt, kth, kp, upper, span, blocks):
                out = self._work.buffer("cand", (b, blocks, kp), np.uint64)
                _dot_kernel(qt)[(math.ceil(b / qt), blocks), self.threads](
                    d_queries, matrix.vectors, matrix.live, matrix.cats, *filter_args, upper, n, span, kth, kp,
                    self.buffer, out,
                )
                return "cand"

            return _decode(self._top_keys(b, n, k, launch, tiled=True), k)

    def warmup(self) -> None:
        """Compile every kernel this backend launches (for its storage dtype) on tiny inputs."""
        rng = np.random.default_rng(0)
        n = 4 * self.buffer + 1  # more than one block of items, so the reduction kernel runs too
        items = rng.normal(size=(n, 8)).astype(np.float32)
        matrix = DeviceItemMatrix(8, self.storage_dtype, 1, self.threads)
        matrix.sync(items, np.ones(n, np.bool_), np.zeros((n, 1), np.uint64), n, np.zeros(0, np.int64))
        for qt in _TILES:  # k = 1 and B = qt select a qt-query tile
            self.search_resident(items[:qt], 1, Filters.none(qt, n), matrix)
        self.rank_scores(items[:, 0], 1, Filters.none(1, n))

    # --- selection driver ----------------------------------------------------------------------------

    def _top_keys(self, b: int, n: int, k: int, launch, tiled: bool) -> np.ndarray:
        """Sorted top keys [B, min(k, n)], in passes of at most max_pass_k keys."""
        if n >= _MAX_ROWS:
            raise ValueError(f"the cuda backend ranks at most {_MAX_ROWS - 1} rows, got {n}")
        total = min(k, n)
        # One tile size for all passes (pass boundaries rely on every pass computing the same scores), no
        # larger than the batch: unused query slots would still cost their multiply-adds.
        qt = min(self._queries_per_block(_pow2(min(total, self.max_pass_k))), _pow2(b)) if tiled else 1
        keys = np.zeros((b, total), dtype=np.uint64)
        upper = np.full(b, np.iinfo(np.uint64).max, dtype=np.uint64)
        done = 0
        while done < total:
            kth = min(self.max_pass_k, total - done)
            kp = _pow2(kth)
            span, blocks = self._split(n, math.ceil(b / qt), kp)
            cand = launch(qt, kth, kp, self._bounds.upload(upper)[0], span, blocks)
            top = self._reduce(cand, b, blocks, kth, kp)[:, :kth]
            keys[:, done : done + kth] = top
            done += kth
            upper = np.ascontiguousarray(top[:, -1])  # 0 once a query ran out: admits nothing more
            if not upper.any():
                break
        return keys

    def _queries_per_block(self, kp: int) -> int:
        return next(qt for qt in _TILES if qt * (kp + self.buffer) <= _CAND)

    def _split(self, n: int, query_tiles: int, kp: int) -> tuple[int, int]:
        """(items per block, blocks): enough blocks to fill the GPU, each span well above kp."""
        if self.items_per_block is not None:
            span = self.items_per_block
        else:
            want = max(1, math.ceil(self.target_blocks / query_tiles))
            span = max(math.ceil(n / want), 2 * self.buffer, 2 * kp)
        span = max(span, math.ceil(n / _MAX_GRID_Y))
        return span, math.ceil(n / span)

    def _reduce(self, src: str, b: int, blocks: int, kth: int, kp: int) -> np.ndarray:
        """Merge the [B, blocks, kp] candidate lists in workspace buffer `src` down to one sorted list per
        query (host [B, kp])."""
        level = 0
        while blocks > 1:
            c = blocks * kp
            span = max(self.items_per_block or max(8 * kp, 4 * self.buffer), 2 * kp, math.ceil(c / _MAX_GRID_Y))
            nxt = math.ceil(c / span)
            dst = f"reduce{level % 2}"  # never the level's input
            out = self._work.buffer(dst, (b, nxt, kp), np.uint64)
            _keys_kernel[(b, nxt), self.threads](
                self._work.buffer(src, (b, c), np.uint64), c, span, kth, kp, self.buffer, out
            )
            src, blocks, level = dst, nxt, level + 1
        return self._work.buffer(src, (b, kp), np.uint64).copy_to_host()
