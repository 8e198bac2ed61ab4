"""Multi-process serving (`streamrec serve --replicas N`): throughput scaling, replica lag, read-your-writes and
what feeding replicas costs the primary, measured in one run against real servers, next to the issue's targets.

    .venv/bin/python benchmarks/replicas.py --quick                  # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/replicas.py                          # full: every N up to --max-processes
    .venv/bin/python benchmarks/replicas.py --only lag ryw --json /tmp/replicas.json

Writes benchmarks/results/replicas-<machine>[-quick].json (--machine defaults to "<cores>core").

Data: MovieLens-100K at dim 64 (so the shipped reranker loads), seeded once into --work-dir and reused by later
runs; every topology runs on a fresh copy of it (a replica reads its primary's folder, so one folder per
topology). Every server process is sized as one core's worth (NUMBA_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1),
which is what --replicas is meant to multiply.

How the load reaches the processes. The load tester's command line takes one --address, so this script drives
its runner (clients/loadtest: make_specs, run_processes, build_report) directly and points client process i at
process port i mod N: every process gets the same share of connections (the shared SO_REUSEPORT port spreads
connections by hash, unevenly when there are few), all clients start together and their latency histograms
merge exactly. Writes that reach a replica are forwarded to the primary, as they would be on the shared port.

1. scaling   Recommend with N = 1 (--replicas 0), 2, ... server processes, for retrieval only (--rerank off),
             reranked (--rerank on, the server's 200 candidates) and an 80/20 mix of Recommend (retrieval only)
             and event batches (10 events each). Two loads per workload:
             - peak: closed loop, --concurrency workers per process: calls/s, and calls/s over N x the
               one-process calls/s (the issue's ratio);
             - paced: open loop at --paced-rate calls/s per process, the same for every N, so every process
               forms kernel batches alike and CPU per call compares what the processes themselves cost.
             CPU is utime + stime from /proc of every server pid that Stats reports, summed, sampled inside the
             load tester's measured window; "per batch" is Recommend calls per micro-batch (Stats), which is
             what moves CPU per call at peak (fewer calls at once per process: smaller batches).
             Rows whose servers share cores with the load generator are compared with a one-process row that
             shares them too, measured in the same sweep.
2. lag       an event acked by the primary -> applied on a replica: a background writer publishes events at
             --lag-rates events/s (open loop, 10 per message, through the primary's port) while a prober
             publishes one event at a time and, from the moment its ack arrives, polls a replica (Recommend of an
             unknown user, min_seq 0) until the answer's served_by.applied_seq reaches the ack's durable_seq.
             Resolution: one poll round trip ("poll rtt"; "1st poll" is the share of probes already applied when
             the first poll answered). The achieved rate is the writer's accepted events/s.
3. ryw       read-your-writes: --ryw-pairs pairs, --ryw-threads at a time, each a purchase event for a fresh
             user written through one process (rotating over all) and then a Recommend through another (a replica
             whenever there is one) with min_seq = the ack's durable_seq. A violation: served_by.applied_seq <
             durable_seq, or an answer that is not "personalized" (the user's one event not reflected). The wait
             for min_seq is the answer's server_latency_us (which includes the wait) minus that of a second
             Recommend of the same user right after it, on the same process, with min_seq 0 (nothing to wait for).
4. feeding   the primary's ingest (StreamEvents through its port, closed loop, 100 events per message) with 0
             replicas vs with N replicas that only tail the log; fresh data copies, alternating, --feeding-rounds
             rounds. Also the primary's own CPU per event, and the cores the replicas spend applying the log.

Cores. When the machine has room, the servers are pinned to cores of their own and the load generator (and this
script's threads) to the others; otherwise nothing is pinned and everything shares the cores, which the rows
say ("shared"). A target is judged PASS/FAIL only where it was measured with cores to spare (or passes even
without); else "not measurable here" with the reason. On a 2-core machine the load generator always shares, so
there paced CPU per call is the honest figure for scaling, and the primary's CPU per event for feeding. The same
command runs unchanged on a 16-core host (N up to 8 pinned apart there; larger N share).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from streamrec.cli.process import ServerProcess, free_port
from streamrec.clients.client import StreamrecClient, make_event
from streamrec.clients.loadtest import build_parser as loadtest_parser
from streamrec.clients.loadtest import make_specs, resolve_ids
from streamrec.clients.loadtest.report import build_report
from streamrec.clients.loadtest.runner import run_processes
from streamrec.v1 import events_pb2, recommend_pb2

DATASET, DIM = "ml-100k", 64
SECTIONS = ("scaling", "lag", "ryw", "feeding")
WORKLOADS = {  # name -> load tester arguments; mixed last: it writes, the others only read
    "retrieval": ["--scenario", "recommend", "--rerank", "off"],
    "reranked": ["--scenario", "recommend", "--rerank", "on"],
    "mixed 80/20": ["--scenario", "mixed", "--mix", "0.8", "--rerank", "off", "--events-per-message", "10"],
}
# The issue's targets.
SCALING_TARGET = 0.8  # aggregate Recommend >= 0.8 x N x one process's, on N free cores
LAG_TARGET_MS, LAG_TARGET_RATE = 10.0, 10_000  # replica lag p99, at this many events/s
RYW_TARGET_PAIRS = 10_000  # with 0 violations
FEEDING_TARGET = 0.05  # at most this share of the primary's ingest lost to feeding replicas
MAX_ERROR_RATE = 0.001  # a load with more failed calls measures the failure, not the serving
SATURATED = 0.85  # cores busy per server process at peak, below which the load generator was the limit
MACHINE_CPUS = sorted(os.sched_getaffinity(0))  # what this script may use, before it pins anything


@dataclass
class Plan:
    """How long and how big each section runs (--quick shrinks it)."""

    process_counts: list[int]
    seconds: float  # measured seconds of a scaling load
    warmup: float
    concurrency_per_process: int
    paced_rate: float  # calls/s per server process of the paced scaling loads
    clients_per_process: int
    lag_rates: list[int]
    lag_seconds: float
    ryw_pairs: int
    ryw_threads: int
    feeding_rounds: int
    feeding_seconds: float
    feeding_events_per_message: int
    replicas: int  # for lag, ryw and feeding


def make_plan(args) -> Plan:
    top = max(1, args.max_processes)
    counts = sorted({1, min(2, top), top}) if args.quick else list(range(1, top + 1))
    return Plan(process_counts=counts, seconds=args.seconds or (3.0 if args.quick else 10.0),
                warmup=1.0 if args.quick else 3.0, concurrency_per_process=args.concurrency, paced_rate=args.paced_rate,
                clients_per_process=args.clients_per_process, lag_rates=args.lag_rates,
                lag_seconds=args.lag_seconds or (5.0 if args.quick else 20.0),
                ryw_pairs=args.ryw_pairs or RYW_TARGET_PAIRS, ryw_threads=args.ryw_threads,
                feeding_rounds=args.feeding_rounds or (2 if args.quick else 3),
                feeding_seconds=args.seconds or (3.0 if args.quick else 10.0),
                feeding_events_per_message=args.feeding_events_per_message, replicas=max(1, top - 1))


# --- cores --------------------------------------------------------------------------------------------------

@dataclass
class Cores:
    """Which CPUs the servers and the load generator get; `pinned` False = all share every CPU."""

    servers: set[int]
    clients: set[int]
    pinned: bool
    why_shared: str = ""


def split_cores(server_cores: int, client_cores: int) -> Cores:
    """The first `server_cores` CPUs for the servers and the rest for the load generator, when there are enough
    for both apart; else everything shared, with the reason."""
    if len(MACHINE_CPUS) >= server_cores + client_cores:
        return Cores(set(MACHINE_CPUS[:server_cores]), set(MACHINE_CPUS[server_cores:]), True)
    why = (f"{server_cores} server core(s) + {client_cores} for the load generator needed, "
           f"this machine has {len(MACHINE_CPUS)}")
    return Cores(set(MACHINE_CPUS), set(MACHINE_CPUS), False, why)


def server_cpus(cores: Cores) -> set[int] | None:
    return cores.servers if cores.pinned else None


@contextlib.contextmanager
def running_on(cpus: set[int]):
    """Pin this thread to `cpus`, and so what it starts meanwhile: the load tester's processes, the probing threads,
    gRPC's threads for this process's channels. (A server is pinned on its own, see Topology.)"""
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, MACHINE_CPUS)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def session_members(session_id: int) -> list[int]:
    """Pids of the live processes of a session (this script starts each supervisor in a session of its own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry.name))
    return members


