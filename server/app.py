"""Builds and runs the gRPC server: the three streamrec services, health checking and reflection.

The port opens before the data loads, so health checks answer NOT_SERVING during loading and
recovery, then SERVING.

Security (both off by default, for the embedded loopback use): `tls_cert` + `tls_key` (+ `tls_client_ca`
for mutual TLS) serve TLS, see tls.py; `tokens_file` turns on bearer-token authentication with roles,
see auth.py. Listening beyond loopback without either logs a warning saying which is missing."""
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

from streamrec.engine import Engine, EngineObserver
from streamrec.engine.config import STORE_FOLDER, EngineConfig
from streamrec.server.auth import AuthInterceptor, TokenTable
from streamrec.server.decode import RequestDecodeInterceptor
from streamrec.server.forward import PrimaryForwarder, primary_channel
from streamrec.server.replication import GrpcLogSource, ReplicationServicer
from streamrec.server.metrics import Metrics, MetricsInterceptor
from streamrec.server.servicers import (
    CatalogServicer,
    DiagnosticsServicer,
    EngineHolder,
    EventServicer,
    RecommendServicer,
)
from streamrec.server.experiments import ExperimentServicer
from streamrec.server.tls import server_credentials, tls_files
from streamrec.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    experiments_pb2,
    experiments_pb2_grpc,
    recommend_pb2,
    recommend_pb2_grpc,
    replication_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"].full_name,
    catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name,
    diagnostics_pb2.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name,
    experiments_pb2.DESCRIPTOR.services_by_name["ExperimentService"].full_name,
)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    data_dir: Path = Path("data")
    dataset: str = "ml-100k"  # seeds an empty data dir: ml-100k | synthetic | none
    workers: int = 32  # each open stream holds a worker thread
    # Calls admitted at once (running + waiting for a worker). Beyond it gRPC answers RESOURCE_EXHAUSTED at
    # once instead of queueing without bound in the executor: memory stays flat under a flood.
    max_concurrent_rpcs: int | None = None  # None = 4 x workers
    max_message_bytes: int = 16 << 20
    grace_s: float = 10.0
    metrics_port: int | None = None  # Prometheus /metrics; None = off, 0 = any free port
    metrics_host: str = "127.0.0.1"
    # TLS: PEM file paths (see tls.py). A client CA turns on mutual TLS: clients must present a certificate.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Bearer tokens with roles (see auth.py); None = no authentication. Re-read when it changes.
    tokens_file: Path | None = None
    tokens_refresh_s: float = 1.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Topology (supervisor.py starts these): the primary writes; a replica serves reads from the primary's log
    # and forwards writes to `primary_target`. `process_port`: a second port of this process alone, besides the
    # shared one, for clients that balance calls across processes themselves and for the supervisor's checks.
    role: str = "primary"
    primary_target: str | None = None
    process_port: int | None = None
    # A replica on another machine (engine/replica/remote.py): copies the primary at `primary_target` over its
    # ReplicationService into its own data dir. The token (admin role) is sent when the primary checks tokens.
    remote: bool = False
    replication_token: str | None = None


