"""Crash-kill trials: SIGKILL the real server at random moments under event and Recommend load, restart it,
and count acknowledged events that were lost or applied twice.

    python benchmarks/crash.py --trials 50 --json benchmarks/out/crash.json
    python benchmarks/crash.py --trials 50 --replicas 2 --json benchmarks/results/crash-replicas.json

With --replicas N the server is `streamrec serve --replicas N` and the primary is the process killed; its
supervisor restarts it. Events go through the shared port (a connection may land on a replica, which forwards
it), Recommend load runs on the replicas' own ports, and each trial also counts
- replica_read_failures: reads on replicas that failed while the primary was down (they must keep serving);
- diverged_users:        users whose vector differs between processes once all have applied the same seq.

Each trial: start `streamrec serve` on a scratch data dir (reused across trials, so recovery replays real
logs), run several event streams (batched and single-event messages) plus Recommend load, kill -9 after a
random delay (checkpoints every 0.2 s, so some kills land mid-checkpoint), restart, then
- lost:       acked events whose id is NOT recognised as a duplicate on resend (they were not durable);
- duplicates: users whose event count exceeds the events ever sent to them (an event applied twice);
- recovery:   seconds from process start to SERVING.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from streamrec.clients.client import StreamrecClient, make_event
from streamrec.cli.process import ServerProcess, free_port
from streamrec.v1 import events_pb2


class Load:
    """Event streams and Recommend callers against one server life; remembers what was sent and acked."""

    def __init__(self, address: str, trial: int, streams: int, rng: random.Random):
        self.address, self.trial, self.rng = address, trial, rng
        self.sent: Counter = Counter()  # user -> events sent (acked or not)
        self.acked: list[tuple[str, str]] = []  # (event_id, user)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._stream, args=(n, 1 if n % 2 else 50), daemon=True) for n in range(streams)]
        self.threads.append(threading.Thread(target=self._recommend, daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def _stream(self, stream: int, per_message: int) -> None:
        batches: dict[str, list[tuple[str, str]]] = {}

        def generate():
            for number in range(10**9):
                if self.stop.is_set():
                    return
                events = []
                for j in range(per_message):
                    user = f"crash-{self.rng.randrange(50)}"
                    events.append(make_event(user, f"i{self.rng.randrange(2000)}", "click",
                                             event_id=f"t{self.trial}-s{stream}-{number}-{j}"))
                with self.lock:
                    for e in events:
                        self.sent[e.user_id] += 1
                batches[str(number)] = [(e.event_id, e.user_id) for e in events]
                yield events_pb2.EventBatch(batch_id=str(number), events=events)

        with StreamrecClient(self.address) as client:
            try:
                for ack in client.events.StreamEvents(generate(), timeout=120):
                    with self.lock:
                        self.acked.extend(batches.pop(ack.batch_id))
            except grpc.RpcError:
                pass  # the server died

    def _recommend(self) -> None:
        with StreamrecClient(self.address, timeout_s=5) as client:
            while not self.stop.is_set():
                try:
                    client.recommend(f"crash-{self.rng.randrange(50)}", k=10, retry=False)
                except (grpc.RpcError, TypeError):
                    time.sleep(0.01)


class SingleServer:
    """The server of the plain trials: one process, killed and started again by the benchmark."""

    def __init__(self, folder: Path):
        self.server = ServerProcess(folder / "data", extra_args=("--checkpoint-interval", "0.2")).start()
        self.address = self.primary_address = self.server.address
        self.replica_addresses: list[str] = []

    def crash_and_recover(self) -> float:
        self.server.kill()
        started = time.perf_counter()
        self.server.start()
        return time.perf_counter() - started

    def close(self) -> None:
        self.server.kill()


class ReplicatedServer:
    """`streamrec serve --replicas N`: the primary is killed; the supervisor starts it again."""

    def __init__(self, folder: Path, replicas: int):
        self.port, ports = free_port(), [free_port() for _ in range(replicas + 1)]
        self.address = f"127.0.0.1:{self.port}"
        self.primary_address = f"127.0.0.1:{ports[0]}"
        self.replica_addresses = [f"127.0.0.1:{p}" for p in ports[1:]]
        self.log = open(folder / "supervisor.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamrec.cli", "--log-level", "WARNING", "serve", "--data-dir",
             str(folder / "data"), "--dataset", "synthetic", "--dim", "16", "--checkpoint-interval", "0.2",
             "--port", str(self.port), "--replicas", str(replicas), "--process-ports", ",".join(map(str, ports))],
            stdout=self.log, stderr=subprocess.STDOUT)
        for address in (self.primary_address, *self.replica_addresses):
            with StreamrecClient(address) as client:
                client.wait_until_serving(300)

    def crash_and_recover(self) -> float:
        """Kill -9 the primary; seconds until a new primary process answers SERVING."""
        with StreamrecClient(self.primary_address, timeout_s=10) as client:
            old = client.stats().pid
            os.kill(old, signal.SIGKILL)
            started = time.perf_counter()
            while True:
                try:
                    if client.health(timeout_s=1, retry=False) == "SERVING" and client.stats(retry=False).pid != old:
                        return time.perf_counter() - started
                except grpc.RpcError:
                    pass
                time.sleep(0.02)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()


class ReplicaReads:
    """Recommend calls round-robin over the replicas' own ports; counts the ones that failed."""

    def __init__(self, addresses: list[str]):
        self.clients = [StreamrecClient(a, timeout_s=5, consistency="eventual") for a in addresses]
        self.ok = self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                self.clients[n % len(self.clients)].recommend(f"crash-{n % 50}", k=10, retry=False)
                self.ok += 1
            except grpc.RpcError:
                self.failed += 1
            n += 1

    def __enter__(self) -> "ReplicaReads":
        if self.clients:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.clients:
            self.thread.join(10)
        for client in self.clients:
            client.close()


