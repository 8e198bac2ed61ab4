"""Read replicas on Ray Serve (deploy/ray.py): what Serve's gRPC ingress adds to a Recommend against calling the
same kind of replica directly, and how far a replica on the network path trails the primary, measured in one run
against real processes on this machine.

    .venv/bin/python benchmarks/ray_serve.py --quick                 # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/ray_serve.py                         # full, about 10 minutes: 15 s loads, 2 rounds
    .venv/bin/python benchmarks/ray_serve.py --only overhead --rates 100 300 1000 --concurrency 1 16

Writes benchmarks/results/ray-serve-<machine>[-quick].json (--machine defaults to "<cores>core").

Data: MovieLens-100K at dim 64, seeded once into --work-dir (or copied from benchmarks/replicas.py's seed when
that exists) and copied for the primary of each run. Recommend calls are retrieval only (the request sets
rerank.enabled = false), k = 10, users drawn Zipf(1.1) over the 943 ML-100K users by the project's load tester.

What runs, all at once, one local Ray instance (ray.init: num_cpus = the machine's cores, no dashboard):
    primary            `streamrec serve` on a copy of the seed (cli/process.py ServerProcess)
    direct replica     `streamrec serve --replicate-from PRIMARY --dim 64 --reranker none`: a remote replica
                       (engine/replica/remote.py) in a process of its own, called on its own port
    Serve replica      deploy(PRIMARY, replicas=1) (deploy/ray.py): the same remote replica (the same Engine and
                       RecommendServicer, EngineConfig(dim=64), no reranker) inside a Ray Serve deployment,
                       called through Serve's gRPC proxy with metadata ("application", "streamrec")
Every streamrec process and Ray worker gets NUMBA_NUM_THREADS = OPENBLAS_NUM_THREADS = OMP_NUM_THREADS = 1
(set before ray.init, so Ray's processes inherit it; Ray gives a num_cpus=1 actor OMP_NUM_THREADS=1 anyway).
Serve is started here first with its HTTP proxy on a free port (the default 8000 may be taken by another Serve
on the machine) and deploy() then joins that Serve instance, with the same gRPC options it would set itself.

1. overhead  Recommend through Serve's ingress vs the direct replica, at the SAME offered load, in the same run:
             - open loop at --rates calls/s (latency from each call's scheduled send time: a target that falls
               behind shows it as latency, not as a lower rate);
             - closed loop at --concurrency workers: the most calls/s each target answers, and the latency there.
             Every load runs against both targets back to back, which one goes first alternating, --rounds times.
             Ratios are Serve / direct, "+ms" is Serve minus direct. Beside the latency: the server-side cores
             busy during the measured window (direct: the replica process; Serve: every Ray process, i.e. the
             gRPC proxy, the replica actor, the controller, raylet, GCS and Ray's agents) and CPU ms per call.
             The cores each side keeps busy with no load at all are measured first ("idle": Ray's background
             work, about 0.1 core here) and taken off before dividing by the calls (CPU per call net of idle).
2. snapshot  time for a fresh remote replica to copy the primary's state: from process start to SERVING (start of
             the interpreter, imports, Snapshot over the ReplicationService, recovery into its own LMDB copy) and
             the replica's own log line "remote replica: snapshot at seq N (I items, U users) copied in X ms"
             (--snapshots fresh direct replicas, one after the other; the last one is the direct target of 1 and
             3). For the Serve replica: deploy() until Serve's proxy routes the application, and the same log line
             from the replica actor's worker log (ray.LoggingConfig at INFO, so it reaches worker-*.err).
3. lag       an event acked by the primary -> applied on a replica, over the network path: a writer (the load
             tester, events scenario, 10 events per message, open loop) offers --lag-rate events/s to the
             primary while a prober publishes one event at a time and, from the moment its ack arrives, polls a
             replica (Recommend of an unknown user, min_seq 0, rerank off) until served_by.applied_seq reaches
             the ack's durable_seq. One window for the direct replica, then one for the Serve replica (polled
             through the ingress), each under the same writer load; both replicas follow the log and apply every
             write in both windows. Resolution: one poll round trip ("poll rtt"); "1st poll" is the share of
             probes already applied when the first poll answered (their lag is below one poll round trip).

Other sessions. This machine is shared: every load records the cores that processes outside this run took in its
measured window ("other cores": machine-wide busy time from /proc/stat minus this run's process tree) and any other
session's Ray instance or pytest seen around it. A load (both targets) or a lag window during which other
processes took more than 0.1 core runs again once the machine is quiet (waiting up to 20 s; if it stays busy the
attempt is kept as is), up to --contended-retries times; the least contended attempt is kept (the others stay in
the JSON), and a row still contended says so, as do the findings.

The 2-core caveat. Nothing is pinned: the load tester, the primary, both replicas and Ray's processes (proxy,
controller, raylet, GCS, agents) share the same two cores. Serve's path has more processes on them (the proxy
and the replica actor are two Python processes per call, plus Ray's background work), so on 2 cores its
latency and its throughput include contention that a machine with spare cores would not show. The CPU per call
is the figure that carries over; the latency gap is an upper bound of what Serve adds where cores are spare.

Published figures, as context only (other hardware, other payloads): Ray's documentation says Serve adds about
1-2 ms per request; a 2025 Serve microbenchmark reports gRPC p50 1.57 ms through the proxy.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import grpc
import numpy as np

from streamrec.cli.process import ServerProcess, free_port
from streamrec.clients.client import StreamrecClient, make_event
from streamrec.clients.loadtest import build_parser as loadtest_parser
from streamrec.clients.loadtest import make_specs, resolve_ids
from streamrec.clients.loadtest import runner as loadtest_runner
from streamrec.clients.loadtest.report import build_report
from streamrec.v1 import events_pb2, recommend_pb2, recommend_pb2_grpc

from replicas import WindowWatch, fmt, git_commit, ms_summary  # noqa: E402 (the neighbour script: benchmarks/ is on sys.path)

# Ray is imported only where the cluster starts: the load tester's client processes (spawned) import this module.

DATASET, DIM = "ml-100k", 64
SECTIONS = ("overhead", "snapshot", "lag")
APPLICATION = "streamrec"  # deploy/ray.py APPLICATION: the `application` metadata Serve's gRPC proxy routes on
ROUTE = (("application", APPLICATION),)
ONE_CORE_ENV = {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
SNAPSHOT_LINE = re.compile(r"remote replica: snapshot at seq (\d+) \((\d+) items, (\d+) users\) copied in ([\d.]+) ms")
REPLICAS_SEED = Path("/tmp/streamrec-bench-replicas") / f"seed-{DATASET}-d{DIM}"  # benchmarks/replicas.py's
MAX_ERROR_RATE = 0.001
OTHER_CORES_NOTE = 0.1  # a row says so when processes outside this run took more cores than this in its window
MACHINE_CPUS = sorted(os.sched_getaffinity(0))


@dataclass
class Plan:
    """How long and how big each section runs (--quick shrinks it)."""

    rates: list[float]
    concurrencies: list[int]
    seconds: float
    warmup: float
    rounds: int
    idle_seconds: float
    snapshots: int
    lag_rate: float
    lag_seconds: float
    contended_retries: int


def make_plan(args) -> Plan:
    quick = args.quick
    return Plan(rates=args.rates, concurrencies=args.concurrency or ([1, 8, 32] if quick else [1, 4, 16, 64]),
                seconds=args.seconds or (8.0 if quick else 15.0), warmup=1.0 if quick else 2.0,
                rounds=args.rounds or (1 if quick else 2), idle_seconds=3.0 if quick else 5.0,
                snapshots=args.snapshots or (2 if quick else 5), lag_rate=args.lag_rate,
                lag_seconds=args.lag_seconds or (10.0 if quick else 30.0), contended_retries=args.contended_retries)


# --- processes ----------------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, all its threads; None once it has exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), cmdline)
    return table


def descendants(root: int, table: dict[int, tuple[int, str]] | None = None) -> list[int]:
    table = table if table is not None else process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def ray_pids(exclude: set[int]) -> list[int]:
    """Ray's processes: everything ray.init started under this driver (GCS, raylet, agents, the Serve controller,
    proxy and replica workers), without the streamrec servers and the load tester's client processes."""
    table = process_table()
    return [pid for pid in descendants(os.getpid(), table)
            if pid not in exclude and "multiprocessing" not in table[pid][1]]