# --- servers ------------------------------------------------------------------------------------------------

def seeded_template(work_dir: Path) -> Path:
    """A data dir seeded with ML-100K at dim 64, made once (a minute or two) and reused by later runs."""
    template = work_dir / f"seed-{DATASET}-d{DIM}"
    if (template / "lmdb").is_dir():
        return template
    staging = work_dir / f"{template.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"seeding {DATASET} (dim {DIM}) into {template} (once; later runs reuse it)", flush=True)
    server = ServerProcess(staging, dataset=DATASET, dim=DIM).start(timeout_s=900)
    if server.terminate() != 0:  # a clean stop writes the final checkpoint the copies start from
        raise RuntimeError(f"the seeding server did not stop cleanly; log: {server.log_path}")
    staging.rename(template)
    return template


class Topology:
    """`streamrec serve --replicas N` on a copy of the template: a supervisor, the primary and N replicas, each with
    a process port of its own. The supervisor gets a session of its own, so stop() finds every process it
    started (restarted children included) and ends each by its pid."""

    def __init__(self, template: Path, work_dir: Path, replicas: int, cpus: set[int] | None = None):
        self.template, self.replicas, self.cpus = template, replicas, cpus
        self.data_dir = work_dir / f"run-{replicas}r-{uuid.uuid4().hex[:8]}"
        self.log_path = work_dir / f"{self.data_dir.name}.log"
        self.port = free_port()
        # With --replicas 0 the one process serves the shared port only (--process-ports is ignored then).
        self.process_ports = [free_port() for _ in range(replicas + 1)] if replicas else [self.port]
        self.addresses = [f"127.0.0.1:{port}" for port in self.process_ports]  # the primary's first
        self.proc: subprocess.Popen | None = None
        self.clients: list[StreamrecClient] = []
        self.pids: list[int] = []

    def __enter__(self) -> "Topology":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def primary(self) -> StreamrecClient:
        return self.clients[0]

    def start(self, timeout_s: float = 300.0) -> None:
        shutil.copytree(self.template, self.data_dir)
        argv = [sys.executable, "-m", "streamrec.cli", "--log-level", "WARNING", "serve", "--data-dir",
                str(self.data_dir), "--dataset", "none", "--dim", str(DIM), "--port", str(self.port),
                "--replicas", str(self.replicas)]
        if self.replicas:
            argv += ["--process-ports", ",".join(map(str, self.process_ports))]
        # One core's worth per process: the thread pools would otherwise size themselves by the whole machine.
        env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        cpus = self.cpus
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # noqa: E731  inherited by every child
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pin,
                                         start_new_session=True)
        # Session consistency off: every read here says its own min_seq.
        self.clients = [StreamrecClient(address, timeout_s=10.0, consistency="eventual") for address in self.addresses]
        deadline = time.monotonic() + timeout_s
        for client in self.clients:
            self._wait_serving(client, deadline)
        stats = [client.stats() for client in self.clients]
        roles = [s.role for s in stats]
        if roles != ["primary"] + ["replica"] * self.replicas:
            raise RuntimeError(f"unexpected roles on the process ports: {roles}")
        self.pids = [s.pid for s in stats]
        self._wait_wakeups_registered(deadline)

    def _wait_serving(self, client: StreamrecClient, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                client.wait_until_serving(5.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{client.address} not SERVING in time; log: {self.log_path}") from None

    def _wait_wakeups_registered(self, deadline: float) -> None:
        """Until every replica gets commit wake-ups (the primary lists them about once a second); before that a
        replica only polls, and the first lag samples would measure the poll interval."""
        while self.primary.stats().replicas < self.replicas:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the primary registered fewer than {self.replicas} replicas")
            time.sleep(0.1)

    def cpu_seconds(self) -> list[float]:
        """CPU seconds so far of each server process, the primary's first."""
        return [cpu_seconds(pid) for pid in self.pids]

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # replicas drain, then the primary checkpoints
                try:
                    self.proc.wait(90)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            for pid in session_members(self.proc.pid):  # children the supervisor left behind, if any
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.log_path.exists() and not self.log_path.stat().st_size:
            self.log_path.unlink()  # the servers logged no warning: nothing to keep


# --- load -----------------------------------------------------------------------------------------------------

class WindowWatch:
    """Stands in for the load tester's progress display. Its updates carry the seconds since the clients' common
    start, so the first one tells when the measured window opens and closes: `opened` and `closed` are set a
    margin inside it, and whatever is sampled between them saw measured load only."""

    def __init__(self, warmup_s: float, duration_s: float):
        margin = min(0.5, 0.1 * duration_s)
        self.offsets = (warmup_s + margin, warmup_s + duration_s - margin)
        self.opened, self.closed = threading.Event(), threading.Event()
        self._timers: list[threading.Timer] = []

    def update(self, elapsed: float, finished: int, failed: int) -> None:
        if self._timers:
            return
        start = time.monotonic() - elapsed
        for event, offset in zip((self.opened, self.closed), self.offsets):
            timer = threading.Timer(max(0.0, start + offset - time.monotonic()), event.set)
            timer.daemon = True
            timer.start()
            self._timers.append(timer)

    def close(self) -> None:
        """The load ended (or failed): nobody waits any longer."""
        for timer in self._timers:
            timer.cancel()
        self.opened.set()
        self.closed.set()


def run_load(addresses: list[str], loadtest_args: list[str], watch: WindowWatch | None = None) -> dict:
    """The load tester's report for one run, client process i sending to addresses[i % len(addresses)]."""
    args = loadtest_parser().parse_args(["--address", addresses[0], "--dataset", DATASET, "--progress", "none",
                                         *loadtest_args])
    users, items = resolve_ids(args, DATASET)
    specs = make_specs(args, users, items, DATASET)
    for spec in specs:
        spec["address"] = addresses[spec["proc_index"] % len(addresses)]
    watch = watch or WindowWatch(args.warmup, args.duration)
    started = time.perf_counter()
    try:
        recorder = run_processes(specs, watch, args.connect_timeout)
    finally:
        watch.close()
    report = build_report(args, recorder, DATASET, len(users), len(items), time.perf_counter() - started)
    report["address"] = addresses
    return report


@dataclass
class ServerSample:
    """What the server processes did between two snapshots."""

    per_process_cores: list[float]  # CPU seconds per wall second, the primary's first
    recommend_calls: int
    recommend_batches: int  # kernel batches the micro-batcher formed from those calls

    @property
    def calls_per_batch(self) -> float | None:
        return self.recommend_calls / self.recommend_batches if self.recommend_batches else None


class ServerSampler:
    """Snapshots the server processes when a WindowWatch opens and closes, so the CPU and the batching it reports
    cover measured load only. Batching matters when CPU per call is compared: a process that gets fewer calls
    at once forms smaller kernel batches and spends more per call."""

    def __init__(self, topology: Topology, watch: WindowWatch):
        self.topology, self.watch = topology, watch
        self.sample: ServerSample | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _snapshot(self) -> tuple[float, list[float], int, int]:
        stats = [client.stats() for client in self.topology.clients]
        return (time.monotonic(), self.topology.cpu_seconds(), sum(s.recommendations for s in stats),
                sum(s.recommend_batches for s in stats))

    def _run(self) -> None:
        self.watch.opened.wait()
        t0, cpu0, calls0, batches0 = self._snapshot()
        self.watch.closed.wait()
        t1, cpu1, calls1, batches1 = self._snapshot()
        if t1 - t0 > 0.2:  # else the load failed before its window
            self.sample = ServerSample([(b - a) / (t1 - t0) for a, b in zip(cpu0, cpu1)], calls1 - calls0,
                                       batches1 - batches0)

    def result(self) -> ServerSample | None:
        self._thread.join(30)
        return self.sample


def loaded_servers(topology: Topology, addresses: list[str], loadtest_args: list[str], warmup: float,
                   seconds: float) -> tuple[dict, ServerSample | None]:
    """Run a load; return its report and what the server processes did during it."""
    watch = WindowWatch(warmup, seconds)
    sampler = ServerSampler(topology, watch)
    report = run_load(addresses, [*loadtest_args, "--warmup", str(warmup), "--duration", str(seconds)], watch)
    return report, sampler.result()


def ms_summary(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    values = np.asarray(seconds) * 1e3
    return {"n": len(values), "p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "max": float(values.max())}


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


# --- 1. throughput scaling -------------------------------------------------------------------------------------

def scaling_runs(plan: Plan) -> list[tuple[int, Cores]]:
    """(server processes, cores) of each topology: pinned apart where the machine has room. A row that shares the
    cores is compared with a one-process row that shares them too, measured in the same sweep, so its ratios
    compare like with like."""
    runs = [(n, split_cores(n, n * plan.clients_per_process)) for n in plan.process_counts]
    shared = [cores for n, cores in runs if not cores.pinned]
    if shared and runs[0][0] == 1 and runs[0][1].pinned:
        runs.insert(1, (1, Cores(set(MACHINE_CPUS), set(MACHINE_CPUS), False, shared[0].why_shared)))
    return runs


def measure_scaling(plan: Plan, template: Path, work_dir: Path) -> list[dict]:
    rows: list[dict] = []
    for processes, cores in scaling_runs(plan):
        clients = processes * plan.clients_per_process
        with running_on(cores.clients), Topology(template, work_dir, processes - 1, server_cpus(cores)) as topology:
            for workload, workload_args in WORKLOADS.items():
                common = [*workload_args, "--processes", str(clients)]
                peak = loaded_servers(topology, topology.addresses,
                                      [*common, "--concurrency", str(plan.concurrency_per_process * processes)],
                                      plan.warmup, plan.seconds)
                paced = loaded_servers(topology, topology.addresses,
                                       [*common, "--rate", str(plan.paced_rate * processes)], plan.warmup, plan.seconds)
                rows.append(scaling_row(workload, processes, peak, paced, cores, rows))
                print(format_scaling_row(rows[-1]), flush=True)
    return rows


def server_figures(report: dict, sample: ServerSample | None) -> dict:
    """A load's calls/s and what it cost the server processes."""
    calls = report["throughput_rps"]
    cores_busy = sum(sample.per_process_cores) if sample else None
    return {"calls_per_s": calls, "server_cores_busy": cores_busy,
            "server_cpu_ms_per_call": cores_busy / calls * 1e3 if cores_busy and calls else None,
            "server_cores_busy_per_process": sample.per_process_cores if sample else None,
            "recommend_calls_per_batch": sample.calls_per_batch if sample else None,
            "latency_ms": report["latency_ms"], "errors": report["errors"], "error_rate": report["error_rate"],
            "errors_by_code": report["errors_by_code"]}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def scaling_row(workload: str, processes: int, peak: tuple[dict, ServerSample | None],
                paced: tuple[dict, ServerSample | None], cores: Cores, earlier: list[dict]) -> dict:
    """peak: closed loop, as many calls as the processes answer; paced: open loop at the same calls/s per process
    for every N, so every process forms batches alike and CPU per call compares the processes' own costs."""
    row = {"workload": workload, "processes": processes, **server_figures(*peak),
           "paced": server_figures(*paced), "paced_rate_per_process": paced[0]["target_rate_rps"] / processes,
           "pinned": cores.pinned, "why_shared": cores.why_shared, "server_cpus": sorted(cores.servers),
           "client_cpus": sorted(cores.clients)}
    row["error_rate"] = max(row["error_rate"], row["paced"]["error_rate"])
    one = row if processes == 1 else next((r for r in earlier if r["workload"] == workload and r["processes"] == 1
                                           and r["pinned"] == cores.pinned), None)
    if one is not None:
        row["ratio_to_n_x_one"] = ratio(row["calls_per_s"], processes * one["calls_per_s"])
        row["paced_cpu_per_call_vs_one"] = ratio(row["paced"]["server_cpu_ms_per_call"],
                                                 one["paced"]["server_cpu_ms_per_call"])
    else:
        row.update(ratio_to_n_x_one=None, paced_cpu_per_call_vs_one=None)
    # The issue's ratio holds on N cores of the servers' own, with the load generator elsewhere, and only when the
    # load kept every process busy: a client-bound baseline would flatter every ratio.
    row["saturated"] = (row["server_cores_busy"] or 0.0) / processes >= SATURATED
    row["measurable"] = bool(cores.pinned and row["saturated"] and one is not None and one["saturated"]
                             and row["error_rate"] <= MAX_ERROR_RATE)
    return row


SCALING_HEADER = (f"{'':<18}{'peak (closed loop)':-^51}  {'paced (fixed calls/s per process)':-^40}\n"
                  f"{'workload':<12} {'procs':>5} {'calls/s':>9} {'/(N x 1)':>8} {'srv cores':>9} {'CPU ms/call':>11} "
                  f"{'per batch':>9}  {'calls/s':>8} {'CPU ms/call':>11} {'vs N=1':>6} {'per batch':>9}  "
                  f"{'errors':>6}  cores")


def format_scaling_row(r: dict) -> str:
    paced = r["paced"]
    errors = {k: v for k, v in r["errors_by_code"].items()}
    for code, count in paced["errors_by_code"].items():
        errors[code] = errors.get(code, 0) + count
    return (f"{r['workload']:<12} {r['processes']:>5} {r['calls_per_s']:>9,.0f} {fmt(r['ratio_to_n_x_one']):>8} "
            f"{fmt(r['server_cores_busy']):>9} {fmt(r['server_cpu_ms_per_call'], '.3f'):>11} "
            f"{fmt(r['recommend_calls_per_batch'], '.1f'):>9}  {paced['calls_per_s']:>8,.0f} "
            f"{fmt(paced['server_cpu_ms_per_call'], '.3f'):>11} {fmt(r['paced_cpu_per_call_vs_one']):>6} "
            f"{fmt(paced['recommend_calls_per_batch'], '.1f'):>9}  {r['errors'] + paced['errors']:>6}  "
            f"{'pinned apart' if r['pinned'] else 'shared'}{'' if r['saturated'] else ', not saturated'}"
            + (f"  {errors}" if errors else ""))


def scaling_verdict(rows: list[dict]) -> str:
    multi = [r for r in rows if r["processes"] > 1 and r["ratio_to_n_x_one"] is not None]
    if not multi:
        return "not measured: no run with 2 or more processes (--max-processes)"
    measurable = [r for r in multi if r["measurable"]]
    if measurable:
        worst = min(measurable, key=lambda r: r["ratio_to_n_x_one"])
        verdict = "PASS" if worst["ratio_to_n_x_one"] >= SCALING_TARGET else "FAIL"
        left_out = len(multi) - len(measurable)
        return (f"{verdict}: worst {worst['ratio_to_n_x_one']:.2f} x N x one process ({worst['workload']}, "
                f"N={worst['processes']})" + (f"; {left_out} row(s) not measurable here (shared cores, not "
                                              f"saturated or failed calls)" if left_out else ""))
    clean = [r for r in multi if r["error_rate"] <= MAX_ERROR_RATE] or multi
    worst = min(clean, key=lambda r: r["ratio_to_n_x_one"])
    if not worst["pinned"]:
        why = f"{worst['why_shared']}, so the load generator takes cores from the servers"
    else:
        why = (f"the load did not keep every server process busy (>= {SATURATED} core each): "
               f"raise --clients-per-process or --concurrency")
    costs = [r for r in clean if r["paced_cpu_per_call_vs_one"] is not None]
    costliest = max(costs, key=lambda r: r["paced_cpu_per_call_vs_one"]) if costs else None
    cpu = (f"; paced CPU per call at most {costliest['paced_cpu_per_call_vs_one']:.2f} x one process's "
           f"({costliest['workload']}, N={costliest['processes']})" if costliest else "")
    failed = [r for r in multi if r["error_rate"] > MAX_ERROR_RATE]
    errors = "".join(f"; failed calls: {r['workload']} N={r['processes']} ({r['error_rate']:.1%} "
                     f"{r['errors_by_code']})" for r in failed)
    return (f"not measurable here: {why} (worst ratio {worst['ratio_to_n_x_one']:.2f}, {worst['workload']} "
            f"N={worst['processes']}{cpu}){errors}")


# --- 2. replica lag ------------------------------------------------------------------------------------------------

def probe_lag(topology: Topology, watch: WindowWatch, item: str, out: dict, give_up_s: float = 5.0) -> None:
    """One event at a time through the primary; from its ack, poll a replica until it has applied the ack's seq."""
    publish = topology.primary.events.PublishEvents
    replicas = [client.recommender.Recommend for client in topology.clients[1:]]
    poll = recommend_pb2.RecommendRequest(user_id="lag-poll-nobody", k=1)  # unknown user: the cheapest Recommend
    poll.rerank.enabled = False
    user = f"lag-probe-{uuid.uuid4().hex[:8]}"
    lags, acks, polls_per_probe, poll_rtts, errors = [], [], [], [], []
    watch.opened.wait()
    for n in itertools.count():
        if watch.closed.is_set():
            break
        try:
            sent = time.perf_counter()
            ack = publish(events_pb2.EventBatch(events=[make_event(user, item, "view")]), timeout=10)
            acked = time.perf_counter()
            recommend = replicas[n % len(replicas)]
            for polls in itertools.count(1):
                before = time.perf_counter()
                applied = recommend(poll, timeout=10).served_by.applied_seq
                seen = time.perf_counter()
                poll_rtts.append(seen - before)
                if applied >= ack.durable_seq or seen - acked > give_up_s:  # a stuck replica still ends the probe
                    break
        except grpc.RpcError as error:
            errors.append(error.code().name)
            continue
        lags.append(seen - acked)
        acks.append(acked - sent)
        polls_per_probe.append(polls)
        time.sleep(0.002)  # the writer makes the load; the prober only samples it
    out.update(lag_ms=ms_summary(lags), ack_ms=ms_summary(acks), poll_rtt_ms=ms_summary(poll_rtts),
               polls_per_probe=float(np.mean(polls_per_probe)) if polls_per_probe else None,
               # applied before the first poll's answer: that lag is below one poll round trip (the resolution)
               first_poll_fresh=polls_per_probe.count(1) / len(polls_per_probe) if polls_per_probe else None,
               probe_errors=len(errors), probe_errors_by_code={c: errors.count(c) for c in set(errors)})


def measure_lag(plan: Plan, template: Path, work_dir: Path) -> list[dict]:
    events_per_message = 10
    cores = split_cores(plan.replicas + 1, 2)  # the writer's process(es) and this prober
    rows = []
    with running_on(cores.clients), Topology(template, work_dir, plan.replicas, server_cpus(cores)) as topology:
        item = topology.primary.recommend("nobody-yet", k=1).items[0].item_id
        for rate in plan.lag_rates:
            writers = max(1, round(rate / 5_000))  # a client process keeps up with about that many events/s
            loadtest_args = ["--scenario", "events", "--rate", str(rate / events_per_message),
                             "--processes", str(writers), "--events-per-message", str(events_per_message),
                             "--warmup", "1", "--duration", str(plan.lag_seconds)]
            watch, probes = WindowWatch(1.0, plan.lag_seconds), {}
            prober = threading.Thread(target=probe_lag, args=(topology, watch, item, probes), daemon=True)
            prober.start()
            report = run_load([topology.addresses[0]], loadtest_args, watch)
            prober.join(60)
            if "lag_ms" not in probes:
                raise RuntimeError("the lag prober failed (its traceback is in the stderr log in --work-dir)")
            achieved = report["events"]["accepted"] / report["duration_s"]
            rows.append({"offered_events_per_s": rate, "achieved_events_per_s": achieved, "replicas": plan.replicas,
                         "writer_errors": report["errors"], "writer_errors_by_code": report["errors_by_code"],
                         "writer_error_rate": report["error_rate"],
                         "writer_ack_ms": report["event_ack_lag_ms"], "pinned": cores.pinned,
                         "why_shared": cores.why_shared, **probes})
            print(format_lag_row(rows[-1]), flush=True)
    if all((r["first_poll_fresh"] or 0) > 0.9 for r in rows):
        print("note: (nearly) every probe was applied before its first poll answered: the lags are below one poll "
              "round trip, and these figures are upper bounds", flush=True)
    return rows


LAG_HEADER = (f"{'offered ev/s':>12} {'achieved':>9} {'lag p50 ms':>10} {'p99':>7} {'max':>7} {'probes':>6} "
              f"{'poll rtt':>8} {'1st poll':>8} {'ack p50':>7}  cores")


def format_lag_row(r: dict) -> str:
    lag, poll, ack = r["lag_ms"], r["poll_rtt_ms"], r["ack_ms"]
    return (f"{r['offered_events_per_s']:>12,} {r['achieved_events_per_s']:>9,.0f} {fmt(lag['p50']):>10} "
            f"{fmt(lag['p99']):>7} {fmt(lag['max']):>7} {lag['n']:>6} {fmt(poll['p50']):>8} "
            f"{fmt(r['first_poll_fresh'], '>7.0%'):>8} {fmt(ack['p50']):>7}  "
            f"{'pinned apart' if r['pinned'] else 'shared'}"
            + (f"  probe errors {r['probe_errors_by_code']}" if r["probe_errors"] else "")
            + (f"  writer errors {r['writer_errors_by_code']}" if r["writer_errors"] else ""))


def lag_verdict(rows: list[dict]) -> str:
    row = next((r for r in rows if r["offered_events_per_s"] == LAG_TARGET_RATE), None)
    if row is None or row["lag_ms"]["p99"] is None:
        return f"not measured: run with {LAG_TARGET_RATE} in --lag-rates"
    p99, achieved = row["lag_ms"]["p99"], row["achieved_events_per_s"]
    figure = f"p99 {p99:.2f} ms at {achieved:,.0f} events/s achieved"
    if row["writer_error_rate"] > MAX_ERROR_RATE or row["probe_errors"]:
        return f"not measured: the writer or the prober had failed calls ({figure}; see the row)"
    if achieved < 0.9 * LAG_TARGET_RATE:
        return f"not measurable here: the primary took only {achieved:,.0f} of {LAG_TARGET_RATE:,} events/s ({figure})"
    if p99 <= LAG_TARGET_MS:
        return f"PASS: {figure}"
    if not row["pinned"]:
        return f"not measurable here: {row['why_shared']} ({figure})"
    return f"FAIL: {figure}"


# --- 3. read-your-writes -------------------------------------------------------------------------------------------

@dataclass
class RywTally:
    pairs: int = 0
    violations: int = 0
    stale: int = 0  # served_by.applied_seq < the ack's durable_seq
    not_personalized: int = 0
    unavailable: int = 0  # the read waited its bound (1 s) and answered UNAVAILABLE; retried
    reads_on_replicas: int = 0
    waits_s: list[float] = field(default_factory=list)
    read_latencies_s: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def reader_for(writer: int, n: int, processes: int) -> int:
    """Another process than the writer, a replica whenever one is left (the primary reads its own writes)."""
    others = [p for p in range(1, processes) if p != writer] or [0]
    return others[(n // processes) % len(others)]


def ryw_pair(topology: Topology, n: int, tag: str, item: str, tally: RywTally) -> None:
    processes = len(topology.clients)
    writer, reader = n % processes, reader_for(n % processes, n, processes)
    user = f"ryw-{tag}-{n}"
    ack = topology.clients[writer].publish([make_event(user, item, "purchase")], timeout_s=10)
    recommend = topology.clients[reader].recommender.Recommend
    request = recommend_pb2.RecommendRequest(user_id=user, k=10, min_seq=ack.durable_seq)
    request.rerank.enabled = False
    unavailable = 0
    while True:
        started = time.perf_counter()
        try:
            response = recommend(request, timeout=10)
            break
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or unavailable >= 5:
                raise
            unavailable += 1  # what the session client does: retry
    latency = time.perf_counter() - started
    request.min_seq = 0  # the same read with nothing to wait for: the baseline of the wait
    baseline = recommend(request, timeout=10)
    stale = response.served_by.applied_seq < ack.durable_seq
    cold = response.strategy != "personalized"
    with tally.lock:
        tally.pairs += 1
        tally.unavailable += unavailable
        tally.reads_on_replicas += reader != 0
        tally.stale += stale
        tally.not_personalized += cold
        tally.violations += stale or cold
        if (stale or cold) and len(tally.examples) < 5:
            tally.examples.append(f"user {user} written via process {writer}, read via {reader}: durable_seq "
                                  f"{ack.durable_seq}, served applied_seq {response.served_by.applied_seq}, "
                                  f"strategy {response.strategy}")
        tally.waits_s.append((response.server_latency_us - baseline.server_latency_us) / 1e6)
        tally.read_latencies_s.append(latency)


def measure_ryw(plan: Plan, template: Path, work_dir: Path) -> dict:
    cores = split_cores(plan.replicas + 1, 1)
    tally, tag = RywTally(), uuid.uuid4().hex[:8]
    with running_on(cores.clients), Topology(template, work_dir, plan.replicas, server_cpus(cores)) as topology:
        item = topology.primary.recommend("nobody-yet", k=1).items[0].item_id
        numbers = itertools.count()
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                while (n := next(numbers)) < plan.ryw_pairs:
                    ryw_pair(topology, n, tag, item, tally)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        started = time.perf_counter()
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(plan.ryw_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"read-your-writes pairs failed: {errors[0]!r}") from errors[0]
    waits = np.asarray(tally.waits_s) * 1e3
    result = {"pairs": tally.pairs, "violations": tally.violations, "stale": tally.stale,
              "not_personalized": tally.not_personalized, "unavailable_retried": tally.unavailable,
              "reads_on_replicas": tally.reads_on_replicas, "processes": plan.replicas + 1, "threads": plan.ryw_threads,
              "pairs_per_s": tally.pairs / elapsed, "read_latency_ms": ms_summary(tally.read_latencies_s),
              "wait_ms": {"p50": float(np.percentile(waits, 50)), "p99": float(np.percentile(waits, 99)),
                          "max": float(waits.max()), "waited_over_1ms": int((waits > 1.0).sum())},
              "examples": tally.examples, "pinned": cores.pinned}
    print(format_ryw(result), flush=True)
    return result


def format_ryw(r: dict) -> str:
    wait = r["wait_ms"]
    return (f"{r['pairs']:,} pairs ({r['reads_on_replicas']:,} read on replicas, {r['threads']} threads, "
            f"{r['pairs_per_s']:,.0f} pairs/s): violations {r['violations']} (stale {r['stale']}, not personalized "
            f"{r['not_personalized']}), UNAVAILABLE retried {r['unavailable_retried']}\n"
            f"wait for min_seq: p50 {wait['p50']:.3f} ms, p99 {wait['p99']:.3f} ms, max {wait['max']:.2f} ms, "
            f"{wait['waited_over_1ms']} over 1 ms; read latency p50 {r['read_latency_ms']['p50']:.2f} ms, "
            f"p99 {r['read_latency_ms']['p99']:.2f} ms"
            + "".join(f"\n  violation: {example}" for example in r["examples"]))


def ryw_verdict(r: dict) -> str:
    figure = f"{r['violations']} violations over {r['pairs']:,} pairs"
    if r["violations"]:
        return f"FAIL: {figure}"
    if r["pairs"] < RYW_TARGET_PAIRS:
        return f"PASS so far: {figure} (the target counts {RYW_TARGET_PAIRS:,}: --ryw-pairs {RYW_TARGET_PAIRS})"
    return f"PASS: {figure}"


# --- 4. the cost of feeding replicas ------------------------------------------------------------------------------

def measure_feeding(plan: Plan, template: Path, work_dir: Path) -> list[dict]:
    cores = split_cores(plan.replicas + 1, 2)
    loadtest_args = ["--scenario", "events", "--processes", "2", "--concurrency", "32", "--streams", "2",
                     "--events-per-message", str(plan.feeding_events_per_message)]
    rows = []
    for round_number in range(plan.feeding_rounds):
        for replicas in (0, plan.replicas):
            with running_on(cores.clients), Topology(template, work_dir, replicas, server_cpus(cores)) as topology:
                report, sample = loaded_servers(topology, [topology.addresses[0]], loadtest_args, plan.warmup,
                                                plan.feeding_seconds)
            busy = sample.per_process_cores if sample else None
            events_per_s = report["events"]["accepted"] / report["duration_s"]
            primary_cores = busy[0] if busy else None
            rows.append({"round": round_number, "replicas": replicas, "events_per_s": events_per_s,
                         "errors": report["errors"], "errors_by_code": report["errors_by_code"],
                         "error_rate": report["error_rate"], "ack_ms": report["event_ack_lag_ms"],
                         "primary_cores_busy": primary_cores, "replica_cores_busy": sum(busy[1:]) if busy else None,
                         "primary_cpu_us_per_event": ratio(primary_cores, events_per_s / 1e6),
                         "pinned": cores.pinned, "why_shared": cores.why_shared})
            print(format_feeding_row(rows[-1]), flush=True)
    return rows


FEEDING_HEADER = (f"{'round':>5} {'replicas':>8} {'events/s':>10} {'primary cores':>13} {'CPU us/event':>12} "
                  f"{'replica cores':>13} {'ack p50 ms':>10} {'errors':>6}  cores")


def format_feeding_row(r: dict) -> str:
    ack = r["ack_ms"] or {}
    return (f"{r['round']:>5} {r['replicas']:>8} {r['events_per_s']:>10,.0f} {fmt(r['primary_cores_busy']):>13} "
            f"{fmt(r['primary_cpu_us_per_event'], '.1f'):>12} {fmt(r['replica_cores_busy']):>13} "
            f"{fmt(ack.get('p50')):>10} {r['errors']:>6}  {'pinned apart' if r['pinned'] else 'shared'}")


def feeding_summary(rows: list[dict]) -> dict:
    """Totals over the rounds: events/s and the primary's CPU per event, without and with replicas."""
    alone = [r for r in rows if r["replicas"] == 0]
    fed = [r for r in rows if r["replicas"] > 0]

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    def spread(values) -> float | None:
        """How far runs of the same kind differ: the noise the cost must be read against."""
        values = [v for v in values if v]
        return (max(values) - min(values)) / float(np.mean(values)) if len(values) > 1 else None

    rate_alone, rate_fed = mean(r["events_per_s"] for r in alone), mean(r["events_per_s"] for r in fed)
    cpu_alone = mean(r["primary_cpu_us_per_event"] for r in alone)
    cpu_fed = mean(r["primary_cpu_us_per_event"] for r in fed)
    return {"replicas": fed[0]["replicas"] if fed else None, "events_per_s_alone": rate_alone,
            "events_per_s_fed": rate_fed,
            "throughput_cost": 1 - rate_fed / rate_alone if rate_alone and rate_fed else None,
            "primary_cpu_us_per_event_alone": cpu_alone, "primary_cpu_us_per_event_fed": cpu_fed,
            "primary_cpu_per_event_cost": cpu_fed / cpu_alone - 1 if cpu_alone and cpu_fed else None,
            "pinned": all(r["pinned"] for r in rows), "why_shared": rows[0]["why_shared"] if rows else "",
            "failed_loads": sum(r["error_rate"] > MAX_ERROR_RATE for r in rows), "rounds": len(alone),
            "spread_between_rounds": max((x for x in (spread(r["events_per_s"] for r in alone),
                                                     spread(r["events_per_s"] for r in fed)) if x is not None),
                                         default=None)}


def change(fraction: float, more: str, less: str) -> str:
    return f"{abs(fraction):.1%} {more if fraction >= 0 else less}"


def feeding_verdict(s: dict) -> str:
    if s["throughput_cost"] is None:
        return "not measured"
    if s["failed_loads"]:
        return f"not measured: {s['failed_loads']} of the loads had failed calls (see the rows)"
    figure = f"ingest {change(s['throughput_cost'], 'lower', 'higher')} with {s['replicas']} replica(s)"
    if s["primary_cpu_per_event_cost"] is not None:
        figure += f", the primary's CPU per event {change(s['primary_cpu_per_event_cost'], 'higher', 'lower')}"
    figure += (f"; runs of one kind differ by up to {s['spread_between_rounds']:.0%}" if s["spread_between_rounds"]
               is not None else "; one round: no noise estimate")
    if s["throughput_cost"] <= FEEDING_TARGET:
        return f"PASS: {figure}"
    if not s["pinned"]:
        return (f"not measurable here: {s['why_shared']}, so the replicas' log apply takes cores from the primary "
                f"({figure}; the primary's CPU per event is the honest figure)")
    return f"FAIL: {figure}"


# --- the run ----------------------------------------------------------------------------------------------------

def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N in {1, 2, max} and short loads")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--max-processes", type=int, default=os.cpu_count(),
                        help="scaling goes up to this many server processes; lag, ryw and feeding use it minus one "
                             "replicas (at least one)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per scaling and feeding load")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop workers per server process")
    parser.add_argument("--paced-rate", type=float, default=250.0,
                        help="calls/s per server process of the paced scaling loads (low enough for every N here)")
    parser.add_argument("--clients-per-process", type=int, default=1, help="load tester processes per server process")
    parser.add_argument("--lag-rates", type=int, nargs="+", default=[1_000, LAG_TARGET_RATE], help="events/s offered")
    parser.add_argument("--lag-seconds", type=float, default=None, help="measured seconds per lag rate")
    parser.add_argument("--ryw-pairs", type=int, default=None, help=f"default {RYW_TARGET_PAIRS:,}")
    parser.add_argument("--ryw-threads", type=int, default=4, help="pairs in flight at once")
    parser.add_argument("--feeding-rounds", type=int, default=None, help="0 replicas / N replicas alternations")
    parser.add_argument("--feeding-events-per-message", type=int, default=100)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/streamrec-bench-replicas"),
                        help="the seeded template (kept for later runs), the data copies and the server logs")
    parser.add_argument("--machine", default=f"{len(MACHINE_CPUS)}core", help="names the JSON file")
    parser.add_argument("--json", dest="json_path", type=Path, default=None,
                        help="default benchmarks/results/replicas-<machine>[-quick].json")
    return parser.parse_args()


@contextlib.contextmanager
def stderr_to(path: Path):
    """The load tester's client processes inherit this process's stderr, and a failing stream makes grpc.aio print
    a traceback per request there, which would bury the tables: stderr goes to a file meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if path.stat().st_size:
            print(f"note: {path.stat().st_size:,} bytes of stderr (load tester clients, threads) are in {path}")


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every started topology is stopped by its `with`."""
    def raise_interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, raise_interrupt)


def main() -> int:
    args = parse_args()
    stop_on_sigterm()
    plan = make_plan(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.json_path or (Path(__file__).resolve().parent / "results" /
                                   f"replicas-{args.machine}{'-quick' if args.quick else ''}.json")
    meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "cpus": len(MACHINE_CPUS),
            "python": platform.python_version(), "commit": git_commit(), "quick": args.quick,
            "loadavg_at_start": os.getloadavg(), "plan": plan.__dict__}
    started = time.perf_counter()
    template = seeded_template(args.work_dir)
    results: dict = {}
    verdicts: dict[str, str] = {}
    try:
        with stderr_to(args.work_dir / "stderr.log"):
            run_sections(args, plan, template, results, verdicts)
    except BaseException as error:  # the sections done so far are still worth keeping
        meta["interrupted_by"] = repr(error)
        raise
    finally:
        meta.update(loadavg_at_finish=os.getloadavg(), wall_s=round(time.perf_counter() - started, 1))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, "targets": verdicts, **results}, indent=1, default=str))
    print_targets(verdicts)
    print(f"\n{meta['wall_s']:.0f} s; results: {json_path}")
    return 0


