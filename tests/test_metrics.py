"""The Prometheus endpoint exposes the named series with live values."""
from __future__ import annotations

import urllib.request

import grpc
import pytest

from streamrec.clients.client import make_event


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        return response.read().decode()


def value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " ") or line.startswith(series + "{") and line.split(" ")[0] == series:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not exposed")


def test_metrics_endpoint_exposes_the_named_series(server, client):
    client.recommend("u1", k=3)
    client.publish([make_event("metrics-user", "i1", "click")])
    with pytest.raises(grpc.RpcError):
        client.recommend("u1", k=0)
    text = scrape(server)
    assert value(text, 'streamrec_rpc_requests_total{code="OK",method="Recommend"}') >= 1
    assert value(text, 'streamrec_rpc_requests_total{code="INVALID_ARGUMENT",method="Recommend"}') >= 1
    assert value(text, 'streamrec_rpc_latency_seconds_count{method="PublishEvents"}') >= 1
    assert value(text, "streamrec_recommend_batch_size_count") >= 1
    assert value(text, 'streamrec_events_total{outcome="accepted"}') >= 1
    assert value(text, "streamrec_wal_commit_seconds_count") >= 1
    assert value(text, "streamrec_items") >= 2000 and value(text, "streamrec_users") >= 500
    assert value(text, "streamrec_checkpoint_age_seconds") >= 0
    assert "streamrec_write_queue" in text


def test_metrics_expose_impressions_per_arm(server, client):
    answer = client.recommend("u2", k=3)
    client.publish([make_event("u2", answer.items[0].item_id, "click", 1.0, recommendation_id=answer.recommendation_id)])
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = scrape(server)
        if 'streamrec_arm_events_total{arm="",experiment="",type="click"} 1' in text:  # attributed (async)
            break
        time.sleep(0.05)
    assert value(text, 'streamrec_arm_impressions_total{arm="",experiment=""}') >= 1
    assert value(text, 'streamrec_arm_events_total{arm="",experiment="",type="click"}') >= 1
    assert value(text, 'streamrec_impression_log_total{counter="recorded"}') >= 1
    assert value(text, "streamrec_impressions_stored") >= 1