def foreign_activity() -> list[str]:
    """Other sessions' heavy work on this machine, which would share the cores: Ray instances (a raylet) and test
    runs (pytest) that this run did not start. Recorded with every load, so a contaminated row can be told."""
    table = process_table()
    mine = set(descendants(os.getpid(), table)) | {os.getpid()}
    seen = []
    for pid, (_, cmdline) in table.items():
        words = cmdline.split()
        program = " ".join(words[:4])
        if pid not in mine and ("raylet/raylet" in program or "pytest" in program):
            seen.append(f"{pid} {cmdline[:60]}")
    return seen


def stop_process(proc: subprocess.Popen | None, grace_s: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL after grace_s; the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def seeded_template(work_dir: Path) -> Path:
    """A data dir seeded with ML-100K at dim 64: made once and reused; copied from benchmarks/replicas.py's seed
    when that one exists (seeding takes a minute or two)."""
    template = work_dir / f"seed-{DATASET}-d{DIM}"
    if (template / "lmdb").is_dir():
        return template
    staging = work_dir / f"{template.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    if (REPLICAS_SEED / "lmdb").is_dir():
        print(f"copying the seed of benchmarks/replicas.py ({REPLICAS_SEED}) into {template}", flush=True)
        shutil.copytree(REPLICAS_SEED, staging)
    else:
        print(f"seeding {DATASET} (dim {DIM}) into {template} (once; later runs reuse it)", flush=True)
        server = ServerProcess(staging, dataset=DATASET, dim=DIM).start(timeout_s=900)
        if server.terminate() != 0:  # a clean stop writes the final checkpoint the copies start from
            raise RuntimeError(f"the seeding server did not stop cleanly; log: {server.log_path}")
    staging.rename(template)
    return template


def parse_snapshot_line(text: str) -> dict | None:
    """The last "remote replica: snapshot at seq ..." line of a log."""
    matches = SNAPSHOT_LINE.findall(text)
    if not matches:
        return None
    seq, items, users, ms = matches[-1]
    return {"seq": int(seq), "items": int(items), "users": int(users), "copy_ms": float(ms)}


class RemoteReplica:
    """`streamrec serve --replicate-from PRIMARY` on a fresh data dir of its own (tests/test_remote_replica.py),
    in a session of its own; start() times process start -> SERVING."""

    def __init__(self, primary: str, work_dir: Path, name: str):
        self.primary = primary
        self.data_dir = work_dir / name
        self.log_path = work_dir / f"{name}.log"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.client: StreamrecClient | None = None
        self.start_to_serving_s: float | None = None

    def start(self, timeout_s: float = 180.0) -> "RemoteReplica":
        argv = [sys.executable, "-m", "streamrec.cli", "--log-level", "INFO", "serve", "--replicate-from",
                self.primary, "--data-dir", str(self.data_dir), "--port", str(self.port), "--dim", str(DIM),
                "--reranker", "none"]
        self.client = StreamrecClient(self.address, timeout_s=10.0, consistency="eventual")
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ONE_CORE_ENV},
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the remote replica exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                self.client.wait_until_serving(0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the remote replica is not SERVING after {timeout_s} s; log: {self.log_path}")
        self.start_to_serving_s = time.perf_counter() - started
        return self

    def snapshot(self) -> dict | None:
        # The line is logged before the server binds its port, so it is there once the replica is SERVING.
        return parse_snapshot_line(self.log_path.read_text(errors="replace"))

    def stop(self) -> int | None:
        if self.client is not None:
            self.client.close()
        status = stop_process(self.proc)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        return status


class RayServe:
    """A local Ray instance with Serve's gRPC ingress and deploy(primary, replicas=1) on it."""

    def __init__(self, primary: str, work_dir: Path):
        self.primary = primary
        self.data_root = work_dir / f"serve-replicas-{uuid.uuid4().hex[:8]}"
        self.grpc_port = free_port()
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.session_dir: Path | None = None
        self.started = False
        self.timings: dict[str, float] = {}

    def start(self) -> "RayServe":
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions, HTTPOptions

        from streamrec.deploy.ray import SERVICER_FUNCTIONS, deploy

        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
        t0 = time.perf_counter()
        self.started = True  # from here on, stop() shuts down whatever came up
        for attempt in (1, 2):
            try:
                # "local": a new instance of our own, never one that RAY_ADDRESS or /tmp/ray/ray_current_cluster
                # names (other sessions on this machine run Ray too)
                ray.init(address="local", num_cpus=len(MACHINE_CPUS), include_dashboard=False, log_to_driver=False,
                         logging_level="WARNING", object_store_memory=100 << 20,
                         # INFO on the workers' root logger: the replica's snapshot line reaches its worker-*.err
                         logging_config=ray.LoggingConfig(encoding="TEXT", log_level="INFO"))
                break
            except Exception as error:  # noqa: BLE001 - seen once: GCS not up in time while another Ray started
                ray.shutdown()
                if attempt == 2:
                    raise
                print(f"ray.init failed ({error!r:.200}); retrying once", flush=True)
                time.sleep(5)
        with contextlib.suppress(Exception):
            self.session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
        t1 = time.perf_counter()
        serve.start(http_options=HTTPOptions(port=free_port()),
                    grpc_options=gRPCOptions(port=self.grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS))
        for name in ("ray", "ray.serve"):  # Serve sets its own level when it starts
            logging.getLogger(name).setLevel(logging.WARNING)
        t2 = time.perf_counter()
        deploy(self.primary, str(self.data_root), replicas=1, grpc_port=self.grpc_port, engine_options={"dim": DIM})
        t3 = time.perf_counter()
        self.timings = {"ray_init_s": t1 - t0, "serve_start_s": t2 - t1, "deploy_to_routable_s": t3 - t2}
        return self

    def snapshot(self) -> dict | None:
        """The replica actor's snapshot line, from the worker logs of this Ray session."""
        if self.session_dir is None:
            return None
        found = None
        for path in sorted((self.session_dir / "logs").glob("worker-*.err")):
            with contextlib.suppress(OSError):
                found = parse_snapshot_line(path.read_text(errors="replace")) or found
        return found

    def stop(self) -> None:
        if self.started:
            import ray
            from ray import serve
            with output_to(self.data_root.parent / "ray-shutdown.log", fd=1):
                try:
                    if ray.is_initialized():  # else serve.shutdown() would start a Ray instance to shut down
                        serve.shutdown()
                finally:
                    ray.shutdown()
            self.started = False
        shutil.rmtree(self.data_root, ignore_errors=True)


@dataclass
class Target:
    """One way to reach a replica: its address, the metadata every call carries, the pids whose CPU serves it."""

    name: str
    address: str
    metadata: tuple[tuple[str, str], ...]
    pids: callable


# --- load ---------------------------------------------------------------------------------------------------

def _loadtest_child(spec: dict, messages, start_event, start_at) -> None:
    """A load tester client process whose calls carry spec["metadata"] besides the token (Serve's proxy routes on
    the `application` key). Spawned: this module is its __main__, and the runner module is a fresh import."""
    metadata = tuple(tuple(pair) for pair in spec.get("metadata") or ())
    if metadata:
        base = loadtest_runner.auth_metadata
        loadtest_runner.auth_metadata = lambda token: base(token, metadata)
    loadtest_runner._child_main(spec, messages, start_event, start_at)


@contextlib.contextmanager
def clients_with_metadata():
    """run_processes starts `runner._child_main` in each client process: meanwhile, ours."""
    original = loadtest_runner._child_main
    loadtest_runner._child_main = _loadtest_child
    try:
        yield
    finally:
        loadtest_runner._child_main = original


def run_load(address: str, metadata: tuple, loadtest_args: list[str], watch: WindowWatch) -> dict:
    """The load tester's report for one run against `address` (client processes spawned, as its CLI does)."""
    args = loadtest_parser().parse_args(["--address", address, "--dataset", DATASET, "--progress", "none",
                                         *loadtest_args])
    users, items = resolve_ids(args, DATASET)
    specs = make_specs(args, users, items, DATASET)
    for spec in specs:
        spec["metadata"] = list(metadata)
    started = time.perf_counter()
    try:
        with clients_with_metadata():
            recorder = loadtest_runner.run_processes(specs, watch, args.connect_timeout)
    finally:
        watch.close()
    report = build_report(args, recorder, DATASET, len(users), len(items), time.perf_counter() - started)
    report.pop("timeline", None)
    report.pop("latency_histogram", None)
    return report


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy so far (all cores; /proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this run: this process and everything it started (the load tester's clients, the servers,
    Ray's processes), those still alive."""
    return sum(filter(None, (cpu_seconds(pid) for pid in [os.getpid(), *descendants(os.getpid())])))


class CpuSampler:
    """CPU seconds of a target's processes between a WindowWatch's opened and closed: cores busy. Also the
    machine's busy cores and this run's, whose difference is what other sessions' processes took meanwhile."""

    def __init__(self, pids, watch: WindowWatch):
        self.pids, self.watch = pids, watch
        self.cores: float | None = None
        self.processes = 0
        self.machine_cores: float | None = None
        self.other_cores: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.watch.opened.wait()
        pids = self.pids()
        t0, cpu0 = time.monotonic(), {pid: cpu_seconds(pid) for pid in pids}
        machine0, own0 = machine_busy_seconds(), own_cpu_seconds()
        self.watch.closed.wait()
        t1, cpu1 = time.monotonic(), {pid: cpu_seconds(pid) for pid in pids}
        machine1, own1 = machine_busy_seconds(), own_cpu_seconds()
        if t1 - t0 > 0.2:  # else the load failed before its window
            used = [cpu1[p] - cpu0[p] for p in pids if cpu0[p] is not None and cpu1[p] is not None]
            self.cores, self.processes = sum(used) / (t1 - t0), len(used)
            self.machine_cores = (machine1 - machine0) / (t1 - t0)
            # a client process that exits before the second sample takes its CPU along: a floor of 0
            self.other_cores = max(0.0, (machine1 - machine0 - (own1 - own0)) / (t1 - t0))

    def result(self) -> float | None:
        self._thread.join(30)
        return self.cores


def idle_cores(groups: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """Cores busy per group of processes over one window with no load."""
    pids = [pid for group in groups.values() for pid in group]
    before, t0 = {pid: cpu_seconds(pid) for pid in pids}, time.monotonic()
    time.sleep(seconds)
    after, t1 = {pid: cpu_seconds(pid) for pid in pids}, time.monotonic()
    return {name: sum(after[p] - before[p] for p in group if before[p] is not None and after[p] is not None) / (t1 - t0)
            for name, group in groups.items()}


def wait_for_quiet(max_s: float = 20.0, window_s: float = 2.0) -> float:
    """Until processes outside this run take under OTHER_CORES_NOTE cores over a window (at most max_s); returns
    the last window's figure."""
    deadline = time.monotonic() + max_s
    while True:
        machine0, own0, t0 = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()
        time.sleep(window_s)
        other = max(0.0, (machine_busy_seconds() - machine0 - (own_cpu_seconds() - own0)) / (time.monotonic() - t0))
        if other < OTHER_CORES_NOTE or time.monotonic() > deadline:
            return other


def least_contended(run_once, contention, retries: int, label: str):
    """run_once() again (after waiting for quiet) while other sessions' processes took more than OTHER_CORES_NOTE
    cores during it, up to `retries` more times, but only once the machine has gone quiet: under sustained load
    from elsewhere another attempt would measure the same. The least contended attempt and the others (JSON)."""
    attempts = []
    for attempt in range(retries + 1):
        if attempt:
            other = wait_for_quiet()
            if other >= OTHER_CORES_NOTE:
                print(f"    ({label}: other processes took {contention(attempts[-1]):.2f} cores, still "
                      f"{other:.2f} after waiting: kept as is)", flush=True)
                break
            print(f"    ({label}: other processes took {contention(attempts[-1]):.2f} cores; quiet again, running "
                  f"it again, {attempt} of {retries})", flush=True)
        attempts.append(run_once())
        if contention(attempts[-1]) <= OTHER_CORES_NOTE:
            break
    best = min(range(len(attempts)), key=lambda i: contention(attempts[i]))
    return attempts[best], attempts[:best] + attempts[best + 1:]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# --- 1. Serve ingress overhead -----------------------------------------------------------------------------------

def loads(plan: Plan) -> list[tuple[str, float]]:
    return [("open", rate) for rate in plan.rates] + [("closed", c) for c in plan.concurrencies]


def load_label(kind: str, value: float) -> str:
    return f"open {value:g}/s" if kind == "open" else f"closed c={value:g}"


def one_load(target: Target, kind: str, value: float, plan: Plan) -> dict:
    shape = ["--rate", str(value)] if kind == "open" else ["--concurrency", str(int(value))]
    args = ["--scenario", "recommend", "--rerank", "off", "--k", "10", "--processes", "1", *shape,
            "--warmup", str(plan.warmup), "--duration", str(plan.seconds)]
    watch = WindowWatch(plan.warmup, plan.seconds)
    sampler = CpuSampler(target.pids, watch)
    foreign = foreign_activity()
    report = run_load(target.address, target.metadata, args, watch)
    cores = sampler.result()
    foreign += [f for f in foreign_activity() if f not in foreign]
    calls = report["throughput_rps"]
    return {"target": target.name, "calls_per_s": calls, "foreign_activity": foreign, "latency_ms": report["latency_ms"],
            "schedule_lag_ms": report["schedule_lag_ms"], "errors": report["errors"],
            "errors_by_code": report["errors_by_code"], "error_rate": report["error_rate"],
            "server_cores_busy": cores, "server_processes": sampler.processes,
            "machine_cores_busy": sampler.machine_cores, "other_cores_busy": sampler.other_cores,
            "server_cpu_ms_per_call": cores / calls * 1e3 if cores and calls else None}


def measure_overhead(plan: Plan, direct: Target, serve: Target, idle: dict[str, float]) -> list[dict]:
    rows = []
    for index, (kind, value) in enumerate(loads(plan)):
        runs: dict[str, list[dict]] = {"direct": [], "serve": []}
        discarded: list[dict] = []
        for round_number in range(plan.rounds):
            order = (direct, serve) if (index + round_number) % 2 == 0 else (serve, direct)

            def pair(order=order, round_number=round_number) -> list[dict]:
                runs_of_pair = []
                for position, target in enumerate(order):
                    run = one_load(target, kind, value, plan)
                    run["round"], run["order"] = round_number, position
                    runs_of_pair.append(run)
                return runs_of_pair

            kept, others = least_contended(pair, lambda runs_of_pair: max(r["other_cores_busy"] or 0.0
                                                                          for r in runs_of_pair),
                                           plan.contended_retries, load_label(kind, value))
            for run in kept:
                runs[run["target"]].append(run)
            discarded += [run for attempt in others for run in attempt]
        rows.append(overhead_row(kind, value, runs, idle))
        rows[-1]["discarded_contended_runs"] = discarded
        print(format_overhead_row(rows[-1]), flush=True)
    return rows


def side(runs: list[dict], idle_cores: float) -> dict:
    """One target's figures for a load: the mean over rounds. CPU per call net of idle: the cores its processes
    keep busy with no load (Ray's background work) taken off first, so low rates are not charged for it."""
    def latency(key):
        return mean(r["latency_ms"].get(key) if r["latency_ms"] else None for r in runs)

    return {"calls_per_s": mean(r["calls_per_s"] for r in runs), "p50_ms": latency("p50"), "p99_ms": latency("p99"),
            "p999_ms": latency("p99.9"), "errors": sum(r["errors"] for r in runs),
            "error_rate": max(r["error_rate"] for r in runs),
            "server_cores_busy": mean(r["server_cores_busy"] for r in runs),
            "other_cores_busy": max((r["other_cores_busy"] or 0.0 for r in runs), default=0.0),
            "server_cpu_ms_per_call": mean(r["server_cpu_ms_per_call"] for r in runs),
            "server_cpu_ms_per_call_net_of_idle": mean(
                (r["server_cores_busy"] - idle_cores) / r["calls_per_s"] * 1e3
                if r["server_cores_busy"] is not None and r["calls_per_s"] else None for r in runs)}


def overhead_row(kind: str, value: float, runs: dict[str, list[dict]], idle: dict[str, float]) -> dict:
    d, s = side(runs["direct"], idle["direct_cores_busy"]), side(runs["serve"], idle["ray_cores_busy"])

    def diff(key):
        return s[key] - d[key] if s[key] is not None and d[key] is not None else None

    return {"load": load_label(kind, value), "mode": kind, "rate": value if kind == "open" else None,
            "concurrency": int(value) if kind == "closed" else None, "direct": d, "serve": s,
            "p50_ratio": ratio(s["p50_ms"], d["p50_ms"]), "p99_ratio": ratio(s["p99_ms"], d["p99_ms"]),
            "p50_added_ms": diff("p50_ms"), "p99_added_ms": diff("p99_ms"),
            "throughput_ratio": ratio(s["calls_per_s"], d["calls_per_s"]),
            "cpu_per_call_ratio": ratio(s["server_cpu_ms_per_call"], d["server_cpu_ms_per_call"]),
            "cpu_per_call_net_of_idle_ratio": ratio(s["server_cpu_ms_per_call_net_of_idle"],
                                                    d["server_cpu_ms_per_call_net_of_idle"]),
            "foreign_activity": sorted({f for r in runs["direct"] + runs["serve"] for f in r["foreign_activity"]}),
            "runs": runs["direct"] + runs["serve"]}


OVERHEAD_HEADER = (f"{'load':<13} {'calls/s d / S':>15} {'p50 ms d / S':>15} {'ratio':>6} {'+ms':>6}  "
                   f"{'p99 ms d / S':>15} {'ratio':>6} {'+ms':>6}  {'CPU ms/call* d / S':>18} {'ratio':>6} {'errors':>8}")


def format_overhead_row(r: dict) -> str:
    d, s = r["direct"], r["serve"]
    return (f"{r['load']:<13} {fmt(d['calls_per_s'], ',.0f'):>7} / {fmt(s['calls_per_s'], ',.0f'):<5} "
            f"{fmt(d['p50_ms']):>7} / {fmt(s['p50_ms']):<5} {fmt(r['p50_ratio']):>6} {fmt(r['p50_added_ms']):>6}  "
            f"{fmt(d['p99_ms']):>7} / {fmt(s['p99_ms']):<5} {fmt(r['p99_ratio']):>6} {fmt(r['p99_added_ms']):>6}  "
            f"{fmt(d['server_cpu_ms_per_call_net_of_idle'], '.3f'):>8} / "
            f"{fmt(s['server_cpu_ms_per_call_net_of_idle'], '.3f'):<7} {fmt(r['cpu_per_call_net_of_idle_ratio']):>6} "
            f"{d['errors']:>3} / {s['errors']:<3}"
            + ("  (another session's Ray or pytest was running)" if r["foreign_activity"] else "")
            + (f"  (other processes took {max(d['other_cores_busy'], s['other_cores_busy']):.2f} cores)"
               if max(d["other_cores_busy"], s["other_cores_busy"]) > OTHER_CORES_NOTE else ""))


# --- 2. snapshot --------------------------------------------------------------------------------------------------

SNAPSHOT_HEADER = (f"{'replica':<22} {'start->SERVING ms':>17} {'copy ms (log)':>13} {'at seq':>8} {'items':>6} "
                   f"{'users':>6}")


def format_snapshot_row(r: dict) -> str:
    snap = r["log"] or {}
    return (f"{r['replica']:<22} {fmt(r['start_to_serving_ms'], ',.0f'):>17} {fmt(snap.get('copy_ms'), '.1f'):>13} "
            f"{fmt(snap.get('seq'), 'd'):>8} {fmt(snap.get('items'), 'd'):>6} {fmt(snap.get('users'), 'd'):>6}")


def snapshot_summary(rows: list[dict]) -> dict:
    direct = [r for r in rows if r["kind"] == "direct"]
    copies = [r["log"]["copy_ms"] for r in direct if r["log"]]
    serving = [r["start_to_serving_ms"] for r in direct]
    serve = next((r for r in rows if r["kind"] == "serve"), None)
    return {"direct_starts": len(direct), "direct_copy_ms_median": float(np.median(copies)) if copies else None,
            "direct_start_to_serving_ms_median": float(np.median(serving)) if serving else None,
            "serve_copy_ms": serve["log"]["copy_ms"] if serve and serve["log"] else None,
            "serve_deploy_to_routable_ms": serve["start_to_serving_ms"] if serve else None}


# --- 3. replica lag over the network path ----------------------------------------------------------------------------

def probe_lag(primary: StreamrecClient, targets: list[Target], watch: WindowWatch, item: str, out: dict,
              give_up_s: float = 5.0) -> None:
    """One event at a time through the primary; from its ack, poll a replica (the targets in turn) until it has
    applied the ack's seq (benchmarks/replicas.py probe_lag, over several targets)."""
    publish = primary.events.PublishEvents
    channels = [grpc.insecure_channel(t.address) for t in targets]
    stubs = [recommend_pb2_grpc.RecommendServiceStub(c) for c in channels]
    poll = recommend_pb2.RecommendRequest(user_id="lag-poll-nobody", k=1)  # unknown user: the cheapest Recommend
    poll.rerank.enabled = False
    user = f"lag-probe-{uuid.uuid4().hex[:8]}"
    tally = {t.name: {"lags": [], "acks": [], "polls": [], "rtts": [], "errors": []} for t in targets}
    try:
        for stub, target in zip(stubs, targets):  # connected before the window
            stub.Recommend(poll, metadata=target.metadata, timeout=30)
        watch.opened.wait()
        for n in itertools.count():
            if watch.closed.is_set():
                break
            target = targets[n % len(targets)]
            stub, t = stubs[n % len(targets)], tally[target.name]
            try:
                sent = time.perf_counter()
                ack = publish(events_pb2.EventBatch(events=[make_event(user, item, "view")]), timeout=10)
                acked = time.perf_counter()
                for polls in itertools.count(1):
                    before = time.perf_counter()
                    applied = stub.Recommend(poll, metadata=target.metadata, timeout=10).served_by.applied_seq
                    seen = time.perf_counter()
                    t["rtts"].append(seen - before)
                    if applied >= ack.durable_seq or seen - acked > give_up_s:  # a stuck replica still ends it
                        break
            except grpc.RpcError as error:
                t["errors"].append(error.code().name)
                continue
            t["lags"].append(seen - acked)
            t["acks"].append(acked - sent)
            t["polls"].append(polls)
            time.sleep(0.002)  # the writer makes the load; the prober only samples it
    finally:
        for channel in channels:
            channel.close()
    for name, t in tally.items():
        polls = t["polls"]
        out[name] = {"lag_ms": ms_summary(t["lags"]), "ack_ms": ms_summary(t["acks"]),
                     "poll_rtt_ms": ms_summary(t["rtts"]),
                     "polls_per_probe": float(np.mean(polls)) if polls else None,
                     "first_poll_fresh": polls.count(1) / len(polls) if polls else None,
                     "probe_errors": len(t["errors"]),
                     "probe_errors_by_code": {c: t["errors"].count(c) for c in set(t["errors"])}}


def measure_lag(plan: Plan, primary: ServerProcess, targets: list[Target]) -> list[dict]:
    """One window per target, the same writer load each time (both replicas follow the log and apply every
    write throughout; only the probes move), so the direct replica's probes do not wait behind Serve's polls."""
    events_per_message = 10
    rows = []
    with StreamrecClient(primary.address, timeout_s=10.0, consistency="eventual") as client:
        item = client.recommend("nobody-yet", k=1).items[0].item_id
        for target in targets:
            def window(target=target) -> dict:
                args = ["--scenario", "events", "--rate", str(plan.lag_rate / events_per_message), "--processes",
                        "1", "--events-per-message", str(events_per_message), "--warmup", "1",
                        "--duration", str(plan.lag_seconds)]
                watch, probes = WindowWatch(1.0, plan.lag_seconds), {}
                sampler = CpuSampler(target.pids, watch)
                prober = threading.Thread(target=probe_lag, args=(client, [target], watch, item, probes), daemon=True)
                prober.start()
                foreign = foreign_activity()
                report = run_load(primary.address, (), args, watch)
                prober.join(60)
                sampler.result()
                foreign += [f for f in foreign_activity() if f not in foreign]
                if target.name not in probes:
                    raise RuntimeError("the lag prober failed (its traceback is in the stderr log in --work-dir)")
                return {"replica": target.name, "offered_events_per_s": plan.lag_rate,
                        "achieved_events_per_s": report["events"]["accepted"] / report["duration_s"],
                        "writer_errors": report["errors"], "writer_errors_by_code": report["errors_by_code"],
                        "writer_error_rate": report["error_rate"], "writer_ack_ms": report["event_ack_lag_ms"],
                        "replica_cores_busy": sampler.cores, "other_cores_busy": sampler.other_cores,
                        "foreign_activity": foreign, **probes[target.name]}

            row, others = least_contended(window, lambda r: r["other_cores_busy"] or 0.0, plan.contended_retries,
                                          f"lag {target.name}")
            row["discarded_contended_windows"] = others
            rows.append(row)
            print(format_lag_row(rows[-1]), flush=True)
    return rows


LAG_HEADER = (f"{'replica':<8} {'offered ev/s':>12} {'achieved':>9} {'lag p50 ms':>10} {'p99':>7} {'max':>7} "
              f"{'probes':>6} {'poll rtt':>8} {'1st poll':>8} {'ack p50':>7}")


def format_lag_row(r: dict) -> str:
    lag, poll, ack = r["lag_ms"], r["poll_rtt_ms"], r["ack_ms"]
    return (f"{r['replica']:<8} {r['offered_events_per_s']:>12,.0f} {r['achieved_events_per_s']:>9,.0f} "
            f"{fmt(lag['p50']):>10} {fmt(lag['p99']):>7} {fmt(lag['max']):>7} {lag['n']:>6} {fmt(poll['p50']):>8} "
            f"{fmt(r['first_poll_fresh'], '>7.0%'):>8} {fmt(ack['p50']):>7}"
            + (f"  probe errors {r['probe_errors_by_code']}" if r["probe_errors"] else "")
            + (f"  writer errors {r['writer_errors_by_code']}" if r["writer_errors"] else "")
            + ("  (another session's Ray or pytest was running)" if r["foreign_activity"] else "")
            + (f"  (other processes took {r['other_cores_busy']:.2f} cores)"
               if (r["other_cores_busy"] or 0.0) > OTHER_CORES_NOTE else ""))


# --- findings -----------------------------------------------------------------------------------------------------

def findings(results: dict) -> list[str]:
    lines = []
    rows = results.get("overhead", {}).get("rows", [])
    for r in rows:
        d, s = r["direct"], r["serve"]
        if r["mode"] == "open":
            failed = max(d["error_rate"], s["error_rate"]) > MAX_ERROR_RATE
            lines.append(f"Serve ingress at {r['rate']:g} calls/s: p50 {fmt(d['p50_ms'])} -> {fmt(s['p50_ms'])} ms "
                         f"(+{fmt(r['p50_added_ms'])} ms, {fmt(r['p50_ratio'])}x), p99 {fmt(d['p99_ms'])} -> "
                         f"{fmt(s['p99_ms'])} ms (+{fmt(r['p99_added_ms'])} ms, {fmt(r['p99_ratio'])}x); server CPU "
                         f"per call net of idle {fmt(d['server_cpu_ms_per_call_net_of_idle'], '.3f')} -> "
                         f"{fmt(s['server_cpu_ms_per_call_net_of_idle'], '.3f')} ms "
                         f"({fmt(r['cpu_per_call_net_of_idle_ratio'])}x)"
                         + ("; FAILED CALLS, see the rows" if failed else ""))
    closed = [r for r in rows if r["mode"] == "closed"]
    if closed:
        best_d = max(closed, key=lambda r: r["direct"]["calls_per_s"] or 0)
        best_s = max(closed, key=lambda r: r["serve"]["calls_per_s"] or 0)
        lines.append(f"most calls/s (closed loop): direct {fmt(best_d['direct']['calls_per_s'], ',.0f')} "
                     f"(c={best_d['concurrency']}), Serve {fmt(best_s['serve']['calls_per_s'], ',.0f')} "
                     f"(c={best_s['concurrency']}): {fmt(ratio(best_s['serve']['calls_per_s'], best_d['direct']['calls_per_s']))}x")
    idle = results.get("overhead", {}).get("idle")
    if idle:
        lines.append(f"with no load, Ray's processes keep {idle['ray_cores_busy']:.2f} core(s) busy "
                     f"({idle['ray_processes']} processes), the direct replica {idle['direct_cores_busy']:.3f}")
    snap = results.get("snapshot", {}).get("summary")
    if snap:
        lines.append(f"snapshot of a fresh remote replica: copy {fmt(snap['direct_copy_ms_median'], '.1f')} ms "
                     f"(its log, median of {snap['direct_starts']}), process start -> SERVING "
                     f"{fmt(snap['direct_start_to_serving_ms_median'], ',.0f')} ms; Serve replica: copy "
                     f"{fmt(snap['serve_copy_ms'], '.1f')} ms, deploy() -> routable "
                     f"{fmt(snap['serve_deploy_to_routable_ms'], ',.0f')} ms")
    for r in results.get("lag", []):
        lines.append(f"tail lag, {r['replica']} replica, {r['achieved_events_per_s']:,.0f} events/s: "
                     f"p50 {fmt(r['lag_ms']['p50'])} ms, p99 {fmt(r['lag_ms']['p99'])} ms (resolution: poll rtt "
                     f"{fmt(r['poll_rtt_ms']['p50'])} ms, {r['lag_ms']['n']} probes)"
                     + (f"; {r['probe_errors']} probe errors" if r["probe_errors"] else "")
                     + ("; nearly every probe was applied before its first poll answered: an upper bound"
                        if (r["first_poll_fresh"] or 0) > 0.9 else ""))
    tainted = [r["load"] for r in rows if r["foreign_activity"] or max(r["direct"]["other_cores_busy"],
                                                                         r["serve"]["other_cores_busy"]) > OTHER_CORES_NOTE] + \
        [f"lag {r['replica']}" for r in results.get("lag", [])
         if r["foreign_activity"] or (r["other_cores_busy"] or 0.0) > OTHER_CORES_NOTE]
    if tainted:
        lines.append(f"other sessions' processes shared the cores during: {', '.join(tainted)} "
                     f"(see foreign_activity and other_cores_busy in the JSON): rerun those on a quiet machine")
    return lines


# --- the run ------------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short loads, 1 round, 2 snapshot starts")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 300.0], help="open-loop calls/s")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="closed-loop workers (default 1 8 32 with --quick, else 1 4 16 64)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per load")
    parser.add_argument("--rounds", type=int, default=None, help="times each load runs on each target")
    parser.add_argument("--snapshots", type=int, default=None, help="fresh direct replicas started one by one")
    parser.add_argument("--lag-rate", type=float, default=1_000.0, help="events/s offered to the primary")
    parser.add_argument("--lag-seconds", type=float, default=None)
    parser.add_argument("--contended-retries", type=int, default=2,
                        help="run a load (or lag window) again, after waiting for quiet, while processes outside "
                             f"this run took more than {OTHER_CORES_NOTE} cores during it; the least contended is kept")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/streamrec-bench-ray-serve"),
                        help="the seed (kept for later runs), the data copies and the server logs")
    parser.add_argument("--machine", default=f"{len(MACHINE_CPUS)}core", help="names the JSON file")
    parser.add_argument("--json", dest="json_path", type=Path, default=None,
                        help="default benchmarks/results/ray-serve-<machine>[-quick].json")
    return parser.parse_args()


@contextlib.contextmanager
def output_to(path: Path, fd: int = 2):
    """The load tester's client processes and Ray's processes inherit this process's stderr (grpc.aio prints a
    traceback per failed request), and Ray prints its shutdown chatter on stdout: it goes to a file meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(fd)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every started process and the Ray instance are stopped."""
    def raise_interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, raise_interrupt)


def reap_leftovers(grace_s: float = 15.0) -> list[str]:
    """Whatever this run started and is still alive after the clean stops (ray.shutdown returns before all of Ray's
    processes have exited): grace_s to exit on their own, then SIGTERM, then SIGKILL, each by its pid. Returns
    those that had to be signalled."""
    def alive() -> tuple[list[int], dict]:
        table = process_table()
        return [pid for pid in descendants(os.getpid(), table) if "resource_tracker" not in table[pid][1]], table

    deadline = time.monotonic() + grace_s
    left, table = alive()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left, table = alive()
    signalled = [f"{pid} {table[pid][1][:80]}" for pid in left]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(2.0 if left else 0.0)
        left, table = alive()
    return signalled


def main() -> int:
    args = parse_args()
    stop_on_sigterm()
    os.environ.update(ONE_CORE_ENV)  # before anything starts: servers and Ray's workers inherit it
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    plan = make_plan(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.json_path or (Path(__file__).resolve().parent / "results" /
                                   f"ray-serve-{args.machine}{'-quick' if args.quick else ''}.json")
    meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "cpus": len(MACHINE_CPUS),
            "python": platform.python_version(), "ray": version("ray"), "commit": git_commit(),
            "quick": args.quick, "dataset": DATASET, "dim": DIM, "request": "Recommend k=10, rerank.enabled=false",
            "loadavg_at_start": os.getloadavg(), "foreign_activity_at_start": foreign_activity(),
            "plan": plan.__dict__, "env": ONE_CORE_ENV}
    started = time.perf_counter()
    results: dict = {}
    try:
        template = seeded_template(args.work_dir)
        with output_to(args.work_dir / "stderr.log"):
            run_sections(args, plan, template, results, meta)
    except BaseException as error:  # the sections done so far are still worth keeping
        meta["interrupted_by"] = repr(error)
        raise
    finally:
        leftovers = reap_leftovers()
        if leftovers:
            meta["signalled_leftovers"] = leftovers
            print(f"note: {len(leftovers)} process(es) were still alive 15 s after the clean stops and were "
                  f"signalled: {leftovers}")
        meta.update(loadavg_at_finish=os.getloadavg(), wall_s=round(time.perf_counter() - started, 1))
        results["findings"] = findings(results)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, **results}, indent=1, default=str))
    print("\n== Findings")
    for line in results["findings"]:
        print(f"  {line}")
    if len(MACHINE_CPUS) < 4:
        print(f"note: {len(MACHINE_CPUS)} cores shared by the load tester, the primary, both replicas and Ray's "
              f"processes (proxy, controller, raylet, GCS): Serve's latency gap includes that contention; the CPU "
              f"per call is the figure that carries over to a machine with spare cores.")
    print(f"\n{meta['wall_s']:.0f} s; results: {json_path}")
    return 0


