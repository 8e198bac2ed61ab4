"""A Node.js client built from the .proto files alone (clients/node) against a live server."""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest

from streamrec.clients.client import StreamrecClient
from streamrec.engine.offline.datasets import synthetic_truth

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
CATEGORY = "c4"

# Publishes one event, then reads with a session client and an 'eventual' one, recording the min_seq each
# Recommend hands to gRPC. Both clients are then told a seq far past the log's end: only the session client
# sends it, so only its read fails (OUT_OF_RANGE), which proves the stamp reaches the server.
SESSION_SCRIPT = """
import { connect, makeEvent } from './client.js';
const [address, user, item] = process.argv.slice(1);
async function read(client, sent) {
  const recommend = client.recommender.Recommend.bind(client.recommender);
  client.recommender.Recommend = (request, ...rest) => { sent.push(request.min_seq); return recommend(request, ...rest); };
  const response = await client.recommend(user, 5);
  client.sawSeq(BigInt(client.sessionSeq) + 1000000n);
  const ahead = await client.recommend(user, 5).then(() => 'OK', (error) => error.code);
  return { appliedSeq: response.served_by.applied_seq, ahead };
}
const session = connect(address, { deadlineMs: 5000 });
const eventual = connect(address, { deadlineMs: 5000, consistency: 'eventual' });
try {
  const ack = await session.sendEvents([makeEvent(user, item, 'purchase')]);
  const ackSeq = String(session.sessionSeq);
  const sent = [], eventualSent = [];
  const out = { durableSeq: ack.durableSeq, ackSeq, ...(await read(session, sent)), sent };
  out.eventual = { ...(await read(eventual, eventualSent)), sent: eventualSent };
  console.log(JSON.stringify(out));
} finally {
  session.close();
  eventual.close();
}
"""


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


def test_node_client_session_stamps_min_seq_on_reads(node_client_dir, server):
    result = subprocess.run([shutil.which("node"), "--input-type=module", "-e", SESSION_SCRIPT, server.address,
                             f"node-{uuid.uuid4().hex[:8]}", "i3"], cwd=node_client_dir, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"session script failed ({result.returncode}):\n{result.stderr}\n{result.stdout}"
    out = json.loads(result.stdout)

    durable = int(out["durableSeq"])
    assert durable > 0 and int(out["ackSeq"]) == durable, out  # the stream ack fed the session
    min_seq = int(out["sent"][0])
    assert min_seq >= durable, out
    assert int(out["appliedSeq"]) >= min_seq, out
    assert int(out["sent"][1]) > int(out["appliedSeq"]) and out["ahead"] == grpc.StatusCode.OUT_OF_RANGE.value[0], out

    assert out["eventual"]["sent"] == ["0", "0"] and out["eventual"]["ahead"] == "OK", out


ATTRIBUTION_SCRIPT = """
import { connect, makeEvent } from './client.js';
const [address, user, item] = process.argv.slice(1);
const client = connect(address, { deadlineMs: 5000 });
try {
  await client.sendEvents([makeEvent(user, item, 'purchase')]);
  const answer = await client.recommend(user, 5, { explain: true, mmrLambda: 0.2 });
  const clicked = answer.items[0].item_id;
  const ack = await client.sendEvents([makeEvent(user, clicked, 'click', { recommendationId: answer.recommendation_id })]);
  console.log(JSON.stringify({ id: answer.recommendation_id, clicked, accepted: ack.accepted,
                               because: answer.items[0].because.length }));
} finally {
  client.close();
}
"""


def test_node_client_attributes_a_click_to_its_answer(node_client_dir, server):
    import time

    user = f"node-{uuid.uuid4().hex[:8]}"
    result = subprocess.run([shutil.which("node"), "--input-type=module", "-e", ATTRIBUTION_SCRIPT, server.address,
                             user, "i3"], cwd=node_client_dir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["id"]) == 32 and out["accepted"] == 1 and out["because"] >= 1
    with StreamrecClient(server.address, timeout_s=20.0) as client:
        deadline = time.monotonic() + 5
        while client.stats().impressions.attributed < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.stats().impressions.attributed >= 1
