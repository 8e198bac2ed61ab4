"""Online update throughput (issue 4): events/s through the batched Numba kernel (engine/cpu/online.py) at
batch sizes 1, 100 and 10k, against peers measured in the same run:

  numpy-reference   engine/state/online.py, the same rule event by event in NumPy (what the kernel is tested against)
  numpy-batched     a NumPy-vectorised batched solve: one exact fold-in per distinct user of the batch
                    (np.linalg.solve on stacked systems) against fixed items, no item steps - a cheaper rule,
                    the best NumPy does without a per-event loop

Tables are ML-100K-sized (943 users, 1682 items, dim 64, a full 50-event ring per user); users are drawn from a
Zipf law (s = 1.2), items uniformly, strengths from the event-type mix. Throughput is best-of-`--repeat` wall
time; the CPU seconds of the same runs are printed too (the kernel is single-threaded: events of different users
share item rows and the Gram, and must apply in order for replay to be deterministic).

    python benchmarks/update.py                  # table
    python benchmarks/update.py --json out.json  # + JSON
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np

from streamrec.engine.config import EngineConfig
from streamrec.engine.cpu.online import apply_events
from streamrec.engine.signals import signed_strength
from streamrec.engine.state.online import (
    OnlineArrays,
    OnlineParams,
    apply_events_reference,
    gram_fixed,
    gram_float,
    history_weights,
)

TARGET = 100_000  # events/s


def tables(users: int, items: int, dim: int, ring: int, seed: int = 0) -> OnlineArrays:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(items, dim))
    y = (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)
    live = np.ones(items, bool)
    g = gram_fixed(y, live)
    return OnlineArrays(
        user_vectors=(rng.normal(size=(users, dim)) * 0.3).astype(np.float32),
        last_event_ms=np.full(users, 1_700_000_000_000, np.int64),
        hist_items=rng.integers(0, items, (users, ring)).astype(np.int32),
        hist_strength=signed_strength(rng.choice([1.5, 1.0, 0.5, 0.25, -0.3], (users, ring))),
        hist_ts=np.full((users, ring), 1_700_000_000_000, np.int64) - rng.integers(0, 10**9, (users, ring)),
        hist_count=np.full(users, ring, np.int64), item_vectors=y, item_live=live,
        item_counts=rng.integers(0, 200, items).astype(np.int64), gram_fixed=g, gram=gram_float(g),
        moved=np.zeros(0, np.int64))


def events(n: int, users: int, items: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    user_rows = (rng.zipf(1.2, n) - 1) % users
    item_rows = rng.integers(0, items, n)
    strengths = signed_strength(rng.choice([1.5, 1.0, 0.5, 0.25, -0.3, -1.0], n, p=[.3, .2, .2, .2, .07, .03]))
    timestamps = 1_700_000_000_000 + np.arange(n, dtype=np.int64) * 1000
    return user_rows, item_rows, strengths, timestamps


def run_kernel(state: OnlineArrays, batch: tuple, size: int, params: OnlineParams) -> None:
    for lo in range(0, len(batch[0]), size):
        part = tuple(column[lo:lo + size] for column in batch)
        state.moved = np.empty(len(part[0]), np.int64)
        apply_events(state, *part, params)


def run_reference(state: OnlineArrays, batch: tuple, size: int, params: OnlineParams) -> None:
    for lo in range(0, len(batch[0]), size):
        part = tuple(column[lo:lo + size] for column in batch)
        state.moved = np.empty(len(part[0]), np.int64)
        apply_events_reference(state, *part, params)


def run_numpy_batched(state: OnlineArrays, batch: tuple, size: int, params: OnlineParams) -> None:
    """Per batch: append to the rings, then one exact fold-in per distinct user, all users solved at once."""
    hist_len = state.hist_items.shape[1]
    window = min(hist_len, params.history)
    for lo in range(0, len(batch[0]), size):
        user_rows, item_rows, strengths, timestamps = (column[lo:lo + size] for column in batch)
        for u, i, s, t in zip(user_rows, item_rows, strengths, timestamps):  # ring append (cheap, in order)
            slot = state.hist_count[u] % hist_len
            state.hist_items[u, slot], state.hist_strength[u, slot], state.hist_ts[u, slot] = i, s, t
            state.hist_count[u] += 1
            state.last_event_ms[u] = max(state.last_event_ms[u], t)
        distinct = np.unique(user_rows)
        slots = (state.hist_count[distinct, None] - window + np.arange(window)) % hist_len
        y = state.item_vectors[state.hist_items[distinct[:, None], slots]].astype(np.float64)  # [B, n, d]
        strength = state.hist_strength[distinct[:, None], slots].astype(np.float64)
        dt = (state.last_event_ms[distinct, None] - state.hist_ts[distinct[:, None], slots]).astype(np.float64)
        decay = np.where(dt > 0, np.maximum(0.5 ** (dt / params.half_life_ms), params.decay_floor), 1.0)
        cw = params.alpha * np.abs(strength) * decay
        a = state.gram + params.reg * np.eye(state.gram.shape[0]) + np.einsum("bn,bni,bnj->bij", cw, y, y)
        b = np.einsum("bn,bni->bi", (1.0 + cw) * (strength > 0), y)
        state.user_vectors[distinct] = np.linalg.solve(a, b[:, :, None])[:, :, 0].astype(np.float32)


def measure(fn, base: OnlineArrays, batch: tuple, size: int, params: OnlineParams, repeat: int) -> dict:
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        state = copy.deepcopy(base)
        wall, cpu = time.perf_counter(), time.process_time()
        fn(state, batch, size, params)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    n = len(batch[0])
    return {"events": n, "wall_s": best_wall, "cpu_s": best_cpu, "events_per_s": n / best_wall,
            "events_per_cpu_s": n / best_cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=943)
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--events", type=int, default=100_000, help="events per kernel measurement")
    parser.add_argument("--reference-events", type=int, default=2_000, help="events per NumPy-reference measurement")
    parser.add_argument("--batches", default="1,100,10000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    config = EngineConfig(dim=args.dim)
    params = OnlineParams(alpha=config.online_alpha, reg=config.online_reg, cg_steps=config.online_cg_steps,
                          history=config.online_history, item_lr=config.item_lr, item_lr_new=config.item_lr_new)
    base = tables(args.users, args.items, args.dim, config.history_len)
    batch = events(args.events, args.users, args.items)
    run_kernel(copy.deepcopy(base), tuple(c[:50] for c in batch), 10, params)  # compile / load the cache
    rows = []
    for size in (int(s) for s in args.batches.split(",")):
        kernel = measure(run_kernel, base, batch, size, params, args.repeat)
        ref_batch = tuple(c[: args.reference_events] for c in batch)
        reference = measure(run_reference, base, ref_batch, size, params, 1)
        batched = measure(run_numpy_batched, base, tuple(c[: max(args.reference_events, min(size * 5, args.events))] for c in batch),
                          size, params, 1)
        rows.append({"batch": size, "numba": kernel, "numpy_reference": reference, "numpy_batched": batched,
                     "vs_reference": kernel["events_per_s"] / reference["events_per_s"],
                     "vs_numpy_batched": kernel["events_per_s"] / batched["events_per_s"]})

    print(f"online update throughput: {args.users} users, {args.items} items, dim {args.dim}, fold-in history "
          f"{params.history}, {params.cg_steps} CG steps; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{'batch':>6} {'numba ev/s':>12} {'(per CPU s)':>12} {'numpy ref ev/s':>15} {'numpy batched ev/s':>19} {'x ref':>7} {'x batched':>10}")
    for r in rows:
        print(f"{r['batch']:>6} {r['numba']['events_per_s']:>12,.0f} {r['numba']['events_per_cpu_s']:>12,.0f} "
              f"{r['numpy_reference']['events_per_s']:>15,.0f} {r['numpy_batched']['events_per_s']:>19,.0f} "
              f"{r['vs_reference']:>7.0f} {r['vs_numpy_batched']:>10.1f}")
    best = max(r["numba"]["events_per_s"] for r in rows)
    print(f"target >= {TARGET:,} events/s: {'met' if best >= TARGET else 'NOT met'} (best {best:,.0f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args) | {"history": params.history, "cg_steps": params.cg_steps,
                                              "cpus": os.cpu_count()}, "rows": rows, "target": TARGET}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
