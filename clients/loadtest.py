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
import asyncio
import itertools
import json
import math
import multiprocessing
import os
import queue as queue_module
import random
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable

import grpc
import grpc.aio
import numpy as np

from streamrec.clients.aio import make_aio_channel
from streamrec.clients.client import StreamrecClient, auth_metadata
from streamrec.v1 import (
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    recommend_pb2,
    recommend_pb2_grpc,
)

DEFAULT_ADDRESS = os.environ.get("STREAMREC_ADDRESS", "127.0.0.1:50051")
# ping / ping-stream do no server work: the floors the real scenarios are compared against.
SCENARIOS = ("recommend", "stream", "events", "mixed", "ping", "ping-stream")
DATASETS = {
    "synthetic": {"users": 500, "user_prefix": "u", "user_start": 0, "items": 2000, "item_prefix": "i", "item_start": 0},
    "ml-100k": {"users": 943, "user_prefix": "", "user_start": 1, "items": 1682, "item_prefix": "", "item_start": 1},
}
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
EVENT_TYPES = (1, 2, 3, 4)  # view, click, add_to_cart, purchase
EVENT_WEIGHTS = (0.6, 0.3, 0.05, 0.05)


# --- latency histograms -----------------------------------------------------------------------------------

class Histogram:
    """Latencies in log-spaced buckets: bucket i covers [min_s * growth**i, min_s * growth**(i+1)).
    A percentile is read as its bucket's geometric middle (clamped to the observed min/max), so the
    relative error is below (growth - 1) / 2. Memory is fixed; two histograms merge by adding counts."""

    def __init__(self, growth: float = 1.01, min_s: float = 1e-6, max_s: float = 3600.0):
        self.growth, self.min_s, self.max_s = growth, min_s, max_s
        self._scale = 1.0 / math.log(growth)
        self.size = int(math.ceil(math.log(max_s / min_s) * self._scale)) + 1
        self.counts = [0] * self.size
        self.total = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0

    def index(self, seconds: float) -> int:
        if seconds <= self.min_s:
            return 0
        return min(self.size - 1, int(math.log(seconds / self.min_s) * self._scale))

    def record(self, seconds: float) -> None:
        self.counts[self.index(seconds)] += 1
        self.total += 1
        self.sum += seconds
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds

    def bucket_bounds(self, index: int) -> tuple[float, float]:
        return self.min_s * self.growth ** index, self.min_s * self.growth ** (index + 1)

    def percentile(self, q: float) -> float:
        if not self.total:
            return math.nan
        rank = max(1, math.ceil(q / 100.0 * self.total))
        if rank >= self.total:
            return self.max  # the extremes are known exactly
        if rank == 1:
            return self.min
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                low, high = self.bucket_bounds(index)
                return min(self.max, max(self.min, math.sqrt(low * high)))
        return self.max

    def merge(self, other: "Histogram") -> "Histogram":
        if (other.growth, other.min_s, other.size) != (self.growth, self.min_s, self.size):
            raise ValueError("histograms with different buckets")
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def to_dict(self) -> dict:
        return {"growth": self.growth, "min_s": self.min_s, "max_s": self.max_s, "total": self.total, "sum": self.sum,
                "min": self.min if self.total else None, "max": self.max,
                "counts": {i: c for i, c in enumerate(self.counts) if c}}

    @classmethod
    def from_dict(cls, data: dict) -> "Histogram":
        histogram = cls(data["growth"], data["min_s"], data["max_s"])
        for index, count in data["counts"].items():
            histogram.counts[int(index)] = count
        histogram.total, histogram.sum, histogram.max = data["total"], data["sum"], data["max"]
        histogram.min = math.inf if data["min"] is None else data["min"]
        return histogram

    def summary_ms(self) -> dict | None:
        if not self.total:
            return None
        summary = {"count": self.total, "mean": 1e3 * self.sum / self.total, "min": 1e3 * self.min}
        summary.update({name: 1e3 * self.percentile(q) for name, q in PERCENTILES})
        summary["max"] = 1e3 * self.max
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}


