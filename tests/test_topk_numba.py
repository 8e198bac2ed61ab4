"""NumbaTopK on every code path: the contract every backend meets (tests/topk_contract.py), then sizes that
cross its part, block and chunk boundaries, long exclude lists, large k, threads, against NumpyTopK and the
brute-force reference."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.engine.retrieval.topk import Filters, HostBackend, NumpyTopK, TopKBackend, get_backend

numba_topk = pytest.importorskip("streamrec.engine.cpu.topk")
NumbaTopK = numba_topk.NumbaTopK

from topk_contract import (  # noqa: E402  (tests dir is on sys.path)
    TopKContract,
    assert_matches,
    assert_same,
    random_case,
    reference,
    unit_rows,
)

# Every scoring path, with small blocks so that odd sizes cross part, row-block, query-block and BLAS-chunk
# boundaries: min_parallel_work=0 and min_part_rows=5 give parallel calls with several parts per query
# even for a few hundred rows ("default" runs such small inputs in the calling thread).
# "blas" / "blas-threads" force the BLAS path with its selection in the calling thread / across Numba's threads;
# "auto" sends every batch through the measured dispatch (its table is forced per test below, so the path it
# takes does not depend on the CPU running the tests).
PATHS = {
    "sum": dict(fused_max_batch=None, bcast_min_batch=1 << 30, min_part_rows=5, min_parallel_work=0, query_block=7),
    "bcast": dict(fused_max_batch=None, bcast_min_batch=0, min_part_rows=5, min_parallel_work=0, query_block=21),
    "blas": dict(fused_max_batch=0, block_bytes=64 * 4 * 3, query_block=5, blas_parallel_select=False),
    "blas-threads": dict(fused_max_batch=0, block_bytes=64 * 4 * 3, query_block=5, blas_parallel_select=True),
    # threads split the queries, not the items (taken where Numba has >= 2 threads and the block >= 4 queries)
    "groups": dict(fused_max_batch=None, bcast_min_batch=0, min_part_rows=5, min_parallel_work=0, query_block=37,
                   group_min_width=1),
    "default": dict(),
}


def backend(path: str) -> NumbaTopK:
    return NumbaTopK(**PATHS[path])


class TestNumbaContract(TopKContract):
    path = "default"

    def backend(self) -> NumbaTopK:
        return backend(self.path)


class TestNumbaContractSum(TestNumbaContract):
    path = "sum"


class TestNumbaContractBcast(TestNumbaContract):
    path = "bcast"


class TestNumbaContractBlas(TestNumbaContract):
    path = "blas"


class TestNumbaContractBlasThreads(TestNumbaContract):
    path = "blas-threads"


class TestNumbaContractGroups(TestNumbaContract):
    path = "groups"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(
    "b,n,d,k",
    [(1, 1, 3, 1), (3, 37, 5, 7), (5, 203, 8, 40), (2, 100, 7, 150), (9, 2053, 16, 10), (17, 515, 67, 64)],
)
def test_matches_reference(path: str, b: int, n: int, d: int, k: int) -> None:
    rng = np.random.default_rng([b, n, d, k])
    case = random_case(rng, b, n, d)
    f = case.filters()
    got = backend(path).search(case.queries, case.items, k, f)
    assert_matches(*got, reference(case, k), k)
    assert_same(got, NumpyTopK().search(case.queries, case.items, k, f))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("filtered", [False, True])
def test_duplicate_rows_tie_exactly(path: str, filtered: bool) -> None:
    # Rows copied from 6 vectors: whole groups of bit-identical scores straddle the k-th place.
    rng = np.random.default_rng(17)
    case = random_case(rng, 11, 2500, 24, pool=6, filtered=filtered)
    f = case.filters()
    ref = reference(case, 700)
    for k in (5, 700):
        got = backend(path).search(case.queries, case.items, k, f)
        assert_same(got, NumpyTopK().search(case.queries, case.items, k, f))
        for qi, (ref_rows, _) in enumerate(ref):
            assert got[0][qi, : min(k, len(ref_rows))].tolist() == ref_rows[:k]


@pytest.mark.parametrize("path", list(PATHS))
def test_large_k(path: str) -> None:
    rng = np.random.default_rng(5)
    for n in (5003, 300):  # k < N and k > N
        case = random_case(rng, 3, n, 12)
        f = case.filters()
        got = backend(path).search(case.queries, case.items, 4096, f)
        assert_same(got, NumpyTopK().search(case.queries, case.items, 4096, f))
        if n == 300:
            assert_matches(*got, reference(case, 4096), 4096)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("parallel_prep", [False, True])
def test_long_and_short_exclude_lists(path: str, parallel_prep: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Long lists (>= max(256, N/512) entries) become bitmaps, short ones are sorted and binary-searched.
    if parallel_prep:  # normally only from 1M exclude entries
        monkeypatch.setattr(numba_topk, "_PARALLEL_PREP_ROWS", 0)
    rng = np.random.default_rng(21)
    n = 3000
    q, items = unit_rows(rng, 5, 8), unit_rows(rng, n, 8)
    top = np.argsort(-(q @ items.T), axis=1)  # exclude each query's own best rows, so it matters
    excl = [
        np.concatenate([top[0, :1500], top[0, :40], [-1, n, n + 7]]).tolist(),  # long, duplicates, out of range
        rng.permutation(top[1, :300]).tolist(),  # long, unsorted
        top[2, :200].tolist()[::-1] + [n + 1, -5] * 20,  # short (240 entries), unsorted, out of range
        [],
        list(range(n)),  # everything
    ]
    f = Filters.build(rng.random(n) > 0.05, excl)
    for k in (10, 2000):
        got = backend(path).search(q, items, k, f)
        assert_same(got, NumpyTopK().search(q, items, k, f))
        for qi, rows in enumerate(excl):
            assert not set(got[0][qi][got[0][qi] >= 0].tolist()) & set(rows)
    assert (got[0][4] == -1).all()
    sc = (q @ items.T).astype(np.float32)
    assert_same(backend(path).rank_scores(sc, 50, f), NumpyTopK().rank_scores(sc, 50, f))


@pytest.mark.parametrize("path", ["sum", "default"])
def test_rank_scores(path: str) -> None:
    rng = np.random.default_rng(11)
    b, n, k = 4, 3001, 40
    case = random_case(rng, b, n, 2)
    f = case.filters()
    # Small integers: ties everywhere, so rows are compared exactly; -0.0 must tie with 0.0.
    shared = rng.integers(-2, 4, size=n).astype(np.float32)
    shared[shared == 0] = np.where(rng.random(int((shared == 0).sum())) < 0.5, -0.0, 0.0)
    shared[[3, 8, 900]] = -np.inf
    shared[[5, 2000]] = np.nan
    per_query = rng.integers(0, 3, size=(b, n)).astype(np.float32)
    per_query[:, ::7] = np.nan
    for scores in (shared, np.tile(shared, (b, 1)), per_query):
        for kk in (k, 1, 5000):
            got = backend(path).rank_scores(scores, kk, f)
            assert_same(got, NumpyTopK().rank_scores(scores, kk, f))
    ref = reference(case, k, [shared.tolist()] * b)
    got = backend(path).rank_scores(shared, k, f)
    assert got[0].tolist() == [r + [-1] * (k - len(r)) for r, _ in ref]


def test_scores_are_exact_on_every_path() -> None:
    """float32 of the float64 dot, whatever the path: the float32 pass only gates."""
    rng = np.random.default_rng(3)
    case = random_case(rng, 19, 1500, 64)
    case.items *= rng.uniform(0.5, 2.0, size=(1500, 1)).astype(np.float32)  # norms up to 2: still exact
    f = case.filters()
    want = NumpyTopK().search(case.queries, case.items, 30, f)
    for path in PATHS:
        assert_same(backend(path).search(case.queries, case.items, 30, f), want)
    for qi in range(19):  # a query alone gets exactly what it gets inside the batch
        sl = slice(qi, qi + 1)
        one = Filters.build(case.valid, case.excl[sl], case.item_cats, case.inc[sl], case.exc[sl])
        rows, scores = NumbaTopK().search(case.queries[qi : qi + 1], case.items, 30, one)
        assert (rows[0] == want[0][qi]).all() and (scores[0] == want[1][qi]).all()


def test_constructor_validation() -> None:
    for bad in (dict(query_block=0), dict(block_bytes=0), dict(parts_per_thread=0), dict(min_part_rows=0),
                dict(bcast_min_batch=-1), dict(fused_max_batch=-1), dict(fused_max_batch="fused"),
                dict(blas_parallel_select="yes"), dict(blas_parallel_min_batch=0)):
        with pytest.raises(ValueError):
            NumbaTopK(**bad)


def test_concurrent_calls_from_threads() -> None:
    rng = np.random.default_rng(8)
    case = random_case(rng, 6, 3000, 32)
    f = case.filters()
    want = NumpyTopK().search(case.queries, case.items, 12, f)
    results: list[tuple[np.ndarray, np.ndarray]] = []

    def work(path: str) -> None:
        for _ in range(3):
            results.append(backend(path).search(case.queries, case.items, 12, f))

    threads = [threading.Thread(target=work, args=(p,)) for p in ("sum", "bcast", "blas", "blas-threads", "default")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 15
    for got in results:
        assert_same(got, want)


def test_registry_and_warmup() -> None:
    numba_topk.warmup()
    for name in ("numba", "auto"):
        b = get_backend(name)
        assert isinstance(b, NumbaTopK) and isinstance(b, TopKBackend) and b.name == "numba"
        assert isinstance(b, HostBackend)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(0, 6),
    n=st.integers(0, 60),
    d=st.integers(1, 10),
    k=st.integers(1, 70),
    path=st.sampled_from(list(PATHS)),
    pool=st.one_of(st.none(), st.integers(1, 6)),
    filtered=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_reference(
    b: int, n: int, d: int, k: int, path: str, pool: int | None, filtered: bool, seed: int
) -> None:
    case = random_case(np.random.default_rng(seed), b, n, d, pool=pool, filtered=filtered)
    f = case.filters()
    got = backend(path).search(case.queries, case.items, k, f)
    assert_matches(*got, reference(case, k), k)
    assert_same(got, NumpyTopK().search(case.queries, case.items, k, f))
    scores = np.random.default_rng(seed).integers(0, 4, size=(b, n)).astype(np.float32)
    assert_same(backend(path).rank_scores(scores, k, f), NumpyTopK().rank_scores(scores, k, f))