def run_sections(args, plan: Plan, template: Path, results: dict, meta: dict) -> None:
    run_dir = args.work_dir / f"run-{uuid.uuid4().hex[:8]}"
    shutil.copytree(template, run_dir / "primary")
    primary = ServerProcess(run_dir / "primary", dataset="none", dim=DIM)
    replicas: list[RemoteReplica] = []
    serve = RayServe(primary.address, run_dir)
    try:
        primary.start(timeout_s=300)
        with StreamrecClient(primary.address, timeout_s=10.0) as client:
            meta["primary_last_seq_at_start"] = client.stats().served_by.applied_seq

        # 2 first: fresh remote replicas one after the other; the last one stays up as the direct target.
        starts = plan.snapshots if "snapshot" in args.only else 1
        print(f"\n== 2. Snapshot: a fresh remote replica copies the primary's state ({DATASET}, dim {DIM})\n"
              f"{SNAPSHOT_HEADER}", flush=True)
        snapshot_rows = []
        for n in range(starts):
            if replicas:
                replicas.pop().stop()
            replicas.append(RemoteReplica(primary.address, run_dir, f"direct-{n}").start())
            snapshot_rows.append({"replica": f"direct #{n + 1}", "kind": "direct",
                                  "start_to_serving_ms": replicas[-1].start_to_serving_s * 1e3,
                                  "log": replicas[-1].snapshot()})
            print(format_snapshot_row(snapshot_rows[-1]), flush=True)
        direct_replica = replicas[-1]

        serve.start()
        snapshot_rows.append({"replica": "Serve (deploy)", "kind": "serve",
                              "start_to_serving_ms": serve.timings["deploy_to_routable_s"] * 1e3,
                              "log": serve.snapshot(), **{k: v for k, v in serve.timings.items()}})
        print(format_snapshot_row(snapshot_rows[-1]), flush=True)
        print(f"(Ray: ray.init {serve.timings['ray_init_s']:.1f} s, serve.start {serve.timings['serve_start_s']:.1f} s; "
              f"Serve's deploy-to-routable includes starting the replica actor's worker process)", flush=True)
        results["snapshot"] = {"rows": snapshot_rows, "summary": snapshot_summary(snapshot_rows)}

        servers = {primary.proc.pid, direct_replica.proc.pid}
        direct = Target("direct", direct_replica.address, (), lambda: [direct_replica.proc.pid])
        served = Target("serve", serve.address, ROUTE, lambda: ray_pids(servers))
        warm_up([direct, served])

        if "overhead" in args.only:
            groups = {"ray": ray_pids(servers), "direct": [direct_replica.proc.pid], "primary": [primary.proc.pid]}
            busy = idle_cores(groups, plan.idle_seconds)
            idle = {"seconds": plan.idle_seconds, "ray_processes": len(groups["ray"]), "ray_cores_busy": busy["ray"],
                    "direct_cores_busy": busy["direct"], "primary_cores_busy": busy["primary"]}
            print(f"\n== 1. Serve ingress vs the replica called directly: Recommend, retrieval only ({DATASET}, dim "
                  f"{DIM}, k 10), 1 replica each, {plan.seconds:g} s per load, {plan.rounds} round(s)\n"
                  f"idle: Ray's {idle['ray_processes']} processes {idle['ray_cores_busy']:.2f} cores busy, the "
                  f"direct replica {idle['direct_cores_busy']:.3f}\n"
                  f"(d = direct replica, S = through Serve; ratio S / d; +ms S - d; * server CPU per call net of idle:"
                  f" the replica process vs every Ray process)\n{OVERHEAD_HEADER}", flush=True)
            results["overhead"] = {"idle": idle, "rows": measure_overhead(plan, direct, served, idle)}

        if "lag" in args.only:
            print(f"\n== 3. Tail lag over the network path: event acked by the primary -> applied on the replica "
                  f"({plan.lag_rate:,.0f} events/s offered, {plan.lag_seconds:g} s)\n{LAG_HEADER}", flush=True)
            results["lag"] = measure_lag(plan, primary, [direct, served])
    finally:
        try:
            serve.stop()
        finally:
            for replica in replicas:
                replica.stop()
            stop_process(primary.proc)
            shutil.rmtree(run_dir / "primary", ignore_errors=True)  # the data; the logs stay in run_dir
            meta["logs"] = str(run_dir)


def warm_up(targets: list[Target], calls: int = 50) -> None:
    """A few calls to each target before any load (connections, first batches, JIT), answers checked."""
    request = recommend_pb2.RecommendRequest(user_id="1", k=10)
    request.rerank.enabled = False
    for target in targets:
        with grpc.insecure_channel(target.address) as channel:
            stub = recommend_pb2_grpc.RecommendServiceStub(channel)
            for _ in range(calls):
                response = stub.Recommend(request, metadata=target.metadata, timeout=30)
            if len(response.items) != 10:
                raise RuntimeError(f"{target.name}: {len(response.items)} items for user 1, expected 10")


if __name__ == "__main__":
    sys.exit(main())
