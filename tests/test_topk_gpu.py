"""CudaTopK and DeviceItemMatrix.

* `gpu`-marked tests need a real CUDA GPU (`.venv/bin/pytest -m gpu tests/test_topk_gpu.py`); they are skipped
  elsewhere. They compare against an exact float64 ranking with a tolerance for float32 accumulation.
  TestCudaContract, the contract every backend meets (tests/topk_contract.py), is one of them.
* The simulator tests run the same kernels on the CPU under Numba's CUDA simulator, on tiny sizes, in a
  subprocess (the simulator must be switched on before numba.cuda is imported), checking the brute-force
  reference of topk_contract.py exactly, ties included: TestCudaContract itself, and the scenarios below.
* A compile test builds the kernels for sm_90 with libNVVM when the machine has it: the simulator runs
  Python, so it cannot catch what the CUDA target fails to type or lower.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import config as numba_config
from topk_contract import TIE_TOL, Case, TopKContract, assert_matches, random_case, reference, unit_rows

from streamrec.engine.gpu import CUDA_AVAILABLE
from streamrec.engine.retrieval.topk import Filters, NumpyTopK, TopKBackend, get_backend

HERE = Path(__file__).resolve().parent
REAL_GPU = CUDA_AVAILABLE and not numba_config.ENABLE_CUDASIM
requires_gpu = pytest.mark.skipif(
    not REAL_GPU, reason="needs a CUDA GPU usable by numba.cuda; none here (the simulator tests cover the logic)"
)


# ---------------------------------------------------------------------------------------------------------
# The contract every backend meets: on a real GPU with the default configuration, and in the simulator (by
# test_contract_simulated, in a subprocess) with the small blocks of _sim_backend.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA GPU here; test_contract_simulated runs it on the simulator")
class TestCudaContract(TopKContract):
    bit_exact = False  # float32 accumulation: held to the reference within TIE_TOL, not to NumpyTopK's bits

    def backend(self):
        from streamrec.engine.gpu.topk import CudaTopK

        return CudaTopK() if REAL_GPU else _sim_backend()


# ---------------------------------------------------------------------------------------------------------
# Simulator scenarios: plain functions, run by sim_main inside a subprocess with the simulator on.
# Tiny sizes, 32 threads per block and small item spans, so that several blocks, buffer flushes and
# reduction levels happen on a few hundred rows.
# ---------------------------------------------------------------------------------------------------------


def _sim_backend(**options):
    from streamrec.engine.gpu.topk import CudaTopK

    return CudaTopK(**{"threads_per_block": 32, "items_per_block": 64, **options})


def _case_for(items: np.ndarray, queries: np.ndarray, f: Filters, n: int) -> Case:
    """A Case describing rows [0, n) of items under filters f (bitsets turned back into id lists)."""
    def ids(bits: np.ndarray) -> list[int]:
        return [w * 64 + i for w in range(bits.shape[0]) for i in range(64) if (int(bits[w]) >> i) & 1]

    return Case(
        queries=queries, items=items[:n], valid=[bool(v) for v in f.valid[:n]],
        excl=[f.exclude_rows[f.exclude_indptr[b] : f.exclude_indptr[b + 1]].tolist() for b in range(f.num_queries)],
        item_cats=[ids(f.item_cats[r]) for r in range(n)],
        inc=[ids(row) for row in f.include_cats], exc=[ids(row) for row in f.exclude_cats],
    )


def sim_search() -> int:
    """Filters, several k (one above N), float16 storage, k served in several passes."""
    from streamrec.engine.gpu.topk import DeviceItemMatrix

    checks = 0
    case = random_case(np.random.default_rng(5), 3, 150, 5)
    f = case.filters()
    backend = _sim_backend()
    assert isinstance(backend, TopKBackend) and backend.name == "cuda"
    for k in (1, 7, 40, 160):
        rows, scores = backend.search(case.queries, case.items, k, f)
        assert_matches(rows, scores, reference(case, k), k)
        checks += 1
    # A pass holds 8 keys: k = 20 takes three passes, each admitting only keys below the previous pass.
    rows, scores = _sim_backend(max_pass_k=8).search(case.queries, case.items, 20, f)
    assert_matches(rows, scores, reference(case, 20), 20)
    # 8 threads: 16-key buffers flushed into a full 32-key list, i.e. merges into a list tail.
    rows, scores = _sim_backend(threads_per_block=8, items_per_block=150).search(case.queries, case.items, 20, f)
    assert_matches(rows, scores, reference(case, 20), 20)
    # float16 storage, resident path: exact against the reference on float16-rounded items.
    matrix = DeviceItemMatrix(5, np.float16, min_capacity=8, threads_per_block=32)
    matrix.sync(case.items, f.valid, f.item_cats, len(case.items), np.zeros(0, np.int64))
    rounded = Case(**{**case.__dict__, "items": case.items.astype(np.float16).astype(np.float32)})
    rows, scores = backend.search_resident(case.queries, 12, f, matrix)
    assert_matches(rows, scores, reference(rounded, 12), 12)
    return checks + 3


def sim_backend_sync() -> int:
    """CudaTopK.sync / search_synced: a resident matrix in the configured storage dtype, uploads of the changed
    and new rows only, searches of the first filters.num_items rows, and filters beyond the synced rows refused."""
    assert get_backend("cuda", gpu_storage="float16").storage_dtype == np.float16
    rng = np.random.default_rng(14)
    case = random_case(rng, 2, 100, 5)
    every = case.filters()
    vectors, live, cats = case.items.copy(), every.valid.copy(), every.item_cats.copy()
    rounded = vectors.astype(np.float16).astype(np.float32)
    backend = _sim_backend(storage_dtype=np.float16)

    def filters(n: int) -> Filters:
        return Filters(live[:n].copy(), every.exclude_indptr, every.exclude_rows, cats[:n], every.include_cats,
                       every.exclude_cats)

    backend.sync(vectors, live, cats, 80, np.zeros(0, np.int64))
    matrix = backend._synced
    assert matrix.dtype == np.float16 and (matrix.full_uploads, matrix.rows_uploaded, matrix.n_rows) == (1, 80, 80)
    for n in (80, 50):
        f = filters(n)
        rows, scores = backend.search_synced(case.queries, vectors[:n], 10, f)
        assert_matches(rows, scores, reference(_case_for(rounded, case.queries, f, n), 10), 10)

    vectors[5] = case.queries[1]
    rounded[5] = vectors[5].astype(np.float16)
    live[5] = True
    backend.sync(vectors, live, cats, 100, np.array([5], np.int64))
    assert backend._synced is matrix and (matrix.full_uploads, matrix.rows_uploaded, matrix.n_rows) == (1, 101, 100)
    rows, _ = backend.search_synced(case.queries, vectors, 10, Filters.build(live, [[], []]))
    assert rows[1, 0] == 5
    f = filters(100)
    rows, scores = backend.search_synced(case.queries, vectors, 10, f)
    assert_matches(rows, scores, reference(_case_for(rounded, case.queries, f, 100), 10), 10)

    more = np.concatenate([vectors, unit_rows(rng, 3, 5)])
    with pytest.raises(ValueError, match="synced"):
        backend.search_synced(case.queries, more, 10, Filters.none(2, 103))
    return 5


def sim_sync() -> int:
    """In-place updates, deletes, growth past capacity and wider category bitsets on the resident matrix."""
    from streamrec.engine.gpu.topk import DeviceItemMatrix

    rng = np.random.default_rng(9)
    d, k = 4, 15
    items = unit_rows(rng, 70, d)
    valid = np.ones(70, np.bool_)
    cat_ids = [[int(c)] for c in rng.integers(0, 5, size=70)]
    queries = unit_rows(rng, 2, d)
    backend = _sim_backend()

    def check(n: int, f: Filters) -> None:
        rows, scores = backend.search_resident(queries, k, f, matrix)
        assert_matches(rows, scores, reference(_case_for(items, queries, f, n), k), k)

    def filters(n: int, excl=([1, 2], [1, 2]), include=None) -> Filters:
        return Filters.build(valid[:n], list(excl), cat_ids[:n], include)

    matrix = DeviceItemMatrix(d, np.float32, min_capacity=16, threads_per_block=32)
    f = filters(40)
    matrix.sync(items, valid, f.item_cats, 40, np.zeros(0, np.int64))
    assert (matrix.full_uploads, matrix.rows_uploaded, matrix.capacity, matrix.n_rows) == (1, 40, 40, 40)
    check(40, f)

    # Move row 3 to the top of query 0's ranking, delete row 17, recategorise row 30.
    vectors_before = matrix.vectors
    items[3] = queries[0]
    valid[17] = False
    cat_ids[30] = [4]
    f = filters(40)
    matrix.sync(items, valid, f.item_cats, 40, np.array([3, 17, 30]))
    assert matrix.vectors is vectors_before and (matrix.full_uploads, matrix.rows_uploaded) == (1, 43)
    rows, _ = backend.search_resident(queries, k, f, matrix)
    assert rows[0, 0] == 3 and 17 not in rows
    check(40, f)
    check(40, filters(40, excl=([], []), include=[[4], [4]]))  # only category 4: row 30 is in

    # Growth: 70 rows > capacity 40 -> doubled to 80 on the device; only the 30 new rows cross the bus.
    f = filters(70)
    matrix.sync(items, valid, f.item_cats, 70, np.zeros(0, np.int64))
    assert (matrix.capacity, matrix.grows, matrix.full_uploads, matrix.rows_uploaded) == (80, 1, 1, 73)
    assert matrix.vectors is not vectors_before
    check(70, f)

    # A category id >= 64 widens the bitsets to two words (re-uploaded whole, they are small).
    cat_ids[5] = [100]
    cat_ids[66] = [3, 100]
    f = filters(70, excl=([], []), include=[[100], [3]])
    matrix.sync(items, valid, f.item_cats, 70, np.array([5, 66]))
    assert matrix.words == 2 and matrix.rows_uploaded == 75
    rows, _ = backend.search_resident(queries, k, f, matrix)
    assert sorted(rows[0][rows[0] >= 0].tolist()) == [5, 66]
    check(70, f)
    return 6


def sim_protocol_updates() -> int:
    """The host-array path notices in-place edits of the same array and uploads only those rows."""
    rng = np.random.default_rng(4)
    case = random_case(rng, 2, 80, 4, filtered=False)
    backend = _sim_backend()
    backend.warmup()
    f = case.filters()
    assert_matches(*backend.search(case.queries, case.items, 10, f), reference(case, 10), 10)
    case.items[7] = case.queries[1]  # same array object, edited in place
    case.valid[11] = False
    f = case.filters()
    rows, scores = backend.search(case.queries, case.items, 10, f)
    assert rows[1, 0] == 7 and 11 not in rows
    assert_matches(rows, scores, reference(case, 10), 10)
    matrix = backend._mirror.matrix
    assert (matrix.full_uploads, matrix.rows_uploaded) == (1, 82)
    grown = np.concatenate([case.items, unit_rows(rng, 5, 4)])  # a new, longer array: only new rows move
    case.items, case.valid = grown, case.valid + [True] * 5
    case.item_cats += [[]] * 5
    f = case.filters()
    assert_matches(*backend.search(case.queries, grown, 10, f), reference(case, 10), 10)
    assert (matrix.full_uploads, matrix.rows_uploaded) == (1, 87)
    return 3


SIM_SCENARIOS = {f.__name__: f for f in (sim_search, sim_backend_sync, sim_sync, sim_protocol_updates)}


def sim_main(name: str) -> None:
    from cudasim_shared_fix import patch_shared_arrays

    patch_shared_arrays()  # the simulator's own race, not the kernel's: see tests/cudasim_shared_fix.py
    print(json.dumps({"scenario": name, "checks": SIM_SCENARIOS[name]()}))


def run_simulated(name: str) -> dict:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "STREAMREC_ALLOW_CUDASIM": "1"}
    # A short switch interval: the simulator's threads hand the GIL around at every syncthreads.
    code = (
        f"import sys; sys.setswitchinterval(1e-4); sys.path.insert(0, {str(HERE)!r}); "
        f"import test_topk_gpu; test_topk_gpu.sim_main({name!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"simulated {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(SIM_SCENARIOS))
def test_simulated(name: str) -> None:
    result = run_simulated(name)
    assert result["scenario"] == name and result["checks"] > 0


def test_contract_simulated() -> None:
    """TestCudaContract in a pytest subprocess with the simulator on, set up as run_simulated does."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "STREAMREC_ALLOW_CUDASIM": "1"}
    node = f"{HERE / 'test_topk_gpu.py'}::TestCudaContract"
    code = (
        f"import sys; sys.setswitchinterval(1e-4); sys.path.insert(0, {str(HERE)!r}); "
        "from cudasim_shared_fix import patch_shared_arrays; patch_shared_arrays(); "
        # --noconftest: tests/conftest.py imports the server, which this run does not need.
        f"import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--noconftest', {node!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE.parent, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"simulated contract failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(r"skipped|failed|error", summary), summary


# ---------------------------------------------------------------------------------------------------------
# Without a GPU: the flag, the registry, and the kernels compiling for the real target.
# ---------------------------------------------------------------------------------------------------------


def test_importing_topk_does_not_import_numba_cuda() -> None:
    code = "import sys, streamrec.engine.retrieval.topk; assert not any(m.startswith('numba.cuda') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_registry_and_flag() -> None:
    from streamrec.engine.retrieval.topk import BACKENDS

    assert "cuda" in BACKENDS and "numpy" in BACKENDS
    if REAL_GPU:
        assert get_backend("auto").name == "cuda" and get_backend("cuda").name == "cuda"
    else:
        assert not CUDA_AVAILABLE and get_backend("auto").name != "cuda"
        with pytest.raises(RuntimeError, match="CUDA"):
            get_backend("cuda")


def test_simulator_needs_explicit_request() -> None:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    env.pop("STREAMREC_ALLOW_CUDASIM", None)
    code = "from streamrec.engine.gpu import CUDA_AVAILABLE; print(CUDA_AVAILABLE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


_COMPILE_SCRIPT = r"""
import json, sys, types
import numba.cuda.dispatcher as dispatcher
from numba import cuda, types as T
from numba.cuda.cudadrv import nvvm
if not nvvm.is_available():
    print(json.dumps({"skip": "libNVVM not found"})); sys.exit(0)
# Device functions are compiled for the current device's compute capability; there is none here.
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
from streamrec.engine.gpu import kernels as G
A = lambda t, nd: T.Array(t, nd, "C")
u64, f32, f16, i64, u8 = T.uint64, T.float32, T.float16, T.int64, T.uint8
# live, cats, inc, exc, inc_any, ex_ptr, ex_rows, upper, n, span, kth, kp, t, out
tail = (A(u8, 1), A(u64, 2), A(u64, 2), A(u64, 2), A(u8, 1), A(i64, 1), A(i64, 1), A(u64, 1))
tail += (i64,) * 5 + (A(u64, 3),)
jobs = {
    "dot8_f16": (G._dot_kernel(8).py_func, (A(f32, 2), A(f16, 2)) + tail),
    "dot1_f32": (G._dot_kernel(1).py_func, (A(f32, 2), A(f32, 2)) + tail),
    "scores": (G._scores_kernel.py_func, (A(f32, 2),) + tail),
    "keys": (G._keys_kernel.py_func, (A(u64, 2), i64, i64, i64, i64, i64, A(u64, 3))),
    "scatter": (G._scatter_cols.py_func, (A(f16, 2), A(i64, 1), A(f16, 2))),
}
out = {}
for name, (fn, sig) in jobs.items():
    out[name] = cuda.compile_ptx(fn, T.void(*sig), cc=(9, 0))[0]
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    """Type and lower every kernel for the CUDA target; with ptxas, check spills and < 48 KiB shared memory."""
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    ptx = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in ptx:
        pytest.skip(ptx["skip"])
    ptxas = shutil.which("ptxas") or next((p for p in ["/usr/local/cuda/bin/ptxas"] if os.path.exists(p)), None)
    for name, text in ptx.items():
        assert ".entry" in text
        if ptxas is None:
            continue
        path = tmp_path / f"{name}.ptx"
        path.write_text(text)
        info = subprocess.run([ptxas, "-arch=sm_90", "-v", "-maxrregcount=128", str(path), "-o", os.devnull],
                              capture_output=True, text=True, timeout=300)
        assert info.returncode == 0, info.stderr
        # A few spilled words under the 128-register cap are fine; local arrays left in memory are not.
        spill = re.search(r"(\d+) bytes spill stores", info.stderr)
        assert spill is not None and int(spill.group(1)) <= 64, (name, info.stderr)
        smem = re.search(r"(\d+) bytes smem", info.stderr)
        assert smem is None or int(smem.group(1)) < 48 * 1024, (name, info.stderr)


# ---------------------------------------------------------------------------------------------------------
# Real GPU
# ---------------------------------------------------------------------------------------------------------

GPU_CATS = [0, 3, 63, 64, 90, 127]  # two words


def gpu_filters(rng: np.random.Generator, b: int, n: int) -> Filters:
    cats = [rng.choice(GPU_CATS, size=rng.integers(0, 3), replace=False).tolist() for _ in range(n)]

    def pick() -> list[list[int]]:
        return [rng.choice(GPU_CATS, size=2, replace=False).tolist() if rng.random() < 0.3 else [] for _ in range(b)]

    excl = [rng.integers(-3, n + 3, size=rng.integers(0, 300)).tolist() for _ in range(b)]
    return Filters.build(rng.random(n) < 0.9, excl, cats, pick(), pick())


def exact_allowed(queries: np.ndarray, items: np.ndarray, f: Filters) -> np.ndarray:
    """float64 [B, N] exact scores, -inf where the filters drop the row."""
    s = queries.astype(np.float64) @ items.astype(np.float64).T
    s[:, ~f.valid] = -np.inf
    n = items.shape[0]
    for b in range(len(queries)):
        ex = f.exclude_rows[f.exclude_indptr[b] : f.exclude_indptr[b + 1]]
        s[b, ex[(ex >= 0) & (ex < n)]] = -np.inf
        if f.include_cats[b].any():
            s[b, ~((f.item_cats & f.include_cats[b]) != 0).any(axis=1)] = -np.inf
        if f.exclude_cats[b].any():
            s[b, ((f.item_cats & f.exclude_cats[b]) != 0).any(axis=1)] = -np.inf
    return s


def check_topk(rows: np.ndarray, scores: np.ndarray, exact: np.ndarray, k: int, tol: float = TIE_TOL) -> None:
    """Vectorised assert_matches: padding exact, order consistent, scores within tol of the exact ranking,
    rows exact wherever no other allowed row is within 2*tol."""
    b, n = exact.shape
    assert rows.shape == scores.shape == (b, k) and rows.dtype == np.int64 and scores.dtype == np.float32
    for q in range(b):
        e = exact[q]
        m = min(k, int(np.isfinite(e).sum()))
        r, s = rows[q, :m], scores[q, :m]
        assert (rows[q, m:] == -1).all() and (scores[q, m:] == -np.inf).all()
        assert (r >= 0).all() and len(np.unique(r)) == m and np.isfinite(e[r]).all()
        assert np.all((s[:-1] > s[1:]) | ((s[:-1] == s[1:]) & (r[:-1] < r[1:])))
        order = np.argsort(-e, kind="stable")[: m + 1]
        top = e[order]
        assert np.abs(s - e[r]).max(initial=0) <= tol and np.abs(s - top[:m]).max(initial=0) <= tol
        gaps = np.abs(np.diff(top))
        before = np.concatenate([[np.inf], gaps])[:m]
        after = np.concatenate([gaps, [np.inf]])[:m]
        isolated = (before > 2 * tol) & (after > 2 * tol)
        assert (r[isolated] == order[:m][isolated]).all(), f"query {q}: rows differ at isolated places"


@pytest.fixture(scope="module")
def gpu_data():
    rng = np.random.default_rng(2024)
    b, n, d = 37, 50_021, 96
    queries, items = unit_rows(rng, b, d), unit_rows(rng, n, d)
    return queries, items, gpu_filters(rng, b, n)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("k", [1, 10, 100, 1000, 4096])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_search_matches_reference(gpu_data, dtype, k: int) -> None:
    from streamrec.engine.gpu.topk import CudaTopK, DeviceItemMatrix

    queries, items, f = gpu_data
    stored = items.astype(dtype).astype(np.float32)
    exact = exact_allowed(queries, stored, f)
    rows, scores = CudaTopK(storage_dtype=dtype).search(queries, items, k, f)
    check_topk(rows, scores, exact, k)
    matrix = DeviceItemMatrix(items.shape[1], dtype)
    matrix.sync(items, f.valid, f.item_cats, len(items), np.zeros(0, np.int64))
    resident = CudaTopK().search_resident(queries, k, f, matrix)
    assert (resident[0] == rows).all() and (resident[1] == scores).all()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("k", [6000, 9000])
def test_gpu_k_beyond_one_pass(k: int) -> None:
    from streamrec.engine.gpu.topk import CudaTopK

    rng = np.random.default_rng(k)
    queries, items = unit_rows(rng, 5, 40), unit_rows(rng, 20_011, 40)
    f = gpu_filters(rng, 5, 20_011)
    rows, scores = CudaTopK().search(queries, items, k, f)
    check_topk(rows, scores, exact_allowed(queries, items, f), k)


@pytest.mark.gpu
@requires_gpu
def test_gpu_exact_ties_break_by_row() -> None:
    from streamrec.engine.gpu.topk import CudaTopK

    rng = np.random.default_rng(31)
    queries = unit_rows(rng, 6, 16)
    pool = unit_rows(rng, 40, 16)
    items = pool[rng.integers(0, 40, size=30_000)]  # duplicated rows: bit-identical scores
    f = gpu_filters(rng, 6, 30_000)
    distinct = np.sort(queries.astype(np.float64) @ pool.astype(np.float64).T, axis=1)
    assert np.diff(distinct, axis=1).min() > 2 * TIE_TOL  # a query's distinct scores are far apart: exact ties only
    for k in (100, 2500, 5000):
        want_rows, _ = NumpyTopK().search(queries, items, k, f)
        rows, scores = CudaTopK().search(queries, items, k, f)
        assert (rows == want_rows).all()
        check_topk(rows, scores, exact_allowed(queries, items, f), k)


@pytest.mark.gpu
@requires_gpu
def test_gpu_rank_scores_exact() -> None:
    from streamrec.engine.gpu.topk import CudaTopK

    rng = np.random.default_rng(8)
    b, n = 9, 70_001
    f = gpu_filters(rng, b, n)
    shared = rng.integers(0, 50, size=n).astype(np.float32)
    shared[rng.integers(0, n, size=500)] = np.nan
    shared[rng.integers(0, n, size=500)] = -np.inf
    per_query = rng.normal(size=(b, n)).astype(np.float32)
    backend = CudaTopK()
    for scores_in in (shared, per_query):
        for k in (10, 4096, 5000):
            rows, scores = backend.rank_scores(scores_in, k, f)
            want_rows, want = NumpyTopK().rank_scores(scores_in, k, f)
            assert (rows == want_rows).all() and (scores == want).all()


@pytest.mark.gpu
@requires_gpu
def test_gpu_sync_in_place_and_growth() -> None:
    from streamrec.engine.gpu.topk import CudaTopK, DeviceItemMatrix

    rng = np.random.default_rng(12)
    d, n0, n1 = 64, 40_000, 70_000
    items = unit_rows(rng, n1, d)
    queries = unit_rows(rng, 16, d)
    f = gpu_filters(rng, 16, n1)
    valid, cats = f.valid.copy(), f.item_cats.copy()
    backend = CudaTopK()
    matrix = DeviceItemMatrix(d, np.float16, min_capacity=1)

    def check(n: int, k: int = 200) -> None:
        sub = Filters(valid[:n], f.exclude_indptr, f.exclude_rows, cats[:n], f.include_cats, f.exclude_cats)
        rows, scores = backend.search_resident(queries, k, sub, matrix)
        stored = items[:n].astype(np.float16).astype(np.float32)
        check_topk(rows, scores, exact_allowed(queries, stored, sub), k)

    matrix.sync(items, valid, cats, n0, np.zeros(0, np.int64))
    assert (matrix.capacity, matrix.full_uploads, matrix.rows_uploaded) == (n0, 1, n0)
    check(n0)
    before = matrix.vectors
    changed = rng.choice(n0, size=500, replace=False)
    items[changed[:300]] = unit_rows(rng, 300, d)
    items[changed[0]] = queries[0]
    valid[changed[0]] = True
    valid[changed[300:400]] = False
    cats[changed[400:]] = 0
    matrix.sync(items, valid, cats, n0, changed)
    assert matrix.vectors is before and matrix.full_uploads == 1 and matrix.rows_uploaded == n0 + 500
    check(n0)
    rows, _ = backend.search_resident(queries[:1], 1, Filters.none(1, n0), matrix)
    assert rows[0, 0] == changed[0]
    matrix.sync(items, valid, cats, n1, np.zeros(0, np.int64))  # 70k > 40k: doubled on the device
    assert matrix.capacity == 2 * n0 and matrix.grows == 1 and matrix.full_uploads == 1
    assert matrix.rows_uploaded == n1 + 500 and matrix.vectors is not before
    check(n1)


@pytest.mark.gpu
@requires_gpu
def test_gpu_batch_and_k_independent_scores(gpu_data) -> None:
    """A (query, row) pair gets the same float32 score alone or in a batch, for any k and tile size."""
    from streamrec.engine.gpu.topk import CudaTopK

    queries, items, f = gpu_data
    backend = CudaTopK()
    rows, scores = backend.search(queries, items, 1000, f)
    small_rows, small_scores = backend.search(queries, items, 10, f)
    assert (small_rows == rows[:, :10]).all() and (small_scores == scores[:, :10]).all()
    for q in (0, 17, 36):
        one = Filters(f.valid, f.exclude_indptr[q : q + 2] - f.exclude_indptr[q],
                      f.exclude_rows[f.exclude_indptr[q] : f.exclude_indptr[q + 1]], f.item_cats,
                      f.include_cats[q : q + 1], f.exclude_cats[q : q + 1])
        r, s = backend.search(queries[q : q + 1], items, 1000, one)
        assert (r[0] == rows[q]).all() and (s[0] == scores[q]).all()

