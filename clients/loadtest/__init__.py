"""Load tester for a running streamrec server.

    python -m streamrec.clients.loadtest --scenario mixed --mix 0.8 --concurrency 32 --duration 30
    streamrec loadtest --scenario recommend --rate 2000 --processes 4 --duration 60 --json r.json --plot r.png

Scenarios
    recommend  unary Recommend calls
    stream     RecommendStream: requests multiplexed over --streams bidirectional streams per process
    events     StreamEvents: each request is one EventBatch of --events-per-message events; its latency
               ends at the batch's ack (acks come after the events are durable)
    mixed      a --mix share of unary Recommend calls, the rest event batches as in `events`

Load models
    closed loop (default): --concurrency workers, each sends its next request when the last one is answered.
    open loop (--rate R):   requests are scheduled at fixed intervals (R per second over all processes) and
                            latency is measured from each request's SCHEDULED send time, so a slow server (or
                            a client that falls behind) shows up as latency instead of silently lowering the
                            rate (no coordinated omission). --max-inflight bounds outstanding requests per
                            process: past it, sends wait, and that wait is counted in the latency too.

Users are drawn from a Zipf distribution (--zipf s: P(rank r) ~ 1/r^s; 0 = uniform) over the dataset's
user ids; event items likewise over its item ids. --dataset picks id presets (synthetic: u0..u499 and
i0..i1999; ml-100k: "1".."943" and "1".."1682"; auto asks the server whether item "i0" exists);
--users/--user-prefix/--user-start/--user-file (and the --item-* twins) override them.

Each process runs its workers on asyncio (grpc.aio); --processes P spreads the load over P processes to get
past the GIL. Latencies are recorded in fixed log-spaced buckets (1% wide, HDR-like), so memory stays
bounded whatever the run length, and the processes' histograms are merged exactly.

Event sends write to the server: use a server whose data you can spare.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

import grpc

from streamrec.clients.client import StreamrecClient
from streamrec.clients.loadtest.progress import Progress
from streamrec.clients.loadtest.report import build_report, format_report, write_plot
from streamrec.clients.loadtest.runner import run_in_process, run_processes

DEFAULT_ADDRESS = os.environ.get("STREAMREC_ADDRESS", "127.0.0.1:50051")
# ping / ping-stream do no server work: the floors the real scenarios are compared against.
SCENARIOS = ("recommend", "stream", "events", "mixed", "ping", "ping-stream")
DATASETS = {
    "synthetic": {"users": 500, "user_prefix": "u", "user_start": 0, "items": 2000, "item_prefix": "i", "item_start": 0},
    "ml-100k": {"users": 943, "user_prefix": "", "user_start": 1, "items": 1682, "item_prefix": "", "item_start": 1},
}


def _read_ids(path: str) -> list[str]:
    ids = [line.strip() for line in Path(path).read_text().splitlines()]
    return [i for i in ids if i and not i.startswith("#")]


def detect_dataset(args) -> str:
    """'synthetic' when the server knows item i0, else 'ml-100k'."""
    with StreamrecClient(args.address, timeout_s=args.connect_timeout, token=args.token, tls=args.tls,
                         root_certificates=args.root_cert, certificate_chain=args.client_cert, private_key=args.client_key,
                         server_name=args.server_name) as client:
        try:
            client.get_item("i0")
            return "synthetic"
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return "ml-100k"
            raise


def resolve_ids(args, dataset: str) -> tuple[list[str], list[str]]:
    preset = DATASETS[dataset]

    def ids(kind: str) -> list[str]:
        path = getattr(args, f"{kind}_file")
        if path:
            return _read_ids(path)
        count = getattr(args, f"{kind}s") or preset[f"{kind}s"]
        prefix = preset[f"{kind}_prefix"] if getattr(args, f"{kind}_prefix") is None else getattr(args, f"{kind}_prefix")
        start = preset[f"{kind}_start"] if getattr(args, f"{kind}_start") is None else getattr(args, f"{kind}_start")
        return [f"{prefix}{n}" for n in range(start, start + count)]

    return ids("user"), ids("item")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port (env STREAMREC_ADDRESS)")
    parser.add_argument("--scenario", choices=SCENARIOS, default="recommend")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    load = parser.add_argument_group("load model")
    load.add_argument("--concurrency", type=int, default=16, help="closed loop: workers in all (split over processes)")
    load.add_argument("--rate", type=float, default=None, help="open loop: requests/s in all, latency from the scheduled send time")
    load.add_argument("--max-inflight", type=int, default=1000, help="open loop: outstanding requests per process at most")
    load.add_argument("--processes", type=int, default=1, help="client processes (each runs asyncio workers)")
    load.add_argument("--streams", type=int, default=2, help="stream/events/mixed: bidirectional streams per process "
                                                            "(each holds a server worker thread)")
    load.add_argument("--timeout", type=float, default=10.0, help="deadline per request, seconds")
    work = parser.add_argument_group("workload")
    work.add_argument("--k", type=int, default=10, help="recommendations per request")
    work.add_argument("--rerank", choices=("server", "on", "off"), default="server",
                      help="second stage per request: the server's default, forced on, or retrieval order only")
    work.add_argument("--mix", type=float, default=0.8, help="mixed: share of recommend requests (rest: event batches)")
    work.add_argument("--events-per-message", type=int, default=10, help="events per EventBatch")
    work.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent for user and item draws (0 = uniform)")
    work.add_argument("--seed", type=int, default=0)
    work.add_argument("--dataset", choices=("auto", *DATASETS), default="auto", help="id presets; auto asks the server")
    for kind in ("user", "item"):
        work.add_argument(f"--{kind}s", type=int, default=None, help=f"{kind} ids PREFIX<START>..PREFIX<START+N-1>")
        work.add_argument(f"--{kind}-prefix", default=None)
        work.add_argument(f"--{kind}-start", type=int, default=None)
        work.add_argument(f"--{kind}-file", default=None, help=f"{kind} ids, one per line (overrides the above)")
    conn = parser.add_argument_group("connection")
    conn.add_argument("--token", default=os.environ.get("STREAMREC_TOKEN"), help="bearer token (env STREAMREC_TOKEN)")
    conn.add_argument("--tls", action="store_true", help="TLS with the system roots (or --root-cert)")
    conn.add_argument("--root-cert", default=None, help="PEM file of the CA that signed the server's certificate")
    conn.add_argument("--client-cert", default=None, help="mTLS: client certificate chain (PEM)")
    conn.add_argument("--client-key", default=None, help="mTLS: client private key (PEM)")
    conn.add_argument("--server-name", default=None, help="expected name in the server's certificate")
    conn.add_argument("--connect-timeout", type=float, default=15.0)
    out = parser.add_argument_group("output")
    out.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here")
    out.add_argument("--plot", default=None, help="write a PNG: latency histogram, latency and throughput over time")
    out.add_argument("--progress", choices=("auto", "tqdm", "rich", "simple", "none"), default="auto")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m streamrec.clients.loadtest", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    return add_arguments(parser)


def _validate(args) -> None:
    if args.processes < 1 or args.duration <= 0 or args.warmup < 0:
        raise SystemExit("need --processes >= 1, --duration > 0, --warmup >= 0")
    if args.rate is not None and args.rate <= 0:
        raise SystemExit("--rate must be > 0")
    if args.rate is None and args.concurrency < args.processes:
        raise SystemExit("--concurrency must be at least --processes")
    if not 0.0 <= args.mix <= 1.0:
        raise SystemExit("--mix is a share between 0 and 1")
    if args.events_per_message < 1 or args.streams < 1 or args.max_inflight < 1:
        raise SystemExit("--events-per-message, --streams and --max-inflight must be >= 1")


def make_specs(args, users: list[str], items: list[str], dataset: str) -> list[dict]:
    run_id = uuid.uuid4().hex[:8]
    specs = []
    for index in range(args.processes):
        specs.append({
            "proc_index": index, "run_id": run_id, "address": args.address, "scenario": args.scenario,
            "duration": args.duration, "warmup": args.warmup, "timeout": args.timeout,
            "concurrency": args.concurrency // args.processes + (index < args.concurrency % args.processes),
            "rate": args.rate / args.processes if args.rate else None,
            "phase": index / args.rate if args.rate else 0.0,  # interleave the processes' schedules
            "max_inflight": args.max_inflight, "streams": args.streams, "k": args.k, "rerank": args.rerank, "mix": args.mix,
            "events_per_message": args.events_per_message, "zipf": args.zipf, "seed": args.seed,
            "users": users, "items": items, "dataset": dataset, "token": args.token, "tls": args.tls,
            "root_cert": args.root_cert, "client_cert": args.client_cert, "client_key": args.client_key,
            "server_name": args.server_name, "connect_timeout": args.connect_timeout,
        })
    return specs


def run(args) -> int:
    """Run a load test from parsed arguments (also `streamrec loadtest`); prints the report."""
    _validate(args)
    try:
        dataset = detect_dataset(args) if args.dataset == "auto" else args.dataset
    except grpc.RpcError as error:
        print(f"error: cannot reach {args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    users, items = resolve_ids(args, dataset)
    specs = make_specs(args, users, items, dataset)
    bar = Progress(args.progress, args.warmup + args.duration)
    started = time.perf_counter()
    try:
        recorder = run_in_process(specs[0], bar) if args.processes == 1 else run_processes(specs, bar, args.connect_timeout)
    except (ConnectionError, RuntimeError) as error:
        bar.close()
        print(f"error: {error}", file=sys.stderr)
        return 1
    bar.close()
    report = build_report(args, recorder, dataset, len(users), len(items), time.perf_counter() - started)
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
        print(f"report: {args.json_path}")
    if args.plot:
        problem = write_plot(report, args.plot)
        print(problem if problem else f"plot: {args.plot}", file=sys.stderr if problem else sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
