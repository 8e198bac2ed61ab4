"""The load tester's workload: Zipf id draws, requests multiplexed over bidirectional streams, the
closed- and open-loop schedules of one process (asyncio on grpc.aio), and the spawned client processes."""
from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import queue as queue_module
import random
import time
import traceback
from typing import Callable

import grpc
import grpc.aio
import numpy as np

from streamrec.clients.aio import make_aio_channel
from streamrec.clients.channel import auth_metadata
from streamrec.clients.loadtest.histogram import Recorder
from streamrec.clients.loadtest.progress import Progress
from streamrec.v1 import (
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    recommend_pb2,
    recommend_pb2_grpc,
)

EVENT_TYPES = (1, 2, 3, 4)  # view, click, add_to_cart, purchase
EVENT_WEIGHTS = (0.6, 0.3, 0.05, 0.05)


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


# --- running ----------------------------------------------------------------------------------------------------

def run_in_process(spec: dict, bar: Progress) -> Recorder:
    update = lambda p: bar.update(p["elapsed"], p["finished"], p["failed"])  # noqa: E731
    return Recorder.from_dict(asyncio.run(run_process(spec, update)))


def run_processes(specs: list[dict], bar: Progress, connect_timeout: float) -> Recorder:
    context = multiprocessing.get_context("spawn")  # fork after gRPC has started threads is unsafe
    messages = context.Queue()
    start_event, start_at = context.Event(), context.Value("d", 0.0)
    # Spawn pickles the target by module and name: this module is always imported as itself, never as __main__.
    processes = [context.Process(target=_child_main, args=(spec, messages, start_event, start_at), daemon=True)
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
