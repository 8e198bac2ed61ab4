"""Serving budget: the CPU each serving target leaves for streamrec's own work, beside what that work costs.

    python benchmarks/serving_budget.py --json benchmarks/out/serving_budget.json      # about 3 minutes

benchmarks/serving.py measures the targets end to end; this explains its figures. In one run, with the
server's work on one core (--server-cpu) and the load tester on the others:
  floor  server CPU per message of Ping and PingStream: a `streamrec serve` process on ML-100K, driven by
         the load tester, /proc utime + stime over the run (the figure serving.py reports)
  work   what a Recommend or an event message adds to its floor, measured in-process on the same core:
         request parsing, the batch search, the response, the batcher's hand-off; the whole event path
         (decode, validate, group commit with fsync, apply, ack) with K messages in flight
A target of r times a floor F leaves F * (1/r - 1) of CPU per message for that work. The Recommend search
is also timed with a NumPy peer (matmul + argpartition, same batch) in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core: BLAS threads would only spin against each other

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import build_synthetic, loadtest  # noqa: E402

from streamrec.engine.config import EngineConfig  # noqa: E402
from streamrec.engine.engine import Engine  # noqa: E402
from streamrec.engine.offline.seeding import STORE_FOLDER, open_engine  # noqa: E402
from streamrec.server import convert  # noqa: E402
from streamrec.cli.process import ServerProcess  # noqa: E402
from streamrec.v1 import events_pb2, recommend_pb2  # noqa: E402

RECOMMEND_TARGET, EVENTS_X1_TARGET, EVENTS_X100_PER_S = 0.8, 0.8, 100_000


def median_us(fn, repeats: int, per: int = 1, clock=time.thread_time_ns) -> float:
    """Median over `repeats` calls of fn's CPU time (this thread's by default), in microseconds per `per` units."""
    samples = []
    for _ in range(repeats):
        started = clock()
        fn()
        samples.append((clock() - started) / 1e3 / per)
    return statistics.median(samples)


def floors(data_dir: Path, cpu: int, seconds: float) -> dict:
    server = ServerProcess(data_dir, dataset="ml-100k", dim=64, cpus={cpu}).start(timeout_s=300)
    out = {}
    try:
        for name, scenario in (("ping", "ping"), ("ping-stream", "ping-stream")):
            before = server.cpu_seconds()
            report = loadtest(server.address, ["--scenario", scenario], seconds,
                              ["--concurrency", "32", "--processes", "2", "--streams", "4", "--dataset", "ml-100k"])
            messages = report["throughput_rps"] * (seconds + 1)  # the 1 s warm-up ran at about the same rate
            out[name] = (server.cpu_seconds() - before) / messages * 1e6
    finally:
        server.terminate()
    return out


def recommend_work(engine: Engine, users: list[str], batch: int, repeats: int) -> tuple[dict, dict]:
    """(parts, info): per request, the CPU a Recommend adds to the Ping floor, and figures beside it."""
    rng = np.random.default_rng(0)
    requests = [recommend_pb2.RecommendRequest(user_id=users[rng.integers(len(users))], k=10,
                                               rerank=recommend_pb2.RerankOptions(enabled=False)).SerializeToString()
                for _ in range(batch)]
    queries = [engine.build_query(**convert.query_fields(recommend_pb2.RecommendRequest.FromString(raw))) for raw in requests]
    results = engine.retriever.recommend(queries)
    with engine.lock:
        prepared = engine.retriever._prepare(queries)
    matrix = np.stack([v for v in prepared.queries if v is not None]).astype(np.float32)
    histogram = engine.batcher.histogram
    batches_before, requests_before = histogram.batches, histogram.requests

    def through_batcher() -> None:  # `batch` requests in flight at once, as concurrent RPC threads leave them
        for future in [engine.recommend_async(query) for query in queries]:
            future.result(30)

    parts = {
        "parse_request": median_us(lambda: [engine.build_query(**convert.query_fields(recommend_pb2.RecommendRequest.FromString(raw)))
                                            for raw in requests], repeats, batch),
        # Process CPU: the batcher thread's search and both sides of the hand-off.
        f"engine_b{batch}": median_us(through_batcher, repeats, batch, clock=time.process_time_ns),
        "response": median_us(lambda: [convert.recommend_response(engine.served_by(), r, 100).SerializeToString() for r in results],
                              repeats, batch),
    }
    info = {"mean_batch": (histogram.requests - requests_before) / max(1, histogram.batches - batches_before),
            f"search_b{batch}": median_us(lambda: engine.retriever.recommend(queries), repeats, batch),
            f"numpy_peer_search_b{batch}": median_us(lambda: np.argpartition(-(matrix @ prepared.vectors.T), 10, axis=1),
                                                     repeats, len(matrix))}
    return parts, info


def event_work(engine: Engine, users: list[str], items: list[str], per_message: int, in_flight: int, messages: int) -> float:
    """Process CPU per message for the whole in-process event path with `in_flight` messages queued at once."""
    rng = np.random.default_rng(1)

    def message() -> bytes:
        batch = events_pb2.EventBatch()
        for _ in range(per_message):
            batch.events.add(event_id=uuid.uuid4().hex, user_id=users[rng.integers(len(users))],
                             item_id=items[rng.integers(len(items))], type=int(rng.integers(1, 5)))
        return batch.SerializeToString()

    raw = [message() for _ in range(messages)]
    started = time.process_time()
    for lo in range(0, messages, in_flight):
        pending: list[Future] = []
        for data in raw[lo:lo + in_flight]:
            pending.append(engine.ingest_async(convert.events_from(events_pb2.EventBatch.FromString(data))))
        for number, future in enumerate(pending):
            convert.ack_from(str(number), future.result(30)).SerializeToString()
    return (time.process_time() - started) / messages * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-cpu", type=int, default=0, help="the one CPU the server's work runs on")
    parser.add_argument("--seconds", type=float, default=6.0, help="load-test seconds per floor")
    parser.add_argument("--batch", type=int, default=16, help="Recommend batch size (the commonest in serving.py's runs)")
    parser.add_argument("--group", type=int, default=13, help="1-event messages per group commit (serving.py's ML-100K runs: ~13)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    others = set(os.sched_getaffinity(0)) - {args.server_cpu}
    os.sched_setaffinity(0, others or {args.server_cpu})
    with tempfile.TemporaryDirectory() as tmp:
        floor = floors(Path(tmp) / "ml", args.server_cpu, args.seconds)
        os.sched_setaffinity(0, {args.server_cpu})
        numba.set_num_threads(1)  # one core, as the pinned server has
        config = EngineConfig(dim=64)
        work: dict[str, tuple[dict, dict]] = {}  # row -> (parts that add up to its work, figures beside them)
        with open_engine(Path(tmp) / "ml", config) as engine:
            users, items = [str(u) for u in range(1, 944)], [str(i) for i in range(1, 1683)]
            work["recommend ml-100k"] = recommend_work(engine, users, args.batch, args.repeats)
            x1 = {k: event_work(engine, users, items, 1, k, 150 * k) for k in (1, args.group)}
            work["events x1 ml-100k"] = ({f"event_path_{args.group}_in_flight": x1[args.group]},
                                         {"event_path_1_in_flight": x1[1]})
            x100 = {k: event_work(engine, users, items, 100, k, 20 * k) / 100 for k in (1, 16)}
            work["events x100 ml-100k"] = ({"event_path_16_in_flight": x100[16]}, {"event_path_1_in_flight": x100[1]})
        build_synthetic(Path(tmp) / "syn", args.items, 64)
        with Engine(Path(tmp) / "syn" / STORE_FOLDER, config) as engine:
            work[f"recommend synthetic-{args.items // 1000}k"] = recommend_work(
                engine, [f"u{u}" for u in range(2000)], args.batch, max(20, args.repeats // 10))
    budgets = {"recommend": ("ping", floor["ping"] * (1 / RECOMMEND_TARGET - 1)),
               "events x1": ("ping-stream", floor["ping-stream"] * (1 / EVENTS_X1_TARGET - 1)),
               "events x100": (None, 1e6 / EVENTS_X100_PER_S)}  # x100: the whole core's time per event
    rows = []
    for name, (parts, info) in work.items():
        floor_name, budget = next(v for prefix, v in budgets.items() if name.startswith(prefix + " "))
        cost = sum(parts.values())
        rows.append({"row": name, "floor": floor_name, "floor_us": floor.get(floor_name), "budget_us": budget,
                     "work_us": cost, "work_over_budget": cost / budget, "parts_us": parts, "beside": info})
    print(f"floors (server CPU per message, one core): ping {floor['ping']:.0f} us, ping-stream {floor['ping-stream']:.0f} us")
    print(f"{'row':<26} {'budget us':>10} {'work us':>9} {'work/budget':>12}  parts; [beside] (us per message, per event for x100)")
    for r in rows:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["parts_us"].items())
        beside = ", ".join(f"{k} {v:.1f}" for k, v in r["beside"].items())
        print(f"{r['row']:<26} {r['budget_us']:>10.1f} {r['work_us']:>9.1f} {r['work_over_budget']:>11.2f}x  {parts}; [{beside}]")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "server_cpu": args.server_cpu}
        Path(args.json_path).write_text(json.dumps({"meta": meta, "floors_us": floor, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
