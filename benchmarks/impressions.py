"""What the impression log costs a recommendation (issue 20), against the same engine without it, in one run.

Two engines on copies of one seeded store (synthetic, --items items, d = 64, numba top-k), one with the
impression log (and, in a third, with feature logging at 100%), answer the same users in turn, one Recommend at a
time and in batches of --batch; per call p50 / p99 in microseconds, calls interleaved between the engines so the
shared machine's noise falls on all alike. Then an overload check: a log with a queue of --shed-queue takes
answers as fast as one thread can ask, and the answers it could not queue are counted (serving never waits).

    python benchmarks/impressions.py --json benchmarks/results/impression-log-cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from streamrec.engine import Engine, EngineConfig
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import seed_engine


def timed_calls(engines: dict[str, Engine], users: list[str], batch: int, calls: int) -> dict:
    times = {name: [] for name in engines}
    for n in range(calls):
        group = [users[(n * batch + j) % len(users)] for j in range(batch)]
        for name, engine in engines.items():
            queries = [engine.build_query(u, 10, rerank=False) for u in group]
            t0 = time.perf_counter_ns()
            engine.recommend(queries)
            times[name].append(time.perf_counter_ns() - t0)
    return {name: {"calls": len(v), "p50_us": float(np.percentile(np.array(v) / 1e3, 50)),
                   "p99_us": float(np.percentile(np.array(v) / 1e3, 99))} for name, v in times.items()}


def log_bytes(log) -> int:
    """Bytes of the LMDB pages the log's databases use (the file itself is preallocated)."""
    with log.env.begin() as txn:
        stats = [txn.stat(db) for db in log.dbs.values() if db is not None]
    return sum((s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * s["psize"] for s in stats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shed-queue", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    base = EngineConfig(sync=True, backend="numba", checkpoint_interval_s=3600, checkpoint_every_records=10**9)
    configs = {"no log": replace(base, impressions=False), "impression log": base,
               "log + features": replace(base, impression_features=1.0)}
    users = [f"u{n}" for n in range(args.users)]
    with tempfile.TemporaryDirectory(prefix="streamrec-impressions-") as tmp:
        with Engine(Path(tmp) / "seed", replace(base, impressions=False, sync=False)) as engine:
            seed_engine(engine, synthetic(args.users, args.items, 50, 20, seed=0))
        engines = {}
        for name, config in configs.items():
            folder = Path(tmp) / name.replace(" ", "-").replace("+", "and")
            shutil.copytree(Path(tmp) / "seed", folder)
            engines[name] = Engine(folder, config)
        try:
            timed_calls(engines, users, 1, 100)  # warm-up
            single = timed_calls(engines, users, 1, args.calls)
            batched = timed_calls(engines, users, args.batch, max(args.calls // 10, 50))
            for engine in engines.values():
                if engine.impressions is not None:
                    engine.impressions.flush(60)
            logged = {name: e.impressions_info() for name, e in engines.items() if e.impressions is not None}
            sizes = {name: log_bytes(e.impressions) for name, e in engines.items() if e.impressions is not None}
        finally:
            for engine in engines.values():
                engine.close(checkpoint=False)
        folder = Path(tmp) / "shed"
        shutil.copytree(Path(tmp) / "seed", folder)
        with Engine(folder, replace(base, impression_queue=args.shed_queue)) as engine:
            started = time.perf_counter()
            answered = 0
            while time.perf_counter() - started < 3.0:
                engine.recommend([engine.build_query(u, 10, rerank=False) for u in users[:64]])
                answered += 64
            engine.impressions.flush(60)
            shed = engine.impressions_info()

    print(f"Recommend per call, k = 10, {args.items} items, d = 64, impressions fsynced per writer batch")
    print(f"{'engine':<16} {'1 user p50':>11} {'p99':>8} {f'{args.batch} users p50':>13} {'p99':>8}")
    for name in configs:
        print(f"{name:<16} {single[name]['p50_us']:>9.0f}us {single[name]['p99_us']:>6.0f}us "
              f"{batched[name]['p50_us']:>11.0f}us {batched[name]['p99_us']:>6.0f}us")
    for name in logged:
        print(f"{name}: ratio to no log, p50 1 user {single[name]['p50_us'] / single['no log']['p50_us']:.3f}, "
              f"{args.batch} users {batched[name]['p50_us'] / batched['no log']['p50_us']:.3f}; "
              f"{logged[name]['recorded']} recorded, {logged[name].get('shed', 0)} shed, "
              f"{sizes[name] / max(logged[name]['stored'], 1):.0f} bytes per impression on disk")
    print(f"overload: {answered} answers in 3 s with a queue of {args.shed_queue}: {shed['recorded']} logged, "
          f"{shed.get('shed', 0)} shed (counted, not waited for)")
    if args.json:
        record = {"args": vars(args), "single": single, "batched": batched, "logged": logged, "bytes": sizes,
                  "overload": {"answered": answered, "recorded": shed["recorded"], "shed": shed.get("shed", 0)},
                  "host": {"cpus": os.cpu_count()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
