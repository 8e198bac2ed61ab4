"""Overload: past the admission limit the server answers RESOURCE_EXHAUSTED at once (no unbounded queue),
keeps serving the calls it admitted, and serves normally again when the burst is over."""
from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest

from streamrec.engine.config import EngineConfig
from streamrec.server.app import ServerConfig, StreamrecServer
from streamrec.v1 import recommend_pb2, recommend_pb2_grpc


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    logging.getLogger("streamrec").setLevel(logging.WARNING)
    config = ServerConfig(host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("overload"), dataset="synthetic",
                          workers=2, max_concurrent_rpcs=4, grace_s=1.0, engine=EngineConfig(dim=16, backend="numpy"))
    server = StreamrecServer(config)
    server.start()
    yield server
    server.stop(grace_s=1.0)


def test_burst_past_the_limit_is_shed_with_resource_exhausted_then_served_again(small_server):
    channel = grpc.insecure_channel(small_server.address)
    stub = recommend_pb2_grpc.RecommendServiceStub(channel)
    request = recommend_pb2.RecommendRequest(user_id="u0", k=5)
    stub.Recommend(request, timeout=10)  # warm
    # A burst of 200 calls at once against 4 admission slots.
    futures = [stub.Recommend.future(request, timeout=30) for _ in range(200)]
    codes, rejected_messages = {}, set()
    for future in futures:
        code = future.code()
        codes[code] = codes.get(code, 0) + 1
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            rejected_messages.add(future.details())
    assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) > 0, codes
    assert codes.get(grpc.StatusCode.OK, 0) > 0, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert all("limit" in message.lower() for message in rejected_messages), rejected_messages
    # The burst is over: every call is served again, one after the other.
    for _ in range(20):
        response = stub.Recommend(request, timeout=10)
        assert len(response.items) == 5
    channel.close()


def test_rejections_come_back_fast_while_admitted_calls_run(small_server):
    """A client that holds all slots with slow streams does not make others wait: they are told at once."""
    channel = grpc.insecure_channel(small_server.address)
    stub = recommend_pb2_grpc.RecommendServiceStub(channel)
    release = threading.Event()

    def idle_requests():
        release.wait(10)
        return
        yield  # a stream that sends nothing until released

    streams = [stub.RecommendStream(idle_requests(), timeout=30) for _ in range(4)]
    time.sleep(0.5)  # let them be admitted
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as error:
        stub.Recommend(recommend_pb2.RecommendRequest(user_id="u0", k=5), timeout=10)
    elapsed = time.perf_counter() - started
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert elapsed < 2.0, f"rejection took {elapsed:.2f} s"
    release.set()
    for stream in streams:
        list(stream)
    assert len(stub.Recommend(recommend_pb2.RecommendRequest(user_id="u0", k=5), timeout=10).items) == 5
    channel.close()
