"""What the sequence user tower costs per event, and what it does to ingest (issue 19), against the iALS online
update alone, in the same run.

Setup: ML-100K seeded as `streamrec serve` seeds it, copied once per engine; the tower is the shipped one
(engine/sequence/models/ml100k-sequence.onnx) or --model. Events go to the 943 ML-100K users and random items,
every event type, timestamps after the data's.

- per event: `State.apply_events([event])` on one thread (what one event costs the writer: the iALS kernel, the
  bookkeeping and, with the tower, one ONNX run for the user), iALS-only and with the tower interleaved;
  p50 / p99 / mean in microseconds; plus the tower run alone (what a lazy recompute would add to a read);
- ingest: events/s through `Engine.ingest_async` (validation, group commit, apply, ack), batches of --batch
  events, --in-flight batches queued, fsync off (so the apply, not the disk, is measured), best of --repeat,
  for iALS alone and the tower recomputing on each event (sequence_update "event") or on the next read ("read");
- read after an event: one event for a user, then one Recommend for them (retrieval only), timing the
  Recommend: with "read" it pays the tower run, with "event" the ingest did.

    python benchmarks/sequence_update.py --json benchmarks/results/sequence-update-cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

from streamrec.engine import SHIPPED_SEQUENCE_MODEL, Engine, EngineConfig, Event, EventType
from streamrec.engine.offline.seeding import open_engine

TYPES = [EventType.VIEW, EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE, EventType.RATING,
         EventType.SKIP, EventType.DISLIKE]


def make_events(n: int, users: list[str], items: list[str], start_ms: int, seed: int, prefix: str) -> list[Event]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = TYPES[int(rng.integers(0, len(TYPES)))]
        value = float(rng.integers(1, 6)) if kind == EventType.RATING else 1.0
        out.append(Event(f"{prefix}{i}", users[int(rng.integers(0, len(users)))], items[int(rng.integers(0, len(items)))],
                         kind, value, start_ms + 1000 * i))
    return out


def per_event(engines: dict[str, Engine], events: list[Event], rounds: int) -> dict:
    """Apply one event at a time to each engine's State, alternating engines every `len(events) // rounds` events."""
    times = {name: [] for name in engines}
    chunk = max(len(events) // rounds, 1)
    for start in range(0, len(events), chunk):
        for name, engine in engines.items():
            state = engine.state
            for event in events[start:start + chunk]:
                event = Event(f"{name}-{event.event_id}", event.user_id, event.item_id, event.type, event.value,
                              event.timestamp_ms)
                t0 = time.perf_counter_ns()
                with engine.lock:
                    state.apply_events([event])
                times[name].append(time.perf_counter_ns() - t0)
    out = {}
    for name, values in times.items():
        us = np.array(values) / 1e3
        out[name] = {"events": len(us), "p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
                     "mean_us": float(us.mean())}
    return out


def read_after_event(engines: dict[str, Engine], events: list[Event]) -> dict:
    """Per event: ingest it, then time one Recommend for its user; engines interleaved per event."""
    times = {name: [] for name in engines}
    for event in events:
        for name, engine in engines.items():
            engine.ingest([Event(f"{name}-{event.event_id}", event.user_id, event.item_id, event.type, event.value,
                                 event.timestamp_ms)])
            query = engine.build_query(event.user_id, 10, rerank=False)
            t0 = time.perf_counter_ns()
            engine.recommend([query])
            times[name].append(time.perf_counter_ns() - t0)
    out = {}
    for name, values in times.items():
        us = np.array(values[20:]) / 1e3  # the first reads warm caches
        out[name] = {"reads": len(us), "p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99))}
    return out


def tower_alone(engine: Engine, users: list[str], runs: int) -> dict:
    state = engine.state
    tower, ids = state.sequence, state.items.ids
    rows = [state.users.row_of(u) for u in users]
    times = []
    for i in range(runs):
        history = state.users.history[rows[i % len(rows)]]
        t0 = time.perf_counter_ns()
        tower.query(history, ids.__getitem__)
        times.append(time.perf_counter_ns() - t0)
    us = np.array(times) / 1e3
    return {"runs": runs, "p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99))}


def ingest_rate(folder: Path, config: EngineConfig, events: list[Event], batch: int, in_flight: int) -> dict:
    with Engine(folder, config) as engine:
        pending: deque = deque()
        cpu0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, len(events), batch):
            pending.append(engine.ingest_async(events[start:start + batch]))
            if len(pending) >= in_flight:
                pending.popleft().result(60)
        while pending:
            pending.popleft().result(60)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        updates = engine.state.sequence_updates
    return {"events_per_s": len(events) / wall, "cpu_s": cpu, "wall_s": wall, "sequence_updates": updates}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHIPPED_SEQUENCE_MODEL))
    parser.add_argument("--per-event", type=int, default=4000, help="events timed one at a time, per engine")
    parser.add_argument("--ingest-events", type=int, default=20_000)
    parser.add_argument("--reads", type=int, default=1000, help="event-then-Recommend pairs per engine")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    base = dict(backend="numpy", sync=False, checkpoint_interval_s=3600, checkpoint_every_records=10**9)
    configs = {"ials": EngineConfig(**base),
               "sequence-event": EngineConfig(**base, user_model="sequence", sequence_model_path=args.model,
                                              sequence_update="event"),
               "sequence-read": EngineConfig(**base, user_model="sequence", sequence_model_path=args.model,
                                             sequence_update="read")}
    with tempfile.TemporaryDirectory(prefix="streamrec-seq-bench-") as tmp:
        seed_dir = Path(tmp) / "seed"
        with open_engine(seed_dir, EngineConfig(backend="numpy", sync=False), "ml-100k") as engine:
            users = [str(u) for u in range(1, 944)]
            items = [str(i) for i in range(1, 1683)]
            last_ms = max(engine.get_user(u, 0).last_event_ms for u in users)
        copies = {}
        for name in configs:
            copies[name] = Path(tmp) / name
            shutil.copytree(seed_dir, copies[name])
        engines = {name: Engine(copies[name] / "lmdb", configs[name]) for name in configs}
        try:
            events = make_events(args.per_event, users, items, last_ms + 1000, 1, "p")
            timed = {name: engines[name] for name in ("ials", "sequence-event")}
            per_event(timed, events[:200], 2)  # warm-up
            cost = per_event(timed, events, 20)
            alone = tower_alone(engines["sequence-event"], users, 2000)
            reads = read_after_event(engines, make_events(args.reads, users, items, last_ms + 10**8, 3, "r"))
        finally:
            for engine in engines.values():
                engine.close(checkpoint=False)
        ingest = {name: [] for name in configs}
        events = make_events(args.ingest_events, users, items, last_ms + 10**9, 2, "i")
        for r in range(args.repeat):
            for name in (configs if r % 2 == 0 else reversed(list(configs))):
                folder = Path(tmp) / f"ingest-{name}-{r}"
                shutil.copytree(seed_dir, folder)
                ingest[name].append(ingest_rate(folder / "lmdb", configs[name], events, args.batch, args.in_flight))
                shutil.rmtree(folder)
    best = {name: max(runs, key=lambda run: run["events_per_s"]) for name, runs in ingest.items()}

    print(f"per event, State.apply_events([event]) on one thread ({args.per_event} events each, interleaved)")
    print(f"{'user models kept':<16} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    for name, row in cost.items():
        print(f"{name:<16} {row['p50_us']:>8.1f} {row['p99_us']:>8.1f} {row['mean_us']:>8.1f}")
    print(f"tower run alone: p50 {alone['p50_us']:.1f} us, p99 {alone['p99_us']:.1f} us")
    print(f"\nRecommend right after the user's event ({args.reads} pairs, interleaved)")
    print(f"{'user model':<16} {'p50 us':>8} {'p99 us':>8}")
    for name, row in reads.items():
        print(f"{name:<16} {row['p50_us']:>8.1f} {row['p99_us']:>8.1f}")
    print(f"\ningest through the engine, batches of {args.batch}, {args.in_flight} in flight, fsync off, "
          f"best of {args.repeat}")
    print(f"{'user models kept':<16} {'events/s':>10} {'cpu s':>7} {'tower runs':>10}")
    for name, row in best.items():
        print(f"{name:<16} {row['events_per_s']:>10.0f} {row['cpu_s']:>7.2f} {row['sequence_updates']:>10}")
    ratio = {name: best[name]["events_per_s"] / best["ials"]["events_per_s"] for name in best}
    print("ingest relative to iALS alone: " + ", ".join(f"{name} {r:.3f}" for name, r in ratio.items()))
    if args.json:
        record = {"args": vars(args), "per_event": cost, "tower_alone": alone, "read_after_event": reads,
                  "ingest_runs": ingest, "ingest_best": best,
                  "ingest_ratio": ratio, "host": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                  "python": sys.version.split()[0]}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
