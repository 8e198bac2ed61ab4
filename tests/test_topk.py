"""NumpyTopK: the contract every backend meets (tests/topk_contract.py) at several chunk sizes, and what is
NumPy's own: chunking never changes the answer, Filters construction, the registry."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from topk_contract import TopKContract, assert_matches, dot, random_case, reference

from streamrec.engine.retrieval.topk import (
    BACKENDS,
    Filters,
    HostBackend,
    NumpyTopK,
    TopKBackend,
    category_bitset,
    get_backend,
    words_for,
)


class TestNumpyContract(TopKContract):
    chunk_rows = 65536  # the default: one chunk for every case here

    def backend(self) -> NumpyTopK:
        return NumpyTopK(chunk_rows=self.chunk_rows)


# Chunks smaller than k and not dividing N: candidates are merged across chunks, tie groups straddle them.
class TestNumpyContractChunk1(TestNumpyContract):
    chunk_rows = 1


class TestNumpyContractChunk3(TestNumpyContract):
    chunk_rows = 3


class TestNumpyContractChunk7(TestNumpyContract):
    chunk_rows = 7


def test_scores_independent_of_chunking() -> None:
    rng = np.random.default_rng(3)
    case = random_case(rng, 8, 300, 32)
    f = case.filters()
    want_rows, want = NumpyTopK().search(case.queries, case.items, 30, f)
    for backend in (NumpyTopK(chunk_rows=1), NumpyTopK(chunk_rows=7), NumpyTopK(max_chunk_bytes=100)):
        rows, scores = backend.search(case.queries, case.items, 30, f)
        assert (rows == want_rows).all() and (scores == want).all()
    # Scores are float32 of the float64 dot product.
    for qi in range(8):
        live = want_rows[qi] >= 0
        exact = [np.float32(dot(case.queries[qi], case.items[r])) for r in want_rows[qi][live]]
        assert want[qi][live].tolist() == exact


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


def test_filters_validation() -> None:
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
    assert isinstance(backend, HostBackend)  # sync is a no-op, search_synced is search
    assert get_backend("numpy", gpu_storage="float16").name == "numpy"  # host backends ignore the GPU dtype
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
