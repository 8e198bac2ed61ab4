"""End to end through real gRPC and real LMDB: the behaviours the foundation promises."""
from __future__ import annotations

import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from streamrec.clients.client import StreamrecClient, make_event
from streamrec.engine.offline.datasets import synthetic_truth
from streamrec.v1 import catalog_pb2, events_pb2

TRUTH = synthetic_truth()


def items_of(category: str, count: int) -> list[str]:
    return [item for item, c in TRUTH.item_cluster.items() if c == category][:count]


def fresh_user() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_health_is_serving(client):
    assert client.health() == "SERVING"
    assert client.health("streamrec.v1.RecommendService") == "SERVING"


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
    assert {"streamrec.v1.EventService", "streamrec.v1.RecommendService", "streamrec.v1.CatalogService",
            "streamrec.v1.DiagnosticsService", "grpc.health.v1.Health"} <= names


def test_ping_floor_rpcs(client):
    from streamrec.v1 import diagnostics_pb2

    assert client.ping(b"x").payload == b"x"
    echoed = [r.id for r in client.ping_stream(diagnostics_pb2.PingRequest(id=str(n)) for n in range(5))]
    assert echoed == ["0", "1", "2", "3", "4"]


def test_new_user_gets_popular_items_then_personalised_after_events(client):
    user = fresh_user()
    before = client.recommend(user, k=10)
    assert before.strategy == "popular" and len(before.items) == 10
    liked = items_of("c4", 5)
    result = client.send_events([make_event(user, item, "purchase") for item in liked], batch_size=2)
    assert (result.batches, result.accepted, result.rejections) == (3, 5, [])
    after = client.recommend(user, k=10)
    assert after.strategy == "personalized"
    in_cluster = sum("c4" in item.categories for item in after.items)
    assert in_cluster >= 8, [list(i.categories) for i in after.items]
    assert not set(liked) & {i.item_id for i in after.items}, "seen items must be excluded"
    assert after.served_by.applied_seq >= result.durable_seq


def test_an_event_moves_an_existing_users_recommendations(client):
    user = "u7"
    preferred = set(TRUTH.user_clusters[user])
    other = next(f"c{c}" for c in range(10) if f"c{c}" not in preferred)
    before = client.recommend(user, k=20)
    before_share = sum(other in i.categories for i in before.items)
    client.send_events([make_event(user, item, "purchase") for item in items_of(other, 12)])
    after = client.recommend(user, k=20)
    after_share = sum(other in i.categories for i in after.items)
    assert after_share > before_share, (before_share, after_share)


def test_seen_items_excluded_unless_asked(client):
    user = fresh_user()
    item = items_of("c2", 1)[0]
    client.publish([make_event(user, item, "purchase")])
    assert item not in {i.item_id for i in client.recommend(user, k=50).items}
    with_seen = client.recommend(user, k=5, exclude_seen=False)
    assert with_seen.items[0].item_id == item  # its own vector is the closest to a one-event user


def test_explicit_excludes_and_category_filters(client):
    user = fresh_user()
    client.publish([make_event(user, i, "purchase") for i in items_of("c1", 3)])
    top = client.recommend(user, k=5)
    excluded = [top.items[0].item_id, top.items[1].item_id]
    filtered = client.recommend(user, k=5, exclude_item_ids=excluded)
    assert not set(excluded) & {i.item_id for i in filtered.items}
    only_c6 = client.recommend(user, k=15, include_categories=["c6"])
    assert len(only_c6.items) == 15 and all("c6" in i.categories for i in only_c6.items)
    no_c1 = client.recommend(user, k=15, exclude_categories=["c1"])
    assert all("c1" not in i.categories for i in no_c1.items)
    assert client.recommend(user, k=5, include_categories=["no-such-category"]).items == []


def test_deleted_item_never_comes_back(client):
    user = fresh_user()
    client.publish([make_event(user, i, "purchase") for i in items_of("c9", 3)])
    target = client.recommend(user, k=1).items[0].item_id
    response = client.delete_items([target, "never-existed"])
    assert response.deleted == 1 and list(response.not_found) == ["never-existed"]
    for _ in range(3):
        assert target not in {i.item_id for i in client.recommend(user, k=200).items}
    assert target not in {i.item_id for i in client.recommend(fresh_user(), k=200).items}
    assert target not in {i.item_id for i in client.similar_items(items_of("c9", 5)[4], k=200).items}
    assert client.get_item(target).deleted
    ack = client.publish([make_event(user, target, "click")])
    assert ack.accepted == 0 and ack.rejections[0].field == "item_id" and "deleted" in ack.rejections[0].reason


