"""Durable event ingestion through the engine API (issue 6): events/s from `Engine.ingest_async` to the ack
(validation, group commit into LMDB with fsync, the online update, the in-memory bookkeeping), at 1, 100 and
1000 events per batch, with fsync on and off.

Peer, measured in the same run on the same data: `legacy`, the write path as it was before issue 6's
optimisation (per event: a LogEntry, three LMDB puts, Python bookkeeping in State.apply_events), kept here
verbatim as a subclass of Engine so both paths run against the same store, kernel and validation.

Setup: a synthetic catalog (10k items, 2k users, 50 clusters, 20 events per user, dim 64) is seeded once and
copied for every run; events go to 3k users (a third of them new) and uniformly random items, with every event
type, ids unique. A producer thread keeps `--in-flight` batches queued (like several streams), which lets the
writer fold them into group commits. Each cell is the best of `--repeat` runs (wall clock); the process CPU
seconds of the same run are shown as well, since the machine may be shared.

    python benchmarks/ingest.py                      # table
    python benchmarks/ingest.py --json out.json      # + JSON
    python benchmarks/ingest.py --batches 100 --no-legacy
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

from streamrec.engine.api import Event, EventType, IngestResult, ItemSpec, Rejection
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import DeleteResult, Engine, UpsertResult
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import seed_engine
from streamrec.engine.signals import event_strengths, event_weight, is_positive
from streamrec.engine.state.state import State
from streamrec.engine.store import codec
from streamrec.engine.store.store import _META_LAST_SEQ, _SEQ, LogEntry, Store, _key

TARGET = 100_000  # events/s, issue 6 (through the gRPC server, 100 events per message)


# --- the pre-change write path (peer) ---------------------------------------------------------------


def legacy_append_log(store: Store, entries: list[LogEntry]) -> list[int | None]:
    """Store.append_log before issue 6: three puts per event."""
    log, idem, user_log, meta = store._log, store._idem, store._user_log, store._meta
    pack = _SEQ.pack

    def fn(txn):
        put = txn.put
        start = seq = store._last_seq_txn(txn)
        out: list[int | None] = []
        for e in entries:
            sb = pack(seq + 1)
            if e.event_id and not put(_key(e.event_id), sb, overwrite=False, db=idem):
                out.append(None)
                continue
            seq += 1
            put(sb, e.payload, append=True, db=log)
            if e.user_id is not None:
                put(_key(e.user_id), sb, db=user_log)
            out.append(seq)
        if seq != start:
            put(_META_LAST_SEQ.encode(), pack(seq), db=meta)
        return out

    return store._write(fn)


def legacy_apply_events(state: State, events: list[Event]) -> None:
    """State.apply_events before issue 6: per-event Python bookkeeping after the kernel."""
    from streamrec.engine.cpu.online import apply_events as apply_update_kernel

    if not events:
        return
    items, users = state.items, state.users
    user_rows = np.fromiter((users.ensure(e.user_id) for e in events), np.int64, len(events))
    item_rows = np.fromiter((items.rows[e.item_id] for e in events), np.int64, len(events))
    types = np.fromiter((e.type for e in events), np.int64, len(events))
    values = np.fromiter((e.value for e in events), np.float32, len(events))
    timestamps = np.fromiter((e.timestamp_ms for e in events), np.int64, len(events))
    strengths = event_strengths(types, values)
    moved = np.full(len(events), -1, np.int64)
    apply_update_kernel(state.online_arrays(moved), user_rows, item_rows, strengths, timestamps, state.online)
    for event, u, i in zip(events, user_rows, item_rows):
        positive = is_positive(event.type, event.value)
        weight = event_weight(event.type, event.value)
        users.record(int(u), int(i), int(event.type), float(event.value), event.timestamp_ms, positive)
        items.record_interaction(int(i), weight if positive else 0.0, event.timestamp_ms, positive, count=False)
    changed = set(moved[moved >= 0].tolist())
    items.dirty_rows.update(changed)
    items.device_changes.update(changed)
    state.embedding_version += 1


class LegacyEngine(Engine):
    """Engine._commit_group before issue 6 (events only are exercised here, but the whole function is kept)."""

    def _commit_group(self, group) -> None:
        items = self.state.items
        pending_live: dict[str, bool] = {}
        entries: list[LogEntry] = []
        plan = []
        results: dict[int, object] = {}
        for op in group:
            if op.kind == "events":
                result = results[id(op)] = IngestResult()
                for index, event in op.payload:
                    live = pending_live.get(event.item_id, items.is_live(event.item_id))
                    if not live:
                        known = event.item_id in pending_live or items.row_of(event.item_id) is not None
                        reason = f"item '{event.item_id}' is deleted" if known else f"unknown item '{event.item_id}'"
                        result.rejections.append(Rejection(index, event.event_id, "item_id", reason))
                        continue
                    entries.append(LogEntry(codec.encode_event(event), event.event_id, event.user_id))
                    plan.append((op, event))
            elif op.kind == "upsert":
                result = results[id(op)] = UpsertResult()
                for spec in op.payload:
                    entries.append(LogEntry(codec.encode_upsert(spec)))
                    plan.append((op, spec))
                    pending_live[spec.item_id] = True
            elif op.kind == "delete":
                result = results[id(op)] = DeleteResult()
                for item_id in dict.fromkeys(op.payload):
                    if pending_live.get(item_id, items.is_live(item_id)):
                        entries.append(LogEntry(codec.encode_delete(item_id)))
                        plan.append((op, codec.DeleteItem(item_id)))
                        pending_live[item_id] = False
                    else:
                        result.not_found.append(item_id)
            else:
                raise AssertionError(f"unexpected op {op.kind}")
        seqs = legacy_append_log(self.store, entries) if entries else []
        durable = self.store.last_seq()
        with self.lock:
            batch: list[Event] = []
            for (op, record), seq in zip(plan, seqs):
                result = results[id(op)]
                if isinstance(record, Event):
                    if seq is None:
                        result.duplicates += 1
                        continue
                    batch.append(record)
                    result.accepted += 1
                    result.first_seq = result.first_seq or seq
                    continue
                legacy_apply_events(self.state, batch)
                batch = []
                if isinstance(record, ItemSpec):
                    if self.state.apply_upsert(record):
                        result.created += 1
                    else:
                        result.updated += 1
                else:
                    self.state.apply_delete(record.item_id)
                    result.deleted += 1
            legacy_apply_events(self.state, batch)
            self.state.applied_seq = durable
        self._records_since_checkpoint += sum(seq is not None for seq in seqs)
        for op in group:
            result = results[id(op)]
            result.durable_seq = durable
            op.future.set_result(result)


# --- workload -------------------------------------------------------------------------------------------


def make_batches(n_events: int, batch: int, n_users: int, n_items: int, seed: int, tag: str) -> list[list[Event]]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_events)
    items = rng.integers(0, n_items, n_events)
    types = rng.integers(1, len(EventType) + 1, n_events)
    values = rng.integers(1, 6, n_events).astype(float)
    events = [Event(f"{tag}-{k}", f"u{u}", f"i{i}", EventType(t), v, 1_710_000_000_000 + k)
              for k, (u, i, t, v) in enumerate(zip(users.tolist(), items.tolist(), types.tolist(), values.tolist()))]
    return [events[k:k + batch] for k in range(0, n_events, batch)]


def seed_template(folder: Path, dim: int) -> None:
    with Engine(folder, EngineConfig(dim=dim, backend="numpy")) as engine:
        seed_engine(engine, synthetic(n_users=2000, n_items=10_000, n_clusters=50, events_per_user=20))


def run_once(template: Path, work: Path, engine_cls, batches: list[list[Event]], sync: bool, dim: int,
             in_flight: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    config = EngineConfig(dim=dim, backend="numpy", sync=sync, checkpoint_interval_s=3600,
                          checkpoint_every_records=10**9)
    engine = engine_cls(work, config)
    try:
        engine.ingest(make_batches(50, 50, 3000, 10_000, 99, "warm")[0])  # JIT cache load, first txn
        pending: deque = deque()
        accepted = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        for batch in batches:
            if len(pending) >= in_flight:
                accepted += pending.popleft().result(60).accepted
            pending.append(engine.ingest_async(batch))
        while pending:
            accepted += pending.popleft().result(60).accepted
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        groups = list(engine.writer.group_sizes)
    finally:
        engine.close(checkpoint=False)
    n = sum(len(b) for b in batches)
    assert accepted == n, f"{accepted} of {n} accepted"
    return {"events": n, "wall_s": wall, "cpu_s": cpu, "events_per_s": n / wall, "events_per_cpu_s": n / cpu,
            "mean_group_ops": float(np.mean(groups[1:] or [0]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,100,1000", help="events per ingest call")
    parser.add_argument("--events", type=int, default=30_000, help="events per run (batch 1: a fifth of it)")
    parser.add_argument("--in-flight", type=int, default=32, help="batches queued at once by the producer")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--sync", default="on,off", help="fsync per group commit: on, off or both")
    parser.add_argument("--no-legacy", action="store_true", help="skip the pre-change peer")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    sizes = [int(b) for b in args.batches.split(",")]
    syncs = [s.strip() == "on" for s in args.sync.split(",")]
    paths = [("streamrec", Engine)] + ([] if args.no_legacy else [("legacy", LegacyEngine)])
    root = Path(tempfile.mkdtemp(prefix="streamrec-ingest-"))
    rows = []
    try:
        started = time.perf_counter()
        seed_template(root / "template", args.dim)
        print(f"seeded template in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
        header = f"{'batch':>6} {'fsync':>5} {'path':>10} {'events/s':>10} {'ev/CPU-s':>10} {'group ops':>9} {'x legacy':>8}"
        print(header)
        for size in sizes:
            n_events = args.events // 5 if size == 1 else args.events
            for sync in syncs:
                best: dict[str, dict] = {}
                for repeat in range(args.repeat):
                    # Fresh ids per repeat and path: every event is new to its copy of the store.
                    for name, cls in paths:  # alternate paths so load from other processes hits both alike
                        batches = make_batches(n_events, size, 3000, 10_000, seed=repeat, tag=f"{name}{repeat}")
                        out = run_once(root / "template", root / "work", cls, batches, sync, args.dim, args.in_flight)
                        if name not in best or out["events_per_s"] > best[name]["events_per_s"]:
                            best[name] = out
                for name, _ in paths:
                    out = best[name]
                    ratio = out["events_per_s"] / best["legacy"]["events_per_s"] if "legacy" in best else None
                    rows.append({"batch": size, "fsync": sync, "path": name, **out, "vs_legacy": ratio})
                    print(f"{size:>6} {'on' if sync else 'off':>5} {name:>10} {out['events_per_s']:>10,.0f} "
                          f"{out['events_per_cpu_s']:>10,.0f} {out['mean_group_ops']:>9.1f} "
                          f"{'' if ratio is None else f'{ratio:.2f}':>8}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": {**vars(args), "cpus": os.cpu_count(), "loadavg_at_finish": os.getloadavg()},
                       "rows": rows, "target": TARGET}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
