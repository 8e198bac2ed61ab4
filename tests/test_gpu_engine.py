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

SCRIPT = textwrap.dedent('''
    import json, os, sys, tempfile
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.path.insert(0, os.environ["STREAMREC_TESTS_DIR"])
        from cudasim_shared_fix import patch_shared_arrays
        patch_shared_arrays()  # the simulator's own race, not the kernel's: see tests/cudasim_shared_fix.py
    from streamrec.engine.config import EngineConfig
    from streamrec.engine.datasets import synthetic
    from streamrec.engine.engine import Engine
    from streamrec.engine.seeding import seed_engine
    from streamrec.engine.types import Event, EventType, ItemSpec

    def run(backend):
        with tempfile.TemporaryDirectory() as tmp:
            engine = Engine(tmp, EngineConfig(dim=8, backend=backend))
            seed_engine(engine, synthetic(n_users=20, n_items=int(sys.argv[1]), n_clusters=3, events_per_user=6))
            answers = []
            def ask():
                queries = [engine.build_query(u, 7, exclude_categories=["c1"] if u == "u2" else ()) for u in ("u0", "u1", "u2", "new")]
                answers.append([r.item_ids for r in engine.recommend(queries)])
            ask()
            engine.ingest([Event("e1", "new", "i3", EventType.PURCHASE, 0, 1_710_000_000_000)])
            engine.delete_items(["i5", "i9"])          # rows change in place on the device
            engine.upsert_items([ItemSpec("fresh", ["c0"]), ItemSpec("i4", ["c2"])])  # a new row + a moved one
            ask()
            device = getattr(engine.retriever, "_device_matrix", None)
            stats = None if device is None else {"full_uploads": device.full_uploads, "rows_uploaded": device.rows_uploaded}
            engine.close()
            return answers, stats

    cpu, _ = run("numpy")
    gpu, stats = run("cuda")
    print(json.dumps({"cpu": cpu, "gpu": gpu, "stats": stats}))
''')


def run_script(env_extra: dict, n_items: int) -> dict:
    env = {**os.environ, **env_extra, "STREAMREC_TESTS_DIR": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(n_items)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(result: dict, n_items: int) -> None:
    assert result["gpu"] == result["cpu"]
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
