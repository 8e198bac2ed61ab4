"""Prometheus metrics: RPCs by method and code, latency, micro-batch sizes, ingest, WAL commits,
checkpoint age, catalog size. Each server gets its own registry, so several can live in one process."""
from __future__ import annotations

import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from streamrec.engine.observer import EngineObserver

_LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics(EngineObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter("streamrec_rpc_requests", "Finished RPCs", ["method", "code"], registry=r)
        self.rpc_latency = Histogram("streamrec_rpc_latency_seconds", "RPC handling time (streams: whole call)",
                                     ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("streamrec_recommend_batch_size", "Requests per top-k kernel call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.events_counter = Counter("streamrec_events", "Ingested events by outcome", ["outcome"], registry=r)
        # Children looked up once: events() runs for every event message, and labels() costs a locked lookup.
        self._events_by_outcome = {o: self.events_counter.labels(o) for o in ("accepted", "duplicate", "rejected")}
        self.commit_latency = Histogram("streamrec_wal_commit_seconds", "Group-commit LMDB transaction time",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.commit_records = Counter("streamrec_wal_records", "Records written to the event log", registry=r)
        self.checkpoint_latency = Histogram("streamrec_checkpoint_seconds", "Checkpoint write time",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.checkpoint_age = Gauge("streamrec_checkpoint_age_seconds", "Seconds since the last checkpoint", registry=r)
        self.items = Gauge("streamrec_items", "Live items", registry=r)
        self.users = Gauge("streamrec_users", "Known users", registry=r)
        self.write_queue = Gauge("streamrec_write_queue", "Writes waiting for the group-commit writer", registry=r)
        # With replicas: a replica's lag is log_last_seq - applied_seq (records the primary wrote, not yet applied here).
        self.applied_seq = Gauge("streamrec_applied_seq", "Last log record applied by this process", registry=r)
        self.log_last_seq = Gauge("streamrec_log_last_seq", "Last record in the log", registry=r)
        self.replicas = Gauge("streamrec_replicas", "Replicas registered with this primary", registry=r)
        self._http = None

    # --- EngineObserver ----------------------------------------------------------------------
    def commit(self, seconds: float, records: int) -> None:
        self.commit_latency.observe(seconds)
        self.commit_records.inc(records)

    def checkpoint(self, seconds: float, items: int, users: int) -> None:
        self.checkpoint_latency.observe(seconds)

    def recommend_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def events(self, accepted: int, duplicates: int, rejected: int) -> None:
        for outcome, count in (("accepted", accepted), ("duplicate", duplicates), ("rejected", rejected)):
            if count:
                self._events_by_outcome[outcome].inc(count)

    def track_engine(self, engine) -> None:
        """Gauges read at scrape time, so they are never stale and cost nothing between scrapes."""
        self.checkpoint_age.set_function(lambda: time.time() - engine.stats().last_checkpoint_wall)
        self.items.set_function(lambda: engine.stats().items)
        self.users.set_function(lambda: engine.stats().users)
        self.write_queue.set_function(lambda: engine.stats().write_queue)
        self.applied_seq.set_function(lambda: engine.served_by().applied_seq)
        self.log_last_seq.set_function(lambda: engine.stats().last_seq)
        self.replicas.set_function(lambda: engine.stats().replicas)
        if engine.impressions is not None:
            self.registry.register(_ArmCollector(engine))

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class _ArmCollector:
    """Impressions and attributed events per experiment arm, and the impression log's own counters, read from
    the log at scrape time (engine/feedback/impressions.py)."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []  # no fixed set of series: the arms come and go with experiments

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        info = self.engine.impressions_info()
        shown = CounterMetricFamily("streamrec_arm_impressions", "Impressions per experiment arm", labels=["experiment", "arm"])
        outcomes = CounterMetricFamily("streamrec_arm_events", "Attributed events per experiment arm and event type",
                                       labels=["experiment", "arm", "type"])
        for key, counts in info.get("arms", {}).items():
            experiment, _, arm = key.partition("/")
            shown.add_metric([experiment, arm], counts.get("impressions", 0))
            for name, value in counts.items():
                if name not in ("impressions", "attributed"):
                    outcomes.add_metric([experiment, arm, name], value)
        log = CounterMetricFamily("streamrec_impression_log", "Impression log counters of this process", labels=["counter"])
        for name in ("recorded", "shed", "attributed", "unattributed_unknown_id", "unattributed_other_user",
                     "unattributed_not_shown", "unattributed_outside_window", "pruned"):
            log.add_metric([name], info.get(name, 0))
        stored = GaugeMetricFamily("streamrec_impressions_stored", "Impressions kept by the log", value=info.get("stored", 0))
        return [shown, outcomes, log, stored]


def _wrap_unary(behavior, method: str, metrics: Metrics):
    def handler(request, context):
        started = time.perf_counter()
        try:
            return behavior(request, context)
        finally:
            metrics.rpc_latency.labels(method).observe(time.perf_counter() - started)
            metrics.rpcs.labels(method, _code_name(context)).inc()
    return handler


def _wrap_stream(behavior, method: str, metrics: Metrics):
    def handler(request_or_iterator, context):
        started = time.perf_counter()
        try:
            yield from behavior(request_or_iterator, context)
        finally:
            metrics.rpc_latency.labels(method).observe(time.perf_counter() - started)
            metrics.rpcs.labels(method, _code_name(context)).inc()
    return handler


def _code_name(context) -> str:
    code = context.code()
    return "OK" if code is None else code.name


class MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method, self.metrics))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method, self.metrics))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, method, self.metrics))
        return handler._replace(stream_stream=_wrap_stream(handler.stream_stream, method, self.metrics))
