"""CudaTopK, the TopKBackend on a CUDA GPU: the host driver that picks tiles, passes and grids and launches the
kernels of kernels.py over an item matrix resident on the device (device.py), which `sync` keeps current.

Scores are float32 dot products accumulated in float32 in a fixed order, so a (query, row) pair gets the
same score whatever the batch, tile or k; they can differ from the float64-accumulated NumPy reference in
the last bits (and by the float16 rounding of the items with float16 storage).
"""
from __future__ import annotations

import math
import threading

import numpy as np
from numba import cuda

from streamrec.engine.gpu import CUDA_AVAILABLE
from streamrec.engine.gpu.device import DeviceItemMatrix, _HostMirror, _pad_words, _pow2, _QueryFilters, _Workspace
from streamrec.engine.gpu.kernels import _CAND, _NEG_INF, MAX_PASS_K, _dot_kernel, _keys_kernel, _scores_kernel
from streamrec.engine.retrieval.topk import Filters, check_k, check_search_args, empty_result

__all__ = ["CUDA_AVAILABLE", "MAX_PASS_K", "CudaTopK", "DeviceItemMatrix"]

_TILES = (8, 4, 2, 1)  # queries per block in phase 1, the most that fit
_MAX_GRID_Y = 65535
_MAX_ROWS = 1 << 32  # keys hold the row in 32 bits


def _decode(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys uint64 [B, kk] (descending, 0 = none) -> (rows int64 [B, k], scores float32 [B, k])."""
    rows, scores = empty_result(keys.shape[0], k)
    kk = keys.shape[1]
    hit = keys != 0
    hi = (keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where((hi & np.uint32(0x80000000)) != 0, hi & np.uint32(0x7FFFFFFF), ~hi).astype(np.uint32)
    row = (np.uint64(0xFFFFFFFF) - (keys & np.uint64(0xFFFFFFFF))).astype(np.int64)
    rows[:, :kk] = np.where(hit, row, -1)
    scores[:, :kk] = np.where(hit, bits.view(np.float32), _NEG_INF)
    return rows, scores


def _sm_count() -> int:
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # the simulator's device has no attributes
        return 1


class CudaTopK:
    """TopKBackend on a CUDA GPU. `sync` keeps a resident DeviceItemMatrix of the catalog current (only changed
    rows move) and `search_synced` searches it; `search` finds the changed rows of the host arrays it is given
    itself (_HostMirror); `search_resident` searches a DeviceItemMatrix that the caller keeps in sync.

    storage_dtype: the items' dtype on the device, float32 or float16 (scores accumulate in float32 either
    way); threads_per_block: a power of 2 up to 256 (below 32 only for the simulator); items_per_block: a fixed
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
        if self.storage_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"storage dtype must be float32 or float16, got {self.storage_dtype}")
        self.threads = int(threads_per_block)
        self.buffer = 2 * self.threads  # insert buffer per query: a flush is due only every other tile or so
        self.items_per_block = items_per_block
        self.max_pass_k = int(max_pass_k)
        self.target_blocks = max(1, int(blocks_per_sm) * _sm_count())
        self._lock = threading.RLock()  # one search or sync at a time: the workspace and the matrices are shared
        self._mirror: _HostMirror | None = None  # search()'s copy of the host arrays it was last given
        self._synced: DeviceItemMatrix | None = None  # the catalog as of the last sync()
        self._work = _Workspace()  # queries, filters and candidate buffers
        self._bounds = _Workspace()  # each pass's upper bounds (uploaded while the queries stay put)

    # --- TopKBackend ---------------------------------------------------------------------------------

    def sync(
        self, vectors: np.ndarray, live: np.ndarray, category_bits: np.ndarray, n: int, changed_rows: np.ndarray
    ) -> None:
        """Bring the resident catalog up to date: everything on the first call, then changed_rows and the rows
        new since the last call (DeviceItemMatrix.sync)."""
        with self._lock:
            if self._synced is None:
                dim = np.shape(vectors)[1]
                self._synced = DeviceItemMatrix(dim, self.storage_dtype, threads_per_block=self.threads)
            self._synced.sync(vectors, live, category_bits, n, changed_rows)

    def search_synced(
        self, queries: np.ndarray, items: np.ndarray, k: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]:
        """search_resident over the synced catalog's first filters.num_items rows; before any sync, `search`."""
        with self._lock:  # held throughout, so a concurrent sync cannot change the matrix between check and launch
            matrix = self._synced
            if matrix is None:
                return self.search(queries, items, k, filters)
            queries, items, k = check_search_args(queries, items, k, filters)
            if filters.num_items > matrix.n_rows:
                raise ValueError(f"filters cover {filters.num_items} rows but only {matrix.n_rows} were synced")
            return self._search_matrix(queries, k, filters, matrix, filters.num_items)

    def search(self, queries: np.ndarray, items: np.ndarray, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        queries, items, k = check_search_args(queries, items, k, filters)
        if queries.shape[0] == 0 or items.shape[0] == 0:
            return empty_result(queries.shape[0], k)
        with self._lock:  # one cached device matrix per backend instance
            if self._mirror is None or self._mirror.matrix.dim != items.shape[1]:
                matrix = DeviceItemMatrix(items.shape[1], self.storage_dtype, 1, self.threads)
                self._mirror = _HostMirror(matrix)
            self._mirror.sync(items, filters.valid, filters.item_cats)
            return self.search_resident(queries, k, filters, self._mirror.matrix)

    def rank_scores(self, scores: np.ndarray, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        k = check_k(k)
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
            return empty_result(b, k)
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
        return self._search_matrix(queries, k, filters, matrix, matrix.n_rows)

    def _search_matrix(
        self, queries: np.ndarray, k: int, filters: Filters, matrix: DeviceItemMatrix, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """search_resident over the matrix's first n rows."""
        k = check_k(k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != matrix.dim:
            raise ValueError(f"need queries [B, {matrix.dim}], got {queries.shape}")
        b = queries.shape[0]
        if filters.num_queries != b:
            raise ValueError(f"filters are for B={filters.num_queries}; got B={b}")
        if b == 0 or n == 0:
            return empty_result(b, k)
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