def open_engine(data_dir: Path, config: EngineConfig, dataset: str, observer: EngineObserver,
                replica: bool = False, source=None) -> Engine:
    """The Engine of <data_dir>/lmdb; on the first start (no store yet) seeded with `dataset` first. A replica
    opens the store its primary has already created; a remote one (source: a LogSource) keeps its own copy."""
    store_dir = Path(data_dir) / STORE_FOLDER
    if replica:
        return Engine(store_dir, config, observer, replica=True, source=source)
    if dataset == "none" or Engine.holds_store(store_dir):
        return Engine(store_dir, config, observer)
    # First start only: training a model to seed with is offline work, so its code is loaded just then.
    from streamrec.engine.offline.seeding import open_engine as seed_and_open

    return seed_and_open(data_dir, config, dataset, observer=observer)


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
        if config.role not in ("primary", "replica"):
            raise ValueError(f"role must be primary or replica, not {config.role!r}")
        if config.role == "replica" and not config.primary_target:
            raise ValueError("a replica needs the primary's address (primary_target) to forward writes to")
        self.tls = tls_files(config.tls_cert, config.tls_key, config.tls_client_ca)
        forwarder = (PrimaryForwarder(config.primary_target, self.tls, config.max_message_bytes)
                     if config.role == "replica" else None)
        self.holder = EngineHolder(forwarder)
        self.health = health.HealthServicer()
        self.engine: Engine | None = None
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        # TLS files were read above, so a bad file stops the server before it binds anything.
        self._credentials = server_credentials(self.tls) if self.tls else None
        self.tokens = TokenTable(config.tokens_file, config.tokens_refresh_s) if config.tokens_file else None
        # The first interceptor runs outermost: metrics wraps auth, so rejected calls are counted by code;
        # the decode guard is innermost, so requests that do not parse get INVALID_ARGUMENT, not INTERNAL.
        interceptors = [MetricsInterceptor(self.metrics), *([AuthInterceptor(self.tokens)] if self.tokens else []),
                        RequestDecodeInterceptor()]
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"), options=options,
            interceptors=interceptors, maximum_concurrent_rpcs=config.max_concurrent_rpcs or 4 * config.workers)
        events_pb2_grpc.add_EventServiceServicer_to_server(EventServicer(self.holder), self.grpc_server)
        recommend_pb2_grpc.add_RecommendServiceServicer_to_server(RecommendServicer(self.holder), self.grpc_server)
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(CatalogServicer(self.holder), self.grpc_server)
        diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(DiagnosticsServicer(), self.grpc_server)
        experiments_pb2_grpc.add_ExperimentServiceServicer_to_server(ExperimentServicer(self.holder), self.grpc_server)
        if config.role == "primary":
            replication_pb2_grpc.add_ReplicationServiceServicer_to_server(ReplicationServicer(self.holder),
                                                                          self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0
        self.process_port: int | None = None
        self._stopped = threading.Event()

    def _set_health(self, status) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> int:
        """Open the port (answering NOT_SERVING), then load/recover the data, then SERVING. A replica loads first:
        on the shared port, a connection the kernel gave to a replica still loading would fail its calls."""
        if self.config.role == "replica":
            self._open_engine()
        self.port = self._bind(self.config.port)
        if self.config.process_port is not None:
            self.process_port = self._bind(self.config.process_port)
        self._warn_if_exposed()
        self.grpc_server.start()
        log.info("listening on %s%s%s" + (" (NOT_SERVING while loading %s)" if self.engine is None else " (%s loaded)"),
                 self.address,
                 "" if self.tls is None else (" with mutual TLS" if self.tls.mutual else " with TLS"),
                 "" if self.tokens is None else f", tokens from {self.config.tokens_file}", self.config.data_dir)
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_host, self.metrics_port)
        if self.engine is None:
            self._open_engine()
        self.metrics.track_engine(self.engine)
        self.holder.set(self.engine)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        stats = self.engine.stats()
        log.info("%s serving on %s: %d items, %d users, %d logged events, model %s, backend %s", self.config.role,
                 self.address, stats.items, stats.users, stats.log_events, stats.served_by.model_version,
                 stats.served_by.backend)
        return self.port

    def _open_engine(self) -> None:
        config = self.config
        source = None
        if config.remote:
            token = [("authorization", f"Bearer {config.replication_token}")] if config.replication_token else []
            source = GrpcLogSource(primary_channel(config.primary_target, self.tls, config.max_message_bytes), token)
        self.engine = open_engine(config.data_dir, config.engine, config.dataset, observer=self.metrics,
                                  replica=config.role == "replica", source=source)

    def _bind(self, port: int) -> int:
        target = f"{self.config.host}:{port}"
        if self._credentials is not None:
            bound = self.grpc_server.add_secure_port(target, self._credentials)
        else:
            bound = self.grpc_server.add_insecure_port(target)
        if bound == 0:
            raise RuntimeError(f"could not bind {target}")
        return bound

    def _warn_if_exposed(self) -> None:
        if _is_loopback(self.config.host):
            return
        host = self.config.host
        if self.tls is None and self.tokens is None:
            log.warning("SECURITY: listening on %s without TLS and without authentication: anyone who can reach "
                        "it can read and write, in cleartext. Set --tls-cert/--tls-key and --tokens-file, bind "
                        "127.0.0.1, or put it behind a trusted network.", host)
        elif self.tls is None:
            log.warning("SECURITY: listening on %s without TLS: bearer tokens and data cross the network in "
                        "cleartext and can be replayed by anyone on the path. Set --tls-cert and --tls-key.", host)
        elif self.tokens is None and not self.tls.mutual:
            log.warning("SECURITY: listening on %s with TLS but without authentication: anyone who can reach it "
                        "can read and write. Set --tokens-file (or --tls-client-ca for mutual TLS).", host)
        if self.tls is not None and self.tls.mutual and self.tokens is None:
            log.info("mutual TLS without tokens: every client with a certificate from the client CA has full access")

    def stop(self, grace_s: float | None = None) -> None:
        """Health first turns NOT_SERVING, in-flight calls drain, then the engine commits and checkpoints."""
        if self._stopped.is_set():
            return
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.engine is not None and self.engine.feed is not None:
            self.engine.feed.close()  # replicas' log streams never end by themselves: end them before draining
        self.grpc_server.stop(self.config.grace_s if grace_s is None else grace_s).wait()
        if self.engine is not None:
            self.engine.close()
        if self.holder.primary is not None:
            self.holder.primary.close()
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
