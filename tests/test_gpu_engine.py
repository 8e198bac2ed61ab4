"""The engine's GPU path (device-resident matrix, incremental row sync) agrees with the CPU path.
Runs under Numba's CUDA simulator in a subprocess here; on a GPU machine `pytest -m gpu` runs it for real."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streamrec.engine.gpu import CUDA_AVAILABLE

K, DEEP_K = 7, 40
SCORE_TOL = 2e-6  # float32 dot products: the GPU contracts to FMA and sums in another order

SCRIPT = f"K, DEEP_K = {K}, {DEEP_K}\n" + textwrap.dedent('''
    import json, os, sys, tempfile
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.path.insert(0, os.environ["STREAMREC_TESTS_DIR"])
        from cudasim_shared_fix import patch_shared_arrays
        patch_shared_arrays()  # the simulator's own race, not the kernel's: see tests/cudasim_shared_fix.py
    from streamrec.engine.config import EngineConfig
    from streamrec.engine.offline.datasets import synthetic
    from streamrec.engine.engine import Engine
    from streamrec.engine.offline.seeding import seed_engine
    from streamrec.engine.api import Event, EventType, ItemSpec

    def run(backend, k):
        with tempfile.TemporaryDirectory() as tmp:
            engine = Engine(tmp, EngineConfig(dim=8, backend=backend))
            seed_engine(engine, synthetic(n_users=20, n_items=int(sys.argv[1]), n_clusters=3, events_per_user=6))
            answers = []
            def ask():
                queries = [engine.build_query(u, k, exclude_categories=["c1"] if u == "u2" else ()) for u in ("u0", "u1", "u2", "new")]
                answers.append([[list(r.item_ids), [float(s) for s in r.scores]] for r in engine.recommend(queries)])
            ask()
            engine.ingest([Event("e1", "new", "i3", EventType.PURCHASE, 0, 1_710_000_000_000)])
            engine.delete_items(["i5", "i9"])          # rows change in place on the device
            engine.upsert_items([ItemSpec("fresh", ["c0"]), ItemSpec("i4", ["c2"])])  # a new row + a moved one
            ask()
            device = getattr(engine.backend, "_synced", None)
            stats = None if device is None else {"full_uploads": device.full_uploads, "rows_uploaded": device.rows_uploaded}
            engine.close()
            return answers, stats

    cpu, _ = run("numpy", DEEP_K)  # deeper, so a near-tie just past k on one side is still found on the other
    gpu, stats = run("cuda", K)
    print(json.dumps({"cpu": cpu, "gpu": gpu, "stats": stats}))
''')


def run_script(env_extra: dict, n_items: int) -> dict:
    env = {**os.environ, **env_extra, "STREAMREC_TESTS_DIR": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(n_items)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(result: dict, n_items: int) -> None:
    """The GPU answer is the CPU's top-k up to float32 rounding: the same scores rank by rank, and every item it
    returns has, on the CPU, the score the GPU gave it. Items only trade places within SCORE_TOL (near-ties)."""
    assert len(result["gpu"]) == len(result["cpu"])
    for gpu_ask, cpu_ask in zip(result["gpu"], result["cpu"]):
        for (gpu_ids, gpu_scores), (cpu_ids, cpu_scores) in zip(gpu_ask, cpu_ask, strict=True):
            assert len(gpu_ids) == min(K, len(cpu_ids))
            assert gpu_scores == pytest.approx(cpu_scores[:K], abs=SCORE_TOL)
            cpu_score_of = dict(zip(cpu_ids, cpu_scores))
            for item, score in zip(gpu_ids, gpu_scores):
                assert item in cpu_score_of, f"{item} is not among the CPU's top {DEEP_K}"
                assert score == pytest.approx(cpu_score_of[item], abs=SCORE_TOL), item
    stats = result["stats"]
    assert stats["full_uploads"] == 1
    assert stats["rows_uploaded"] <= n_items + 10, "after the first upload only changed rows may move"


def test_gpu_engine_path_under_simulator():
    n_items = 60
    check(run_script({"NUMBA_ENABLE_CUDASIM": "1", "STREAMREC_ALLOW_CUDASIM": "1"}, n_items), n_items)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA GPU")
def test_gpu_engine_path_on_device():
    check(run_script({}, 3000), 3000)