def _coarse() -> Histogram:
    return Histogram(growth=1.1)  # per-second timeline: ~200 buckets, 5% resolution


class Recorder:
    """What one process measured: per-operation histograms, errors by status code, a per-second timeline."""

    def __init__(self) -> None:
        self.latency = Histogram()
        self.error_latency = Histogram()  # how fast failures come back (e.g. RESOURCE_EXHAUSTED under overload)
        self.by_op: dict[str, Histogram] = {}
        self.ops: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.ack_lag = Histogram()
        self.schedule_lag = Histogram()
        self.timeline: dict[int, dict] = {}
        self.events = {"messages": 0, "sent": 0, "accepted": 0, "duplicates": 0, "rejected": 0}
        self.issued = 0
        self.last_send_s = 0.0  # when the last measured request went out, since the window start
        self.last_done_s = 0.0  # when the last measured request finished
        self.slot_waits = 0  # open loop: sends that waited for a --max-inflight slot

    def _second(self, second: int) -> dict:
        slot = self.timeline.get(second)
        if slot is None:
            slot = self.timeline[second] = {"ok": 0, "errors": 0, "latency": _coarse()}
        return slot

    def record(self, op: str, t_rel: float, latency_s: float, code: str) -> None:
        self.ops[op] = self.ops.get(op, 0) + 1
        slot = self._second(int(t_rel))
        if code == "OK":
            self.latency.record(latency_s)
            histogram = self.by_op.get(op)
            if histogram is None:
                histogram = self.by_op[op] = Histogram()
            histogram.record(latency_s)
            slot["ok"] += 1
            slot["latency"].record(latency_s)
        else:
            self.errors[code] = self.errors.get(code, 0) + 1
            self.error_latency.record(latency_s)
            slot["errors"] += 1

    @property
    def ok(self) -> int:
        return self.latency.total

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        return {
            "latency": self.latency.to_dict(), "error_latency": self.error_latency.to_dict(), "by_op": {k: v.to_dict() for k, v in self.by_op.items()},
            "ops": self.ops, "errors": self.errors, "ack_lag": self.ack_lag.to_dict(),
            "schedule_lag": self.schedule_lag.to_dict(), "events": self.events, "issued": self.issued,
            "last_send_s": self.last_send_s, "last_done_s": self.last_done_s, "slot_waits": self.slot_waits,
            "timeline": {s: {"ok": v["ok"], "errors": v["errors"], "latency": v["latency"].to_dict()} for s, v in self.timeline.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Recorder":
        recorder = cls()
        recorder.latency = Histogram.from_dict(data["latency"])
        recorder.error_latency = Histogram.from_dict(data["error_latency"])
        recorder.by_op = {k: Histogram.from_dict(v) for k, v in data["by_op"].items()}
        recorder.ops, recorder.errors, recorder.events = dict(data["ops"]), dict(data["errors"]), dict(data["events"])
        recorder.ack_lag, recorder.schedule_lag = Histogram.from_dict(data["ack_lag"]), Histogram.from_dict(data["schedule_lag"])
        recorder.issued, recorder.last_send_s, recorder.last_done_s = data["issued"], data["last_send_s"], data["last_done_s"]
        recorder.slot_waits = data["slot_waits"]
        recorder.timeline = {int(s): {"ok": v["ok"], "errors": v["errors"], "latency": Histogram.from_dict(v["latency"])}
                             for s, v in data["timeline"].items()}
        return recorder

    def merge(self, other: "Recorder") -> "Recorder":
        self.latency.merge(other.latency)
        self.error_latency.merge(other.error_latency)
        for op, histogram in other.by_op.items():
            self.by_op.setdefault(op, Histogram()).merge(histogram)
        for mine, theirs in ((self.ops, other.ops), (self.errors, other.errors), (self.events, other.events)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        self.ack_lag.merge(other.ack_lag)
        self.schedule_lag.merge(other.schedule_lag)
        self.issued += other.issued
        self.last_send_s = max(self.last_send_s, other.last_send_s)
        self.last_done_s = max(self.last_done_s, other.last_done_s)
        self.slot_waits += other.slot_waits
        for second, slot in other.timeline.items():
            mine = self._second(second)
            mine["ok"] += slot["ok"]
            mine["errors"] += slot["errors"]
            mine["latency"].merge(slot["latency"])
        return self


# --- workload ---------------------------------------------------------------------------------------------

class ZipfSampler:
    """ids[rank] with P(rank r) ~ 1/r^s over a finite id list. Which ids are hot is fixed by `order_seed`
    (the same in every process); the draws come from `rng`."""

    def __init__(self, ids: list[str], s: float, order_seed: int, rng: np.random.Generator):
        if not ids:
            raise ValueError("no ids to draw from")
        weights = np.arange(1, len(ids) + 1, dtype=np.float64) ** -float(s)
        self.cdf = np.cumsum(weights)
        self.cdf /= self.cdf[-1]
        order = np.random.default_rng(order_seed).permutation(len(ids))
        self.ids = [ids[i] for i in order]
        self.rng = rng
        self._buffer: list[int] = []

    def __call__(self) -> str:
        if not self._buffer:
            self._buffer = np.searchsorted(self.cdf, self.rng.random(4096), side="right").clip(0, len(self.ids) - 1).tolist()
        return self.ids[self._buffer.pop()]


class _StreamFailed(Exception):
    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def _code_name(number: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.name
    return f"CODE_{number}"


class MuxStream:
    """One bidirectional stream carrying many concurrent requests, matched to responses by a key
    (request_id or batch_id). A failed stream fails its outstanding requests and is reopened on next use."""

    def __init__(self, method, key_of: Callable):
        self._method, self._key_of = method, key_of
        self._pending: dict[str, list] = {}  # key -> [future, actual send time]
        self._queue: asyncio.Queue | None = None
        self._call = None
        self._readers: set[asyncio.Task] = set()

    async def _requests(self, requests: asyncio.Queue):
        while (item := await requests.get()) is not None:
            message, key = item
            entry = self._pending.get(key)
            if entry is None:
                continue  # timed out before it could be sent
            entry[1] = time.perf_counter()
            yield message

    async def _read(self, call, requests: asyncio.Queue) -> None:
        error: BaseException = _StreamFailed("UNKNOWN")
        try:
            async for response in call:
                key = self._key_of(response)
                entry = self._pending.pop(key, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result((response, entry[1]))
            error = _StreamFailed("STREAM_ENDED")
        except grpc.aio.AioRpcError as rpc_error:
            error = _StreamFailed(rpc_error.code().name)
        except asyncio.CancelledError:
            error = _StreamFailed("CANCELLED")
        if self._queue is requests:
            self._queue = None  # the next request opens a new stream
        # Everything still pending went out on this call: a new call opens only after this point.
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(error)

    def _open(self) -> None:
        self._queue = requests = asyncio.Queue()
        self._call = self._method(self._requests(requests))
        task = asyncio.create_task(self._read(self._call, requests))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def request(self, message, key: str, timeout_s: float):
        """(response, actual send time)."""
        if self._queue is None:
            self._open()
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = [future, None]
        self._queue.put_nowait((message, key))
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(key, None)

    async def close(self, timeout_s: float = 2.0) -> None:
        if self._queue is not None:
            self._queue.put_nowait(None)
        if self._readers:
            await asyncio.wait(set(self._readers), timeout=timeout_s)
        if self._call is not None:
            self._call.cancel()
        for task in list(self._readers):
            task.cancel()


class Runner:
    """The workload of one process."""

    def __init__(self, spec: dict, channel: grpc.aio.Channel):
        self.spec = spec
        self.scenario = spec["scenario"]
        self.timeout_s = spec["timeout"]
        rng = np.random.default_rng(spec["seed"] + 1 + spec["proc_index"])
        self.rng = random.Random(spec["seed"] * 7919 + spec["proc_index"])
        self.users = ZipfSampler(spec["users"], spec["zipf"], spec["seed"], rng)
        self.items = ZipfSampler(spec["items"], spec["zipf"], spec["seed"] + 1, rng)
        self.recommender = recommend_pb2_grpc.RecommendServiceStub(channel)
        self.diagnostics = diagnostics_pb2_grpc.DiagnosticsServiceStub(channel)
        events = events_pb2_grpc.EventServiceStub(channel)
        streams = max(1, spec["streams"])
        self.rec_streams = [MuxStream(self.recommender.RecommendStream, lambda r: r.request_id) for _ in range(streams)] \
            if self.scenario == "stream" else []
        self.ping_streams = [MuxStream(self.diagnostics.PingStream, lambda r: r.id) for _ in range(streams)] \
            if self.scenario == "ping-stream" else []
        self.event_streams = [MuxStream(events.StreamEvents, lambda a: a.batch_id) for _ in range(streams)] \
            if self.scenario in ("events", "mixed") else []
        self.prefix = f"lt{spec['run_id']}-{spec['proc_index']}-"
        self.counter = itertools.count()
        self.recorder = Recorder()
        self.window = (0.0, 0.0)  # measured window: [start, end) in perf_counter time
        self.started = 0
        self.finished = 0
        self.failed = 0

    def _op(self) -> str:
        if self.scenario == "mixed":
            return "recommend" if self.rng.random() < self.spec["mix"] else "events"
        return self.scenario

    def _recommend_request(self, n: int) -> recommend_pb2.RecommendRequest:
        request = recommend_pb2.RecommendRequest(request_id=f"{self.prefix}{n}", user_id=self.users())
        request.k = self.spec["k"]
        if self.spec.get("rerank") in ("on", "off"):
            request.rerank.enabled = self.spec["rerank"] == "on"
        return request

    def _event_batch(self, n: int) -> events_pb2.EventBatch:
        batch = events_pb2.EventBatch(batch_id=f"{self.prefix}{n}")
        types = self.rng.choices(EVENT_TYPES, EVENT_WEIGHTS, k=self.spec["events_per_message"])
        for j, kind in enumerate(types):
            batch.events.add(event_id=f"{self.prefix}{n}.{j}", user_id=self.users(), item_id=self.items(), type=kind)
        return batch

    async def one(self, t_sched: float) -> None:
        """One request; its latency runs from t_sched (the scheduled time in open loop, the start in closed loop)."""
        n = next(self.counter)
        op = self._op()
        measured = self.window[0] <= t_sched < self.window[1]
        if measured:
            self.recorder.issued += 1
            now = time.perf_counter()
            self.recorder.last_send_s = max(self.recorder.last_send_s, now - self.window[0])
            if self.spec["rate"]:
                self.recorder.schedule_lag.record(max(0.0, now - t_sched))
        self.started += 1
        code, ack = "OK", None
        try:
            if op == "recommend":
                await self.recommender.Recommend(self._recommend_request(n), timeout=self.timeout_s)
            elif op == "ping":
                await self.diagnostics.Ping(diagnostics_pb2.PingRequest(id=str(n)), timeout=self.timeout_s)
            elif op == "ping-stream":
                request = diagnostics_pb2.PingRequest(id=f"{self.prefix}{n}")
                await self.ping_streams[n % len(self.ping_streams)].request(request, request.id, self.timeout_s)
            elif op == "stream":
                request = self._recommend_request(n)
                response, _ = await self.rec_streams[n % len(self.rec_streams)].request(request, request.request_id, self.timeout_s)
                if response.error.code:
                    raise _StreamFailed(_code_name(response.error.code))
            else:
                batch = self._event_batch(n)
                ack, sent_at = await self.event_streams[n % len(self.event_streams)].request(batch, batch.batch_id, self.timeout_s)
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        except _StreamFailed as error:
            code = error.code
        except asyncio.TimeoutError:
            code = "DEADLINE_EXCEEDED"
        done = time.perf_counter()
        self.finished += 1
        if code != "OK":
            self.failed += 1
        if not measured:
            return
        self.recorder.record(op, t_sched - self.window[0], done - t_sched, code)
        self.recorder.last_done_s = max(self.recorder.last_done_s, done - self.window[0])
        if ack is not None:
            events = self.recorder.events
            events["messages"] += 1
            events["sent"] += len(batch.events)
            events["accepted"] += ack.accepted
            events["duplicates"] += ack.duplicates
            events["rejected"] += len(ack.rejections)
            self.recorder.ack_lag.record(done - sent_at)

    async def closed_loop(self, workers: int, t_end: float) -> None:
        async def worker() -> None:
            while (now := time.perf_counter()) < t_end:
                await self.one(now)
        await asyncio.gather(*(worker() for _ in range(workers)))

    async def open_loop(self, rate: float, t0: float, t_end: float, phase: float) -> None:
        interval = 1.0 / rate
        slots = asyncio.Semaphore(self.spec["max_inflight"])
        tasks: set[asyncio.Task] = set()

        async def run(t_sched: float) -> None:
            try:
                await self.one(t_sched)
            finally:
                slots.release()

        for i in itertools.count():
            t_sched = t0 + phase + i * interval
            if t_sched >= t_end:
                break
            delay = t_sched - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots.locked():
                if self.window[0] <= t_sched < self.window[1]:
                    self.recorder.slot_waits += 1
            await slots.acquire()  # past --max-inflight the send waits; the wait counts in its latency
            task = asyncio.create_task(run(t_sched))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks))

    async def run(self, t0: float, progress: Callable[[dict], None] | None) -> dict:
        spec = self.spec
        measure_from = t0 + spec["warmup"]
        t_end = measure_from + spec["duration"]
        self.window = (measure_from, t_end)

        async def report_progress() -> None:
            while True:
                await asyncio.sleep(0.25)
                progress({"elapsed": time.perf_counter() - t0, "finished": self.finished, "failed": self.failed})

        reporter = asyncio.create_task(report_progress()) if progress else None
        try:
            if spec["rate"]:
                await self.open_loop(spec["rate"], t0, t_end, spec["phase"])
            else:
                await self.closed_loop(spec["concurrency"], t_end)
        finally:
            if reporter:
                reporter.cancel()
            for stream in self.rec_streams + self.event_streams + self.ping_streams:
                await stream.close()
        if progress:
            progress({"elapsed": time.perf_counter() - t0, "finished": self.finished, "failed": self.failed})
        return self.recorder.to_dict()


async def run_process(spec: dict, progress: Callable[[dict], None] | None = None,
                      ready: Callable[[], None] | None = None, start_time: Callable | None = None) -> dict:
    """Connect, signal readiness, wait for the common start (wall clock), run the workload."""
    channel = make_aio_channel(spec["address"], tls=spec["tls"], root_certificates=spec["root_cert"],
                               certificate_chain=spec["client_cert"], private_key=spec["client_key"],
                               server_name=spec["server_name"], metadata=auth_metadata(spec["token"]))
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), spec["connect_timeout"])
        except asyncio.TimeoutError:
            raise ConnectionError(f"could not connect to {spec['address']} in {spec['connect_timeout']} s") from None
        runner = Runner(spec, channel)
        if ready:
            ready()
        start_at = await start_time() if start_time else time.time()
        wait = start_at - time.time()
        t0 = time.perf_counter() + max(0.0, wait)
        if wait > 0:
            await asyncio.sleep(wait)
        return await runner.run(t0, progress)
    finally:
        await channel.close()


def _child_main(spec: dict, messages, start_event, start_at) -> None:
    """Entry point of a worker process (spawned): everything goes back through `messages`."""
    index = spec["proc_index"]
    try:
        async def start_time() -> float:
            if not await asyncio.get_running_loop().run_in_executor(None, start_event.wait, 300):
                raise TimeoutError("no start signal")
            return start_at.value

        result = asyncio.run(run_process(spec, lambda p: messages.put(("progress", index, p)),
                                         lambda: messages.put(("ready", index, None)), start_time))
        messages.put(("result", index, result))
    except BaseException:  # noqa: BLE001 - the parent reports it
        messages.put(("error", index, traceback.format_exc()))


# --- progress display ---------------------------------------------------------------------------------------

class Progress:
    """tqdm if installed, else rich, else a line a second on stderr; `none` shows nothing."""

    def __init__(self, kind: str, total_s: float):
        self.total_s, self.kind, self._bar, self._last_line = total_s, kind, None, -1.0
        if kind == "auto":
            self.kind = "simple"
            for candidate in ("tqdm", "rich"):
                try:
                    __import__(candidate)
                    self.kind = candidate
                    break
                except ImportError:
                    pass
        if self.kind == "tqdm":
            from tqdm import tqdm
            self._bar = tqdm(total=round(total_s, 1), unit="s", desc="loadtest", file=sys.stderr,
                             bar_format="{desc} {bar} {n:.1f}/{total:.1f} s {postfix}")
        elif self.kind == "rich":
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
            self._bar = RichProgress(TextColumn("loadtest"), BarColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                     transient=False)
            self._bar.start()
            self._task = self._bar.add_task("loadtest", total=total_s, info="")

    def update(self, elapsed: float, finished: int, failed: int) -> None:
        rate = finished / elapsed if elapsed > 0 else 0.0
        elapsed = min(elapsed, self.total_s)
        info = f"{finished} req, {rate:,.0f} req/s, {failed} errors"
        if self.kind == "tqdm":
            self._bar.n = round(elapsed, 1)
            self._bar.set_postfix_str(info, refresh=False)
            self._bar.refresh()
        elif self.kind == "rich":
            self._bar.update(self._task, completed=elapsed, info=info)
        elif self.kind == "simple" and elapsed - self._last_line >= 1.0:
            self._last_line = elapsed
            print(f"[{elapsed:6.1f}/{self.total_s:.1f} s] {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.kind == "tqdm":
            self._bar.close()
        elif self.kind == "rich":
            self._bar.stop()


# --- ids, arguments ------------------------------------------------------------------------------------------

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


# --- running ----------------------------------------------------------------------------------------------------

def _run_in_process(spec: dict, bar: Progress) -> Recorder:
    update = lambda p: bar.update(p["elapsed"], p["finished"], p["failed"])  # noqa: E731
    return Recorder.from_dict(asyncio.run(run_process(spec, update)))


def _run_processes(specs: list[dict], bar: Progress, connect_timeout: float) -> Recorder:
    from streamrec.clients import loadtest as this  # by its import name, so that spawn can find it

    context = multiprocessing.get_context("spawn")  # fork after gRPC has started threads is unsafe
    messages = context.Queue()
    start_event, start_at = context.Event(), context.Value("d", 0.0)
    processes = [context.Process(target=this._child_main, args=(spec, messages, start_event, start_at), daemon=True)
                 for spec in specs]
    for process in processes:
        process.start()
    ready, results, progress = set(), {}, {}
    deadline = time.monotonic() + connect_timeout + 60.0  # interpreter start-up and imports
    try:
        while len(results) < len(processes):
            try:
                kind, index, payload = messages.get(timeout=0.5)
            except queue_module.Empty:
                dead = [i for i, p in enumerate(processes) if not p.is_alive() and i not in results]
                if dead and messages.empty():
                    raise RuntimeError(f"client process(es) {dead} exited without a result")
                if len(ready) < len(processes) and time.monotonic() > deadline:
                    raise RuntimeError("client processes did not get ready in time")
                continue
            if kind == "error":
                raise RuntimeError(f"client process {index} failed:\n{payload}")
            if kind == "ready":
                ready.add(index)
                if len(ready) == len(processes):
                    start_at.value = time.time() + 0.2
                    start_event.set()
            elif kind == "progress":
                progress[index] = payload
                bar.update(max(p["elapsed"] for p in progress.values()), sum(p["finished"] for p in progress.values()),
                           sum(p["failed"] for p in progress.values()))
            elif kind == "result":
                results[index] = payload
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
    merged = Recorder()
    for index in sorted(results):
        merged.merge(Recorder.from_dict(results[index]))
    return merged


def build_report(args, recorder: Recorder, dataset: str, users: int, items: int, wall_s: float) -> dict:
    duration = args.duration
    send_span = max(duration, recorder.last_send_s)  # sends that fell behind took longer than the window
    done_span = max(duration, recorder.last_done_s)  # answers that came after the window's end
    timeline = []
    for second in sorted(recorder.timeline):
        slot = recorder.timeline[second]
        latency = slot["latency"]
        timeline.append({"t": second, "ok": slot["ok"], "errors": slot["errors"],
                         "p50_ms": round(1e3 * latency.percentile(50), 4) if latency.total else None,
                         "p99_ms": round(1e3 * latency.percentile(99), 4) if latency.total else None})
    buckets = [(i, c) for i, c in enumerate(recorder.latency.counts) if c]
    events = dict(recorder.events)
    events["events_per_s"] = round(events["sent"] / duration, 2)
    requests = recorder.ok + recorder.error_count
    return {
        "scenario": args.scenario, "mode": "open" if args.rate else "closed", "address": args.address,
        "processes": args.processes, "concurrency": None if args.rate else args.concurrency,
        "streams_per_process": args.streams if args.scenario != "recommend" else None,
        "target_rate_rps": args.rate, "duration_s": duration, "warmup_s": args.warmup, "wall_s": round(wall_s, 3),
        "dataset": dataset, "users": users, "items": items, "zipf": args.zipf, "k": args.k, "rerank": args.rerank,
        "mix": args.mix if args.scenario == "mixed" else None,
        "events_per_message": args.events_per_message if args.scenario in ("events", "mixed") else None,
        "requests": requests, "ok": recorder.ok, "errors": recorder.error_count,
        "errors_by_code": dict(sorted(recorder.errors.items())),
        "error_rate": round(recorder.error_count / requests, 6) if requests else 0.0,
        "requests_by_op": dict(sorted(recorder.ops.items())),
        "throughput_rps": round(recorder.ok / done_span, 2),
        "achieved_rate_rps": round(recorder.issued / send_span, 2),
        "latency_ms": recorder.latency.summary_ms(),
        "error_latency_ms": recorder.error_latency.summary_ms(),
        "latency_by_op_ms": {op: h.summary_ms() for op, h in sorted(recorder.by_op.items())},
        "event_ack_lag_ms": recorder.ack_lag.summary_ms(),
        "schedule_lag_ms": recorder.schedule_lag.summary_ms(),
        "inflight_limit_waits": recorder.slot_waits if args.rate else None,
        "events": events,
        "timeline": timeline,
        "latency_histogram": {
            "bucket_low_ms": [round(1e3 * recorder.latency.bucket_bounds(i)[0], 6) for i, _ in buckets],
            "bucket_high_ms": [round(1e3 * recorder.latency.bucket_bounds(i)[1], 6) for i, _ in buckets],
            "counts": [c for _, c in buckets],
        },
    }


def format_report(report: dict) -> str:
    def line(name: str, summary: dict | None) -> str:
        if not summary:
            return f"  {name:<14} -"
        return (f"  {name:<14} p50 {summary['p50']:8.2f}  p90 {summary['p90']:8.2f}  p99 {summary['p99']:8.2f}  "
                f"p99.9 {summary['p99.9']:8.2f}  max {summary['max']:8.2f}  (n={summary['count']})")

    mode = f"open loop at {report['target_rate_rps']:g} req/s" if report["mode"] == "open" else \
        f"closed loop, concurrency {report['concurrency']}"
    out = [f"scenario {report['scenario']} against {report['address']}: {mode}, {report['processes']} process(es), "
           f"{report['duration_s']:g} s measured after {report['warmup_s']:g} s warm-up "
           f"({report['dataset']} ids: {report['users']} users, {report['items']} items, zipf {report['zipf']:g})",
           f"requests {report['requests']}  ok {report['ok']}  errors {report['errors']}"
           + (f" {report['errors_by_code']}" if report["errors"] else ""),
           f"throughput {report['throughput_rps']:,.1f} req/s (achieved send rate {report['achieved_rate_rps']:,.1f} req/s)",
           "latency, ms:", line("all", report["latency_ms"])]
    if len(report["latency_by_op_ms"]) > 1:
        out += [line(op, summary) for op, summary in report["latency_by_op_ms"].items()]
    if report["event_ack_lag_ms"]:
        out.append(line("event ack lag", report["event_ack_lag_ms"]))
        e = report["events"]
        out.append(f"events: {e['sent']} sent in {e['messages']} messages ({e['events_per_s']:,.0f}/s), "
                   f"{e['accepted']} accepted, {e['duplicates']} duplicate, {e['rejected']} rejected")
    if report["inflight_limit_waits"]:
        out.append(f"note: {report['inflight_limit_waits']} send(s) waited for a free --max-inflight slot: the server "
                   f"did not keep up with the rate (their wait is part of the latency above)")
    elif report["schedule_lag_ms"] and report["schedule_lag_ms"]["p99"] > 10.0:
        out.append(f"note: sends ran up to {report['schedule_lag_ms']['max']:.0f} ms behind schedule (p99 "
                   f"{report['schedule_lag_ms']['p99']:.1f} ms; counted in the latencies): the client process is CPU-bound "
                   f"or starved; try more --processes")
    return "\n".join(out)


def write_plot(report: dict, path: str) -> str | None:
    """PNG with the latency histogram and latency / throughput over time; returns an error message instead."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "--plot needs matplotlib (pip install matplotlib); the report was still written"
    fig, (hist_ax, lat_ax, thr_ax) = plt.subplots(3, 1, figsize=(10, 11))
    h = report["latency_histogram"]
    if h["counts"]:
        widths = [hi - lo for lo, hi in zip(h["bucket_low_ms"], h["bucket_high_ms"])]
        hist_ax.bar(h["bucket_low_ms"], h["counts"], width=widths, align="edge")
        hist_ax.set_xscale("log")
        hist_ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    if report["latency_ms"]:
        for name in ("p50", "p99", "p99.9"):
            hist_ax.axvline(report["latency_ms"][name], linestyle="--", linewidth=1, color="gray")
            hist_ax.text(report["latency_ms"][name], hist_ax.get_ylim()[1] * 0.9, f" {name}", fontsize=8)
    hist_ax.set(title=f"{report['scenario']} ({report['mode']} loop): latency histogram", xlabel="latency (ms)", ylabel="requests")
    t = [p["t"] for p in report["timeline"]]
    lat_ax.plot(t, [p["p50_ms"] for p in report["timeline"]], label="p50")
    lat_ax.plot(t, [p["p99_ms"] for p in report["timeline"]], label="p99")
    lat_ax.set(title="latency over time", xlabel="second of the measured window", ylabel="ms")
    lat_ax.legend()
    thr_ax.plot(t, [p["ok"] for p in report["timeline"]], label="ok/s")
    thr_ax.plot(t, [p["errors"] for p in report["timeline"]], label="errors/s")
    if report["target_rate_rps"]:
        thr_ax.axhline(report["target_rate_rps"], linestyle="--", color="gray", label="target")
    thr_ax.set(title="throughput over time", xlabel="second of the measured window", ylabel="requests/s")
    thr_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


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
        recorder = _run_in_process(specs[0], bar) if args.processes == 1 else _run_processes(specs, bar, args.connect_timeout)
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


if __name__ == "__main__":
    sys.exit(main())
