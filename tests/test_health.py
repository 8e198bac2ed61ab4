"""Health says NOT_SERVING while the data loads or recovers, SERVING after, NOT_SERVING again on stop."""
from __future__ import annotations

import threading

import grpc
import pytest

from streamrec.clients.client import StreamrecClient
from streamrec.engine.config import EngineConfig
from streamrec.server import app
from streamrec.server.app import ServerConfig, StreamrecServer


def test_not_serving_until_recovery_ends(tmp_path, monkeypatch):
    release = threading.Event()
    real_open = app.open_engine

    def slow_open(*args, **kwargs):
        release.wait(30)  # stands in for a long log replay
        return real_open(*args, **kwargs)

    monkeypatch.setattr(app, "open_engine", slow_open)
    server = StreamrecServer(ServerConfig(port=0, data_dir=tmp_path, dataset="synthetic", engine=EngineConfig(dim=8)))
    started = threading.Thread(target=server.start)
    started.start()
    with StreamrecClient(f"127.0.0.1:{_wait_for_port(server)}", timeout_s=5) as client:
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as error:
            client.recommend("u1", retry=False)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.value.details()
        release.set()
        started.join(60)
        assert client.health() == "SERVING"
        assert client.recommend("u1").items
        server.stop(grace_s=1.0)


def _wait_for_port(server: StreamrecServer) -> int:
    import time

    deadline = time.monotonic() + 10
    while not server.port and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.port
