"""python benchmarks/serve_streams.py [--messages 2000] [--json PATH]

Should RecommendStream (bidirectional) go through Ray Serve's gRPC ingress? Measures the transport alone: a
deployment whose Recommend and RecommendStream answer a fixed response, called through Serve's proxy (Ray
2.60, proxy path), against a plain grpcio server with the same two handlers, in the same run on one machine.
Per message: unary round trip, and a stream's round trip per message (one request in flight), p50/p99.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import threading
import time
from concurrent import futures

import grpc
import ray
from ray import serve
from ray.serve.config import gRPCOptions

from streamrec.v1 import recommend_pb2, recommend_pb2_grpc

ROUTE = (("application", "echo"),)
ANSWER = recommend_pb2.RecommendResponse(user_id="u", strategy="personalized")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Echo:
    async def Recommend(self, request):
        return ANSWER

    async def RecommendStream(self, request_stream):
        async for _ in request_stream:
            yield ANSWER


class DirectEcho(recommend_pb2_grpc.RecommendServiceServicer):
    def Recommend(self, request, context):
        return ANSWER

    def RecommendStream(self, request_iterator, context):
        for _ in request_iterator:
            yield ANSWER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unary_ms(stub, n: int, metadata) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        stub.Recommend(recommend_pb2.RecommendRequest(user_id="u"), metadata=metadata, timeout=30)
        out.append((time.perf_counter() - started) * 1e3)
    return out


def stream_ms(stub, n: int, metadata) -> list[float]:
    """One request in flight: send, wait for its answer, send the next."""
    turn, out = threading.Semaphore(0), []
    sent_at = [0.0]

    def requests():
        for _ in range(n):
            sent_at[0] = time.perf_counter()
            yield recommend_pb2.RecommendRequest(user_id="u")
            turn.acquire()

    for _ in stub.RecommendStream(requests(), metadata=metadata, timeout=300):
        out.append((time.perf_counter() - sent_at[0]) * 1e3)
        turn.release()
    return out


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered), 3), "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    direct = grpc.server(futures.ThreadPoolExecutor(8))
    recommend_pb2_grpc.add_RecommendServiceServicer_to_server(DirectEcho(), direct)
    direct_port = direct.add_insecure_port("127.0.0.1:0")
    direct.start()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    serve_port = free_port()
    try:
        serve.start(grpc_options=gRPCOptions(port=serve_port, grpc_servicer_functions=[
            "streamrec.v1.recommend_pb2_grpc.add_RecommendServiceServicer_to_server"]))
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        from streamrec.deploy.ray import wait_routable
        wait_routable(f"127.0.0.1:{serve_port}", app="echo")
        rows = {}
        for name, port, metadata in (("direct grpcio", direct_port, ()), ("Serve ingress", serve_port, ROUTE)):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = recommend_pb2_grpc.RecommendServiceStub(channel)
                unary_ms(stub, 200, metadata), stream_ms(stub, 200, metadata)  # warm-up
                rows[name] = {"unary": summary(unary_ms(stub, args.messages, metadata)),
                              "stream": summary(stream_ms(stub, args.messages, metadata))}
    finally:
        serve.shutdown()
        ray.shutdown()
        direct.stop(0)
    print(f"{'path':<14} {'unary p50 ms':>12} {'p99':>8} {'stream/msg p50 ms':>18} {'p99':>8}")
    for name, row in rows.items():
        print(f"{name:<14} {row['unary']['p50_ms']:>12.3f} {row['unary']['p99_ms']:>8.3f} "
              f"{row['stream']['p50_ms']:>18.3f} {row['stream']['p99_ms']:>8.3f}")
    serve_row, direct_row = rows["Serve ingress"], rows["direct grpcio"]
    ratios = {kind: round(serve_row[kind]["p50_ms"] / direct_row[kind]["p50_ms"], 2) for kind in ("unary", "stream")}
    print(f"Serve / direct, p50: unary {ratios['unary']}x, stream per message {ratios['stream']}x")
    if args.json_path:
        meta = {"command": " ".join(sys.argv), "machine": platform.platform(), "ray": ray.__version__}
        with open(args.json_path, "w") as out:
            json.dump({"meta": meta, "rows": rows, "serve_over_direct_p50": ratios}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
