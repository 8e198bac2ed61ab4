"""Batched exact cosine top-k with filters: the interface and the plain NumPy reference backend.

Faster backends (Numba on CPU, CuPy on GPU) implement the same `TopKBackend` protocol and must return
exactly what `NumpyTopK` returns for the same float32 scores, so the selection rule is spelled out here:

* A row is a candidate for query b when `valid[row]`, the row is not in the query's CSR exclude list,
  it shares a category with `include_cats[b]` (only checked when that bitset is non-empty), it shares no
  category with `exclude_cats[b]`, and its score is neither -inf nor NaN (so callers may pre-mask scores
  with -inf in `rank_scores`).
* `search` scores are float32(dot product accumulated in float64). float32 BLAS results change in the
  last bits with the chunk shape and even with the batch a query sits in, which would make the order of
  near-ties depend on batching; rounding a float64 sum gives the same float32 for any summation order
  (barring a ~1e-8-per-entry straddle), so kernels accumulating in float64 can match rows exactly.
* Candidates are ordered by (-score, row): score descending, smaller row first on exact float32 ties.
* The first k are returned; missing places are padded with row -1 and score -inf (`empty_result`).

Every backend serves the Retriever through one protocol: `sync` hands it the live catalog under the engine's
lock, `search_synced` then searches it. Host backends (`HostBackend`) search the host arrays they are given and
ignore `sync`; the GPU backend keeps a resident copy of the catalog current from `sync`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "BACKENDS",
    "Filters",
    "HostBackend",
    "NumpyTopK",
    "TopKBackend",
    "category_bitset",
    "check_k",
    "check_search_args",
    "empty_result",
    "get_backend",
    "words_for",
]

_NEG_INF = np.float32(-np.inf)


def words_for(num_categories: int) -> int:
    """Number of uint64 words needed for a bitset over category ids 0 .. num_categories-1."""
    if num_categories < 0:
        raise ValueError(f"num_categories must be >= 0, got {num_categories}")
    return (num_categories + 63) // 64


def category_bitset(category_ids: Iterable[int], words: int) -> np.ndarray:
    """uint64 [words] with bit c of word c // 64 set for every id c."""
    out = np.zeros(words, dtype=np.uint64)
    for c in category_ids:
        c = int(c)
        if not 0 <= c < 64 * words:
            raise ValueError(f"category id {c} does not fit in {words} words (0 <= id < {64 * words})")
        out[c >> 6] |= np.uint64(1) << np.uint64(c & 63)
    return out


def _bitsets(per_row: Sequence[Iterable[int]], words: int) -> np.ndarray:
    """uint64 [len(per_row), words] from per-row category id lists (ids already checked to fit)."""
    out = np.zeros((len(per_row), words), dtype=np.uint64)
    rows: list[int] = []
    ids: list[int] = []
    for r, cats in enumerate(per_row):
        for c in cats:
            rows.append(r)
            ids.append(int(c))
    if ids:
        cat = np.asarray(ids, dtype=np.int64)
        bits = np.left_shift(np.uint64(1), (cat & 63).astype(np.uint64))
        # bitwise_or.at, not fancy assignment: several ids of one row may land in the same word.
        np.bitwise_or.at(out, (np.asarray(rows, dtype=np.int64), cat >> 6), bits)
    return out


def _max_id(per_row: Sequence[Iterable[int]] | None) -> int:
    """Largest category id in the lists (-1 if none); rejects negative ids."""
    best = -1
    for cats in per_row or ():
        for c in cats:
            c = int(c)
            if c < 0:
                raise ValueError(f"category ids must be >= 0, got {c}")
            best = max(best, c)
    return best


