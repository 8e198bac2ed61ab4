"""The Recommend path inside the server process, without gRPC: `Retriever.recommend` (ids -> filter arrays ->
top-k -> results) against the top-k kernel alone on the same queries and filters, in one run, so the cost around
the kernel is visible. Peer: the same retriever over the plain NumPy backend (engine/topk.py).

Stores: ML-100K as `streamrec serve` seeds it (1,682 items, d=64, every user's seen items excluded) and a
synthetic catalog (--items, d=64). Queries are real users of the store, k=10, retrieval only. Times are the
median of --repeat rounds of --calls calls, on one thread (NUMBA_NUM_THREADS=1 unless set), as the server's
batcher runs them.

    python benchmarks/retrieval.py                       # table
    python benchmarks/retrieval.py --json out.json       # + JSON
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from streamrec.engine.api import RecommendQuery
from streamrec.engine.config import EngineConfig  # noqa: E402
from streamrec.engine.engine import Engine  # noqa: E402
from streamrec.engine.offline.datasets import load_ml100k, synthetic  # noqa: E402
from streamrec.engine.offline.seeding import seed_engine  # noqa: E402
from streamrec.engine.retrieval.topk import NumpyTopK  # noqa: E402


def timed(fn, calls: int, repeat: int) -> float:
    """Median over rounds of the mean µs per call."""
    fn()
    rounds = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - started) / calls * 1e6)
    return float(np.median(rounds))


def measure(name: str, engine: Engine, batches: list[int], calls: int, repeat: int) -> list[dict]:
    retriever = engine.retriever
    users = engine.state.users
    people = [u for u, row in users.rows.items() if users.query_vector(row) is not None]
    reference = NumpyTopK()
    records = []
    for b in batches:
        queries = [RecommendQuery(people[(i * 7) % len(people)], 10, rerank=False) for i in range(b)]
        prepared = retriever._prepare(queries)
        matrix = np.stack(prepared.queries).astype(np.float32)
        filters = retriever._filters(prepared, list(range(b)))
        kernel_us = timed(lambda: retriever.backend.search(matrix, prepared.vectors, 10, filters), calls, repeat)
        path_us = timed(lambda: retriever.recommend(queries), calls, repeat)
        numpy_kernel_us = timed(lambda: reference.search(matrix, prepared.vectors, 10, filters), max(1, calls // 10), repeat)
        backend = retriever.backend
        retriever.backend = reference
        try:
            numpy_path_us = timed(lambda: retriever.recommend(queries), max(1, calls // 10), repeat)
        finally:
            retriever.backend = backend
        record = {"store": name, "items": len(engine.state.items), "batch": b, "backend": backend.name,
                  "path_us": path_us, "kernel_us": kernel_us, "around_kernel_us": path_us - kernel_us,
                  "path_us_per_query": path_us / b, "numpy_path_us": numpy_path_us, "numpy_kernel_us": numpy_kernel_us,
                  "speedup_vs_numpy_path": numpy_path_us / path_us}
        records.append(record)
        print(f"{name:<16} B={b:<4} path {path_us:>9,.0f} us ({path_us / b:>7,.1f}/query)  kernel {kernel_us:>9,.0f} us  "
              f"around it {path_us - kernel_us:>7,.0f} us  | numpy path {numpy_path_us:>10,.0f} us  "
              f"({numpy_path_us / path_us:.1f}x)", flush=True)
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--items", type=int, default=100_000, help="synthetic catalog size (0: skip)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        stores = [("ml-100k", lambda: load_ml100k())]
        if args.items:
            stores.append((f"synthetic-{args.items // 1000}k",
                           lambda: synthetic(n_users=2000, n_items=args.items, n_clusters=50, events_per_user=50)))
        for name, dataset in stores:
            with Engine(Path(tmp) / name, EngineConfig(dim=64)) as engine:
                seed_engine(engine, dataset())
                calls = args.calls if name == "ml-100k" else max(1, args.calls // 10)
                records += measure(name, engine, args.batches, calls, args.repeat)
    if args.json_path:
        meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "numba_threads": os.environ.get("NUMBA_NUM_THREADS")}
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
