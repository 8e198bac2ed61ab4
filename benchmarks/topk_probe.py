"""Quick probe of the top-k backends at N=1M, d=64, k=10 (not the official benchmark: see topk.py).

The host is shared, so every variant runs once per round, interleaved, and the table shows the median
time and the median over rounds of each variant's ratio to the floor measured in the same round (load
that comes and goes hits both sides of a ratio alike). The floor is one parallel pass summing the item
matrix: the least any exact scan has to read.

    .venv/bin/python benchmarks/topk_probe.py [--n 1000000] [--rounds 9] [--batches 1,16,256] [--no-numpy]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numba
import numpy as np
from numba import njit, prange

from streamrec.engine.cpu.topk import NumbaTopK, warmup
from streamrec.engine.retrieval.topk import Filters, NumpyTopK


@njit(parallel=True, fastmath=True, nogil=True)
def _parallel_sum(flat):
    parts = 4 * numba.get_num_threads()
    out = np.zeros(parts, dtype=np.float32)
    for p in prange(parts):
        seg = flat[flat.size * p // parts:flat.size * (p + 1) // parts]
        s = np.float32(0.0)
        for i in range(seg.size):
            s += seg[i]
        out[p] = s
    return out.sum()


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def csr(b: int, n: int, rows: list[np.ndarray]) -> Filters:
    indptr = np.zeros(b + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    return Filters(np.ones(n, np.bool_), indptr, np.concatenate(rows), np.zeros((n, 0), np.uint64),
                   np.zeros((b, 0), np.uint64), np.zeros((b, 0), np.uint64))


def filter_sets(rng: np.random.Generator, b: int, n: int) -> dict[str, Filters]:
    """10% of the items excluded three ways (deleted, by category, per-query CSR lists), plus short lists."""
    deleted = Filters.none(b, n)
    deleted.valid = rng.random(n) >= 0.1
    cats = np.zeros((n, 1), dtype=np.uint64)
    cats[rng.random(n) < 0.1, 0] = 1
    by_cat = Filters(np.ones(n, np.bool_), np.zeros(b + 1, np.int64), np.zeros(0, np.int64), cats,
                     np.zeros((b, 1), np.uint64), np.ones((b, 1), np.uint64))
    return {
        "10% deleted": deleted,
        "10% cat-excluded": by_cat,
        "10% CSR-excluded": csr(b, n, [rng.choice(n, n // 10, replace=False) for _ in range(b)]),
        "1000 CSR/query": csr(b, n, [rng.integers(0, n, 1000) for _ in range(b)]),
    }


def faiss_search(items: np.ndarray) -> Callable[[np.ndarray, int, int], object] | None:
    try:
        import faiss
    except ImportError:
        return None
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)

    def run(q: np.ndarray, k: int, blas_threshold: int) -> object:
        # faiss uses BLAS from B >= blas_threshold (default 20), its per-query SIMD scan below that.
        faiss.cvar.distance_compute_blas_threshold = blas_threshold
        return index.search(q, k)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--no-numpy", action="store_true", help="skip the (slow) NumPy reference")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    items = unit_rows(rng, args.n, args.d)
    warmup()
    _parallel_sum(items.ravel())
    faiss_run = faiss_search(items)
    default = NumbaTopK()
    forced = {"sum tiles": NumbaTopK(bcast_min_batch=1 << 30), "bcast tiles": NumbaTopK(bcast_min_batch=0),
              "BLAS path": NumbaTopK(fused_max_batch=0)}
    print(f"N={args.n} d={args.d} k={args.k} threads={numba.get_num_threads()}; median of {args.rounds} rounds")

    def floor_pass() -> None:
        with numba.parallel_chunksize(1):  # parts handed out dynamically, like the numba backend's
            _parallel_sum(items.ravel())

    for b in (int(x) for x in args.batches.split(",")):
        q = unit_rows(rng, b, args.d)
        none = Filters.none(b, args.n)
        cases: dict[str, Callable[[], object]] = {
            "floor (parallel sum)": floor_pass,
            "numba": lambda: default.search(q, items, args.k, none),
        }
        for name, f in filter_sets(rng, b, args.n).items():
            cases[f"numba {name}"] = lambda f=f: default.search(q, items, args.k, f)
        for name, backend in forced.items():
            cases[f"numba {name}"] = lambda backend=backend: backend.search(q, items, args.k, none)
        if faiss_run is not None:
            for thr in (2, 20):
                cases[f"faiss FlatIP blas>={thr}"] = lambda thr=thr: faiss_run(q, args.k, thr)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        if not args.no_numpy:  # one run: it takes seconds
            t0 = time.perf_counter()
            NumpyTopK().search(q, items, args.k, none)
            times["numpy reference"] = [time.perf_counter() - t0] * args.rounds
        floor, base = np.array(times["floor (parallel sum)"]), np.array(times["numba"])
        print(f"\nB={b}  {'':22s} {'median ms':>10s} {'x floor':>8s} {'x numba':>8s}")
        for name, ts in times.items():
            t = np.array(ts)
            print(f"  {name:30s} {1e3 * np.median(t):10.2f} {np.median(t / floor):8.2f} {np.median(t / base):8.2f}")


if __name__ == "__main__":
    main()