@dataclass
class Filters:
    """Per-batch filter spec, laid out so a kernel can test it without Python objects.

    Arrays are coerced to contiguous arrays of the documented dtypes on construction, so kernels can take
    them as they are. Exclude rows outside [0, N) are ignored (a stale id excludes nothing).
    """

    valid: np.ndarray  # bool [N]: row is live (False = deleted or unused capacity)
    exclude_indptr: np.ndarray  # int64 [B+1]: CSR over queries ...
    exclude_rows: np.ndarray  # int64 [nnz]: ... rows excluded per query; may hold duplicates, unsorted
    item_cats: np.ndarray  # uint64 [N, W]: category bitset per item (bit c of word c // 64)
    include_cats: np.ndarray  # uint64 [B, W]: if any bit set, only items sharing >= 1 of these are allowed
    exclude_cats: np.ndarray  # uint64 [B, W]: items having any of these categories are dropped

    def __post_init__(self) -> None:
        self.valid = np.ascontiguousarray(self.valid, dtype=np.bool_)
        self.exclude_indptr = np.ascontiguousarray(self.exclude_indptr, dtype=np.int64)
        self.exclude_rows = np.ascontiguousarray(self.exclude_rows, dtype=np.int64)
        self.item_cats = np.ascontiguousarray(self.item_cats, dtype=np.uint64)
        self.include_cats = np.ascontiguousarray(self.include_cats, dtype=np.uint64)
        self.exclude_cats = np.ascontiguousarray(self.exclude_cats, dtype=np.uint64)
        n, b, w = self.num_items, self.num_queries, self.words
        if self.valid.ndim != 1:
            raise ValueError(f"valid must be 1-D [N], got shape {self.valid.shape}")
        if self.exclude_indptr.ndim != 1 or len(self.exclude_indptr) < 1:
            raise ValueError(f"exclude_indptr must be 1-D [B+1], got shape {self.exclude_indptr.shape}")
        ip = self.exclude_indptr
        if ip[0] != 0 or ip[-1] != len(self.exclude_rows) or (ip[1:] < ip[:-1]).any():
            raise ValueError("exclude_indptr must start at 0, be non-decreasing and end at len(exclude_rows)")
        if self.exclude_rows.ndim != 1:
            raise ValueError(f"exclude_rows must be 1-D, got shape {self.exclude_rows.shape}")
        if self.item_cats.shape != (n, w) or self.item_cats.ndim != 2:
            raise ValueError(f"item_cats must be [N, W] = {(n, w)}, got {self.item_cats.shape}")
        for name in ("include_cats", "exclude_cats"):
            if getattr(self, name).shape != (b, w):
                raise ValueError(f"{name} must be [B, W] = {(b, w)}, got {getattr(self, name).shape}")

    @property
    def num_queries(self) -> int:
        return len(self.exclude_indptr) - 1

    @property
    def num_items(self) -> int:
        return len(self.valid)

    @property
    def words(self) -> int:
        return self.item_cats.shape[1] if self.item_cats.ndim == 2 else 0

    @classmethod
    def none(cls, num_queries: int, num_items: int) -> Filters:
        """No filtering: every row live, nothing excluded, no categories (W = 0)."""
        return cls(
            valid=np.ones(num_items, dtype=np.bool_),
            exclude_indptr=np.zeros(num_queries + 1, dtype=np.int64),
            exclude_rows=np.zeros(0, dtype=np.int64),
            item_cats=np.zeros((num_items, 0), dtype=np.uint64),
            include_cats=np.zeros((num_queries, 0), dtype=np.uint64),
            exclude_cats=np.zeros((num_queries, 0), dtype=np.uint64),
        )

    @classmethod
    def build(
        cls,
        valid: np.ndarray | Sequence[bool],
        exclude_per_query: Sequence[Iterable[int]],
        item_cats: np.ndarray | Sequence[Iterable[int]] | None = None,
        include_per_query: Sequence[Iterable[int]] | None = None,
        exclude_cats_per_query: Sequence[Iterable[int]] | None = None,
    ) -> Filters:
        """Build from Python lists. B = len(exclude_per_query), N = len(valid).

        item_cats is either a ready uint64 [N, W] bitset array or one iterable of category ids per item.
        W is widened to cover every id named anywhere (extra words are zero), so a query naming a
        category that no item has still filters correctly instead of having its bit dropped.
        """
        valid = np.asarray(valid, dtype=np.bool_)
        n, b = len(valid), len(exclude_per_query)
        for name, lists in (("include_per_query", include_per_query), ("exclude_cats_per_query", exclude_cats_per_query)):
            if lists is not None and len(lists) != b:
                raise ValueError(f"{name} has {len(lists)} entries, expected B = {b}")

        bitset_given = isinstance(item_cats, np.ndarray) and item_cats.dtype == np.uint64 and item_cats.ndim == 2
        if bitset_given:
            if item_cats.shape[0] != n:
                raise ValueError(f"item_cats has {item_cats.shape[0]} rows, expected N = {n}")
            w_items = item_cats.shape[1]
        else:
            if item_cats is not None and len(item_cats) != n:
                raise ValueError(f"item_cats has {len(item_cats)} entries, expected N = {n}")
            w_items = words_for(_max_id(item_cats) + 1)  # type: ignore[arg-type]
        w = max(w_items, words_for(_max_id(include_per_query) + 1), words_for(_max_id(exclude_cats_per_query) + 1))

        if bitset_given:
            cats = np.zeros((n, w), dtype=np.uint64)
            cats[:, :w_items] = item_cats
        else:
            cats = _bitsets(item_cats if item_cats is not None else [()] * n, w)  # type: ignore[arg-type]

        excl = [np.fromiter((int(r) for r in rows), dtype=np.int64) for rows in exclude_per_query]
        indptr = np.zeros(b + 1, dtype=np.int64)
        np.cumsum([len(e) for e in excl], out=indptr[1:])
        return cls(
            valid=valid,
            exclude_indptr=indptr,
            exclude_rows=np.concatenate(excl) if excl else np.zeros(0, dtype=np.int64),
            item_cats=cats,
            include_cats=_bitsets(include_per_query if include_per_query is not None else [()] * b, w),
            exclude_cats=_bitsets(exclude_cats_per_query if exclude_cats_per_query is not None else [()] * b, w),
        )

    def check(self, num_queries: int, num_items: int) -> None:
        """Raise ValueError unless these filters are for a batch of num_queries over num_items rows."""
        if (self.num_queries, self.num_items) != (num_queries, num_items):
            raise ValueError(
                f"filters are for B={self.num_queries}, N={self.num_items}; got B={num_queries}, N={num_items}"
            )


