"""Serving benchmark: streamrec's RPCs against the gRPC floors of the same server, in one run.

    python benchmarks/serving.py --json benchmarks/out/serving.json            # full (several minutes)
    python benchmarks/serving.py --quick                                       # smoke run

For each dataset (synthetic N=100k d=64, and ML-100K) a `streamrec serve` process is started, then the load
tester (clients/loadtest/) measures, in the same run:
  floor:  Ping (unary, no work) and PingStream (bidirectional echo, no work)
  served: Recommend (unary; retrieval only, and with the ONNX rerank stage over 200 candidates where the server
          has a model for the dataset), RecommendStream, StreamEvents with 1 and 100 events per message
Max throughput comes from a closed loop; p50/p99 are then measured open-loop (latency from the scheduled
send time) at 50% and 90% of it. Event -> visible: publish an event for a fresh user, then Recommend; the
time until the answer is personalised.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from streamrec.clients.client import StreamrecClient, make_event
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import STORE_FOLDER, seed_engine
from streamrec.cli.process import ServerProcess

WARMUP_S = 1
SCENARIOS = [  # (name, loadtest args, floor it is compared with)
    ("ping", ["--scenario", "ping"], None),
    ("recommend", ["--scenario", "recommend", "--rerank", "off"], "ping"),
    ("recommend+rerank", ["--scenario", "recommend", "--rerank", "on"], "ping"),
    ("ping-stream", ["--scenario", "ping-stream"], None),
    ("recommend-stream", ["--scenario", "stream", "--rerank", "off"], "ping-stream"),
    ("events x1", ["--scenario", "events", "--events-per-message", "1"], "ping-stream"),
    ("events x100", ["--scenario", "events", "--events-per-message", "100"], None),
]


def cpu_list(text: str) -> set[int]:
    """'0-1,3' -> {0, 1, 3}"""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def build_synthetic(data_dir: Path, n_items: int, dim: int) -> None:
    store = data_dir / STORE_FOLDER
    with Engine(store, EngineConfig(dim=dim)) as engine:
        seed_engine(engine, synthetic(n_users=2000, n_items=n_items, n_clusters=50, events_per_user=50))


def loadtest(address: str, args: list[str], seconds: float, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "streamrec.clients.loadtest", "--address", address, "--duration", str(seconds),
               "--warmup", str(WARMUP_S), "--progress", "none", "--json", out.name, *args, *extra]
        subprocess.run(cmd, check=True, capture_output=True, timeout=seconds * 4 + 120)
        return json.loads(Path(out.name).read_text())


def summary(report: dict) -> dict:
    latency = report.get("latency_ms") or {}
    events = report.get("events") or {}
    accepted_per_s = events.get("accepted", 0) / report["duration_s"] if events.get("accepted") else None
    return {"throughput": report["throughput_rps"], "p50_ms": latency.get("p50"), "p99_ms": latency.get("p99"),
            "errors": report.get("errors", 0), "errors_by_code": report.get("errors_by_code", {}),
            "events_per_s": accepted_per_s}


def event_to_visible(address: str, trials: int) -> dict:
    """ms from sending an event for a brand-new user to a Recommend answer that is personalised by it."""
    samples = []
    with StreamrecClient(address, timeout_s=10) as client:
        item = client.recommend("nobody-yet", k=1).items[0].item_id
        for _ in range(trials):
            user = f"vis-{uuid.uuid4().hex[:10]}"
            started = time.perf_counter()
            client.publish([make_event(user, item, "purchase")])
            while client.recommend(user, k=5).strategy != "personalized":
                pass
            samples.append((time.perf_counter() - started) * 1e3)
    return {"p50_ms": float(np.percentile(samples, 50)), "p99_ms": float(np.percentile(samples, 99)), "trials": trials}


def measure(name: str, server: ServerProcess, seconds: float, concurrency: int, processes: int,
            only: list[str] | None = None) -> list[dict]:
    records = []
    address = server.address
    loaded = ["--concurrency", str(concurrency), "--processes", str(processes), "--streams", "4"]
    results: dict[str, dict] = {}
    for scenario, args, floor in SCENARIOS:
        if only and scenario not in only and not any(f == scenario for s, _, f in SCENARIOS if s in only):
            continue  # a selected row's floor runs too
        cpu_before = server.cpu_seconds()
        peak = summary(loadtest(address, args, seconds, loaded))
        # Server CPU per message over the whole loadtest run (its 1 s warm-up included, counted at the
        # measured rate): a figure the load generator's own CPU use cannot distort.
        messages = peak["throughput"] * (seconds + WARMUP_S)
        cpu_us = (server.cpu_seconds() - cpu_before) / messages * 1e6 if messages else None
        record = {"dataset": name, "scenario": scenario, "max_rps": peak["throughput"], "floor": floor,
                  "events_per_s": peak["events_per_s"], "errors": peak["errors"], "server_cpu_us_per_msg": cpu_us,
                  "errors_by_code": {"max": peak["errors_by_code"]}}
        if floor and results.get(floor, {}).get("max_rps"):
            record["ratio_to_floor"] = peak["throughput"] / results[floor]["max_rps"]
            if cpu_us and results[floor].get("server_cpu_us_per_msg"):
                record["cpu_ratio_to_floor"] = results[floor]["server_cpu_us_per_msg"] / cpu_us
        for share in (0.5, 0.9):
            rate = max(1.0, peak["throughput"] * share)
            at = summary(loadtest(address, args, seconds, ["--rate", f"{rate:.0f}", "--processes", str(processes), "--streams", "4"]))
            record[f"p50_ms@{int(share * 100)}%"] = at["p50_ms"]
            record[f"p99_ms@{int(share * 100)}%"] = at["p99_ms"]
            record["errors"] += at["errors"]
            record["errors_by_code"][f"{int(share * 100)}%"] = at["errors_by_code"]
        results[scenario] = record
        records.append(record)
        print(format_row(record), flush=True)
    return records


def format_row(r: dict) -> str:
    ratio = f"{r['ratio_to_floor']:.2f}x {r['floor']}" if r.get("ratio_to_floor") else ""
    events = f"{r['events_per_s']:,.0f} ev/s" if r.get("events_per_s") else ""
    cpu = f"{r['server_cpu_us_per_msg']:,.0f} us/msg" if r.get("server_cpu_us_per_msg") else ""
    return (f"{r['dataset']:<14} {r['scenario']:<18} {r['max_rps']:>9,.0f} rps {ratio:<20} {events:<14} {cpu:<13} "
            f"p50/p99 @50% {r['p50_ms@50%']:.2f}/{r['p99_ms@50%']:.2f} ms  @90% {r['p50_ms@90%']:.2f}/{r['p99_ms@90%']:.2f} ms"
            f"  errors {r['errors']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, synthetic only")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2, help="load-test client processes")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--server-cpus", type=cpu_list, help="pin the server to these CPUs, e.g. 0 or 0-1")
    parser.add_argument("--client-cpus", type=cpu_list, help="pin this script and the load tester to these CPUs")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in SCENARIOS], metavar="SCENARIO",
                        help="run these rows (and their floors) only: " + ", ".join(name for name, _, _ in SCENARIOS))
    parser.add_argument("--datasets", nargs="+", choices=["synthetic-100k", "ml-100k"], default=["synthetic-100k", "ml-100k"])
    parser.add_argument("--skip-visible", action="store_true", help="skip the event -> visible measurement")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)  # the load tester's processes inherit it
    seconds = 2.0 if args.quick else args.seconds
    records, visible = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        datasets = [("synthetic-100k", "none")] + ([] if args.quick else [("ml-100k", "ml-100k")])
        for name, dataset in [d for d in datasets if d[0] in args.datasets]:
            data_dir = Path(tmp) / name
            if dataset == "none":
                build_synthetic(data_dir, args.items if not args.quick else 10_000, 64)
            server = ServerProcess(data_dir, dataset=dataset, dim=64, cpus=args.server_cpus).start(timeout_s=300)
            try:
                records += measure(name, server, seconds, args.concurrency, args.processes, args.only)
                if args.skip_visible:
                    continue
                visible[name] = event_to_visible(server.address, 50 if args.quick else 300)
                print(f"{name:<14} event -> visible in Recommend: p50 {visible[name]['p50_ms']:.2f} ms, "
                      f"p99 {visible[name]['p99_ms']:.2f} ms", flush=True)
            finally:
                server.terminate()
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "server_cpus": sorted(args.server_cpus) if args.server_cpus else None,
                "client_cpus": sorted(args.client_cpus) if args.client_cpus else None}
        Path(args.json_path).write_text(json.dumps({"meta": meta, "records": records, "event_to_visible": visible}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
