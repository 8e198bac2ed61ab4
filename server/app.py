"""Builds and runs the gRPC server: the three streamrec services, health checking and reflection.

The port opens before the data loads, so health checks answer NOT_SERVING during loading and
recovery, then SERVING."""
from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.seeding import open_engine
from streamrec.v1 import catalog_pb2, catalog_pb2_grpc, events_pb2, events_pb2_grpc, recommend_pb2, recommend_pb2_grpc

from .metrics import Metrics, MetricsInterceptor
from .servicers import CatalogServicer, EngineHolder, EventServicer, RecommendServicer

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"].full_name,
    catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name,
)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    data_dir: Path = Path("data")
    dataset: str = "ml-100k"  # seeds an empty data dir: ml-100k | synthetic | none
    workers: int = 32  # each open stream holds a worker thread
    max_message_bytes: int = 16 << 20
    grace_s: float = 10.0
    metrics_port: int | None = None  # Prometheus /metrics; None = off, 0 = any free port
    metrics_host: str = "127.0.0.1"
    engine: EngineConfig = field(default_factory=EngineConfig)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class StreamrecServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.holder = EngineHolder()
        self.health = health.HealthServicer()
        self.engine: Engine | None = None
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"), options=options,
            interceptors=[MetricsInterceptor(self.metrics)])
        events_pb2_grpc.add_EventServiceServicer_to_server(EventServicer(self.holder), self.grpc_server)
        recommend_pb2_grpc.add_RecommendServiceServicer_to_server(RecommendServicer(self.holder), self.grpc_server)
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(CatalogServicer(self.holder), self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0
        self._stopped = threading.Event()

    def _set_health(self, status) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> int:
        """Open the port (answering NOT_SERVING), then load/recover the data, then SERVING."""
        self.port = self.grpc_server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.host}:{self.config.port}")
        if not _is_loopback(self.config.host):
            log.warning("listening on %s without TLS or authentication: anyone who can reach it can read "
                        "and write. Bind 127.0.0.1 or put it behind a trusted network.", self.config.host)
        self.grpc_server.start()
        log.info("listening on %s (NOT_SERVING while loading %s)", self.address, self.config.data_dir)
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.metrics_port)
        self.engine = open_engine(self.config.data_dir, self.config.engine, self.config.dataset, observer=self.metrics)
        self.metrics.track_engine(self.engine)
        self.holder.set(self.engine)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        stats = self.engine.stats()
        log.info("serving on %s: %d items, %d users, %d logged events, model %s, backend %s", self.address,
                 stats["items"], stats["users"], stats["log_events"], stats["model_version"], stats["backend"])
        return self.port

    def stop(self, grace_s: float | None = None) -> None:
        """Health first turns NOT_SERVING, in-flight calls drain, then the engine commits and checkpoints."""
        if self._stopped.is_set():
            return
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc_server.stop(self.config.grace_s if grace_s is None else grace_s).wait()
        if self.engine is not None:
            self.engine.close()
        self.metrics.close()
        self.holder.set(None)
        self._stopped.set()
        log.info("stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        def on_signal(signum, _frame):
            log.info("received %s: shutting down", signal.Signals(signum).name)
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        self._stopped.wait()
