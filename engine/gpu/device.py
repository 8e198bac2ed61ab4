"""GPU memory of the top-k backend: the item matrix kept resident and updated in place (DeviceItemMatrix), the
host mirror that finds changed rows for callers that cannot name them, and the per-call scratch and query
filter arrays a search uploads. Apart from topk.py because they are state and transfers, not selection.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from streamrec.engine.gpu.kernels import _SIM, _copy_cols, _scatter_cols, _zero
from streamrec.engine.retrieval.topk import Filters

__all__ = ["DeviceItemMatrix"]

_UPLOAD_ROWS = 1 << 18  # rows per host -> device staging chunk


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _pad_words(bits: np.ndarray, words: int) -> np.ndarray:
    """uint64 [n, words]: bits truncated or zero-extended to `words` columns."""
    out = np.zeros((bits.shape[0], words), dtype=np.uint64)
    w = min(words, bits.shape[1])
    out[:, :w] = bits[:, :w]
    return out


def _launch_1d(kernel, total: int, threads: int, *args) -> None:
    """Grid-stride launch; the simulator gets one block, as each of its blocks costs a Python thread per thread."""
    if total > 0:
        kernel[min(math.ceil(total / threads), 1 if _SIM else 1024), threads](*args)


class _Workspace:
    """Device scratch reused from call to call. Numba pays a cudaMalloc and a blocking copy per
    `to_device`/`device_array`, and thousands of Python calls per search for device-array views; on an H100
    that host work, not the kernels, was most of a small search (benchmarks/RESULTS.md, 'Exact top-k on a
    GPU'). So per-call inputs travel packed, in one copy from a pinned buffer, outputs land in named buffers
    that only grow, and every device view (one per offset, dtype and shape) is made once and kept. Not
    thread-safe: its owner serialises calls."""

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
    changed rows should use CudaTopK.sync and search_synced instead.
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
