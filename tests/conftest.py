"""Shared fixtures: a real server on a free port over a real LMDB folder, seeded with synthetic data."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from streamrec.clients.client import StreamrecClient
from streamrec.engine.config import EngineConfig
from streamrec.server.app import ServerConfig, StreamrecServer


def start_server(data_dir: Path, dataset: str = "synthetic", metrics_port: int | None = None, **engine_options) -> StreamrecServer:
    config = ServerConfig(host="127.0.0.1", port=0, data_dir=data_dir, dataset=dataset, workers=16, grace_s=2.0,
                          metrics_port=metrics_port, engine=EngineConfig(dim=32, **engine_options))
    server = StreamrecServer(config)
    server.start()
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logging.getLogger("streamrec").setLevel(logging.WARNING)
    srv = start_server(tmp_path_factory.mktemp("server-data"), metrics_port=0)
    yield srv
    srv.stop(grace_s=1.0)


@pytest.fixture()
def client(server):
    with StreamrecClient(server.address, timeout_s=20.0) as c:
        yield c
