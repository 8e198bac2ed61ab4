"""python benchmarks/serving_processes.py  (about 2 minutes)

Recommend throughput (retrieval only): one server process vs two sharing the port (SO_REUSEPORT, gRPC's
default on Linux), each on its own byte copy of the same seeded ML-100K store. Read-only load, so the copies
stay identical; the load tester is the same in both runs."""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from streamrec.cli.process import ServerProcess, free_port


def load(address, scenario):
    subprocess.run([sys.executable, "-m", "streamrec.clients.loadtest", "--address", address, "--scenario", scenario,
        "--rerank", "off", "--duration", "5", "--warmup", "1", "--concurrency", "32", "--processes", "2",
        "--progress", "none", "--json", "/tmp/r.json"], check=True, capture_output=True)
    return json.load(open("/tmp/r.json"))["throughput_rps"]

tmp = Path(tempfile.mkdtemp())
port = free_port()
first = ServerProcess(tmp / "a", dataset="ml-100k", dim=64, port=port).start(timeout_s=300)
results = {}
try:
    for rep in range(2):
        results.setdefault("1 process", []).append((load(first.address, "ping"), load(first.address, "recommend")))
    first.terminate()
    shutil.copytree(tmp / "a", tmp / "b")
    first = ServerProcess(tmp / "a", dataset="none", dim=64, port=port).start(timeout_s=300)
    second = ServerProcess(tmp / "b", dataset="none", dim=64, port=port).start(timeout_s=300)
    try:
        for rep in range(2):
            results.setdefault("2 processes", []).append((load(first.address, "ping"), load(first.address, "recommend")))
    finally:
        second.terminate()
finally:
    first.terminate()
for name, runs in results.items():
    print(name, " ".join(f"ping {p:.0f} recommend {r:.0f} ({r / p:.2f}x)" for p, r in runs))
