#!/usr/bin/env python3
"""Official exact top-k benchmark: streamrec backends beside their peers, same data, same run.

Every figure comes with the exact command, the hardware and the peer measured beside it (FAISS style):

* streamrec backends, whatever `streamrec.engine.retrieval.topk.BACKENDS` holds when this runs (numpy reference,
  numba, cuda; the cuda backend is timed on its resident path `DeviceItemMatrix` + `search_resident`);
* peers: NumPy (Q @ X.T per item chunk + argpartition + sort), faiss-cpu IndexFlatIP with its BLAS
  dispatch parameters tuned per (d, B, k) on a small pre-run, torch (CPU: `torch.topk(Q @ X.T)`); with
  --gpu also torch.topk on CUDA and CuPy matmul + argpartition, float32 and float16;
* the memory-read floor: one parallel pass summing the item matrix (Numba on CPU, CuPy/torch on GPU),
  timed inside every cell and recorded as impl "floor" / "floor-gpu"; every time is also given as a ratio
  to it.

Each measurement checks recall@k against exact float64 scores (NumPy, or torch on the GPU with --gpu).
Implementations are interleaved repeat by repeat (noise hits all of them alike); medians and p90s are
reported. Run `python benchmarks/topk.py --help`; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamrec.engine.retrieval import topk as st

# Optional modules: each one that is missing just drops the implementations that need it.
_OPTIONAL = {}
for _name in ("faiss", "torch", "cupy", "numba", "rich", "tqdm"):
    try:
        _OPTIONAL[_name] = importlib.import_module(_name)
    except Exception:  # ImportError, or a broken CUDA install raising something else
        _OPTIONAL[_name] = None
faiss = _OPTIONAL["faiss"]
torch = _OPTIONAL["torch"]
cupy = _OPTIONAL["cupy"]
numba = _OPTIONAL["numba"]

# Modules that register further backends into BACKENDS when imported (if they exist yet).
BACKEND_MODULES = ("streamrec.engine.cpu.topk", "streamrec.engine.gpu.topk")

FULL_GRID = {"n": [100_000, 1_000_000], "d": [64, 128], "b": [1, 16, 256, 1024], "k": [10, 100, 1000]}
GPU_EXTRA_N = [10_000_000]
QUICK_GRID = {"n": [100_000], "d": [64], "b": [1, 16, 256], "k": [10, 100]}
EXCLUDE_FRACTION = 0.10
SCORE_BLOCK_BYTES = 256 << 20  # bound on one [B, chunk] score block of the chunked peers
# Items in the faiss tuning pre-run: min(largest N of the grid, this). 2**19 rows at d = 64 are 128 MiB, 4x the
# L3 here: on a subset that fits in cache, faiss's one-scan-per-query path looks far better than it is at 1M.
FAISS_TUNE_ROWS = 1 << 19
INT_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------------------
# Hardware and environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in have]
    except OSError:
        pass
    return []


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu_info() -> dict[str, Any] | None:
    if torch is not None and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda}
    if cupy is not None:
        try:
            if cupy.cuda.runtime.getDeviceCount() > 0:
                p = cupy.cuda.runtime.getDeviceProperties(0)
                name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
                return {"name": name, "memory_gib": round(p["totalGlobalMem"] / 2**30, 1),
                        "count": cupy.cuda.runtime.getDeviceCount(), "cuda": cupy.cuda.runtime.runtimeGetVersion()}
        except Exception:
            pass
    try:  # numba.cuda alone (the streamrec cuda backend needs nothing else)
        gpu = importlib.import_module("streamrec.engine.gpu")
        if getattr(gpu, "CUDA_AVAILABLE", False):
            from numba import cuda as ncuda

            dev = ncuda.get_current_device()
            name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
            return {"name": name, "count": len(ncuda.gpus), "via": "numba.cuda"}
    except Exception:
        pass
    return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("numba", "faiss", "torch", "cupy"):
        mod = _OPTIONAL.get(name)
        out[name] = getattr(mod, "__version__", None) if mod is not None else None
    try:
        from importlib.metadata import version

        out["streamrec"] = version("streamrec")
    except Exception:
        out["streamrec"] = None
    return out


def _threads() -> dict[str, Any]:
    out: dict[str, Any] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                          "NUMBA_NUM_THREADS") if os.environ.get(k)}
    if numba is not None:
        out["numba"] = numba.get_num_threads()
    if faiss is not None:
        out["faiss_omp"] = faiss.omp_get_max_threads()
    if torch is not None:
        out["torch"] = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_info  # type: ignore

        out["blas"] = [{"lib": i.get("internal_api"), "threads": i.get("num_threads")} for i in threadpool_info()]
    except Exception:
        pass
    return out


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return None


def hardware_info() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "memory_gib": _mem_total_gib(),
        "gpu": _gpu_info(),
        "os": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ----------------------------------------------------------------------------------------------------------
# Data


def unit_rows(rng: np.random.Generator, n: int, d: int, block: int = 1 << 18) -> np.ndarray:
    """float32 [n, d] random normal rows, L2-normalised (in blocks, so no float64 copy of the whole matrix)."""
    x = rng.standard_normal((n, d), dtype=np.float32)
    for lo in range(0, n, block):
        blk = x[lo : lo + block]
        blk /= np.sqrt(np.einsum("ij,ij->i", blk, blk, dtype=np.float64)).astype(np.float32)[:, None]
    return x


def make_excludes(rng: np.random.Generator, b: int, n: int, frac: float) -> tuple[np.ndarray, np.ndarray]:
    """CSR over b queries, each excluding an independent Bernoulli(frac) sample of rows, rows sorted per query."""
    indptr = np.zeros(b + 1, dtype=np.int64)
    parts = []
    for q in range(b):
        rows = np.flatnonzero(rng.random(n, dtype=np.float32) < frac).astype(np.int64)
        parts.append(rows)
        indptr[q + 1] = indptr[q] + len(rows)
    return indptr, (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


@dataclass
class Excludes:
    """The first B queries' slice of the per-(N) exclude CSR, plus the streamrec Filters built from it."""

    indptr: np.ndarray  # int64 [B+1]
    rows: np.ndarray  # int64 [nnz], sorted within each query
    n: int

    @property
    def b(self) -> int:
        return len(self.indptr) - 1

    def segment(self, q: int) -> np.ndarray:
        return self.rows[self.indptr[q] : self.indptr[q + 1]]

    def in_chunk(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(query, column - lo) pairs of the excludes falling in rows [lo, hi) (relies on sorted segments)."""
        qs, cols = [], []
        for q in range(self.b):
            seg = self.segment(q)
            a, z = np.searchsorted(seg, (lo, hi))
            if z > a:
                cols.append(seg[a:z] - lo)
                qs.append(np.full(z - a, q, dtype=np.int64))
        if not cols:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        return np.concatenate(qs), np.concatenate(cols)

    def post_filter(self, rows: np.ndarray, k: int) -> np.ndarray:
        """Drop excluded rows from score-ordered candidates [B, k'], keep the first k per query (pad -1)."""
        hit = np.zeros(rows.shape, dtype=np.bool_)
        for q in range(self.b):
            seg = self.segment(q)
            if len(seg):
                pos = np.minimum(np.searchsorted(seg, rows[q]), len(seg) - 1)
                hit[q] = seg[pos] == rows[q]
        hit |= rows < 0
        order = np.argsort(hit, axis=1, kind="stable")[:, :k]
        out = np.take_along_axis(rows, order, axis=1)
        out[np.take_along_axis(hit, order, axis=1)] = -1
        return out


def overfetch(k: int, n: int) -> int:
    """Candidates a post-filtering peer asks for so ~10% exclusions almost never leave fewer than k."""
    return min(n, 2 * k + 16)


# ----------------------------------------------------------------------------------------------------------
# Exact float64 ground truth and recall


def _merge_topk_np(ids: np.ndarray, vals: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if vals.shape[1] > k:
        part = np.argpartition(-vals, k - 1, axis=1)[:, :k]
        ids, vals = np.take_along_axis(ids, part, axis=1), np.take_along_axis(vals, part, axis=1)
    return ids, vals


def exact_topk_numpy(q: np.ndarray, x: np.ndarray, k: int, ex: Excludes | None) -> np.ndarray:
    """rows int64 [B, k] of the exact float64 top-k, best first (items upcast chunk by chunk)."""
    b, n = q.shape[0], x.shape[0]
    q64 = q.astype(np.float64)
    step = max(k, min(n, SCORE_BLOCK_BYTES // (8 * b)))
    ids = np.zeros((b, 0), dtype=np.int64)
    vals = np.zeros((b, 0), dtype=np.float64)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        s = q64 @ x[lo:hi].astype(np.float64).T
        if ex is not None:
            qi, ci = ex.in_chunk(lo, hi)
            s[qi, ci] = -np.inf
        cid = np.broadcast_to(np.arange(lo, hi, dtype=np.int64), s.shape)
        cid, s = _merge_topk_np(cid, s, k)
        ids, vals = _merge_topk_np(np.concatenate([ids, cid], axis=1), np.concatenate([vals, s], axis=1), k)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1)


def exact_topk_torch(q: np.ndarray, x: np.ndarray, k: int, ex: Excludes | None, device: str) -> np.ndarray:
    """Same as exact_topk_numpy in float64 on a torch device (used on the GPU, where N reaches 10M)."""
    b, n = q.shape[0], x.shape[0]
    q64 = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float64)).to(device)
    step = max(k, min(n, (1 << 30) // (8 * b)))
    ids = torch.zeros((b, 0), dtype=torch.int64, device=device)
    vals = torch.zeros((b, 0), dtype=torch.float64, device=device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        s = q64 @ torch.from_numpy(np.ascontiguousarray(x[lo:hi], dtype=np.float64)).to(device).T
        if ex is not None:
            qi, ci = ex.in_chunk(lo, hi)
            s[torch.from_numpy(qi).to(device), torch.from_numpy(ci).to(device)] = -math.inf
        v, i = torch.topk(s, min(k, hi - lo), dim=1)
        vals, ids = torch.cat([vals, v], dim=1), torch.cat([ids, i + lo], dim=1)
        if vals.shape[1] > k:
            vals, j = torch.topk(vals, k, dim=1)
            ids = torch.gather(ids, 1, j)
    vals, j = torch.sort(vals, dim=1, descending=True)
    return torch.gather(ids, 1, j).cpu().numpy()


def recall_at_k(rows: np.ndarray, exact: np.ndarray, k: int, n: int) -> float:
    """Mean over queries of |returned ∩ exact top-k| / k."""
    rows = np.asarray(rows)[:, :k].astype(np.int64)
    b = exact.shape[0]
    base = np.arange(b, dtype=np.int64)[:, None] * (n + 1)
    got = np.unique((rows + base)[rows >= 0])
    want = (exact[:, :k] + base).ravel()
    return float(np.isin(got, want, assume_unique=False).sum()) / (b * k)


# ----------------------------------------------------------------------------------------------------------
# Implementations


@dataclass
class Impl:
    """One implementation: prepare(items) once per (N, d, dtype), then search(queries, k, excludes) -> rows."""

    name: str
    device: str  # "cpu" or "gpu"
    filter_mode: str  # how it honours --filtered: "in-kernel", "mask-scores", "post-filter (over-fetch 2k+16)"
    dtypes: tuple[str, ...] = ("float32",)
    note: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # extra fields of the last search (faiss tuning)

    def prepare(self, items: np.ndarray, dtype: str) -> None:  # pragma: no cover - overridden
        pass

    def search(self, queries: np.ndarray, k: int, ex: Excludes | None) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def release(self) -> None:
        pass


class StreamrecImpl(Impl):
    """A streamrec TopKBackend: backend.search(queries, items, k, filters)."""

    def __init__(self, backend_name: str, device: str = "cpu") -> None:
        super().__init__(name=f"streamrec-{backend_name}", device=device, filter_mode="in-kernel")
        self.backend_name = backend_name
        self.backend = st.get_backend(backend_name)
        self.items: np.ndarray | None = None
        self._filters: dict[tuple[int, int, int], st.Filters] = {}
        self._tuned: dict[tuple[int, int], int] = {}

    def prepare(self, items: np.ndarray, dtype: str) -> None:
        self.items = items
        self._filters.clear()

    def filters_for(self, b: int, ex: Excludes | None) -> st.Filters:
        """Filters are the caller's input, built once per (B, N, filtered) outside the timed call."""
        n = self.items.shape[0]
        key = (b, n, 0 if ex is None else id(ex))
        f = self._filters.get(key)
        if f is None:
            if ex is None:
                f = st.Filters.none(b, n)
            else:
                f = st.Filters(valid=np.ones(n, dtype=np.bool_), exclude_indptr=ex.indptr, exclude_rows=ex.rows,
                               item_cats=np.zeros((n, 0), dtype=np.uint64),
                               include_cats=np.zeros((b, 0), dtype=np.uint64),
                               exclude_cats=np.zeros((b, 0), dtype=np.uint64))
            self._filters = {key: f}
        return f

    def search(self, queries: np.ndarray, k: int, ex: Excludes | None) -> np.ndarray:
        tune = getattr(self.backend, "tune", None)
        if tune is not None:
            # A backend that measures its dispatch does it at start-up: here, once per (d, k), in the untimed
            # warm-up call of the first cell that needs it. The path taken goes into the record.
            d, n = queries.shape[1], len(self.items)
            key = (d, k)
            if key not in self._tuned:
                self._tuned[key] = tune(d, k)
            path = "blas" if self.backend.uses_blas(len(queries), d, k, n) else "fused"
            self.params = {"path": path, "blas_min_batch": self._tuned[key]}
        rows, _ = self.backend.search(queries, self.items, k, self.filters_for(len(queries), ex))
        return rows

    def release(self) -> None:
        self.items = None
        self._filters.clear()


class StreamrecResidentImpl(StreamrecImpl):
    """The streamrec CUDA backend on its resident path: items uploaded once, search_resident per batch."""

    def __init__(self, backend_name: str, module: Any) -> None:
        super().__init__(backend_name, device="gpu")
        self.module = module
        self.resident = None
        self.dtypes = ("float32", "float16")

    def prepare(self, items: np.ndarray, dtype: str) -> None:
        """Upload once (untimed): every row live, no categories; storage dtype = the cell's dtype."""
        super().prepare(items, dtype)
        self.resident = None
        n, d = items.shape
        matrix = self.module.DeviceItemMatrix(d, np.dtype(dtype), threads_per_block=getattr(self.backend, "threads", 256))
        matrix.sync(items, np.ones(n, dtype=np.bool_), np.zeros((n, 1), dtype=np.uint64), n, np.zeros(0, dtype=np.int64))
        self.resident = matrix

    def search(self, queries: np.ndarray, k: int, ex: Excludes | None) -> np.ndarray:
        # Queries go up and rows come back inside the call, as for the torch / CuPy peers.
        rows, _ = self.backend.search_resident(queries, k, self.filters_for(len(queries), ex), self.resident)
        return np.asarray(rows)

    def release(self) -> None:
        super().release()
        self.resident = None


class NumpyPeer(Impl):
    """Q @ X.T (float32 BLAS) per item chunk, argpartition, merge, final sort; filtered: -inf in the scores."""

    def __init__(self) -> None:
        super().__init__(name="numpy-peer", device="cpu", filter_mode="mask-scores (exact)")
        self.items: np.ndarray | None = None

    def prepare(self, items: np.ndarray, dtype: str) -> None:
        self.items = items

    def search(self, queries: np.ndarray, k: int, ex: Excludes | None) -> np.ndarray:
        x = self.items
        b, n = queries.shape[0], x.shape[0]
        step = max(k, min(n, SCORE_BLOCK_BYTES // (4 * b)))
        ids = np.zeros((b, 0), dtype=np.int64)
        vals = np.zeros((b, 0), dtype=np.float32)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            s = queries @ x[lo:hi].T
            if ex is not None:
                qi, ci = ex.in_chunk(lo, hi)
                s[qi, ci] = -np.inf
            c = hi - lo
            if k < c:
                part = np.argpartition(s, c - k, axis=1)[:, c - k :]
                s = np.take_along_axis(s, part, axis=1)
                part += lo
            else:
                part = np.broadcast_to(np.arange(lo, hi, dtype=np.int64), s.shape)
            ids, vals = np.concatenate([ids, part], axis=1), np.concatenate([vals, s], axis=1)
            if vals.shape[1] > k:
                j = np.argpartition(vals, vals.shape[1] - k, axis=1)[:, vals.shape[1] - k :]
                ids, vals = np.take_along_axis(ids, j, axis=1), np.take_along_axis(vals, j, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        return np.take_along_axis(ids, order, axis=1)

    def release(self) -> None:
        self.items = None


@dataclass(frozen=True)
class FaissConfig:
    threshold: int  # faiss.cvar.distance_compute_blas_threshold (BLAS when nx * d >= threshold)
    database_bs: int  # faiss.cvar.distance_compute_blas_database_bs (items per sgemm block)

    def label(self) -> str:
        thr = {0: "0(BLAS)", INT_MAX: "max(no BLAS)"}.get(self.threshold, str(self.threshold))
        return f"thr={thr},db_bs={self.database_bs}"

    def apply(self) -> None:
        faiss.cvar.distance_compute_blas_threshold = self.threshold
        faiss.cvar.distance_compute_blas_database_bs = self.database_bs


class FaissFlatIP(Impl):
    """faiss IndexFlatIP; its BLAS dispatch parameters are tuned per (d, B, k) on a small pre-run.

    faiss (1.15 sources) takes its sequential SIMD scan, one pass over the matrix per query, when
    nx * d < distance_compute_blas_threshold (default 128000, i.e. B < 2000 at d = 64) and sgemm on blocks
    of distance_compute_blas_database_bs items otherwise. Candidates: the defaults, "always BLAS"
    (threshold 0) with database blocks of 1024 / 4096 / 16384 items, and "never BLAS".
    """

    def __init__(self, tune: bool = True, tune_repeats: int = 3, seed: int = 0, settle_ms: float = 0.0,
                 tune_rows: int = FAISS_TUNE_ROWS) -> None:
        super().__init__(name="faiss" if tune else "faiss-default", device="cpu",
                         filter_mode="post-filter (over-fetch 2k+16)")
        self.tune = tune
        self.tune_repeats = tune_repeats
        self.seed = seed
        self.settle_ms = settle_ms
        self.tune_rows = tune_rows
        self.default = FaissConfig(int(faiss.cvar.distance_compute_blas_threshold),
                                   int(faiss.cvar.distance_compute_blas_database_bs))
        self.index = None
        self.tune_index = None
        self.d = 0
        self.cache: dict[tuple[int, int, int], tuple[FaissConfig, dict[str, float]]] = {}
        self.tuning_log: list[dict[str, Any]] = []
        self.note = f"faiss defaults: {self.default.label()}"

    def candidates(self) -> list[FaissConfig]:
        seen, out = set(), []
        for c in (self.default, FaissConfig(0, 1024), FaissConfig(0, 4096), FaissConfig(0, 16384),
                  FaissConfig(INT_MAX, self.default.database_bs)):
            if c not in seen:
                seen.add(c)
                out.append(c)
        return out

    def prepare(self, items: np.ndarray, dtype: str) -> None:
        self.d = items.shape[1]
        self.index = faiss.IndexFlatIP(self.d)
        self.index.add(items)
        if self.tune and (self.tune_index is None or self.tune_index.d != self.d):
            # Its own random matrix, the same for every N, so the choice per (d, B, k) does not depend on
            # which N came first and the subset never fits in cache by accident.
            self.tune_index = faiss.IndexFlatIP(self.d)
            self.tune_index.add(unit_rows(np.random.default_rng([self.seed, 4, self.d]), self.tune_rows, self.d))

    def config_for(self, queries: np.ndarray, k: int) -> FaissConfig:
        if not self.tune:
            return self.default
        key = (self.d, len(queries), k)
        if key not in self.cache:
            self.cache[key] = self._tune(queries, k)
            cfg, times = self.cache[key]
            self.tuning_log.append({"d": self.d, "B": len(queries), "k": k, "tune_rows": self.tune_index.ntotal,
                                    "ms": times, "chosen": cfg.label(), "default": self.default.label(),
                                    "default_over_best": round(times[self.default.label()] / times[cfg.label()], 2)})
        return self.cache[key][0]

    def _tune(self, queries: np.ndarray, k: int) -> tuple[FaissConfig, dict[str, float]]:
        """Best (minimum) time per candidate on the tuning matrix, candidates interleaved round by round.
        Hopeless candidates (one scan per query at B = 1024 costs seconds) stop being timed: after round 1
        those over 10x the best, after round 2 those over 3x (two samples first, so one slice of noise
        does not drop a good one). The minimum, not the median: noise here is additive, so the minimum is
        the most stable estimate of what a configuration can do."""
        kk = min(k, self.tune_index.ntotal)
        times: dict[FaissConfig, list[float]] = {c: [] for c in self.candidates()}
        try:
            for rnd in range(self.tune_repeats):
                best = min((min(t) for t in times.values() if t), default=math.inf)
                for cfg, t in times.items():
                    if (rnd == 1 and min(t) > 10 * best) or (rnd > 1 and min(t) > 3 * best):
                        continue
                    cfg.apply()
                    _pause(self.settle_ms)
                    if rnd == 0:
                        self.tune_index.search(queries, kk)  # warm
                    t.append(_time_ms(lambda: self.tune_index.search(queries, kk)))
        finally:
            self.default.apply()
        best_ms = {c: min(t) for c, t in times.items()}
        chosen = min(best_ms, key=best_ms.__getitem__)
        return chosen, {c.label(): round(v, 3) for c, v in best_ms.items()}

    def search(self, queries: np.ndarray, k: int, ex: Excludes | None) -> np.ndarray:
        n = self.index.ntotal
        kk = k if ex is None else overfetch(k, n)
        cfg = self.config_for(queries, kk)
        self.params = {"faiss_config": cfg.label()}
        cfg.apply()
        try:
            _, rows = self.index.search(queries, kk)
        finally:
            self.default.apply()
        return rows if ex is None else ex.post_filter(rows, k)

    def release(self) -> None:
        self.index = None


class TorchPeer(Impl):
    """torch.topk(Q @ X.T) per item chunk, merged with another topk; on CPU or CUDA (items resident)."""

    def __init__(self, device: str) -> None:
        gpu = device == "cuda"
        super().__init__(name="torch-cuda" if gpu else "torch", device="gpu" if gpu else "cpu",
                         filter_mode="post-filter (over-fetch 2k+16)",
                         dtypes=("float32", "float16") if gpu else ("float32",))
        self.tdev = device
        self.items = None
        self.tdtype = None

    def prepare(self, items: np.ndarray, dtype: str) -> None:
        self.tdtype = getattr(torch, dtype)
        self.items = torch.from_numpy(items).to(self.tdev, self.tdtype)

    @torch.inference_mode() if torch is not None else (lambda f: f)
    def search(self, queries: np.ndarray, k: int, ex: Excludes | None) -> np.ndarray:
        x = self.items
        n = x.shape[0]
        kk = k if ex is None else overfetch(k, n)
        q = torch.from_numpy(queries).to(self.tdev, self.tdtype)
        b = q.shape[0]
        block = (1 << 30) if self.tdev == "cuda" else SCORE_BLOCK_BYTES
        step = max(kk, min(n, block // (x.element_size() * b)))
        vals = ids = None
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            v, i = torch.topk(q @ x[lo:hi].T, min(kk, hi - lo), dim=1, sorted=False)
            i = i + lo
            if vals is None:
                vals, ids = v, i
            else:
                vals, ids = torch.cat([vals, v], dim=1), torch.cat([ids, i], dim=1)
                vals, j = torch.topk(vals, kk, dim=1, sorted=False)
                ids = torch.gather(ids, 1, j)
        vals, j = torch.sort(vals, dim=1, descending=True, stable=True)
        rows = torch.gather(ids, 1, j).cpu().numpy()
        return rows if ex is None else ex.post_filter(rows, k)

    def release(self) -> None:
        self.items = None
        if self.tdev == "cuda":
            torch.cuda.empty_cache()


class CupyPeer(Impl):
    """CuPy: Q @ X.T per item chunk (items resident), argpartition, merge, final argsort."""

    def __init__(self) -> None:
        super().__init__(name="cupy", device="gpu", filter_mode="post-filter (over-fetch 2k+16)",
                         dtypes=("float32", "float16"))
        self.items = None

    def prepare(self, items: np.ndarray, dtype: str) -> None:
        self.items = cupy.asarray(items.astype(dtype, copy=False))

    def search(self, queries: np.ndarray, k: int, ex: Excludes | None) -> np.ndarray:
        cp = cupy
        x = self.items
        n = x.shape[0]
        kk = k if ex is None else overfetch(k, n)
        q = cp.asarray(queries.astype(x.dtype, copy=False))
        b = q.shape[0]
        step = max(kk, min(n, (1 << 30) // (x.itemsize * b)))
        ids = cp.zeros((b, 0), dtype=cp.int64)
        vals = cp.zeros((b, 0), dtype=x.dtype)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            s = q @ x[lo:hi].T
            c = hi - lo
            if kk < c:
                part = cp.argpartition(-s, kk - 1, axis=1)[:, :kk]
                s = cp.take_along_axis(s, part, axis=1)
                part = part.astype(cp.int64) + lo
            else:
                part = cp.broadcast_to(cp.arange(lo, hi, dtype=cp.int64), s.shape)
            ids, vals = cp.concatenate([ids, part], axis=1), cp.concatenate([vals, s], axis=1)
            if vals.shape[1] > kk:
                j = cp.argpartition(-vals, kk - 1, axis=1)[:, :kk]
                ids, vals = cp.take_along_axis(ids, j, axis=1), cp.take_along_axis(vals, j, axis=1)
        order = cp.argsort(-vals, axis=1)
        rows = cp.asnumpy(cp.take_along_axis(ids, order, axis=1))
        return rows if ex is None else ex.post_filter(rows, k)

    def release(self) -> None:
        self.items = None
        cupy.get_default_memory_pool().free_all_blocks()


# ----------------------------------------------------------------------------------------------------------
# Memory-read floor


_numba_sum = None
FLOOR_LANES = 64  # floats per block of the read-floor sum: independent partial sums LLVM vectorises


def _get_numba_sum() -> Callable[[np.ndarray, int], float]:
    """A parallel sum of the matrix in `parts` contiguous parts, each read once in blocks of FLOOR_LANES
    floats. The blocks are indexed by range() counters: with a while-loop index (or one accumulator chain)
    LLVM did not vectorise it and the "floor" ran at a third of the rate the top-k kernel itself reached."""
    global _numba_sum
    if _numba_sum is None:

        @numba.njit(parallel=True, fastmath=True, cache=False, nogil=True)
        def parallel_sum(flat, parts):
            out = np.zeros(parts, dtype=np.float32)
            for p in numba.prange(parts):
                seg = flat[flat.size * p // parts:flat.size * (p + 1) // parts]
                acc = np.zeros(FLOOR_LANES, dtype=np.float32)
                nb = seg.size // FLOOR_LANES
                for t in range(nb):
                    for i in range(FLOOR_LANES):
                        acc[i] += seg[t * FLOOR_LANES + i]
                tail = np.float32(0.0)
                for i in range(nb * FLOOR_LANES, seg.size):
                    tail += seg[i]
                out[p] = acc.sum() + tail
            return out.sum()

        _numba_sum = parallel_sum
    return _numba_sum


class Floor(Impl):
    """One read of the whole item matrix: the bandwidth floor of any exact single-pass search.

    What reads fastest depends on the host, so prepare() measures several ways and keeps the fastest: the
    parallel sum with 1 .. all threads and 1 or 8 parts per thread, and, as a check on those, a parallel
    copy of the matrix (np.copyto split over threads: it reads every byte too, and writes them). A read-only
    pass slower than that copy is not a floor, so the copy stands in then. The method, its rate (GB/s) and
    the rates of the others go into the note. It is then timed inside every cell, in the same interleaved
    rounds as the implementations, so its ratio compares calls made under the same load.
    """

    def __init__(self, device: str) -> None:
        gpu = device == "gpu"
        super().__init__(name="floor-gpu" if gpu else "floor", device=device, filter_mode="n/a",
                         dtypes=("float32", "float16") if gpu else ("float32",))
        self.data = None
        self.nbytes = 0
        self.run: Callable[[], Any] | None = None
        self.probe: dict[str, float] = {}
        if not gpu:
            self.method = "best of numba parallel sums / parallel copy" if numba is not None else \
                "np.add.reduce (single thread)"
        else:
            self.method = "cupy.sum" if cupy is not None else "torch.sum"
        self.note = self.method

    def _cpu_candidates(self) -> dict[str, Callable[[], Any]]:
        flat = self.data
        out: dict[str, Callable[[], Any]] = {"np.add.reduce 1 thread": lambda: np.add.reduce(flat)}
        if numba is None:
            return out
        total = numba.get_num_threads()
        fn = _get_numba_sum()

        def summed(threads: int, parts: int) -> Callable[[], Any]:
            def call() -> Any:
                prev = numba.get_num_threads()
                numba.set_num_threads(threads)
                try:
                    return fn(flat, parts)
                finally:
                    numba.set_num_threads(prev)
            return call

        for threads in sorted({1, max(1, total // 2), total}):
            for per in (1, 8):
                out[f"numba sum {threads} thr x {per} parts"] = summed(threads, threads * per)
        dst = np.empty_like(flat)

        def copy() -> None:  # the read half of a copy: a check on the sums (threads: numpy releases the GIL)
            parts = max(1, total)
            bounds = [flat.size * i // parts for i in range(parts + 1)]
            ths = [threading.Thread(target=np.copyto, args=(dst[bounds[i]:bounds[i + 1]], flat[bounds[i]:bounds[i + 1]]))
                   for i in range(parts)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()

        out["parallel copy (check)"] = copy
        return out

    def prepare(self, items: np.ndarray, dtype: str) -> None:
        self.nbytes = int(items.nbytes)
        if self.device == "cpu":
            self.data = items.reshape(-1)
            cands = self._cpu_candidates()
            if numba is not None:
                _get_numba_sum()(self.data[:4096], 2)  # compile
            times: dict[str, float] = {}
            for _ in range(3):  # interleaved rounds, best per candidate
                for name, fn in cands.items():
                    fn()
                    times[name] = min(times.get(name, math.inf), _time_ms(fn))
            reads = {n: t for n, t in times.items() if n != "parallel copy (check)"}
            best = min(reads, key=reads.__getitem__)
            if times["parallel copy (check)"] < reads[best]:
                best = "parallel copy (check)"
            self.run = cands[best]
            self.probe = {n: round(self.nbytes / (t * 1e6), 2) for n, t in times.items()}
            self.method = f"best of {len(times)} read probes: {best}"
            self.params = {"floor_method": best, "floor_probe_gbps": self.probe}
            self.note = (f"{self.method} ({self.probe[best]} GB/s); others GB/s: "
                         + ", ".join(f"{n}: {v}" for n, v in self.probe.items() if n != best))
        elif cupy is not None:
            self.data = cupy.asarray(items.astype(dtype, copy=False))
        else:
            self.data = torch.from_numpy(items).to("cuda", getattr(torch, dtype))

    def search(self, queries: np.ndarray, k: int, ex: Excludes | None) -> None:
        if self.device == "cpu":
            self.run()
        elif cupy is not None:
            float(self.data.sum(dtype=cupy.float32))
        else:
            float(self.data.sum(dtype=torch.float32))

    def release(self) -> None:
        self.data = None
        self.run = None
        if self.device == "gpu" and cupy is not None:
            cupy.get_default_memory_pool().free_all_blocks()


# ----------------------------------------------------------------------------------------------------------
# Timing


def _time_ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def _running_threads(me: int) -> int:
    """Threads of this process other than `me` that are on a CPU (state R in /proc), -1 if unknown."""
    n = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return -1
    for t in tids:
        if int(t) == me:
            continue
        try:
            with open(f"/proc/self/task/{t}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] == "R":
            n += 1
    return n


def _pause(settle_ms: float) -> None:
    """Wait before a timed call until the previous implementation's worker threads have parked.

    OpenBLAS workers (NumPy's, and faiss's own copy) busy-wait about 2**28 cycles (~0.1 s) after each call,
    libgomp / torch / Numba workers for a few ms. On a 2-core machine a call started inside that window ran
    up to 20x slower here (faiss after NumPy: 5.3 ms alone, 102 ms 20 ms later, 5.7 ms 300 ms later). So
    this polls /proc every ms until no other thread of this process has been running for 3 polls in a row,
    at most settle_ms (a plain sleep of settle_ms where /proc is not available).
    """
    if settle_ms <= 0:
        return
    t_end = time.perf_counter() + settle_ms / 1000
    me = threading.get_native_id()
    quiet = 0
    while time.perf_counter() < t_end:
        busy = _running_threads(me)
        if busy < 0:
            time.sleep(max(0.0, t_end - time.perf_counter()))
            return
        quiet = quiet + 1 if busy == 0 else 0
        if quiet >= 3:
            return
        time.sleep(0.001)


def summarize(times: Sequence[float]) -> dict[str, Any]:
    t = np.asarray(times, dtype=np.float64)
    return {"ms_median": round(float(np.median(t)), 4), "ms_p90": round(float(np.percentile(t, 90)), 4),
            "ms_min": round(float(t.min()), 4), "repeats": int(len(t))}


# ----------------------------------------------------------------------------------------------------------
# Registry discovery


def discover(args: argparse.Namespace, notes: list[str]) -> list[Impl]:
    """Every implementation that can run here, in table order; notes say why the others are skipped."""
    gpu_mod = None
    for modname in BACKEND_MODULES:
        try:
            mod = importlib.import_module(modname)
            if modname.endswith("gpu.topk"):
                gpu_mod = mod
        except ModuleNotFoundError as e:
            if e.name and modname.startswith(e.name):
                notes.append(f"{modname} does not exist (yet): its backend is not measured")
            else:
                notes.append(f"{modname} failed to import: {e}")
        except Exception as e:
            notes.append(f"{modname} failed to import: {type(e).__name__}: {e}")

    impls: list[Impl] = []
    if args.gpu and not any(n in st.BACKENDS for n in ("cuda", "cupy", "gpu")):
        notes.append("no GPU backend in streamrec.engine.retrieval.topk.BACKENDS (yet): no streamrec GPU row")
    for name, factory in st.BACKENDS.items():
        is_gpu = name in ("cuda", "cupy", "gpu") or ".gpu" in getattr(factory, "__module__", "")
        label = f"streamrec-{name}"
        if is_gpu:
            if not args.gpu:
                notes.append(f"{label}: GPU backend, needs --gpu")
                continue
            if gpu_mod is None or not getattr(gpu_mod, "CUDA_AVAILABLE", False):
                notes.append(f"{label}: CUDA_AVAILABLE is false")
                continue
            if not (hasattr(gpu_mod, "DeviceItemMatrix")):
                notes.append(f"{label}: no DeviceItemMatrix; measured on plain search (not resident)")
                try:
                    impls.append(StreamrecImpl(name, device="gpu"))
                except Exception as e:
                    notes.append(f"{label}: unavailable: {type(e).__name__}: {e}")
                continue
            try:
                impls.append(StreamrecResidentImpl(name, gpu_mod))
            except Exception as e:
                notes.append(f"{label}: unavailable: {type(e).__name__}: {e}")
            continue
        try:
            impls.append(StreamrecImpl(name))
        except Exception as e:
            notes.append(f"{label}: unavailable: {type(e).__name__}: {e}")

    impls.append(NumpyPeer())
    if faiss is not None:
        impls.append(FaissFlatIP(tune=True, tune_repeats=args.faiss_tune_repeats, seed=args.seed,
                                 settle_ms=args.settle_ms, tune_rows=min(max(args.n), FAISS_TUNE_ROWS)))
        impls.append(FaissFlatIP(tune=False))
    else:
        notes.append("faiss: not installed (pip install faiss-cpu): no faiss peer, ratios to faiss are n/a")
    if torch is not None:
        impls.append(TorchPeer("cpu"))
        if args.gpu:
            if torch.cuda.is_available():
                impls.append(TorchPeer("cuda"))
            else:
                notes.append("torch-cuda: torch has no CUDA here")
    else:
        notes.append("torch: not installed: no torch peer")
    if args.gpu:
        if cupy is not None:
            impls.append(CupyPeer())
        else:
            notes.append("cupy: not installed: no CuPy peer")
    return impls


DEFAULT_OFF = {"faiss-default"}  # measured only when named in --impl (the tuning table shows its cost)


def select(impls: list[Impl], wanted: list[str] | None, notes: list[str]) -> list[Impl]:
    if not wanted:
        return [i for i in impls if i.name not in DEFAULT_OFF]
    names = {i.name for i in impls}
    for w in wanted:
        if w not in names:
            notes.append(f"--impl {w}: not available here (available: {', '.join(sorted(names))})")
    return [i for i in impls if i.name in wanted]


# ----------------------------------------------------------------------------------------------------------
# Output


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")


def fmt_n(n: int) -> str:
    for div, suf in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suf}"
    return str(n)


COLUMNS = ["impl", "N", "d", "dtype", "B", "k", "filt", "ms med", "ms p90", "x faiss", "x floor", "recall", "reps"]


def table_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in records:
        if r.get("error"):
            out.append([r["impl"], fmt_n(r["N"]), str(r["d"]), r["dtype"], str(r.get("B", "")), str(r.get("k", "")),
                        "y" if r.get("filtered") else "", "error", "", "", "", "", r["error"][:40]])
            continue
        is_floor = r["impl"].startswith("floor")
        out.append([
            r["impl"], fmt_n(r["N"]), str(r["d"]), r["dtype"], str(r["B"]), str(r["k"]),
            "y" if r.get("filtered") else "",
            fmt_ms(r["ms_median"]), fmt_ms(r["ms_p90"]),
            "-" if is_floor else fmt_ratio(r.get("ratio_to_faiss")),
            "1.00" if is_floor else fmt_ratio(r.get("ratio_to_floor")),
            "-" if is_floor else f"{r['recall_vs_exact']:.4f}",
            str(r["repeats"]),
        ])
    return out


def print_table(records: list[dict[str, Any]], meta: dict[str, Any], use_rich: bool) -> None:
    rows = table_rows(records)
    hw = meta["hardware"]
    gpu = hw["gpu"]["name"] if hw.get("gpu") else "none"
    title = f"top-k, {hw['cpu_model']} ({hw['usable_cpus']} cpus), GPU: {gpu}"
    caption = f"command: {meta['command']}"
    rich = _OPTIONAL["rich"]
    if use_rich and rich is not None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, caption=caption, show_lines=False)
        for c in COLUMNS:
            t.add_column(c, justify="left" if c in ("impl", "dtype", "filt") else "right")
        prev = None
        for rec, row in zip(records, rows):
            cell = (rec["N"], rec["d"], rec["dtype"], rec.get("B"), rec.get("k"), rec.get("filtered"))
            if prev is not None and cell != prev:
                t.add_section()
            prev = cell
            t.add_row(*row)
        Console(width=max(140, len(caption) + 4)).print(t)
    else:
        print(title)
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
        line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(COLUMNS, widths)))
        print(line)
        print("-" * len(line))
        for r in rows:
            print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
        print(caption)


def print_tuning(log: list[dict[str, Any]]) -> None:
    if not log:
        return
    print("\nfaiss tuning pre-run (best ms on its own random matrix of `rows` items; chosen = fastest; "
          "default = faiss's own setting):")
    for e in log:
        cands = ", ".join(f"{k}: {fmt_ms(v)}" for k, v in e["ms"].items())
        print(f"  d={e['d']} B={e['B']} k={e['k']} rows={fmt_n(e['tune_rows'])}: chosen {e['chosen']}"
              f" (default is {e['default_over_best']}x slower) | {cands}")


# ----------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Exact top-k benchmark: streamrec backends vs NumPy / faiss / torch / CuPy and the memory floor. "
                    "See benchmarks/README.md.")
    p.add_argument("--quick", action="store_true",
                   help=f"small grid (N={QUICK_GRID['n']}, d={QUICK_GRID['d']}, B={QUICK_GRID['b']}, "
                        f"k={QUICK_GRID['k']}), fewer repeats; explicit --n/--d/--b/--k still win")
    p.add_argument("--n", type=int, nargs="+", help=f"item counts (default {FULL_GRID['n']}, plus 10M with --gpu)")
    p.add_argument("--d", type=int, nargs="+", help=f"dimensions (default {FULL_GRID['d']})")
    p.add_argument("--b", type=int, nargs="+", help=f"query batch sizes (default {FULL_GRID['b']})")
    p.add_argument("--k", type=int, nargs="+", help=f"k values (default {FULL_GRID['k']})")
    p.add_argument("--impl", nargs="+", help="only these implementations (names as in the table, e.g. "
                   "streamrec-numba faiss numpy-peer; faiss-default = faiss with its untuned defaults)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 7, --quick 5)")
    p.add_argument("--min-repeats", type=int, default=3, help="timed runs always done, even past --budget (default %(default)s)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per implementation per cell after which repeats stop (>= --min-repeats); "
                        "default 15, --quick 2")
    p.add_argument("--filtered", action="store_true",
                   help=f"also run every cell with {EXCLUDE_FRACTION * 100:.0f}%% of the items excluded per query "
                        "(Filters CSR excludes; peers: see filter_mode)")
    p.add_argument("--gpu", action="store_true", help="include GPU implementations (error if there is no CUDA GPU)")
    p.add_argument("--cpu-max-n", type=int, default=None,
                   help="skip CPU implementations above this N (default: 1M with --gpu, else no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of items, queries and excludes (default %(default)s)")
    p.add_argument("--json", metavar="PATH", help="write {meta, records} JSON here (rewritten after every cell)")
    p.add_argument("--faiss-tune-repeats", type=int, default=None,
                   help="rounds of the faiss pre-run (best time per candidate; default 5, --quick 3)")
    p.add_argument("--settle-ms", type=float, default=300.0,
                   help="before every timed call, wait (at most this long) until no other thread of the process "
                        "is running, so spinning BLAS/OpenMP workers of the previous implementation have parked "
                        "(OpenBLAS spins ~0.1 s); 0 disables (default %(default)s)")
    p.add_argument("--hot-below-ms", type=float, default=100.0,
                   help="precede each timed call by an untimed one of the same implementation when its calls take "
                        "less than this (steady state, worker threads awake); 0: time cold calls (default "
                        "%(default)s)")
    p.add_argument("--no-rich", action="store_true", help="plain-text table even if rich is installed")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)

    grid = QUICK_GRID if args.quick else FULL_GRID
    explicit_n = args.n is not None
    args.n = args.n or (grid["n"] + (GPU_EXTRA_N if args.gpu and not args.quick else []))
    args.d = args.d or grid["d"]
    args.b = args.b or grid["b"]
    args.k = args.k or grid["k"]
    args.repeats = args.repeats or (5 if args.quick else 7)
    args.budget = args.budget if args.budget is not None else (2.0 if args.quick else 15.0)
    args.faiss_tune_repeats = args.faiss_tune_repeats or (3 if args.quick else 5)
    if args.cpu_max_n is None:
        args.cpu_max_n = 1_000_000 if args.gpu and not explicit_n else None
    for name in ("n", "d", "b", "k"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} values must be >= 1")
    if args.repeats < 1 or args.min_repeats < 1:
        p.error("--repeats and --min-repeats must be >= 1")
    args.min_repeats = min(args.min_repeats, args.repeats)
    if args.gpu and _gpu_info() is None:
        p.error("--gpu given but no CUDA GPU is visible (torch.cuda.is_available() is false and CuPy finds no "
                "device); run without --gpu for the CPU benchmark")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    notes: list[str] = []
    impls = select(discover(args, notes), args.impl, notes)
    if not impls:
        print("nothing to measure:\n  " + "\n  ".join(notes), file=sys.stderr)
        return 2
    floors = [Floor("cpu")] if any(i.device == "cpu" for i in impls) else []
    if args.gpu and any(i.device == "gpu" for i in impls):
        if cupy is not None or (torch is not None and torch.cuda.is_available()):
            floors.append(Floor("gpu"))
        else:
            notes.append("floor-gpu: needs CuPy or torch with CUDA; GPU rows have no floor ratio")
    impls = floors + impls
    use_gpu_exact = args.gpu and torch is not None and torch.cuda.is_available()

    meta: dict[str, Any] = {
        "benchmark": "streamrec top-k",
        "command": command,
        "cwd": os.getcwd(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "hardware": hardware_info(),
        "versions": _versions(),
        "threads": _threads(),
        "grid": {"N": args.n, "d": args.d, "B": args.b, "k": args.k, "filtered": [False, True] if args.filtered
                 else [False], "cpu_max_n": args.cpu_max_n},
        "seed": args.seed,
        "repeats": args.repeats, "min_repeats": args.min_repeats, "budget_s": args.budget, "settle_ms": args.settle_ms,
        "hot_below_ms": args.hot_below_ms,
        "impls": [{"impl": i.name, "device": i.device, "filter_mode": i.filter_mode, "dtypes": list(i.dtypes),
                   **({"note": i.note} if i.note else {})} for i in impls],
        "floor": {f.name: f.method for f in floors},
        "exact": "float64 matmul + top-k over the matrix as searched (" + ("torch on CUDA" if use_gpu_exact
                                                                          else "NumPy") + ")",
        "data": "items and queries: random normal rows, L2-normalised, float32 (float16 on GPU = the float32 "
                "values rounded); queries are the first B rows of one 'max B' query set per d; filtered: each "
                f"query excludes an independent Bernoulli({EXCLUDE_FRACTION}) sample of rows (sorted CSR)",
        "timing": "wall time of one search call for the whole batch, queries from host memory, rows returned to "
                  "host memory; implementations interleaved repeat by repeat; one untimed warm-up call first; "
                  "before each timed call: wait until the previous implementation's threads are parked (at most "
                  "settle_ms), then, for implementations faster than hot_below_ms, one untimed call of the same "
                  "implementation (steady state)",
        "notes": notes,
    }
    records: list[dict[str, Any]] = []

    def dump() -> None:
        if args.json:
            meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            if hasattr(os, "getloadavg"):
                meta["loadavg_at_finish"] = list(os.getloadavg())
            meta["faiss_tuning"] = [e for i in impls if isinstance(i, FaissFlatIP) for e in i.tuning_log]
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"meta": meta, "records": records}, f, indent=1)
            os.replace(tmp, args.json)

    print(f"# {command}", file=sys.stderr)
    for n_ in notes:
        print(f"# note: {n_}", file=sys.stderr)

    dtypes = ["float32"] + (["float16"] if args.gpu else [])
    filt_modes = [False, True] if args.filtered else [False]
    b_max, k_max = max(args.b), max(args.k)
    n_cells = len(args.n) * len(args.d) * len(dtypes) * len(args.b) * len(args.k) * len(filt_modes)
    tqdm = _OPTIONAL["tqdm"]
    bar = tqdm.tqdm(total=n_cells, unit="cell", file=sys.stderr, dynamic_ncols=True) \
        if tqdm is not None and not args.no_progress else None

    for n in args.n:
        ex_all: tuple[np.ndarray, np.ndarray] | None = None
        for d in args.d:
            x32 = unit_rows(np.random.default_rng([args.seed, 1, n, d]), n, d)
            q32_all = unit_rows(np.random.default_rng([args.seed, 2, d]), b_max, d)
            if args.filtered and ex_all is None:
                ex_all = make_excludes(np.random.default_rng([args.seed, 3, n]), b_max, n, EXCLUDE_FRACTION)
            for dtype in dtypes:
                x = x32 if dtype == "float32" else x32.astype(dtype)
                q_all = q32_all if dtype == "float32" else q32_all.astype(dtype)
                here: list[Impl] = []
                for impl in impls:
                    if dtype not in impl.dtypes:
                        continue
                    if impl.device == "cpu" and args.cpu_max_n is not None and n > args.cpu_max_n:
                        continue
                    try:
                        impl.prepare(x, dtype)
                        here.append(impl)
                    except Exception as e:
                        notes.append(f"{impl.name} N={n} d={d} {dtype}: prepare failed: {type(e).__name__}: {e}")
                        impl.release()
                # Exact results for every filter mode first, so that a cell's unfiltered and filtered runs
                # follow each other and see the same load.
                exact_of: dict[bool, np.ndarray] = {}
                for filtered in filt_modes:
                    ex_max = Excludes(*ex_all, n) if filtered else None
                    t0 = time.perf_counter()
                    if use_gpu_exact:
                        exact_of[filtered] = exact_topk_torch(q_all, x, min(k_max, n), ex_max, "cuda")
                    else:
                        exact_of[filtered] = exact_topk_numpy(q_all, x, min(k_max, n), ex_max)
                    meta.setdefault("exact_seconds", {})[f"N={n},d={d},{dtype},filtered={filtered}"] = \
                        round(time.perf_counter() - t0, 2)
                for b in args.b:
                    q = np.ascontiguousarray(q_all[:b])
                    ex_b = None
                    if args.filtered:
                        ip = ex_all[0][: b + 1]
                        ex_b = Excludes(ip, ex_all[1][: ip[-1]], n)
                    for k in args.k:
                        for filtered in filt_modes:
                            if bar is not None:
                                bar.set_description(f"N={fmt_n(n)} d={d} {dtype} B={b} k={k}"
                                                    + (" filt" if filtered else ""))
                            if k > n:
                                notes.append(f"k={k} > N={n}: cell skipped")
                                if bar is not None:
                                    bar.update(1)
                                continue
                            gc.collect()
                            cell = measure_cell(here, q, k, ex_b if filtered else None, exact_of[filtered][:b], n,
                                                args)
                            ok = [c for c in cell if not c.get("error")]
                            faiss_ms = next((c["ms_median"] for c in ok if c["impl"] == "faiss"), None)
                            floor_ms = {c["device"]: c["ms_median"] for c in ok if c["impl"].startswith("floor")}
                            for c in cell:
                                c.update({"N": n, "d": d, "dtype": dtype, "B": b, "k": k, "filtered": filtered})
                                if c["impl"].startswith("floor"):
                                    c["recall_vs_exact"] = None
                                    if not c.get("error"):
                                        c["GBps"] = round(c["bytes"] / (c["ms_median"] / 1e3) / 1e9, 2)
                                elif not c.get("error"):
                                    c["ratio_to_faiss"] = round(c["ms_median"] / faiss_ms, 3) if faiss_ms else None
                                    fm = floor_ms.get(c["device"])
                                    c["ratio_to_floor"] = round(c["ms_median"] / fm, 3) if fm else None
                                records.append(_ordered(c))
                            dump()
                            if bar is not None:
                                bar.update(1)
                for impl in here:
                    impl.release()
                gc.collect()
    if bar is not None:
        bar.close()
    dump()

    print()
    print_table(records, meta, use_rich=not args.no_rich)
    print_tuning([e for i in impls if isinstance(i, FaissFlatIP) for e in i.tuning_log])
    if notes:
        print("\nnotes:")
        for n_ in dict.fromkeys(notes):
            print(f"  - {n_}")
    fmodes = {i.name: i.filter_mode for i in impls if not isinstance(i, Floor)}
    if args.filtered:
        print("\nfiltered runs: " + "; ".join(f"{k}: {v}" for k, v in fmodes.items()))
    print(f"\nfloor = one read of the item matrix ({'; '.join(f'{f.name}: {f.method}' for f in floors)}), timed "
          "in every cell; x faiss / x floor = ms median / that of faiss (tuned) / of the floor, same cell, same run")
    if args.json:
        print(f"records written to {args.json}")
    return 0


RECORD_ORDER = ["impl", "N", "d", "dtype", "B", "k", "filtered", "ms_median", "ms_p90", "recall_vs_exact",
                "ms_min", "repeats", "ratio_to_faiss", "ratio_to_floor", "device", "filter_mode"]


def _ordered(rec: dict[str, Any]) -> dict[str, Any]:
    return {**{k: rec[k] for k in RECORD_ORDER if k in rec}, **{k: v for k, v in rec.items() if k not in RECORD_ORDER}}


def measure_cell(impls: list[Impl], q: np.ndarray, k: int, ex: Excludes | None, exact: np.ndarray, n: int,
                 args: argparse.Namespace) -> list[dict[str, Any]]:
    """Warm-up call per implementation (its rows give the recall), then interleaved timed repeats.

    Before each timed call: wait until the previous implementation's threads have parked (_pause), then,
    unless this implementation's calls take --hot-below-ms or more, one untimed call of the same
    implementation so the timed one finds its own worker threads awake. So every figure is the steady
    state of calling that implementation back to back, never disturbed by another one's spinning threads.
    (Waking parked workers costs from microseconds to a whole scheduler slice when other processes hold
    the cores; --hot-below-ms 0 measures that cold start instead.)"""
    results: dict[str, dict[str, Any]] = {}
    live: list[Impl] = []
    for impl in impls:
        res: dict[str, Any] = {"impl": impl.name, "device": impl.device,
                               **({"filter_mode": impl.filter_mode} if ex is not None and not isinstance(impl, Floor)
                                  else {})}
        results[impl.name] = res
        try:
            _pause(args.settle_ms)
            rows = impl.search(q, k, ex)
            if isinstance(impl, Floor):
                res.update({"method": impl.method, "bytes": impl.nbytes})
            else:
                res["recall_vs_exact"] = round(recall_at_k(rows, exact, k, n), 6)
            live.append(impl)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
    times: dict[str, list[float]] = {i.name: [] for i in live}
    spent: dict[str, float] = {i.name: 0.0 for i in live}
    for rep in range(args.repeats):
        order = live[rep % len(live):] + live[: rep % len(live)] if live else []
        ran = False
        for impl in order:
            if results[impl.name].get("error") or (rep >= args.min_repeats and spent[impl.name] > args.budget):
                continue
            _pause(args.settle_ms)
            try:
                last = times[impl.name][-1] if times[impl.name] else 0.0
                if last < args.hot_below_ms:
                    impl.search(q, k, ex)  # untimed: wakes this implementation's own worker threads
                ms = _time_ms(lambda: impl.search(q, k, ex))
            except Exception as e:
                results[impl.name]["error"] = f"{type(e).__name__}: {e}"
                continue
            times[impl.name].append(ms)
            spent[impl.name] += ms / 1000
            ran = True
        if not ran:
            break
    out = []
    for impl in impls:
        res = results[impl.name]
        if not res.get("error") and times.get(impl.name):
            res.update(summarize(times[impl.name]))
            res.update(impl.params)
        elif not res.get("error"):
            res["error"] = "no timed run"
        out.append(res)
    return out


if __name__ == "__main__":
    sys.exit(main())