@runtime_checkable
class TopKBackend(Protocol):
    """What the Retriever needs from a top-k backend, so that it has one code path for all of them: `sync`
    under the engine's state lock, then `search_synced`, the pair under one search lock so that a resident copy
    of the catalog never changes under a search. `search` and `rank_scores` are stateless.
    """

    name: str

    def warmup(self) -> None:
        """Compile / initialise now, so that the first request does not pay for it."""
        ...

    def sync(
        self, vectors: np.ndarray, live: np.ndarray, category_bits: np.ndarray, n: int, changed_rows: np.ndarray
    ) -> None:
        """The live catalog, called under the engine's state lock before each `search_synced`: vectors float32
        [capacity, d], live bool [capacity], category_bits uint64 [capacity, W], n rows in use, changed_rows int64:
        the rows changed since the last sync (rows new since then are implied). Host backends ignore it."""
        ...

    def search_synced(
        self, queries: np.ndarray, items: np.ndarray, k: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]:
        """`search` over the catalog as of the last `sync`, restricted to its first filters.num_items rows (at
        most the n synced); items is the host matrix of those rows, which host backends search instead. A backend
        with a resident copy takes liveness and item categories from that copy, not from the filters."""
        ...

    def search(
        self, queries: np.ndarray, items: np.ndarray, k: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [B, d], items float32 [N, d], both L2-normalised -> (rows int64 [B, k], scores float32 [B, k])."""
        ...

    def rank_scores(self, scores: np.ndarray, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        """scores float32 [B, N], or [N] shared by the batch -> (rows int64 [B, k], scores float32 [B, k])."""
        ...


class HostBackend(ABC):
    """Base of the backends that search the host arrays they are handed: nothing resident to keep in sync, so
    `sync` is a no-op and `search_synced` is `search`. Subclasses set `name` and implement the two searches."""

    name: str

    def warmup(self) -> None:
        """Nothing to compile by default."""

    def sync(
        self, vectors: np.ndarray, live: np.ndarray, category_bits: np.ndarray, n: int, changed_rows: np.ndarray
    ) -> None:
        """Nothing resident: every search reads the arrays it is given."""

    def search_synced(
        self, queries: np.ndarray, items: np.ndarray, k: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.search(queries, items, k, filters)

    @abstractmethod
    def search(
        self, queries: np.ndarray, items: np.ndarray, k: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def rank_scores(self, scores: np.ndarray, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]: ...


def check_k(k: int) -> int:
    """k as an int; ValueError unless k >= 1."""
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def empty_result(b: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The all-padding answer: rows int64 [b, k] of -1, scores float32 [b, k] of -inf (backends fill it in)."""
    return np.full((b, k), -1, dtype=np.int64), np.full((b, k), _NEG_INF, dtype=np.float32)


def check_search_args(queries, items, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray, int]:
    """The checks every backend's search() makes: contiguous float32 [B, d] and [N, d], k >= 1, filters sized."""
    k = check_k(k)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    items = np.ascontiguousarray(items, dtype=np.float32)
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"need queries [B, d] and items [N, d], got {queries.shape} and {items.shape}")
    filters.check(queries.shape[0], items.shape[0])
    return queries, items, k


