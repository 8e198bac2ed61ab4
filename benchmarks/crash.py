"""Crash-kill trials: SIGKILL the real server at random moments under event and Recommend load, restart it,
and count acknowledged events that were lost or applied twice.

    python benchmarks/crash.py --trials 50 --json benchmarks/out/crash.json

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
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from streamrec.clients.client import StreamrecClient, make_event
from streamrec.cli.process import ServerProcess
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


def run_trial(server: ServerProcess, trial: int, rng: random.Random, streams: int, max_delay_s: float, totals: Counter) -> dict:
    load = Load(server.address, trial, streams, rng)
    load.start()
    delay = rng.uniform(0.05, max_delay_s)
    time.sleep(delay)
    server.kill()
    load.join()
    started = time.perf_counter()
    server.start()
    recovery_s = time.perf_counter() - started
    for user, n in load.sent.items():
        totals[user] += n
    with StreamrecClient(server.address, timeout_s=60) as client:
        resend = client.send_events((make_event(u, "i1", "click", event_id=e) for e, u in load.acked), batch_size=500)
        lost = resend.accepted  # accepted now = it was not in the log although its ack was received
        counts = {u: client.get_user(u).event_count for u in totals if _exists(client, u)}
    duplicates = sum(1 for u, c in counts.items() if c > totals[u])
    return {"trial": trial, "kill_after_s": round(delay, 3), "acked": len(load.acked), "lost": lost,
            "duplicates": duplicates, "recovery_s": round(recovery_s, 3)}


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
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    records, totals = [], Counter()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "data", extra_args=("--checkpoint-interval", "0.2")).start()
        try:
            for trial in range(args.trials):
                record = run_trial(server, trial, rng, args.streams, args.max_delay, totals)
                records.append(record)
                print(f"trial {trial:3d}: killed after {record['kill_after_s']:.2f} s, acked {record['acked']:6d}, "
                      f"lost {record['lost']}, duplicated {record['duplicates']}, recovery {record['recovery_s']:.2f} s",
                      flush=True)
        finally:
            server.kill()
    summary = {
        "trials": len(records), "acked_events": sum(r["acked"] for r in records), "lost": sum(r["lost"] for r in records),
        "duplicates": sum(r["duplicates"] for r in records),
        "recovery_s_median": sorted(r["recovery_s"] for r in records)[len(records) // 2] if records else None,
        "recovery_s_max": max((r["recovery_s"] for r in records), default=None),
    }
    print(json.dumps(summary))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "python": platform.python_version()}
        Path(args.json_path).write_text(json.dumps({"meta": meta, "summary": summary, "trials": records}, indent=1))
    return 0 if summary["lost"] == 0 and summary["duplicates"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
