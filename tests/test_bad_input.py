"""Bad input gets a specific status naming the field; the server keeps serving; streams go on."""
from __future__ import annotations

import math

import grpc
import pytest

from streamrec.clients.client import make_event
from streamrec.v1 import catalog_pb2, events_pb2, recommend_pb2


def status_of(call):
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


@pytest.mark.parametrize("kwargs, field", [
    ({"user_id": ""}, "user_id"),
    ({"user_id": "u1", "k": 0}, "k"),
    ({"user_id": "u1", "k": -5}, "k"),
    ({"user_id": "u1", "k": 100_000}, "k"),
    ({"user_id": "x" * 300}, "user_id"),
    ({"user_id": "bad\x00id"}, "user_id"),
    ({"user_id": "u1", "exclude_item_ids": [""]}, "exclude_item_ids[0]"),
    ({"user_id": "u1", "include_categories": ["ok", "\n"]}, "include_categories[1]"),
])
def test_bad_recommend_requests(client, kwargs, field):
    user_id = kwargs.pop("user_id")
    code, details = status_of(lambda: client.recommend(user_id, **kwargs))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details
    assert client.recommend("u1", k=3).items, "the server keeps serving"


def test_bad_batch_names_the_request(client):
    requests = [client.recommend_request("u1"), client.recommend_request("u2", k=0)]
    code, details = status_of(lambda: client.recommend_batch(requests))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("requests[1].k")


@pytest.mark.parametrize("event, field", [
    (dict(event_id="", user_id="u1", item_id="i1", type=2), "event_id"),
    (dict(event_id="b1", user_id="", item_id="i1", type=2), "user_id"),
    (dict(event_id="b2", user_id="u1", item_id="", type=2), "item_id"),
    (dict(event_id="b3", user_id="u1", item_id="no-such-item", type=2), "item_id"),
    (dict(event_id="b4", user_id="u1", item_id="i1", type=0), "type"),
    (dict(event_id="b5", user_id="u1", item_id="i1", type=99), "type"),
    (dict(event_id="b6", user_id="u1", item_id="i1", type=5, value=math.nan), "value"),
    (dict(event_id="b7", user_id="u1", item_id="i1", type=5, value=math.inf), "value"),
    (dict(event_id="b8", user_id="u1", item_id="i1", type=5, value=11), "value"),
    (dict(event_id="b9", user_id="u1", item_id="i1", type=2, timestamp_ms=-1), "timestamp_ms"),
    (dict(event_id="b10", user_id="u1", item_id="i1", type=2, timestamp_ms=2**62), "timestamp_ms"),
])
def test_bad_events_are_rejected_in_the_ack(client, event, field):
    good = make_event("u1", "i2", "view")
    ack = client.publish([good, events_pb2.Event(**event)])
    assert ack.accepted == 1 and len(ack.rejections) == 1
    rejection = ack.rejections[0]
    assert (rejection.index, rejection.field) == (1, field) and rejection.reason


def test_one_bad_event_does_not_end_the_stream(client):
    batches = [
        [make_event("u1", "i3", "click")],
        [make_event("u1", "i4", "click"), events_pb2.Event(event_id="bad", user_id="u1", item_id="i4", type=42)],
        [make_event("u1", "i5", "click")],
    ]
    acks = list(client.events.StreamEvents(iter(events_pb2.EventBatch(batch_id=f"b{n}", events=b) for n, b in enumerate(batches)), timeout=10))
    assert [a.batch_id for a in acks] == ["b0", "b1", "b2"]
    assert [a.accepted for a in acks] == [1, 1, 1] and acks[1].rejections[0].field == "type"


def test_oversized_batch_is_rejected_as_a_whole_but_stream_goes_on(client):
    too_many = [make_event("u1", "i1", "view") for _ in range(10_001)]
    acks = list(client.events.StreamEvents(iter([
        events_pb2.EventBatch(batch_id="huge", events=too_many),
        events_pb2.EventBatch(batch_id="fine", events=[make_event("u1", "i1", "view")]),
    ]), timeout=30))
    assert acks[0].accepted == 0 and acks[0].rejections[0].field == "events"
    assert acks[1].accepted == 1


def test_bad_stream_request_gets_an_error_response_and_the_stream_goes_on(client):
    requests = [client.recommend_request("u1", k=3, request_id="a"), client.recommend_request("u1", k=0, request_id="b"),
                client.recommend_request("u2", k=3, request_id="c")]
    responses = {r.request_id: r for r in client.recommend_stream(requests)}
    assert len(responses["a"].items) == 3 and len(responses["c"].items) == 3
    assert responses["b"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "k" in responses["b"].error.message


@pytest.mark.parametrize("item, field", [
    (catalog_pb2.Item(item_id="", categories=["c1"]), "items[0].item_id"),
    (catalog_pb2.Item(item_id="v1", embedding=[1.0, 2.0]), "items[0].embedding"),
    (catalog_pb2.Item(item_id="v2", embedding=[math.nan] * 32), "items[0].embedding"),
    (catalog_pb2.Item(item_id="v3", embedding=[math.inf] + [0.0] * 31), "items[0].embedding"),
    (catalog_pb2.Item(item_id="v4", embedding=[0.0] * 32), "items[0].embedding"),
])
def test_bad_items(client, item, field):
    code, details = status_of(lambda: client.upsert_items([item]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details
    code, _ = status_of(lambda: client.get_item(item.item_id or "missing"))
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


def test_not_found(client):
    for call, field in [
        (lambda: client.get_item("nope"), "item_id"),
        (lambda: client.get_user("nobody"), "user_id"),
        (lambda: client.similar_items("nope"), "item_id"),
        (lambda: client.forget_user("nobody"), "user_id"),
    ]:
        code, details = status_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and details.startswith(field), details


def test_empty_requests(client):
    for call, field in [
        (lambda: client.upsert_items([]), "items"),
        (lambda: client.delete_items([]), "item_ids"),
        (lambda: client.similar_items("i1", k=0), "k"),
    ]:
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details
