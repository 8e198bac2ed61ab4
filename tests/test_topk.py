"""NumpyTopK against a brute-force reference written the obvious way (Python loops, sets, sorted())."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.engine.retrieval.topk import (
    BACKENDS,
    Filters,
    NumpyTopK,
    TopKBackend,
    category_bitset,
    get_backend,
    words_for,
)

# Categories on both sides of the 64-bit word boundary, so bitsets need W = 2.
CATS = [0, 1, 5, 63, 64, 65, 100, 127]
# float32 rounding of a unit-vector dot product is ~1e-7; scores further apart than this are "distinct".
TIE_TOL = 1e-5


@dataclass
class Case:
    queries: np.ndarray  # float32 [B, d]
    items: np.ndarray  # float32 [N, d]
    valid: list[bool]
    excl: list[list[int]]  # per query, may hold duplicates and out-of-range rows
    item_cats: list[list[int]]
    inc: list[list[int]]
    exc: list[list[int]]

    def filters(self) -> Filters:
        return Filters.build(self.valid, self.excl, self.item_cats, self.inc, self.exc)


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_case(
    rng: np.random.Generator, b: int, n: int, d: int, pool: int | None = None, filtered: bool = True
) -> Case:
    """Random unit vectors; with pool, items are copies of `pool` distinct vectors (bit-identical ties)."""
    if pool is None:
        items = unit_rows(rng, n, d)
    else:
        items = unit_rows(rng, pool, d)[rng.integers(0, pool, size=n)]
    pick = lambda m, hi: [CATS[i] for i in rng.choice(len(CATS), size=m, replace=False)] if hi else []  # noqa: E731
    return Case(
        queries=unit_rows(rng, b, d),
        items=items,
        valid=[bool(v) for v in rng.random(n) < (0.85 if filtered else 1.0)],
        # Rows in [-2, N+2): duplicates and out-of-range ids that must be ignored.
        excl=[[int(r) for r in rng.integers(-2, n + 2, size=rng.integers(0, n // 2 + 2))] if filtered else [] for _ in range(b)],
        item_cats=[pick(int(rng.integers(0, 3)), filtered) for _ in range(n)],
        inc=[pick(int(rng.integers(1, 4)), filtered and rng.random() < 0.4) for _ in range(b)],
        exc=[pick(int(rng.integers(1, 3)), filtered and rng.random() < 0.4) for _ in range(b)],
    )


def dot(a: np.ndarray, b: np.ndarray) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def reference(case: Case, k: int, scores: list[list[float]] | None = None) -> list[tuple[list[int], dict[int, float]]]:
    """Per query: (top-k rows by (-score, row), score of every allowed row)."""
    out = []
    for qi in range(len(case.excl)):
        excluded = set(case.excl[qi])
        inc, exc = set(case.inc[qi]), set(case.exc[qi])
        allowed: dict[int, float] = {}
        for r in range(len(case.valid)):
            cats = set(case.item_cats[r])
            if not case.valid[r] or r in excluded or (inc and not cats & inc) or cats & exc:
                continue
            s = scores[qi][r] if scores is not None else dot(case.queries[qi], case.items[r])
            if math.isnan(s) or s == -math.inf:
                continue
            allowed[r] = s
        ranked = sorted(allowed, key=lambda r: (-allowed[r], r))
        out.append((ranked[:k], allowed))
    return out


def assert_matches(rows: np.ndarray, scores: np.ndarray, ref: list[tuple[list[int], dict[int, float]]], k: int) -> None:
    assert rows.shape == scores.shape == (len(ref), k)
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    for qi, (ref_rows, allowed) in enumerate(ref):
        n = len(ref_rows)
        got_rows, got = rows[qi], scores[qi]
        # Padding is exact: the number of allowed rows does not depend on float rounding.
        assert (got_rows[n:] == -1).all() and (got[n:] == -np.inf).all()
        assert len(set(got_rows[:n].tolist())) == n and all(int(r) in allowed for r in got_rows[:n])
        # Internally consistent with the returned float32 scores: (-score, row) strictly increasing.
        for i in range(n - 1):
            assert got[i] > got[i + 1] or (got[i] == got[i + 1] and got_rows[i] < got_rows[i + 1])
        np.testing.assert_allclose(got[:n], [allowed[r] for r in ref_rows], atol=TIE_TOL, rtol=0)
        np.testing.assert_allclose(got[:n], [allowed[int(r)] for r in got_rows[:n]], atol=TIE_TOL, rtol=0)
        for i, r in enumerate(ref_rows):
            # Rows must match exactly unless some other allowed row is a near (not bit-exact) tie.
            near = [s for o, s in allowed.items() if o != r and abs(s - allowed[r]) <= TIE_TOL]
            if all(s == allowed[r] for s in near):
                assert got_rows[i] == r, f"query {qi} place {i}: got row {got_rows[i]}, want {r}"


@pytest.mark.parametrize("chunk", [1, 7, 65536])
@pytest.mark.parametrize(
    "b,n,d,k",
    [(1, 1, 3, 1), (3, 20, 4, 5), (4, 50, 8, 10), (5, 33, 5, 40), (2, 64, 16, 64), (6, 71, 3, 3)],
)
def test_matches_reference(b: int, n: int, d: int, k: int, chunk: int) -> None:
    rng = np.random.default_rng([b, n, d, k])
    case = random_case(rng, b, n, d)
    rows, scores = NumpyTopK(chunk_rows=chunk).search(case.queries, case.items, k, case.filters())
    assert_matches(rows, scores, reference(case, k), k)


@pytest.mark.parametrize("chunk", [1, 3, 7, 65536])
def test_exact_ties_break_by_row(chunk: int) -> None:
    rng = np.random.default_rng(7)
    case = random_case(rng, 4, 60, 6, pool=5)
    distinct = sorted({dot(q, v) for q in case.queries for v in case.items})
    assert min(np.diff(distinct)) > TIE_TOL  # so every tie below is bit-exact, none is "near"
    f = case.filters()
    rows, scores = NumpyTopK(chunk_rows=chunk).search(case.queries, case.items, 25, f)
    ref = reference(case, 25)
    assert_matches(rows, scores, ref, 25)
    for qi, (ref_rows, _) in enumerate(ref):
        assert rows[qi, : len(ref_rows)].tolist() == ref_rows
    # Unfiltered as well, where whole tie groups straddle the k-th place.
    rows, _ = NumpyTopK(chunk_rows=chunk).search(case.queries, case.items, 17, Filters.none(4, 60))
    case.valid, case.excl, case.item_cats = [True] * 60, [[]] * 4, [[]] * 60
    case.inc, case.exc = [[]] * 4, [[]] * 4
    assert rows.tolist() == [r for r, _ in reference(case, 17)]


def test_scores_independent_of_chunking_and_batch() -> None:
    rng = np.random.default_rng(3)
    case = random_case(rng, 8, 300, 32)
    f = case.filters()
    want_rows, want = NumpyTopK().search(case.queries, case.items, 30, f)
    for backend in (NumpyTopK(chunk_rows=1), NumpyTopK(chunk_rows=7), NumpyTopK(max_chunk_bytes=100)):
        rows, scores = backend.search(case.queries, case.items, 30, f)
        assert (rows == want_rows).all() and (scores == want).all()
    for qi in range(8):  # a query alone gets exactly what it gets inside the batch
        one = Filters.build(case.valid, case.excl[qi : qi + 1], case.item_cats, case.inc[qi : qi + 1], case.exc[qi : qi + 1])
        rows, scores = NumpyTopK().search(case.queries[qi : qi + 1], case.items, 30, one)
        assert (rows[0] == want_rows[qi]).all() and (scores[0] == want[qi]).all()
    # Scores are float32 of the float64 dot product.
    for qi in range(8):
        live = want_rows[qi] >= 0
        exact = [np.float32(dot(case.queries[qi], case.items[r])) for r in want_rows[qi][live]]
        assert want[qi][live].tolist() == exact


def test_k_larger_than_n_pads() -> None:
    rng = np.random.default_rng(1)
    q, items = unit_rows(rng, 2, 4), unit_rows(rng, 3, 4)
    rows, scores = NumpyTopK().search(q, items, 5, Filters.none(2, 3))
    assert sorted(rows[0, :3].tolist()) == [0, 1, 2] and (rows[:, 3:] == -1).all()
    assert (scores[:, 3:] == -np.inf).all() and np.isfinite(scores[:, :3]).all()


def test_all_excluded() -> None:
    rng = np.random.default_rng(2)
    q, items = unit_rows(rng, 3, 4), unit_rows(rng, 10, 4)
    everyone = [list(range(10))] * 3
    cases = [
        Filters.build([False] * 10, [[]] * 3),  # every row deleted
        Filters.build([True] * 10, everyone),  # every row excluded explicitly
        Filters.build([True] * 10, [[]] * 3, [[1]] * 10, [[200]] * 3),  # include a category no item has
        Filters.build([True] * 10, [[]] * 3, [[1, 70]] * 10, None, [[70]] * 3),  # exclude a category all have
    ]
    for f in cases:
        for chunk in (3, 65536):
            rows, scores = NumpyTopK(chunk_rows=chunk).search(q, items, 4, f)
            assert (rows == -1).all() and (scores == -np.inf).all()


@pytest.mark.parametrize("b,n", [(0, 0), (0, 5), (3, 0)])
def test_empty_shapes(b: int, n: int) -> None:
    rng = np.random.default_rng(0)
    rows, scores = NumpyTopK().search(unit_rows(rng, b, 4), unit_rows(rng, n, 4), 3, Filters.none(b, n))
    assert rows.shape == scores.shape == (b, 3) and rows.dtype == np.int64 and scores.dtype == np.float32
    assert (rows == -1).all() and (scores == -np.inf).all()
    rows, scores = NumpyTopK().rank_scores(np.zeros(n, np.float32), 2, Filters.none(b, n))
    assert rows.shape == (b, 2) and (rows == -1).all()


@pytest.mark.parametrize("chunk", [1, 4, 65536])
def test_rank_scores(chunk: int) -> None:
    rng = np.random.default_rng(11)
    b, n, k = 4, 37, 12
    case = random_case(rng, b, n, 2)
    # Small integer scores: many exact ties, so rows are compared exactly everywhere.
    shared = rng.integers(0, 6, size=n).astype(np.float32)
    shared[[3, 8]] = -np.inf  # pre-masked by the caller
    shared[5] = np.nan
    backend = NumpyTopK(chunk_rows=chunk)
    f = case.filters()
    rows, scores = backend.rank_scores(shared, k, f)
    ref = reference(case, k, [shared.tolist()] * b)
    assert_matches(rows, scores, ref, k)
    assert rows.tolist() == [r + [-1] * (k - len(r)) for r, _ in ref]
    # [N] broadcast is the same as the [B, N] tile; per-query scores are honoured.
    tiled = np.tile(shared, (b, 1))
    assert (backend.rank_scores(tiled, k, f)[0] == rows).all()
    per_query = rng.integers(0, 4, size=(b, n)).astype(np.float32)
    rows, scores = backend.rank_scores(per_query, k, f)
    ref = reference(case, k, per_query.tolist())
    assert rows.tolist() == [r + [-1] * (k - len(r)) for r, _ in ref]
    assert_matches(rows, scores, ref, k)


def test_filters_build_bitsets_and_widening() -> None:
    f = Filters.build([True, True, False], [[2, 2], [], [0]], [[0, 64], [127], []], [[64], [], []], [[], [1], []])
    assert f.words == 2 and f.item_cats.dtype == np.uint64 and f.item_cats.shape == (3, 2)
    assert f.item_cats[0].tolist() == [1, 1] and f.item_cats[1].tolist() == [0, 1 << 63]
    assert f.include_cats.tolist() == [[0, 1], [0, 0], [0, 0]] and f.exclude_cats[1].tolist() == [2, 0]
    assert f.exclude_indptr.tolist() == [0, 2, 2, 3] and f.exclude_rows.tolist() == [2, 2, 0]
    assert (f.num_queries, f.num_items) == (3, 3)

    # A bitset item_cats array is widened when a query names a higher category, never truncated.
    narrow = np.array([[1], [2]], dtype=np.uint64)
    g = Filters.build([True, True], [[]], narrow, [[150]])
    assert g.words == 3 and g.item_cats[:, 0].tolist() == [1, 2] and (g.item_cats[:, 1:] == 0).all()
    rows, _ = NumpyTopK().search(np.ones((1, 2), np.float32) / np.sqrt(2), np.eye(2, dtype=np.float32), 2, g)
    assert (rows == -1).all()

    assert category_bitset([0, 65, 65, 127], 2).tolist() == [1, 2 | (1 << 63)]
    assert category_bitset([], 0).shape == (0,)
    assert (words_for(0), words_for(1), words_for(64), words_for(65)) == (0, 1, 1, 2)
    with pytest.raises(ValueError):
        category_bitset([128], 2)
    with pytest.raises(ValueError):
        category_bitset([-1], 2)
    with pytest.raises(ValueError):
        Filters.build([True], [[]], [[-3]])


def test_validation_errors() -> None:
    backend = NumpyTopK()
    q, items = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
    with pytest.raises(ValueError):
        backend.search(q, items, 0, Filters.none(2, 4))
    with pytest.raises(ValueError):  # filters for another batch size
        backend.search(q, items, 1, Filters.none(3, 4))
    with pytest.raises(ValueError):
        backend.search(q, np.ones((4, 2), np.float32), 1, Filters.none(2, 4))
    with pytest.raises(ValueError):
        backend.rank_scores(np.ones((2, 5), np.float32), 1, Filters.none(2, 4))
    good = Filters.none(2, 4)
    with pytest.raises(ValueError):  # indptr not ending at nnz
        Filters(good.valid, np.array([0, 1, 1]), np.zeros(0), good.item_cats, good.include_cats, good.exclude_cats)
    with pytest.raises(ValueError):  # category words disagree
        Filters(good.valid, good.exclude_indptr, good.exclude_rows, np.zeros((4, 1)), good.include_cats, good.exclude_cats)


def test_registry() -> None:
    from streamrec.engine.gpu import CUDA_AVAILABLE

    assert set(BACKENDS) >= {"numpy", "numba", "cuda"}
    backend = get_backend("numpy")
    assert isinstance(backend, NumpyTopK) and isinstance(backend, TopKBackend) and backend.name == "numpy"
    assert get_backend("auto").name == ("cuda" if CUDA_AVAILABLE else "numba")  # the fastest available
    with pytest.raises(ValueError, match="numpy"):
        get_backend("tpu")


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(0, 5),
    n=st.integers(0, 40),
    d=st.integers(1, 8),
    k=st.integers(1, 45),
    chunk=st.integers(1, 50),
    pool=st.one_of(st.none(), st.integers(1, 6)),
    filtered=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_reference(
    b: int, n: int, d: int, k: int, chunk: int, pool: int | None, filtered: bool, seed: int
) -> None:
    case = random_case(np.random.default_rng(seed), b, n, d, pool=pool, filtered=filtered)
    f = case.filters()
    rows, scores = NumpyTopK(chunk_rows=chunk).search(case.queries, case.items, k, f)
    assert_matches(rows, scores, reference(case, k), k)
    # Chunking never changes the answer, not even among ties.
    full_rows, full_scores = NumpyTopK().search(case.queries, case.items, k, f)
    assert (rows == full_rows).all() and (scores == full_scores).all()