def run_trial(server, trial: int, rng: random.Random, streams: int, max_delay_s: float, totals: Counter) -> dict:
    load = Load(server.address, trial, streams, rng)
    load.start()
    delay = rng.uniform(0.05, max_delay_s)
    with ReplicaReads(server.replica_addresses) as reads:
        time.sleep(delay)
        recovery_s = server.crash_and_recover()
        load.join()
    for user, n in load.sent.items():
        totals[user] += n
    with StreamrecClient(server.primary_address, timeout_s=60) as client:
        resend = client.send_events((make_event(u, "i1", "click", event_id=e) for e, u in load.acked), batch_size=500)
        lost = resend.accepted  # accepted now = it was not in the log although its ack was received
        counts = {u: client.get_user(u).event_count for u in totals if _exists(client, u)}
        diverged = _diverged_users(server, client.session.seq, list(counts))
    duplicates = sum(1 for u, c in counts.items() if c > totals[u])
    return {"trial": trial, "kill_after_s": round(delay, 3), "acked": len(load.acked), "lost": lost,
            "duplicates": duplicates, "recovery_s": round(recovery_s, 3), "replica_reads_ok": reads.ok,
            "replica_read_failures": reads.failed, "diverged_users": diverged}


def _diverged_users(server, seq: int, users: list[str]) -> int:
    """Users whose vector on some replica differs (bit for bit) from the primary's, all at seq or later."""
    if not server.replica_addresses:
        return 0
    vectors = []
    for address in (server.primary_address, *server.replica_addresses):
        with StreamrecClient(address, timeout_s=30) as client:
            client.session.saw(seq)
            vectors.append({u: tuple(client.get_user(u, include_embedding=True).embedding) for u in users})
    return sum(1 for u in users if len({tuple(v[u]) for v in vectors}) > 1)


def _exists(client: StreamrecClient, user: str) -> bool:
    try:
        client.get_user(user)
        return True
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--streams", type=int, default=4, help="event streams (odd: 1 event/message, even: 50)")
    parser.add_argument("--max-delay", type=float, default=3.0, help="kill after a uniform random delay up to this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replicas", type=int, default=0, help="serve with N read replicas; the primary is killed")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    records, totals = [], Counter()
    with tempfile.TemporaryDirectory() as tmp:
        server = ReplicatedServer(Path(tmp), args.replicas) if args.replicas else SingleServer(Path(tmp))
        try:
            for trial in range(args.trials):
                record = run_trial(server, trial, rng, args.streams, args.max_delay, totals)
                records.append(record)
                print(f"trial {trial:3d}: killed after {record['kill_after_s']:.2f} s, acked {record['acked']:6d}, "
                      f"lost {record['lost']}, duplicated {record['duplicates']}, recovery {record['recovery_s']:.2f} s"
                      + (f", replica reads {record['replica_reads_ok']} ok / {record['replica_read_failures']} failed, "
                         f"diverged {record['diverged_users']}" if args.replicas else ""), flush=True)
        finally:
            server.close()
    summary = {
        "replicas": args.replicas, "trials": len(records), "acked_events": sum(r["acked"] for r in records),
        "lost": sum(r["lost"] for r in records), "duplicates": sum(r["duplicates"] for r in records),
        "recovery_s_median": sorted(r["recovery_s"] for r in records)[len(records) // 2] if records else None,
        "recovery_s_max": max((r["recovery_s"] for r in records), default=None),
        "replica_read_failures": sum(r["replica_read_failures"] for r in records),
        "replica_reads_ok": sum(r["replica_reads_ok"] for r in records),
        "diverged_users": sum(r["diverged_users"] for r in records),
    }
    print(json.dumps(summary))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "python": platform.python_version()}
        Path(args.json_path).write_text(json.dumps({"meta": meta, "summary": summary, "trials": records}, indent=1))
    clean = summary["lost"] == summary["duplicates"] == summary["replica_read_failures"] == summary["diverged_users"] == 0
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
