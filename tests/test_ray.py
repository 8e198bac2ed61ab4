"""streamrec on a two-node local Ray cluster: read replicas as a Ray Serve deployment behind Serve's gRPC
ingress, following an in-process primary over the ReplicationService (deploy/ray.py)."""
from __future__ import annotations

import os
import time

import grpc
import pytest

ray = pytest.importorskip("ray")  # extra `ray` (the test extra includes it)
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from conftest import start_server  # noqa: E402
from streamrec.cli.process import free_port  # noqa: E402
from streamrec.clients.client import StreamrecClient, make_event  # noqa: E402
from streamrec.deploy.ray import APPLICATION, deploy  # noqa: E402
from streamrec.v1 import recommend_pb2, recommend_pb2_grpc  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROUTE = (("application", APPLICATION),)
# CI seeds the synthetic catalog; STREAMREC_RAY_TEST_DATASET=ml-100k runs the same tests on MovieLens-100K.
DATASET = os.environ.get("STREAMREC_RAY_TEST_DATASET", "synthetic")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 80 << 20,
                                                          "include_dashboard": False})
    nodes.add_node(num_cpus=2, object_store_memory=80 << 20)
    ray.init(address=nodes.address, logging_level="WARNING")
    yield nodes
    serve.shutdown()
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def primary(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("ray-primary"), dataset=DATASET)
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def ingress(cluster, primary, tmp_path_factory):
    port = free_port()
    deploy(primary.address, str(tmp_path_factory.mktemp("ray-replicas")), replicas=2, grpc_port=port,
           engine_options={"dim": 32})
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield recommend_pb2_grpc.RecommendServiceStub(channel), port
    channel.close()


def items(primary, n: int) -> list[str]:
    return list(primary.engine.state.items.ids[:n])


def recommend(stub, user: str, min_seq: int, attempts: int = 50) -> recommend_pb2.RecommendResponse:
    """Through Serve's proxy; UNAVAILABLE (a replica still starting, or behind min_seq) is retried."""
    for attempt in range(attempts):
        try:
            return stub.Recommend(recommend_pb2.RecommendRequest(user_id=user, k=5, min_seq=min_seq), metadata=ROUTE,
                                  timeout=30)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
            time.sleep(0.2)


def test_serve_ingress_reads_your_writes(primary, ingress):
    stub, _ = ingress
    with StreamrecClient(primary.address) as writer:
        for n in range(20):
            ack = writer.publish([make_event(f"ray-{n}", items(primary, 20)[n], "purchase")])
            response = recommend(stub, f"ray-{n}", ack.durable_seq)
            assert response.served_by.applied_seq >= ack.durable_seq and response.strategy == "personalized"


def test_a_token_beyond_the_log_or_of_another_log_is_refused(primary, ingress):
    stub, _ = ingress
    with pytest.raises(grpc.RpcError) as error:
        recommend(stub, "u1", primary.engine.store.last_seq() + 10**6)
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    request = recommend_pb2.RecommendRequest(user_id="u1", min_seq=1, log_id="another-primarys-log")
    with pytest.raises(grpc.RpcError) as error:
        stub.Recommend(request, metadata=ROUTE, timeout=30)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "log_id" in error.value.details()
    answer = recommend(stub, "u1", 1)
    assert answer.served_by.log_id == primary.engine.store.log_id


def _replica_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "RecommendReplica" in a["name"] and a["namespace"] == "serve"]


def test_a_killed_replica_is_restarted_and_catches_up_from_its_own_copy(primary, ingress):
    stub, _ = ingress
    snapshots = primary.engine.stats().snapshots_served
    assert snapshots == 2  # one per replica, at their first start
    victim = _replica_actors()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    with StreamrecClient(primary.address) as writer:
        ack = writer.publish([make_event("after-kill", items(primary, 5)[4], "purchase")])
    deadline = time.monotonic() + 120
    while len(_replica_actors()) < 2 or victim in _replica_actors():
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(0.5)
    for _ in range(20):  # calls spread over both replicas, the new one included
        assert recommend(stub, "after-kill", ack.durable_seq).strategy == "personalized"
    assert primary.engine.stats().snapshots_served == snapshots  # the new actor resumed from its rank's copy


def test_a_replica_added_later_converges_bit_for_bit(primary, ingress, tmp_path_factory):
    stub, port = ingress
    deploy(primary.address, str(tmp_path_factory.getbasetemp() / "ray-replicas0"), replicas=3, grpc_port=port,
           engine_options={"dim": 32})
    deadline = time.monotonic() + 120
    while len(_replica_actors()) < 3:
        assert time.monotonic() < deadline, "the third replica did not start"
        time.sleep(0.5)
    with StreamrecClient(primary.address) as writer:
        ack = writer.publish([make_event("late", item, "purchase") for item in items(primary, 3)])
    # The new rank copies a snapshot; redeploying replaces the other replicas too (a rolling update), and a
    # replacement that starts while its rank's old replica still holds that copy takes a snapshot of its own.
    assert primary.engine.stats().snapshots_served >= 3
    answers = {recommend(stub, "late", ack.durable_seq).SerializeToString(deterministic=True) for _ in range(40)}
    # Every replica answers the same bytes (items, scores bit for bit, applied seq) except the latency, the
    # embedding version, a count of this process's own applies (a replica from a snapshot counts fewer), and the
    # recommendation_id, which is every answer's own.
    stripped = set()
    for raw in answers:
        response = recommend_pb2.RecommendResponse.FromString(raw)
        assert len(response.recommendation_id) == 32
        response.server_latency_us = 0
        response.served_by.embedding_version = 0
        response.recommendation_id = ""
        stripped.add(response.SerializeToString(deterministic=True))
    assert len(stripped) == 1
