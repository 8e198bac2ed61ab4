"""What every top-k backend must do, written once, and the brute-force reference it is checked against.

`TopKContract` is a mixin in the style of implicit's RecommenderBaseTestMixin: it has no Test prefix, so pytest
does not collect it here; a test module subclasses it (`class TestNumpyContract(TopKContract)`) and overrides
`backend()`. The reference is written the obvious way (Python loops, sets, sorted()), so it shares no code
with any backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from streamrec.engine.retrieval.topk import Filters, NumpyTopK, TopKBackend

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


def assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    """Exactly the same answer: same rows, same float32 scores, same padding."""
    assert got[0].dtype == np.int64 and got[1].dtype == np.float32
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def padded_rows(ref: list[tuple[list[int], dict[int, float]]], k: int) -> list[list[int]]:
    return [rows + [-1] * (k - len(rows)) for rows, _ in ref]


class TopKContract:
    """The behaviour every TopKBackend must have. Subclasses override `backend()` (a fresh, configured backend).

    bit_exact: search() returns NumpyTopK's float32 scores bit for bit (float64-accumulated dots); a backend
    accumulating in float32 (the GPU) sets it False and is held to the reference within TIE_TOL instead.
    rank_scores is exact on every backend: the scores are given.
    """

    bit_exact = True

    def backend(self) -> TopKBackend:
        raise NotImplementedError("a TopKContract subclass returns the backend under test here")

    def check_search(self, got: tuple[np.ndarray, np.ndarray], case: Case, k: int, f: Filters) -> None:
        assert_matches(*got, reference(case, k), k)
        if self.bit_exact:
            assert_same(got, NumpyTopK().search(case.queries, case.items, k, f))

    def test_implements_the_protocol(self) -> None:
        backend = self.backend()
        assert isinstance(backend, TopKBackend)
        assert isinstance(backend.name, str) and backend.name

    def test_warmup_then_search(self) -> None:
        backend = self.backend()
        assert backend.warmup() is None
        case = random_case(np.random.default_rng(6), 2, 30, 4)
        f = case.filters()
        self.check_search(backend.search(case.queries, case.items, 5, f), case, 5, f)

    @pytest.mark.parametrize(
        "b,n,d,k",
        [(1, 1, 3, 1), (3, 20, 4, 5), (4, 50, 8, 10), (5, 33, 5, 40), (2, 64, 16, 64), (6, 71, 3, 3)],
    )
    def test_matches_reference(self, b: int, n: int, d: int, k: int) -> None:
        case = random_case(np.random.default_rng([b, n, d, k]), b, n, d)
        f = case.filters()
        self.check_search(self.backend().search(case.queries, case.items, k, f), case, k, f)

    def test_exact_ties_break_by_row(self) -> None:
        case = random_case(np.random.default_rng(7), 4, 100, 6, pool=5)
        distinct = sorted({dot(q, v) for q in case.queries for v in case.items})
        assert min(np.diff(distinct)) > TIE_TOL  # so every tie below is bit-exact, none is "near"
        backend = self.backend()
        f = case.filters()
        rows, scores = backend.search(case.queries, case.items, 25, f)
        ref = reference(case, 25)
        assert_matches(rows, scores, ref, 25)
        assert rows.tolist() == padded_rows(ref, 25)
        # Unfiltered as well, where whole tie groups straddle the k-th place.
        rows, _ = backend.search(case.queries, case.items, 17, Filters.none(4, 100))
        plain = Case(case.queries, case.items, [True] * 100, [[]] * 4, [[]] * 100, [[]] * 4, [[]] * 4)
        assert rows.tolist() == [r for r, _ in reference(plain, 17)]

    def test_query_alone_gets_what_it_gets_in_the_batch(self) -> None:
        case = random_case(np.random.default_rng(3), 5, 120, 8)
        backend = self.backend()
        want_rows, want = backend.search(case.queries, case.items, 30, case.filters())
        for qi in range(5):
            sl = slice(qi, qi + 1)
            one = Filters.build(case.valid, case.excl[sl], case.item_cats, case.inc[sl], case.exc[sl])
            rows, scores = backend.search(case.queries[sl], case.items, 30, one)
            assert (rows[0] == want_rows[qi]).all() and (scores[0] == want[qi]).all()

    def test_k_larger_than_n_pads(self) -> None:
        rng = np.random.default_rng(1)
        q, items = unit_rows(rng, 2, 4), unit_rows(rng, 3, 4)
        rows, scores = self.backend().search(q, items, 5, Filters.none(2, 3))
        assert sorted(rows[0, :3].tolist()) == [0, 1, 2] and (rows[:, 3:] == -1).all()
        assert (scores[:, 3:] == -np.inf).all() and np.isfinite(scores[:, :3]).all()

    def test_all_excluded(self) -> None:
        rng = np.random.default_rng(2)
        q, items = unit_rows(rng, 3, 4), unit_rows(rng, 10, 4)
        backend = self.backend()
        for f in (
            Filters.build([False] * 10, [[]] * 3),  # every row deleted
            Filters.build([True] * 10, [list(range(10))] * 3),  # every row excluded explicitly
            Filters.build([True] * 10, [[]] * 3, [[1]] * 10, [[200]] * 3),  # include a category no item has
            Filters.build([True] * 10, [[]] * 3, [[1, 70]] * 10, None, [[70]] * 3),  # exclude a category all have
        ):
            rows, scores = backend.search(q, items, 4, f)
            assert (rows == -1).all() and (scores == -np.inf).all()

    @pytest.mark.parametrize("b,n", [(0, 0), (0, 5), (3, 0)])
    def test_empty_shapes(self, b: int, n: int) -> None:
        rng = np.random.default_rng(0)
        backend = self.backend()
        queries, items = unit_rows(rng, b, 4), unit_rows(rng, n, 4)
        rows, scores = backend.search(queries, items, 3, Filters.none(b, n))
        assert rows.shape == scores.shape == (b, 3) and rows.dtype == np.int64 and scores.dtype == np.float32
        assert (rows == -1).all() and (scores == -np.inf).all()
        for s in (np.zeros(n, np.float32), np.zeros((b, n), np.float32)):
            rows, scores = backend.rank_scores(s, 2, Filters.none(b, n))
            assert rows.shape == (b, 2) and (rows == -1).all() and (scores == -np.inf).all()
        backend.sync(items, np.ones(n, np.bool_), np.zeros((n, 1), np.uint64), n, np.zeros(0, np.int64))
        rows, scores = backend.search_synced(queries, items, 3, Filters.none(b, n))
        assert rows.shape == (b, 3) and (rows == -1).all() and (scores == -np.inf).all()

    def test_categories_across_word_boundary(self) -> None:
        rng = np.random.default_rng(9)
        n = 40
        q, items = unit_rows(rng, 4, 6), unit_rows(rng, n, 6)
        item_cats = [[63] if r % 4 == 0 else [64] if r % 4 == 1 else [127, 0] if r % 4 == 2 else [] for r in range(n)]
        f = Filters.build([True] * n, [[]] * 4, item_cats, [[64], [63, 127], [], []], [[], [0], [64, 63], [127]])
        rows, scores = self.backend().search(q, items, n, f)
        case = Case(q, items, [True] * n, [[]] * 4, item_cats, [[64], [63, 127], [], []], [[], [0], [64, 63], [127]])
        self.check_search((rows, scores), case, n, f)
        allowed = [{1}, {0}, {2, 3}, {0, 1, 3}]  # r % 4 classes each query may return
        for qi, classes in enumerate(allowed):
            live = rows[qi][rows[qi] >= 0]
            assert sorted(live.tolist()) == [r for r in range(n) if r % 4 in classes]

    def test_rank_scores_shared_and_per_query(self) -> None:
        rng = np.random.default_rng(11)
        b, n = 4, 90
        case = random_case(rng, b, n, 2)
        f = case.filters()
        backend = self.backend()
        # Small integers: many exact ties, so rows are compared exactly everywhere; -0.0 must tie with 0.0.
        shared = rng.integers(-1, 5, size=n).astype(np.float32)
        shared[[3, 8]] = -np.inf  # pre-masked by the caller
        shared[5] = np.nan
        shared[[9, 20]] = -0.0
        per_query = rng.integers(-3, 4, size=(b, n)).astype(np.float32)
        per_query[:, ::7] = np.nan
        for k in (12, 1, n + 5):
            rows, scores = backend.rank_scores(shared, k, f)
            ref = reference(case, k, [shared.tolist()] * b)
            assert_matches(rows, scores, ref, k)
            assert rows.tolist() == padded_rows(ref, k)
            assert_same((rows, scores), NumpyTopK().rank_scores(shared, k, f))
            # [N] shared by the batch is the same as its [B, N] tile.
            assert_same(backend.rank_scores(np.tile(shared, (b, 1)), k, f), (rows, scores))
            rows, scores = backend.rank_scores(per_query, k, f)
            ref = reference(case, k, per_query.tolist())
            assert_matches(rows, scores, ref, k)
            assert rows.tolist() == padded_rows(ref, k)
            assert_same((rows, scores), NumpyTopK().rank_scores(per_query, k, f))

    def test_input_layouts_and_dtypes(self) -> None:
        rng = np.random.default_rng(4)
        q, items = unit_rows(rng, 5, 9), unit_rows(rng, 120, 9)
        f = Filters.none(5, 120)
        backend = self.backend()
        want = backend.search(q, items, 7, f)
        assert_same(backend.search(np.asfortranarray(q).astype(np.float64), np.asfortranarray(items), 7, f), want)
        assert_same(backend.search(q, items[:, :], 7.0, f), want)

    def test_sync_then_search_synced_is_search(self) -> None:
        """The Retriever's path: sync the catalog (with spare capacity), then search_synced its first rows."""
        rng = np.random.default_rng(13)
        capacity, n, k = 90, 60, 12
        case = random_case(rng, 3, capacity, 6)
        every = case.filters()
        vectors, live, cats = case.items.copy(), every.valid.copy(), every.item_cats.copy()
        backend = self.backend()

        def check(m: int) -> None:  # filters for rows [0, m), as the Retriever builds them
            f = Filters(live[:m].copy(), every.exclude_indptr, every.exclude_rows, cats[:m], every.include_cats,
                        every.exclude_cats)
            want = backend.search(case.queries, vectors[:m], k, f)
            assert_same(backend.search_synced(case.queries, vectors[:m], k, f), want)

        check(n)  # before any sync: a plain search
        backend.sync(vectors, live, cats, n, np.zeros(0, np.int64))
        check(n)
        check(n - 25)  # only the first filters.num_items rows
        # In place: a row moved to query 0's top, one deleted, one recategorised; and 20 new rows.
        vectors[3] = case.queries[0]
        live[17] = False
        cats[30] = cats[31]
        backend.sync(vectors, live, cats, n + 20, np.array([3, 17, 30], np.int64))
        check(n + 20)
        check(n)

    def test_validation_errors(self) -> None:
        backend = self.backend()
        q, items = np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)
        for search in (backend.search, backend.search_synced):
            with pytest.raises(ValueError):
                search(q, items, 0, Filters.none(2, 4))
            with pytest.raises(ValueError):  # filters for another batch size
                search(q, items, 1, Filters.none(3, 4))
            with pytest.raises(ValueError):
                search(q, np.ones((4, 2), np.float32), 1, Filters.none(2, 4))
        with pytest.raises(ValueError):
            backend.rank_scores(np.ones(4, np.float32), 0, Filters.none(2, 4))
        with pytest.raises(ValueError):  # filters for another number of items
            backend.rank_scores(np.ones((2, 5), np.float32), 1, Filters.none(2, 4))
        with pytest.raises(ValueError):
            backend.rank_scores(np.ones((2, 2, 2), np.float32), 1, Filters.none(2, 2))
