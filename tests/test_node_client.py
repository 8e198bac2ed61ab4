"""A Node.js client built from the .proto files alone (clients/node) against a live server."""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from streamrec.clients.client import StreamrecClient
from streamrec.engine.offline.datasets import synthetic_truth

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
CATEGORY = "c4"


@pytest.fixture(scope="module")
def node_client_dir() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are required for the Node.js client test (not found on PATH)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return NODE_DIR


def test_node_client_sends_events_and_gets_personalized_recommendations(node_client_dir, server):
    user = f"node-{uuid.uuid4().hex[:8]}"
    items = [item for item, c in synthetic_truth().item_cluster.items() if c == CATEGORY][:6]
    k = 10
    result = subprocess.run([shutil.which("node"), "demo.js", "--k", str(k), "--batch-size", "4", server.address,
                             user, *items], cwd=node_client_dir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"demo.js failed ({result.returncode}):\n{result.stderr}\n{result.stdout}"
    out = json.loads(result.stdout)

    ack = out["ack"]
    assert (ack["batches"], ack["accepted"], ack["duplicates"], ack["rejections"]) == (2, len(items), 0, []), ack
    assert int(ack["durableSeq"]) > 0

    rec = out["recommendation"]
    assert rec["user_id"] == user and rec["strategy"] == "personalized", rec
    recommended = [entry["item_id"] for entry in rec["items"]]
    assert len(recommended) == k
    assert not set(items) & set(recommended), "seen items must be excluded"
    in_category = sum(CATEGORY in entry["categories"] for entry in rec["items"])
    assert in_category >= 7, [entry["categories"] for entry in rec["items"]]
    assert int(rec["served_by"]["applied_seq"]) >= int(ack["durableSeq"])

    with StreamrecClient(server.address, timeout_s=20.0) as client:
        assert client.get_user(user).event_count == len(items)