def run_sections(args, plan: Plan, template: Path, results: dict, verdicts: dict[str, str]) -> None:
    if "scaling" in args.only:
        print(f"\n== 1. Recommend throughput by server processes ({DATASET}, dim {DIM}; load spread over the process "
              f"ports)\n{SCALING_HEADER}", flush=True)
        results["scaling"] = measure_scaling(plan, template, args.work_dir)
        verdicts["scaling"] = scaling_verdict(results["scaling"])
    if "lag" in args.only:
        print(f"\n== 2. Replica lag: event acked by the primary -> applied on a replica ({plan.replicas} replica(s))\n"
              f"{LAG_HEADER}", flush=True)
        results["lag"] = measure_lag(plan, template, args.work_dir)
        verdicts["lag"] = lag_verdict(results["lag"])
    if "ryw" in args.only:
        print(f"\n== 3. Read-your-writes: event -> Recommend with min_seq through another process "
              f"({plan.replicas + 1} processes)", flush=True)
        results["ryw"] = measure_ryw(plan, template, args.work_dir)
        verdicts["ryw"] = ryw_verdict(results["ryw"])
    if "feeding" in args.only:
        print(f"\n== 4. The primary's ingest with 0 vs {plan.replicas} tailing replica(s) "
              f"({plan.feeding_events_per_message} events per message)\n{FEEDING_HEADER}", flush=True)
        rows = measure_feeding(plan, template, args.work_dir)
        results["feeding"] = {"rows": rows, "summary": feeding_summary(rows)}
        verdicts["feeding"] = feeding_verdict(results["feeding"]["summary"])


def print_targets(verdicts: dict[str, str]) -> None:
    targets = {"scaling": f"aggregate Recommend >= {SCALING_TARGET} x N x one process's, on N free cores",
               "lag": f"replica lag p99 <= {LAG_TARGET_MS:g} ms at {LAG_TARGET_RATE:,} events/s",
               "ryw": f"0 read-your-writes violations over {RYW_TARGET_PAIRS:,} pairs",
               "feeding": f"feeding replicas costs the primary <= {FEEDING_TARGET:.0%} of its ingest"}
    print("\n== Targets (the issue's)")
    for name, verdict in verdicts.items():
        print(f"{targets[name]}\n    {verdict}")
    if len(MACHINE_CPUS) < 4:
        print(f"note: {len(MACHINE_CPUS)} cores: the load generator shares the cores with the servers, so throughput "
              f"ratios understate scaling; CPU per call (and per event) is the honest figure here.")


if __name__ == "__main__":
    sys.exit(main())
