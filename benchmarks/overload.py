"""Overload run: flood a real server far past its capacity, then stop, and measure what it does.

    python benchmarks/overload.py --json benchmarks/out/overload.json           # ML-100K, ~2 minutes
    python benchmarks/overload.py --quick                                        # smoke run

Phases, each a load-tester run (clients/loadtest/) against one `streamrec serve` process:
  baseline   closed loop Recommend: the capacity C
  flood      open loop Recommend at --flood-x times C (latency from the scheduled send: nothing hidden)
  mixed      open loop 80% Recommend / 20% event batches at --flood-x times C
  recovery   closed loop Recommend again: throughput and p50 should be back at the baseline, with no errors
The server's RSS is sampled every 100 ms throughout. Calls past the admission limit get RESOURCE_EXHAUSTED from
the Python server; calls that gRPC core itself holds past its pending-request cap (a C-core default,
grpc.server.max_pending_requests) come back CANCELLED: both are the server shedding load. The same phases run twice: with the default admission
limit (--max-concurrent-rpcs, 4 x workers) and with the limit lifted, which is the peer: it shows where
memory and latency go when calls queue without bound.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

from serving import loadtest  # benchmarks/serving.py: one load-tester run, its JSON report

from streamrec.cli.process import ServerProcess

UNBOUNDED = 1_000_000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), rss_mb(self.pid)))
            except OSError:
                return
            self._stop.wait(self.every_s)

    def between(self, start: float, end: float) -> list[float]:
        return [mb for t, mb in self.samples if start <= t <= end]

    def stop(self) -> None:
        self._stop.set()


def phase_record(name: str, report: dict, rss: list[float]) -> dict:
    codes = {"OK": report["ok"], **report["errors_by_code"]}
    total = report["requests"] or 1
    latency = report.get("latency_ms") or {}
    rejected = report.get("error_latency_ms") or {}
    return {
        "phase": name,
        "requests": report["requests"],
        "ok_per_s": report["throughput_rps"],
        "offered_per_s": report["achieved_rate_rps"],
        "codes": codes,
        "resource_exhausted_share": codes.get("RESOURCE_EXHAUSTED", 0) / total,
        "p50_ms": latency.get("p50"),
        "p99_ms": latency.get("p99"),
        "error_p50_ms": rejected.get("p50"),
        "error_p99_ms": rejected.get("p99"),
        # Open loop on 2 shared cores: how late the client itself sent, which is in every latency above.
        "client_send_lag_p50_ms": (report.get("schedule_lag_ms") or {}).get("p50"),
        "rss_max_mb": max(rss) if rss else None,
        "rss_end_mb": rss[-1] if rss else None,
    }


def run_config(label: str, data_dir: Path, dataset: str, limit: int | None, seconds: float, flood_x: float,
               processes: int) -> list[dict]:
    extra = ("--max-concurrent-rpcs", str(limit)) if limit else ()
    server = ServerProcess(data_dir, dataset=dataset, dim=64, extra_args=extra).start(timeout_s=300)
    sampler = RssSampler(server.proc.pid)
    sampler.start()
    records = []
    try:
        common = ["--processes", str(processes), "--timeout", "2"]
        phases = [
            ("baseline", ["--scenario", "recommend", "--concurrency", "32"]),
            ("flood", ["--scenario", "recommend", "--max-inflight", "5000"]),
            ("mixed", ["--scenario", "mixed", "--max-inflight", "5000", "--streams", "4", "--events-per-message", "10"]),
            ("recovery", ["--scenario", "recommend", "--concurrency", "32"]),
        ]
        capacity = None
        for name, args in phases:
            if name in ("flood", "mixed"):
                args = [*args, "--rate", f"{capacity * flood_x:.0f}"]
            started = time.monotonic()
            report = loadtest(server.address, [*args, *common], seconds, [])
            record = phase_record(name, report, sampler.between(started, time.monotonic()))
            record["config"] = label
            if name == "baseline":
                capacity = max(record["ok_per_s"], 50.0)
            records.append(record)
            print(format_row(record), flush=True)
    finally:
        sampler.stop()
        server.terminate()
    return records


def format_row(r: dict) -> str:
    codes = ", ".join(f"{code} {n}" for code, n in sorted(r["codes"].items(), key=lambda kv: -kv[1]))
    p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
    p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
    failed = f"  failures p50 {r['error_p50_ms']:.1f} ms" if r["error_p50_ms"] is not None else ""
    lag = f"  client send lag p50 {r['client_send_lag_p50_ms']:.1f} ms" if r["client_send_lag_p50_ms"] is not None else ""
    return (f"{r['config']:<10} {r['phase']:<9} offered {r['offered_per_s']:>8,.0f}/s  ok {r['ok_per_s']:>7,.0f}/s  "
            f"RESOURCE_EXHAUSTED {100 * r['resource_exhausted_share']:5.1f}%  p50/p99 {p50}/{p99} ms  "
            f"RSS max {r['rss_max_mb']:.0f} MB{failed}{lag}  [{codes}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases on the synthetic dataset")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--flood-x", type=float, default=10.0, help="offered load during the flood, times capacity")
    parser.add_argument("--processes", type=int, default=2, help="load-test client processes")
    parser.add_argument("--no-peer", action="store_true", help="skip the run with the admission limit lifted")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    dataset = "synthetic" if args.quick else "ml-100k"
    configs = [("bounded", None)] + ([] if args.no_peer else [("unbounded", UNBOUNDED)])
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, limit in configs:
            records += run_config(label, Path(tmp) / "data", dataset, limit, seconds, args.flood_x, args.processes)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "dataset": dataset}
        Path(args.json_path).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
