"""Which scoring path a NumbaTopK search takes when fused_max_batch="auto": the fused kernels (register tiles
in topk.py) or the BLAS path (numpy's sgemm into a cache-sized score block, then the selection scan).

The answer depends on the host (vector width, the BLAS numpy links, cache sizes, cores), so it is measured,
not fixed: NumbaTopK.tune(d, k) (at start-up; benchmarks/topk.py calls it before timing) times both paths
on a synthetic catalog at growing batch sizes and records, per (d, k class), the smallest batch from which
BLAS wins at that batch and every larger one measured (faiss's distance_compute_blas_threshold, found
rather than set). A shape with no figure runs fused. The table can be read (table()), set (set_crossover(),
e.g. from figures measured on the serving host), or fixed for the process with STREAMREC_TOPK_BLAS_MIN_BATCH
(an int; 0: always BLAS, a huge one: never).
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

__all__ = ["NEVER", "blas_wins", "crossover", "k_class", "set_crossover", "table", "tune"]

NEVER = 1 << 62  # crossover meaning "the fused kernels won at every batch measured"
MIN_BATCH = 8  # below this the fused kernels always run: their sum tiles are memory-bound, sgemm is not
MIN_ROWS = 1 << 14  # smaller catalogs always run fused: the whole search is a few hundred microseconds
TUNE_ROWS = 1 << 16
TUNE_BATCHES = (8, 16, 32, 64, 128, 256)
TUNE_REPEATS = 3
_K_CLASSES = (32, 256)  # k <= 32, k <= 256, larger: selection cost differs between the paths by class
_ENV = "STREAMREC_TOPK_BLAS_MIN_BATCH"

_table: dict[tuple[int, int], int] = {}
_lock = threading.Lock()


def k_class(k: int) -> int:
    """0 for k <= 32, 1 for k <= 256, 2 above."""
    for i, top in enumerate(_K_CLASSES):
        if k <= top:
            return i
    return len(_K_CLASSES)


def _k_of_class(c: int) -> int:
    """The k tuned for a class: a typical one (10, 100, 1000)."""
    return (10, 100, 1000)[c]


def table() -> dict[tuple[int, int], int]:
    """A copy of the crossovers measured or set so far: (d, k class) -> smallest batch that takes BLAS."""
    with _lock:
        return dict(_table)


def set_crossover(d: int, kc: int, min_batch: int) -> None:
    """Record the crossover of (d, k class kc) without measuring it (NEVER: always fused)."""
    with _lock:
        _table[(int(d), int(kc))] = int(min_batch)


def crossover(d: int, k: int, measure: bool = False) -> int:
    """Smallest batch from which searches of dimension d for the top k take the BLAS path.

    measure=True measures it now if the table has no figure for (d, k class) yet (start-up: NumbaTopK.tune).
    Otherwise an unmeasured shape runs fused: measuring takes a second or two of both cores, which a serving
    process must not spend in the middle of its requests (a background measurement tripled the served latency
    of a batch of 8 on a 2-core host while it ran)."""
    env = os.environ.get(_ENV)
    if env:
        return int(env)
    key = (int(d), k_class(k))
    with _lock:
        got = _table.get(key)
    if got is not None or not measure:
        return NEVER if got is None else got
    got = tune(d, _k_of_class(key[1]))
    with _lock:
        return _table.setdefault(key, got)


def blas_wins(b: int, d: int, k: int, n: int) -> bool:
    """Whether a search of b queries (dimension d, top k) over n rows should take the BLAS path."""
    if b < MIN_BATCH or n < MIN_ROWS:
        return False
    return b >= crossover(d, k)


def _best_ms(fn, repeats: int) -> float:
    """Minimum of `repeats` timed calls after one untimed: load on a shared host only ever adds time."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def tune(d: int, k: int, rows: int = TUNE_ROWS, batches: tuple[int, ...] = TUNE_BATCHES,
         repeats: int = TUNE_REPEATS, seed: int = 0) -> int:
    """Measure the crossover of (d, k) on `rows` random unit rows: the smallest batch of `batches` from which
    BLAS is faster than the fused kernels at it and at every larger batch measured; NEVER if none.
    Both paths give the same answers, so this only decides speed."""
    from streamrec.engine.cpu.topk import NumbaTopK
    from streamrec.engine.retrieval.topk import Filters

    rng = np.random.default_rng([seed, d])
    items = rng.standard_normal((rows, d), dtype=np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    fused, blas = NumbaTopK(fused_max_batch=None), NumbaTopK(fused_max_batch=0)
    wins = []
    for b in batches:
        q = rng.standard_normal((b, d), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        f = Filters.none(b, rows)
        t_fused = _best_ms(lambda: fused.search(q, items, k, f), repeats)
        t_blas = _best_ms(lambda: blas.search(q, items, k, f), repeats)
        wins.append(t_blas < t_fused)
    best = NEVER
    for b, won in zip(reversed(batches), reversed(wins)):
        if not won:
            break
        best = b
    return best
