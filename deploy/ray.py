"""streamrec on a Ray cluster (extra `ray`: pip install 'streamrec[ray]'): read replicas as a Ray Serve
deployment behind Serve's gRPC ingress, the primary as its own long-lived process.

    primary (one machine):  streamrec serve --host 0.0.0.0 --port 50051 [--tokens-file ...]
                            events, catalog writes and ReplicationService on its port
    Ray Serve (any nodes):  streamrec deploy-ray --primary HOST:50051 --replicas 2 --grpc-port 9000
                            RecommendService (Recommend, RecommendBatch, SimilarItems) on every node's proxy,
                            port 9000, gRPC metadata `application: streamrec`

Each Serve replica is a replica on another machine (engine/replica/remote.py): it copies the primary's state
over the ReplicationService into a data dir of its own on its node (<data-root>/replica-<rank>), follows the
log, and after a restart (Serve restarts a dead replica with the same rank) resumes from that copy. Reads take
`min_seq` as on one machine; a token from another primary's log is refused (OUT_OF_RANGE beyond the log's end).

Only unary RPCs go through Serve: its gRPC proxy runs bidirectional streams only from 2.55 (beta), pulls every
inbound message of a stream with a Ray actor call, and a stream holds one of the replica's request slots for its
whole life (README, "Ray"). RecommendStream and the event stream go to a streamrec process directly.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from ray import serve
from ray.serve.config import gRPCOptions

from streamrec.engine import Engine, EngineConfig, EngineObserver
from streamrec.server.forward import primary_channel
from streamrec.server.replication import GrpcLogSource
from streamrec.server.servicers import EngineHolder, RecommendServicer

log = logging.getLogger(__name__)

APPLICATION = "streamrec"  # the `application` metadata key Serve's gRPC proxy routes on
SERVICER_FUNCTIONS = ["streamrec.v1.recommend_pb2_grpc.add_RecommendServiceServicer_to_server"]


class _Aborted(Exception):
    """Raised after the status is set on Serve's gRPC context, which Serve then returns to the caller."""


class _ServeContext:
    """What RecommendServicer needs of a gRPC servicer context, over Serve's (RayServegRPCContext)."""

    def __init__(self, grpc_context):
        self._context = grpc_context

    def time_remaining(self) -> None:
        return None  # Serve's proxy keeps the caller's deadline; the engine sees none

    def abort(self, code: grpc.StatusCode, details: str):
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted(details)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class RecommendReplica:
    """One read replica: an Engine following the primary over the network, answering RecommendService calls."""

    def __init__(self, primary: str, data_root: str, engine_options: dict, replication_token: str | None = None):
        rank = serve.get_replica_context().rank.rank
        metadata = [("authorization", f"Bearer {replication_token}")] if replication_token else []
        source = GrpcLogSource(primary_channel(primary, None), metadata)
        data_dir, self._lock = claim_copy(Path(data_root), rank)
        self.engine = Engine(data_dir, EngineConfig(**engine_options), EngineObserver(), source=source)
        holder = EngineHolder()
        holder.set(self.engine)
        self.servicer = RecommendServicer(holder)
        # The engine blocks a thread per call (it batches concurrent calls into one kernel call): not the loop.
        self._threads = ThreadPoolExecutor(max_workers=32, thread_name_prefix="serve-rpc")
        log.info("streamrec Serve replica %d following %s from %s", rank, primary, data_dir)

    async def _call(self, method, request, grpc_context):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, method, request, _ServeContext(grpc_context))

    async def Recommend(self, request, grpc_context):
        return await self._call(self.servicer.Recommend, request, grpc_context)

    async def RecommendBatch(self, request, grpc_context):
        return await self._call(self.servicer.RecommendBatch, request, grpc_context)

    async def SimilarItems(self, request, grpc_context):
        return await self._call(self.servicer.SimilarItems, request, grpc_context)

    def applied_seq(self) -> int:
        """For operators and tests: how far this replica has applied the primary's log."""
        return self.engine.served_by().applied_seq

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def claim_copy(data_root: Path, rank: int):
    """The copy this replica keeps: its rank's (<data_root>/replica-<rank>), so a replica Serve restarts resumes
    from it, unless another live process holds that one (during a rolling update the old replica of the rank
    still runs): then the next free one (replica-<rank>.1, ...). Returns the store folder and the held lock."""
    data_root.mkdir(parents=True, exist_ok=True)
    for attempt in range(64):
        name = f"replica-{rank}" + (f".{attempt}" if attempt else "")
        lock = open(data_root / f"{name}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel when the process dies
        except BlockingIOError:
            lock.close()
            continue
        return data_root / name / "lmdb", lock
    raise RuntimeError(f"no free replica copy for rank {rank} under {data_root}")


def build_app(primary: str, data_root: str, replicas: int, engine_options: dict | None = None,
              replication_token: str | None = None, autoscaling: dict | None = None):
    """The Serve application: `replicas` fixed replicas, or Serve's autoscaling config when given."""
    options = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    return RecommendReplica.options(**options).bind(primary, data_root, engine_options or {}, replication_token)


def deploy(primary: str, data_root: str, replicas: int = 2, grpc_port: int = 9000, engine_options: dict | None = None,
           replication_token: str | None = None, autoscaling: dict | None = None):
    """Start Serve's gRPC ingress (one proxy per node) on `grpc_port` and run the application on the connected
    Ray cluster; returns its handle. Running it again with another `replicas` redeploys: Serve replaces the
    replicas in a rolling update (each new one resumes from the copy its rank left); with `autoscaling`, Serve
    adds and removes replicas itself without redeploying."""
    serve.start(grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICER_FUNCTIONS))
    app = build_app(primary, data_root, replicas, engine_options, replication_token, autoscaling)
    handle = serve.run(app, name=APPLICATION, route_prefix=f"/{APPLICATION}")  # None would expose it nowhere
    wait_routable(f"127.0.0.1:{grpc_port}")
    return handle


def wait_routable(proxy: str, timeout_s: float = 60.0, app: str = APPLICATION) -> None:
    """serve.run returns once the replicas run; the proxy learns the route a moment later."""
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(proxy) as channel:
        stub = serve_pb2_grpc.RayServeAPIServiceStub(channel)
        while True:
            try:
                if app in stub.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=5).application_names:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve's proxy at {proxy} does not route {app!r} after {timeout_s} s")
            time.sleep(0.2)