def _any_shared(query_bits: np.ndarray, item_bits: np.ndarray) -> np.ndarray:
    """bool [b, c]: query i and item j share a category. One word at a time keeps temporaries at [b, c]."""
    out = np.zeros((query_bits.shape[0], item_bits.shape[0]), dtype=np.bool_)
    for w in range(query_bits.shape[1]):
        q = query_bits[:, w]
        if not q.any():
            continue
        out |= np.bitwise_and(q[:, None], item_bits[None, :, w]) != 0
    return out


def _select_chunk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns per row of scores [B, c] under (-score, column), unsorted; -> (cols [B, kk], scores).

    argpartition alone picks arbitrary members of a tie at the k-th score, so it is only used to find that
    threshold: everything above it is taken, then tied entries in column (= row) order fill the rest.
    """
    bsz, c = scores.shape
    if k >= c:
        return np.broadcast_to(np.arange(c, dtype=np.int64), (bsz, c)), scores
    kth = np.argpartition(scores, c - k, axis=1)[:, c - k : c - k + 1]
    thresh = np.take_along_axis(scores, kth, axis=1)  # k-th largest score per query
    above = scores > thresh
    tied = scores == thresh
    need = k - above.sum(axis=1, keepdims=True)
    take = above | (tied & (np.cumsum(tied, axis=1) <= need))
    cols = np.nonzero(take)[1].reshape(bsz, k)  # exactly k per query, in column order
    return cols, np.take_along_axis(scores, cols, axis=1)


def _merge(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """First k of each row of candidates ordered by (-score, row)."""
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


class NumpyTopK(HostBackend):
    """Reference backend: matmul over item chunks, filters as -inf, exact tie-broken selection.

    chunk_rows caps the items scored at once, max_chunk_bytes caps the float64 [B, chunk] score block
    (masking temporaries take about as much again), so memory stays bounded for large N and B.
    """

    name = "numpy"

    def __init__(self, chunk_rows: int = 65536, max_chunk_bytes: int = 64 << 20) -> None:
        if chunk_rows < 1 or max_chunk_bytes < 1:
            raise ValueError("chunk_rows and max_chunk_bytes must be >= 1")
        self.chunk_rows = int(chunk_rows)
        self.max_chunk_bytes = int(max_chunk_bytes)

    def search(
        self, queries: np.ndarray, items: np.ndarray, k: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]:
        queries, items, k = check_search_args(queries, items, k, filters)
        q64 = queries.astype(np.float64)

        def score_chunk(lo: int, hi: int) -> np.ndarray:
            return (q64 @ items[lo:hi].astype(np.float64).T).astype(np.float32)

        return self._topk(queries.shape[0], items.shape[0], k, filters, score_chunk)

    def rank_scores(self, scores: np.ndarray, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        k = check_k(k)
        scores = np.asarray(scores, dtype=np.float32)
        b = filters.num_queries
        if scores.ndim == 1:
            shared = scores
            chunk = lambda lo, hi: np.broadcast_to(shared[lo:hi], (b, hi - lo)).copy()  # noqa: E731
        elif scores.ndim == 2:
            b = scores.shape[0]
            chunk = lambda lo, hi: scores[:, lo:hi].copy()  # noqa: E731  (copy: masking writes in place)
        else:
            raise ValueError(f"scores must be [N] or [B, N], got shape {scores.shape}")
        return self._topk(b, scores.shape[-1], k, filters, chunk)

    def _topk(
        self, b: int, n: int, k: int, filters: Filters, score_chunk: Callable[[int, int], np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        filters.check(b, n)
        out_rows, out_scores = empty_result(b, k)
        if b == 0 or n == 0:
            return out_rows, out_scores

        # Excludes sorted by row once, so each chunk finds its slice with searchsorted.
        query_of = np.repeat(np.arange(b, dtype=np.int64), np.diff(filters.exclude_indptr))
        order = np.argsort(filters.exclude_rows, kind="stable")
        ex_rows, ex_query = filters.exclude_rows[order], query_of[order]
        inc_q = np.flatnonzero(filters.include_cats.any(axis=1))
        exc_q = np.flatnonzero(filters.exclude_cats.any(axis=1))

        step = max(1, min(self.chunk_rows, self.max_chunk_bytes // (8 * b)))
        rows = np.zeros((b, 0), dtype=np.int64)
        best = np.zeros((b, 0), dtype=np.float32)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            s = np.ascontiguousarray(score_chunk(lo, hi), dtype=np.float32)
            s[np.isnan(s)] = _NEG_INF  # NaN never compares, so treat it as filtered out
            s[:, ~filters.valid[lo:hi]] = _NEG_INF
            a, z = np.searchsorted(ex_rows, [lo, hi])
            s[ex_query[a:z], ex_rows[a:z] - lo] = _NEG_INF
            if inc_q.size:
                sub = s[inc_q]
                sub[~_any_shared(filters.include_cats[inc_q], filters.item_cats[lo:hi])] = _NEG_INF
                s[inc_q] = sub
            if exc_q.size:
                sub = s[exc_q]
                sub[_any_shared(filters.exclude_cats[exc_q], filters.item_cats[lo:hi])] = _NEG_INF
                s[exc_q] = sub
            cols, sc = _select_chunk(s, k)
            rows, best = _merge(np.concatenate([rows, cols + lo], axis=1), np.concatenate([best, sc], axis=1), k)

        keep = best > _NEG_INF
        kk = rows.shape[1]
        out_rows[:, :kk] = np.where(keep, rows, -1)
        out_scores[:, :kk] = best  # filtered entries are already -inf
        return out_rows, out_scores


# Factories take the GPU storage dtype ("float32" or "float16"); host backends ignore it.
BACKENDS: dict[str, Callable[[str], TopKBackend]] = {
    "numpy": lambda gpu_storage: NumpyTopK(),
    # Imported on first use: numba is heavy to import and optional for the reference path.
    "numba": lambda gpu_storage: __import__("streamrec.engine.cpu.topk", fromlist=["NumbaTopK"]).NumbaTopK(),
    # Imported on first use too, so importing this module never imports numba.cuda.
    "cuda": lambda gpu_storage: __import__("streamrec.engine.gpu.topk", fromlist=["CudaTopK"]).CudaTopK(gpu_storage),
}


def get_backend(name: str = "auto", gpu_storage: str = "float32") -> TopKBackend:
    """A fresh backend by name; "auto" picks the fastest available: cuda with a usable GPU, then numba when it
    imports, else numpy. gpu_storage is the item matrix's dtype on the GPU (float32 or float16)."""
    if name == "auto":
        from streamrec.engine.gpu import CUDA_AVAILABLE

        if CUDA_AVAILABLE:
            return BACKENDS["cuda"](gpu_storage)
        try:
            return BACKENDS["numba"](gpu_storage)
        except ImportError:
            name = "numpy"
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown top-k backend {name!r}; choices: {', '.join(['auto', *BACKENDS])}") from None
    return factory(gpu_storage)