def test_new_item_without_embedding_is_recommendable_at_once(client):
    user = fresh_user()
    client.publish([make_event(user, i, "purchase") for i in items_of("c5", 4)])
    new_id = f"new-{uuid.uuid4().hex[:6]}"
    created = client.upsert_items([catalog_pb2.Item(item_id=new_id, categories=["c5"], attributes={"title": "fresh"})])
    assert created.created == 1
    item = client.get_item(new_id, include_embedding=True)
    assert len(item.embedding) == 32 and not item.deleted
    top = [i.item_id for i in client.recommend(user, k=20).items]
    assert new_id in top, "an item placed at its category's centre must rank high for a fan of that category"


def test_upsert_with_embedding_and_similar_items(client):
    anchor = client.get_item(items_of("c3", 1)[0], include_embedding=True)
    twin = f"twin-{uuid.uuid4().hex[:6]}"
    client.upsert_items([catalog_pb2.Item(item_id=twin, categories=["c3"], embedding=list(anchor.embedding))])
    similar = client.similar_items(anchor.item_id, k=3)
    assert similar.items[0].item_id == twin and similar.items[0].score == pytest.approx(1.0, abs=1e-5)
    assert anchor.item_id not in {i.item_id for i in similar.items}


def test_duplicate_event_id_is_applied_once(client):
    user = fresh_user()
    event = make_event(user, items_of("c0", 1)[0], "purchase", event_id=f"dup-{uuid.uuid4().hex}")
    first = client.publish([event])
    second = client.send_events([event, event])
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (second.accepted, second.duplicates) == (0, 2)
    assert client.get_user(user).event_count == 1


def test_forget_user_erases_vector_history_and_events(client):
    user = fresh_user()
    client.publish([make_event(user, i, "view") for i in items_of("c8", 6)])
    log_before = client.stats().log_events
    forgotten = client.forget_user(user)
    assert forgotten.events_erased == 6
    # The six records go; one marker that names no one comes (replicas reload at its seq).
    assert client.stats().log_events == log_before - 6 + 1
    assert client.stats().served_by.applied_seq >= forgotten.durable_seq > 0
    with pytest.raises(grpc.RpcError) as error:
        client.get_user(user)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.recommend(user).strategy == "popular"
    with pytest.raises(grpc.RpcError) as error:
        client.forget_user(user)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_batch_and_stream_answer_like_unary(client):
    users = ["u1", "u2", fresh_user(), "u3"]
    requests = [client.recommend_request(u, k=7, request_id=f"r{n}") for n, u in enumerate(users)]
    single = [client.recommend(u, k=7) for u in users]
    batch = client.recommend_batch(requests)
    streamed = {r.request_id: r for r in client.recommend_stream(requests)}
    for n, expected in enumerate(single):
        ids = [i.item_id for i in expected.items]
        assert [i.item_id for i in batch[n].items] == ids
        assert batch[n].request_id == f"r{n}"
        assert [i.item_id for i in streamed[f"r{n}"].items] == ids


def test_get_user_shows_history_most_recent_first(client):
    user = fresh_user()
    items = items_of("c2", 3)
    client.publish([make_event(user, item, "click", timestamp_ms=1_700_000_000_000 + n) for n, item in enumerate(items)])
    view = client.get_user(user, include_embedding=True)
    assert [h.item_id for h in view.history] == items[::-1]
    assert view.event_count == 3 and view.seen_items == 3
    assert sum(x * x for x in view.embedding) == pytest.approx(1.0, abs=1e-5)


def test_stats(client):
    stats = client.stats()
    assert stats.dim == 32 and stats.items >= 2000 and stats.users >= 500
    assert stats.log_events >= 20000 and stats.last_seq >= stats.checkpoint_seq > 0
    assert stats.limits.max_k == 1000 and stats.served_by.backend
