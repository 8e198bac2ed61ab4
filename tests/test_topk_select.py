"""The selection under the Numba top-k (engine/cpu/select.py) and the measured choice between its scoring paths
(engine/cpu/dispatch.py): quickselect and compaction on their own, then the dispatch forced each way, so that
CI covers the path its own CPU would not pick."""
from __future__ import annotations

import numpy as np
import pytest

numba_topk = pytest.importorskip("streamrec.engine.cpu.topk")
from streamrec.engine.cpu import dispatch, select  # noqa: E402
from streamrec.engine.retrieval.topk import Filters, NumpyTopK  # noqa: E402

from topk_contract import assert_same, random_case  # noqa: E402  (tests dir is on sys.path)

NumbaTopK = numba_topk.NumbaTopK


@pytest.mark.parametrize("seed", range(6))
def test_nth_partitions_pairs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c in (1, 2, 3, 17, 300):
        hi = [2, 5, 1000][seed % 3]  # few distinct values: long runs of ties
        scores = rng.integers(0, hi, size=c).astype(np.float32)
        for kth in {0, c // 2, c - 1}:
            s, r = scores.copy(), np.arange(c, dtype=np.int64)
            got = select._nth(r, s, c, kth)
            assert got == np.sort(scores)[::-1][kth]
            assert (s[:kth] >= got).all() and (s[kth + 1:] <= got).all()
            assert (scores[r] == s).all() and sorted(r.tolist()) == list(range(c))  # pairs moved together


def test_compact_crowded_band_keeps_best_keys() -> None:
    # Constant scores: no score threshold can shrink the buffer, so it is cut by (-score, row), exactly keff.
    keff = 10
    cap = select.capacity(keff)
    rows = np.random.default_rng(1).permutation(1000)[:cap].astype(np.int64)
    scores = np.full(cap, 0.5, dtype=np.float32)
    flt = numba_topk._Prepared(Filters.none(1, 1000)).kernel_args()
    none = np.zeros((1, 1), dtype=np.float32)
    c, gate = select.compact(rows, scores, cap, 0, keff, np.float32(0.0), np.float32(-np.inf), 0, False, none, none,
                             flt)
    want = np.sort(np.random.default_rng(1).permutation(1000)[:cap])[:keff]
    assert c == keff and gate == np.float32(0.5)
    assert ((rows[:c] & select._ROW) == want).all()


def test_compact_drops_filtered_rows_first() -> None:
    keff = 4
    cap = select.capacity(keff)
    rows = np.arange(cap, dtype=np.int64)
    scores = np.linspace(1, 0, cap, dtype=np.float32)  # row 0 best
    f = Filters.build([True] * cap, [[0, 1, 2]])
    flt = numba_topk._Prepared(f).kernel_args()
    none = np.zeros((1, 1), dtype=np.float32)
    c, gate = select.compact(rows, scores, cap, 0, keff, np.float32(0.0), np.float32(-np.inf), 0, False, none, none,
                             flt)
    assert sorted((rows[:keff] & select._ROW).tolist()) == [3, 4, 5, 6]
    assert c == keff and gate == np.linspace(1, 0, cap, dtype=np.float32)[6]  # the 4th best allowed row's score


def test_k_classes() -> None:
    assert [dispatch.k_class(k) for k in (1, 32, 33, 256, 257, 5000)] == [0, 0, 1, 1, 2, 2]


def test_blas_wins_respects_floors_and_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMREC_TOPK_BLAS_MIN_BATCH", raising=False)
    monkeypatch.setattr(dispatch, "_table", {})
    dispatch.set_crossover(64, 0, 16)
    big = dispatch.MIN_ROWS
    assert not dispatch.blas_wins(dispatch.MIN_BATCH - 1, 64, 10, big)  # small batches: always fused
    assert not dispatch.blas_wins(64, 64, 10, big - 1)  # small catalogs: always fused
    assert not dispatch.blas_wins(15, 64, 10, big) and dispatch.blas_wins(16, 64, 10, big)
    dispatch.set_crossover(64, 1, dispatch.NEVER)
    assert not dispatch.blas_wins(1 << 20, 64, 100, big)
    monkeypatch.setenv("STREAMREC_TOPK_BLAS_MIN_BATCH", "9")
    assert dispatch.blas_wins(9, 64, 100, big) and not dispatch.blas_wins(8, 64, 100, big)


def test_tune_measures_and_fills_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMREC_TOPK_BLAS_MIN_BATCH", raising=False)
    monkeypatch.setattr(dispatch, "_table", {})
    got = dispatch.tune(16, 10, rows=4096, batches=(8, 32), repeats=1)
    assert got in (8, 32, dispatch.NEVER)
    calls = []
    monkeypatch.setattr(dispatch, "tune", lambda d, k: calls.append((d, k)) or 32)
    assert dispatch.crossover(16, 50, measure=True) == 32 and dispatch.crossover(16, 60) == 32  # one per k class
    assert calls == [(16, 100)] and dispatch.table() == {(16, 1): 32}


def test_unmeasured_shape_runs_fused_without_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMREC_TOPK_BLAS_MIN_BATCH", raising=False)
    monkeypatch.setattr(dispatch, "_table", {})
    monkeypatch.setattr(dispatch, "tune", lambda d, k: pytest.fail("measured on the request path"))
    assert dispatch.crossover(40, 10) == dispatch.NEVER and dispatch.table() == {}
    assert not dispatch.blas_wins(1 << 10, 40, 10, 1 << 20)


@pytest.mark.parametrize("crossover", [0, dispatch.NEVER])
def test_auto_dispatch_takes_the_path_the_table_says(crossover: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMREC_TOPK_BLAS_MIN_BATCH", raising=False)
    monkeypatch.setattr(dispatch, "_table", {})
    monkeypatch.setattr(dispatch, "MIN_ROWS", 0)
    monkeypatch.setattr(dispatch, "MIN_BATCH", 1)
    rng = np.random.default_rng(4)
    case = random_case(rng, 12, 3001, 24, filtered=True)
    f = case.filters()
    for kc in range(3):
        dispatch.set_crossover(24, kc, crossover)
    took = []
    real = NumbaTopK._blas_pass
    monkeypatch.setattr(NumbaTopK, "_blas_pass", lambda self, *a: took.append(1) or real(self, *a))
    for k in (7, 100, 1000):
        got = NumbaTopK(min_parallel_work=0, min_part_rows=5).search(case.queries, case.items, k, f)
        assert_same(got, NumpyTopK().search(case.queries, case.items, k, f))
    assert len(took) == (3 if crossover == 0 else 0)
