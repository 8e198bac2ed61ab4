"""Fuzzing every RPC's request messages against a live server (the shared `server` fixture).

Property, for every generated request: the call succeeds, or fails with INVALID_ARGUMENT, NOT_FOUND or
RESOURCE_EXHAUSTED (never UNKNOWN or INTERNAL) whose message starts with the path of a real field of
the request ("requests[3].k: ..."); in-band failures (event rejections in acks, error responses on
RecommendStream) obey the same rules; and afterwards the server still answers a health check and a
Recommend. Beyond generated messages: requests at and over every limit, bytes that are not valid
protobuf or UTF-8, cancelled, half-closed and never-read streams.

Examples per test: STREAMREC_FUZZ_EXAMPLES (default 30, kept small for CI; try 1000 for a long run).
With STREAMREC_FUZZ_REPORT=path, a JSON summary (examples and outcomes per RPC) is written there.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrec.clients.client import make_event
from streamrec.v1 import catalog_pb2, events_pb2, recommend_pb2

DIM = 32  # conftest's server
EXAMPLES = int(os.environ.get("STREAMREC_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("STREAMREC_FUZZ_RANDOM") is None,
                suppress_health_check=list(HealthCheck), print_blob=True)
TIMEOUT = 30.0
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
ALLOWED_NUMBERS = {code.value[0] for code in ALLOWED}
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
NOW_MS = int(time.time() * 1000)
DAY_MS = 24 * 3600 * 1000

# --- the tally -------------------------------------------------------------------------------------------

REPORT: dict[str, dict] = collections.defaultdict(lambda: {"examples": 0, "outcomes": collections.Counter(),
                                                           "in_band": collections.Counter()})


@pytest.fixture(scope="module", autouse=True)
def fuzz_report():
    REPORT.clear()
    started = time.perf_counter()
    yield
    path = os.environ.get("STREAMREC_FUZZ_REPORT")
    if path:
        summary = {
            "max_examples_per_test": EXAMPLES,
            "seconds": round(time.perf_counter() - started, 2),
            "rpcs": {rpc: {"examples": entry["examples"], "outcomes": dict(sorted(entry["outcomes"].items())),
                           "in_band": dict(sorted(entry["in_band"].items()))} for rpc, entry in sorted(REPORT.items())},
        }
        with open(path, "w") as handle:
            json.dump(summary, handle, indent=2)


@pytest.fixture(scope="module")
def stubs(server):
    from streamrec.clients.client import StreamrecClient

    client = StreamrecClient(server.address, timeout_s=TIMEOUT)
    assert client.stats().dim == DIM
    # Warm up first: a kernel may compile on its first call, which must not count against a fuzz example.
    client.recommend("u1", k=1, timeout_s=180.0)
    client.similar_items("i1", k=1, timeout_s=180.0)
    yield client
    client.close()


# --- checks ---------------------------------------------------------------------------------------------

_SEGMENT = re.compile(r"^([a-z_][a-z0-9_]*)(?:\[(\d+)\])?$")


def names_a_field(descriptor, message: str, whole_message_ok: bool = True) -> bool:
    """`message` starts with 'path: ' where path names a field of `descriptor` (e.g. requests[2].k)."""
    path, sep, rest = message.partition(": ")
    if not sep or not rest.strip():
        return False
    if path == "request" and whole_message_ok:  # the request as a whole (bytes that do not parse)
        return True
    for segment in path.split("."):
        match = _SEGMENT.match(segment)
        if descriptor is None or not match:
            return False
        field = descriptor.fields_by_name.get(match.group(1))
        if field is None or (match.group(2) is not None and not field.is_repeated):
            return False
        descriptor = field.message_type
    return True


def assert_healthy(client) -> None:
    started = time.monotonic()
    assert client.health(timeout_s=10.0) == "SERVING"
    response = client.recommend("u1", k=1, timeout_s=10.0)
    assert len(response.items) == 1
    assert time.monotonic() - started < 10.0


def check(client, rpc: str, request_descriptor, call):
    """Run `call`; the property on its outcome; then the server must still be healthy. Returns the
    response, or None when the call failed (as allowed)."""
    entry = REPORT[rpc]
    entry["examples"] += 1
    try:
        response = call()
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        entry["outcomes"][code.name] += 1
        assert code in ALLOWED, f"{rpc}: {code.name}: {details}"
        assert names_a_field(request_descriptor, details) or (
            code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in details), f"{rpc}: {code.name}: {details!r}"
        response = None
    else:
        entry["outcomes"]["OK"] += 1
    assert_healthy(client)
    return response


def check_ack(rpc: str, ack: events_pb2.EventAck, batch: events_pb2.EventBatch, batch_id: str) -> None:
    assert ack.batch_id == batch_id
    entry = REPORT[rpc]["in_band"]
    entry["accepted"] += ack.accepted
    entry["duplicates"] += ack.duplicates
    event = events_pb2.Event.DESCRIPTOR
    for rejection in ack.rejections:
        entry[f"rejected:{rejection.field}"] += 1
        assert rejection.reason, rejection
        if rejection.field == "events":  # the batch as a whole
            assert ack.accepted == 0 and len(ack.rejections) == 1
        else:
            assert rejection.field in event.fields_by_name, rejection
            assert rejection.index < len(batch.events)
            assert rejection.event_id == batch.events[rejection.index].event_id
    if not (len(ack.rejections) == 1 and ack.rejections[0].field == "events"):
        assert ack.accepted + ack.duplicates + len(ack.rejections) == len(batch.events), ack
        assert [r.index for r in ack.rejections] == sorted({r.index for r in ack.rejections})


def check_recommendation(response: recommend_pb2.RecommendResponse, request: recommend_pb2.RecommendRequest,
                         exclude_seen_applies: bool = True) -> None:
    k = request.k if request.HasField("k") else 10
    ids = [item.item_id for item in response.items]
    assert len(ids) <= k and len(set(ids)) == len(ids)
    assert not set(ids) & set(request.exclude_item_ids)
    for item in response.items:
        assert math.isfinite(item.score), response
        if request.include_categories:
            assert set(item.categories) & set(request.include_categories)
        assert not set(item.categories) & set(request.exclude_categories)


def _passes(check_fn, *args) -> bool:
    try:
        check_fn(*args)
        return True
    except AssertionError:
        return False


# --- strategies -------------------------------------------------------------------------------------------

KNOWN_USERS = [f"u{n}" for n in range(0, 500, 7)]
KNOWN_ITEMS = [f"i{n}" for n in range(0, 2000, 13)]
CATEGORIES = [f"c{n}" for n in range(10)]


def usually(valid: st.SearchStrategy, *odd: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` three times as often as the odd values, so that calls also get past validation."""
    return st.one_of(valid, valid, valid, *odd) if len(odd) <= 1 else st.one_of(valid, valid, valid, st.one_of(*odd))


def id_strategy(known: list[str]) -> st.SearchStrategy[str]:
    valid = st.one_of(st.sampled_from(known), st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20))
    return usually(
        valid,
        st.text(max_size=12),  # any unicode, empty included
        st.text(st.characters(max_codepoint=0xA0), min_size=1, max_size=6),  # C0/C1 controls, DEL
        st.integers(250, 262).map(lambda n: "x" * n),  # around max_id_bytes = 256
        st.integers(126, 130).map(lambda n: "\u00e9" * n),  # 2-byte characters around the limit
        st.integers(62, 66).map(lambda n: "\U0001F600" * n),  # 4-byte characters around the limit
        st.sampled_from(["\u200b", "\ufeff", "a\x00b", "\u202eevil", " ", "u1 ", "U1", "\x7f", "\u0085",
                         "\U0010ffff", "../../etc/passwd", "%s%n", "' OR 1=1 --", "i1\n"]),
    )


USER_IDS = id_strategy(KNOWN_USERS)
ITEM_IDS = id_strategy(KNOWN_ITEMS)
CATEGORY_IDS = id_strategy(CATEGORIES)
K = usually(st.one_of(st.none(), st.integers(1, 50)), st.integers(-3, 1003),
            st.sampled_from([-2**31, 2**31 - 1, 0, 1, 10, 1000, 1001]))
FLOATS = usually(st.floats(0, 5), st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5.000001, -1e-300,
                                                                 1e308, 3.4e38, 1e-45]))
TIMESTAMPS = usually(st.one_of(st.just(0), st.integers(NOW_MS - 365 * DAY_MS, NOW_MS)),
                     st.integers(-2**63, 2**63 - 1), st.integers(NOW_MS - 60 * 365 * DAY_MS, NOW_MS + 2 * DAY_MS),
                     st.sampled_from([-1, 1, NOW_MS + DAY_MS - 60_000, NOW_MS + DAY_MS + 60_000, 2**62]))
EVENT_TYPES = usually(st.integers(1, 7), st.integers(0, 8), st.integers(-2**31, 2**31 - 1))
EVENTS = st.builds(
    events_pb2.Event, event_id=st.one_of(st.uuids().map(str), USER_IDS), user_id=USER_IDS, item_id=ITEM_IDS,
    type=EVENT_TYPES, value=FLOATS, timestamp_ms=TIMESTAMPS)
BATCH_IDS = st.one_of(st.just(""), st.text(max_size=20))
BATCHES = st.builds(events_pb2.EventBatch, batch_id=BATCH_IDS, events=st.lists(EVENTS, max_size=6))


@st.composite
def recommend_requests(draw) -> recommend_pb2.RecommendRequest:
    request = recommend_pb2.RecommendRequest(
        request_id=draw(st.text(max_size=10)), user_id=draw(USER_IDS),
        exclude_item_ids=draw(usually(st.just([]), st.lists(ITEM_IDS, max_size=4))),
        include_categories=draw(usually(st.just([]), st.lists(CATEGORY_IDS, max_size=3))),
        exclude_categories=draw(usually(st.just([]), st.lists(CATEGORY_IDS, max_size=2))),
    )
    k = draw(K)
    if k is not None:
        request.k = k
    exclude_seen = draw(st.one_of(st.none(), st.booleans()))
    if exclude_seen is not None:
        request.exclude_seen = exclude_seen
    if draw(st.booleans()):
        enabled = draw(st.one_of(st.none(), st.booleans()))
        request.rerank.candidates = draw(st.integers(0, 2**32 - 1))
        if enabled is not None:
            request.rerank.enabled = enabled
    return request


@st.composite
def similar_requests(draw) -> recommend_pb2.SimilarItemsRequest:
    request = recommend_pb2.SimilarItemsRequest(
        request_id=draw(st.text(max_size=10)), item_id=draw(ITEM_IDS),
        include_categories=draw(usually(st.just([]), st.lists(CATEGORY_IDS, max_size=3))),
        exclude_categories=draw(usually(st.just([]), st.lists(CATEGORY_IDS, max_size=2))))
    k = draw(K)
    if k is not None:
        request.k = k
    return request


EMBEDDINGS = usually(
    st.one_of(st.just([]), st.lists(st.floats(-1, 1, width=32), min_size=DIM, max_size=DIM)),
    st.lists(st.floats(width=32), min_size=DIM, max_size=DIM),
    st.sampled_from([DIM - 1, DIM + 1, 1, 4 * DIM]).flatmap(lambda n: st.lists(st.floats(-1, 1, width=32), min_size=n, max_size=n)),
    st.sampled_from([0.0, 1e-45, 1e-30, 1e20, 3.4e38, math.nan, math.inf]).map(lambda v: [v] * DIM),
)
FUZZ_ITEM_IDS = st.one_of(st.integers(0, 50).map(lambda n: f"fz-{n}"), ITEM_IDS)
VALID_ITEMS = st.builds(
    catalog_pb2.Item, item_id=st.integers(0, 50).map(lambda n: f"fz-{n}"),
    categories=st.lists(st.sampled_from(CATEGORIES), max_size=3, unique=True),
    attributes=st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3),
    embedding=st.one_of(st.just([]), st.lists(st.floats(-1, 1, width=32), min_size=DIM, max_size=DIM)))
ODD_ITEMS = st.builds(
    catalog_pb2.Item, item_id=FUZZ_ITEM_IDS,
    categories=usually(st.lists(CATEGORY_IDS, max_size=3), st.integers(63, 66).map(lambda n: [f"c{j}" for j in range(n)])),
    attributes=usually(st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3),
                       st.integers(4080, 4100).map(lambda n: {"k": "v" * n})),
    embedding=EMBEDDINGS, deleted=st.booleans(), interactions=st.integers(0, 2**64 - 1),
    popularity=FLOATS, last_event_ms=TIMESTAMPS)
ITEMS = usually(VALID_ITEMS, ODD_ITEMS)


# --- one test per RPC -----------------------------------------------------------------------------------

@FUZZ
@given(batch=BATCHES)
def test_publish_events(stubs, batch):
    ack = check(stubs, "PublishEvents", events_pb2.EventBatch.DESCRIPTOR,
                lambda: stubs.events.PublishEvents(batch, timeout=TIMEOUT))
    assert ack is not None, "a batch within the limits always gets an ack"
    check_ack("PublishEvents", ack, batch, batch.batch_id)


@FUZZ
@given(batches=st.lists(BATCHES, max_size=4))
def test_stream_events(stubs, batches):
    acks = check(stubs, "StreamEvents", events_pb2.EventBatch.DESCRIPTOR,
                 lambda: list(stubs.events.StreamEvents(iter(batches), timeout=TIMEOUT)))
    assert acks is not None and len(acks) == len(batches)
    for number, (ack, batch) in enumerate(zip(acks, batches)):
        check_ack("StreamEvents", ack, batch, batch.batch_id or str(number))


@FUZZ
@given(request=recommend_requests())
def test_recommend(stubs, request):
    response = check(stubs, "Recommend", recommend_pb2.RecommendRequest.DESCRIPTOR,
                     lambda: stubs.recommender.Recommend(request, timeout=TIMEOUT))
    if response is not None:
        assert response.request_id == request.request_id and response.user_id == request.user_id
        check_recommendation(response, request)


@FUZZ
@given(requests=st.lists(recommend_requests(), max_size=5))
def test_recommend_batch(stubs, requests):
    batch = recommend_pb2.RecommendBatchRequest(requests=requests)
    response = check(stubs, "RecommendBatch", recommend_pb2.RecommendBatchRequest.DESCRIPTOR,
                     lambda: stubs.recommender.RecommendBatch(batch, timeout=TIMEOUT))
    if response is not None:
        assert [r.request_id for r in response.responses] == [r.request_id for r in requests]
        for answer, request in zip(response.responses, requests):
            check_recommendation(answer, request)


@FUZZ
@given(requests=st.lists(recommend_requests(), max_size=5))
def test_recommend_stream(stubs, requests):
    responses = check(stubs, "RecommendStream", recommend_pb2.RecommendRequest.DESCRIPTOR,
                      lambda: list(stubs.recommender.RecommendStream(iter(requests), timeout=TIMEOUT)))
    assert responses is not None and len(responses) == len(requests)
    assert sorted(r.request_id for r in responses) == sorted(r.request_id for r in requests)
    in_band = REPORT["RecommendStream"]["in_band"]
    for response in responses:
        if response.HasField("error"):
            in_band[f"error:{CODE_NAMES.get(response.error.code, response.error.code)}"] += 1
            assert response.error.code in ALLOWED_NUMBERS, response.error
            assert names_a_field(recommend_pb2.RecommendRequest.DESCRIPTOR, response.error.message), response.error
        else:
            in_band["ok"] += 1
            # Order may differ and ids may repeat: some request with these ids must match the answer.
            candidates = [r for r in requests if r.request_id == response.request_id and r.user_id == response.user_id]
            assert any(_passes(check_recommendation, response, r) for r in candidates), (response, candidates)


@FUZZ
@given(request=similar_requests())
def test_similar_items(stubs, request):
    response = check(stubs, "SimilarItems", recommend_pb2.SimilarItemsRequest.DESCRIPTOR,
                     lambda: stubs.recommender.SimilarItems(request, timeout=TIMEOUT))
    if response is not None:
        k = request.k if request.HasField("k") else 10
        assert len(response.items) <= k and request.item_id not in {i.item_id for i in response.items}
        assert all(math.isfinite(i.score) for i in response.items)


@FUZZ
@given(items=st.lists(ITEMS, max_size=4))
def test_upsert_items(stubs, items):
    request = catalog_pb2.UpsertItemsRequest(items=items)
    response = check(stubs, "UpsertItems", catalog_pb2.UpsertItemsRequest.DESCRIPTOR,
                     lambda: stubs.catalog.UpsertItems(request, timeout=TIMEOUT))
    if response is not None:
        assert response.created + response.updated == len(items)
        last = {item.item_id: item for item in items}
        for item_id, item in last.items():
            stored = stubs.get_item(item_id, include_embedding=True)
            assert not stored.deleted and list(stored.categories) == list(dict.fromkeys(item.categories))
            norm = math.sqrt(sum(v * v for v in stored.embedding))
            assert all(math.isfinite(v) for v in stored.embedding)
            if item.embedding:
                assert abs(norm - 1.0) < 1e-3, (item_id, norm)


@FUZZ
@given(item_ids=st.lists(FUZZ_ITEM_IDS, max_size=4))
def test_delete_items(stubs, item_ids):
    request = catalog_pb2.DeleteItemsRequest(item_ids=item_ids)
    response = check(stubs, "DeleteItems", catalog_pb2.DeleteItemsRequest.DESCRIPTOR,
                     lambda: stubs.catalog.DeleteItems(request, timeout=TIMEOUT))
    if response is not None:
        assert response.deleted + len(response.not_found) == len(dict.fromkeys(item_ids))


@FUZZ
@given(item_id=ITEM_IDS, include_embedding=st.booleans())
def test_get_item(stubs, item_id, include_embedding):
    request = catalog_pb2.GetItemRequest(item_id=item_id, include_embedding=include_embedding)
    item = check(stubs, "GetItem", catalog_pb2.GetItemRequest.DESCRIPTOR, lambda: stubs.catalog.GetItem(request, timeout=TIMEOUT))
    if item is not None:
        assert item.item_id == item_id and len(item.embedding) == (DIM if include_embedding else 0)


@FUZZ
@given(user_id=USER_IDS, include_embedding=st.booleans(),
       history_limit=st.one_of(st.integers(0, 100), st.sampled_from([2**31, 2**32 - 1])))
def test_get_user(stubs, user_id, include_embedding, history_limit):
    request = catalog_pb2.GetUserRequest(user_id=user_id, include_embedding=include_embedding, history_limit=history_limit)
    user = check(stubs, "GetUser", catalog_pb2.GetUserRequest.DESCRIPTOR, lambda: stubs.catalog.GetUser(request, timeout=TIMEOUT))
    if user is not None:
        assert user.user_id == user_id and len(user.history) <= (history_limit or 20)
        assert all(math.isfinite(v) for v in user.embedding)
        assert all(math.isfinite(h.value) and h.timestamp_ms > 0 for h in user.history), user.history


FORGETTABLE = st.one_of(USER_IDS.filter(lambda u: u != "u1"), st.integers(0, 20).map(lambda n: f"fz-user-{n}"))


@FUZZ
@given(user_id=FORGETTABLE)
def test_forget_user(stubs, user_id):
    request = catalog_pb2.ForgetUserRequest(user_id=user_id)
    check(stubs, "ForgetUser", catalog_pb2.ForgetUserRequest.DESCRIPTOR, lambda: stubs.catalog.ForgetUser(request, timeout=60))
    with pytest.raises(grpc.RpcError) as error:
        stubs.catalog.GetUser(catalog_pb2.GetUserRequest(user_id=user_id), timeout=TIMEOUT)
    assert error.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


def test_stats(stubs):
    stats = check(stubs, "Stats", catalog_pb2.StatsRequest.DESCRIPTOR, lambda: stubs.catalog.Stats(catalog_pb2.StatsRequest(), timeout=TIMEOUT))
    assert stats.dim == DIM and stats.limits.max_k > 0


# --- at and over the limits --------------------------------------------------------------------------------

def _expect(stubs, rpc, descriptor, call, field: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call()
    REPORT[rpc]["examples"] += 1
    REPORT[rpc]["outcomes"][error.value.code().name] += 1
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value
    assert error.value.details().startswith(f"{field}: ") and names_a_field(descriptor, error.value.details())
    assert_healthy(stubs)


def test_requests_over_the_limits(stubs):
    limits = stubs.stats().limits
    many_ids = [f"x{n}" for n in range(limits.max_filter_ids + 1)]
    rec = recommend_pb2.RecommendRequest
    _expect(stubs, "Recommend", rec.DESCRIPTOR, lambda: stubs.recommender.Recommend(
        rec(user_id="u1", exclude_item_ids=many_ids), timeout=TIMEOUT), "exclude_item_ids")
    _expect(stubs, "Recommend", rec.DESCRIPTOR, lambda: stubs.recommender.Recommend(
        rec(user_id="u1", include_categories=many_ids), timeout=TIMEOUT), "include_categories")
    _expect(stubs, "Recommend", rec.DESCRIPTOR, lambda: stubs.recommender.Recommend(
        rec(user_id="u1", k=limits.max_k + 1), timeout=TIMEOUT), "k")
    batch = recommend_pb2.RecommendBatchRequest(requests=[rec(user_id="u1")] * (limits.max_requests_per_batch + 1))
    _expect(stubs, "RecommendBatch", batch.DESCRIPTOR, lambda: stubs.recommender.RecommendBatch(batch, timeout=TIMEOUT), "requests")
    items = catalog_pb2.UpsertItemsRequest(items=[catalog_pb2.Item(item_id=f"x{n}") for n in range(limits.max_items_per_upsert + 1)])
    _expect(stubs, "UpsertItems", items.DESCRIPTOR, lambda: stubs.catalog.UpsertItems(items, timeout=TIMEOUT), "items")
    huge = catalog_pb2.UpsertItemsRequest(items=[catalog_pb2.Item(item_id="huge", embedding=[1.0] * 1_000_000)])
    _expect(stubs, "UpsertItems", items.DESCRIPTOR, lambda: stubs.catalog.UpsertItems(huge, timeout=TIMEOUT), "items[0].embedding")
    deletes = catalog_pb2.DeleteItemsRequest(item_ids=many_ids[: limits.max_items_per_upsert + 1])
    _expect(stubs, "DeleteItems", deletes.DESCRIPTOR, lambda: stubs.catalog.DeleteItems(deletes, timeout=TIMEOUT), "item_ids")
    for name, ids in (("UpsertItems", []), ("DeleteItems", [])):
        request = catalog_pb2.UpsertItemsRequest() if name == "UpsertItems" else catalog_pb2.DeleteItemsRequest(item_ids=ids)
        method = getattr(stubs.catalog, name)
        _expect(stubs, name, request.DESCRIPTOR, lambda: method(request, timeout=TIMEOUT), "items" if name == "UpsertItems" else "item_ids")


def test_oversized_event_batches_are_rejected_in_the_ack(stubs):
    limit = stubs.stats().limits.max_events_per_batch
    at_limit = events_pb2.EventBatch(batch_id="at", events=[make_event("fz-limit", "i1", "view") for _ in range(limit)])
    over = events_pb2.EventBatch(batch_id="over", events=list(at_limit.events) + [make_event("fz-limit", "i1", "view")])
    # The unary call fails as a whole; on the stream the batch's ack carries the rejection and the stream goes on.
    _expect(stubs, "PublishEvents", over.DESCRIPTOR, lambda: stubs.events.PublishEvents(over, timeout=TIMEOUT), "events")
    acks = check(stubs, "StreamEvents", over.DESCRIPTOR, lambda: list(stubs.events.StreamEvents(iter([over, at_limit]), timeout=60)))
    assert [a.batch_id for a in acks] == ["over", "at"] and acks[1].accepted == limit
    check_ack("StreamEvents", acks[0], over, "over")
    assert acks[0].rejections[0].field == "events"


def test_a_message_over_the_size_limit_is_refused(server, stubs):
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        publish = channel.unary_unary("/streamrec.v1.EventService/PublishEvents")
        payload = events_pb2.EventBatch(batch_id="x" * (17 << 20)).SerializeToString()
        with pytest.raises(grpc.RpcError) as error:
            publish(payload, timeout=TIMEOUT)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    REPORT["PublishEvents"]["examples"] += 1
    REPORT["PublishEvents"]["outcomes"]["RESOURCE_EXHAUSTED(transport)"] += 1
    assert_healthy(stubs)


# --- bytes that are not a valid message ---------------------------------------------------------------------

UNARY_METHODS = {
    "/streamrec.v1.EventService/PublishEvents": events_pb2.EventBatch,
    "/streamrec.v1.RecommendService/Recommend": recommend_pb2.RecommendRequest,
    "/streamrec.v1.RecommendService/RecommendBatch": recommend_pb2.RecommendBatchRequest,
    "/streamrec.v1.RecommendService/SimilarItems": recommend_pb2.SimilarItemsRequest,
    "/streamrec.v1.CatalogService/UpsertItems": catalog_pb2.UpsertItemsRequest,
    "/streamrec.v1.CatalogService/DeleteItems": catalog_pb2.DeleteItemsRequest,
    "/streamrec.v1.CatalogService/GetItem": catalog_pb2.GetItemRequest,
    "/streamrec.v1.CatalogService/GetUser": catalog_pb2.GetUserRequest,
    "/streamrec.v1.CatalogService/ForgetUser": catalog_pb2.ForgetUserRequest,
    "/streamrec.v1.CatalogService/Stats": catalog_pb2.StatsRequest,
    "/streamrec.v1.CatalogService/LoadReranker": catalog_pb2.LoadRerankerRequest,
}


@FUZZ
@given(method=st.sampled_from(sorted(UNARY_METHODS)), payload=st.binary(max_size=64))
def test_arbitrary_bytes(stubs, method, payload):
    descriptor = UNARY_METHODS[method].DESCRIPTOR
    call = stubs._raw_channel.unary_unary(method)
    check(stubs, method.rsplit("/", 1)[1], descriptor, lambda: call(payload, timeout=TIMEOUT))


@pytest.mark.parametrize("method, message, field", [
    ("/streamrec.v1.RecommendService/Recommend", recommend_pb2.RecommendRequest(user_id="\x01MARK\x01"), "user_id"),
    ("/streamrec.v1.RecommendService/RecommendBatch", recommend_pb2.RecommendBatchRequest(requests=[
        recommend_pb2.RecommendRequest(user_id="u1"), recommend_pb2.RecommendRequest(user_id="u2", exclude_item_ids=["a", "\x01MARK\x01"])]),
     "requests[1].exclude_item_ids[1]"),
    ("/streamrec.v1.EventService/PublishEvents", events_pb2.EventBatch(events=[
        make_event("u1", "i1"), make_event("u1", "\x01MARK\x01")]), "events[1].item_id"),
    ("/streamrec.v1.CatalogService/UpsertItems", catalog_pb2.UpsertItemsRequest(items=[
        catalog_pb2.Item(item_id="fz-utf8", attributes={"colour": "\x01MARK\x01"})]), "items[0].attributes[0].value"),
])
def test_invalid_utf8_names_the_field(stubs, method, message, field):
    """proto3 strings must be UTF-8; other clients (or a proxy) can still send bytes that are not."""
    payload = message.SerializeToString().replace(b"\x01MARK\x01", b"\xff\xfe\xc3\x28\x01\x01")
    with pytest.raises(grpc.RpcError) as error:
        stubs._raw_channel.unary_unary(method)(payload, timeout=TIMEOUT)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == f"{field}: is not valid UTF-8"
    assert_healthy(stubs)


def test_invalid_utf8_in_a_stream_ends_it_with_invalid_argument_after_answering_what_came_before(stubs):
    good = events_pb2.EventBatch(batch_id="b0", events=[make_event("fz-utf8-stream", "i1")]).SerializeToString()
    bad = events_pb2.EventBatch(batch_id="\x01MARK\x01").SerializeToString().replace(b"\x01MARK\x01", b"\xff\xfe\xfd\xfc\xfb\xfa")
    call = stubs._raw_channel.stream_stream("/streamrec.v1.EventService/StreamEvents")(iter([good, bad, good]), timeout=TIMEOUT)
    acks = []
    with pytest.raises(grpc.RpcError) as error:
        for ack in call:
            acks.append(events_pb2.EventAck.FromString(ack))
    assert [a.batch_id for a in acks] == ["b0"] and acks[0].accepted == 1
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details() == "batch_id: is not valid UTF-8"
    assert_healthy(stubs)


# --- streams that end early, half-close or never read ------------------------------------------------------

def _reader_threads() -> int:
    return sum(t.name in ("stream-events-reader", "recommend-stream-reader") for t in threading.enumerate())


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "not within the time limit"
        time.sleep(0.05)


def _event_batches(count: int, size: int = 5):
    for n in range(count):
        yield events_pb2.EventBatch(batch_id=str(n), events=[make_event(f"fz-s{n % 7}", f"i{(n * size + j) % 2000}", "view")
                                                             for j in range(size)])


def test_half_closed_streams(stubs):
    assert list(stubs.events.StreamEvents(iter([]), timeout=TIMEOUT)) == []
    assert list(stubs.recommender.RecommendStream(iter([]), timeout=TIMEOUT)) == []
    acks = list(stubs.events.StreamEvents(_event_batches(20), timeout=TIMEOUT))
    assert [a.batch_id for a in acks] == [str(n) for n in range(20)]
    requests = [recommend_pb2.RecommendRequest(request_id=str(n), user_id=f"u{n}", k=3) for n in range(20)]
    assert len(list(stubs.recommender.RecommendStream(iter(requests), timeout=TIMEOUT))) == 20
    assert_healthy(stubs)


@pytest.mark.parametrize("kind", ["events", "recommend"])
def test_client_cancels_mid_stream(stubs, kind):
    stop = threading.Event()

    def requests():
        for n in range(100_000):
            if stop.is_set():
                return
            if kind == "events":
                yield next(_event_batches(1))
            else:
                yield recommend_pb2.RecommendRequest(request_id=str(n), user_id=f"u{n % 500}", k=5)
            time.sleep(0.001)

    method = stubs.events.StreamEvents if kind == "events" else stubs.recommender.RecommendStream
    call = method(requests(), timeout=TIMEOUT)
    for number, _ in enumerate(call):
        if number == 10:
            break
    call.cancel()
    stop.set()
    with pytest.raises(grpc.RpcError) as error:
        next(call)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    rpc = "StreamEvents" if kind == "events" else "RecommendStream"
    REPORT[rpc]["examples"] += 1
    REPORT[rpc]["outcomes"]["CANCELLED(by client)"] += 1
    assert_healthy(stubs)


def test_a_client_that_never_reads_acks_cannot_hurt_the_server(stubs):
    """Sends batches without reading a single ack, then cancels. Flow control or the per-stream in-flight
    bound must stop it from piling up memory; the server keeps answering others quickly throughout."""
    sent = [0]
    stop = threading.Event()

    def requests():
        for batch in _event_batches(5_000, size=10):
            if stop.is_set():
                return
            sent[0] += 1
            yield batch

    calls = [stubs.events.StreamEvents(requests(), timeout=60) for _ in range(3)]  # nobody reads these
    time.sleep(2.0)
    started = time.monotonic()
    assert_healthy(stubs)
    assert time.monotonic() - started < 2.0, "other clients are served promptly"
    ack = stubs.publish([make_event("fz-other", "i1", "view")], timeout_s=10.0)
    assert ack.accepted == 1
    for call in calls:
        call.cancel()
    stop.set()
    REPORT["StreamEvents"]["examples"] += 3
    REPORT["StreamEvents"]["outcomes"]["CANCELLED(never read)"] += 3
    assert_healthy(stubs)
    assert sent[0] > 0


def test_a_cancelled_stream_releases_its_reader_thread(server, stubs, monkeypatch):
    """Commits are held back while the client fills the stream's in-flight queue and cancels: the reader
    thread must still end once the commits resume."""
    before = _reader_threads()
    gate = threading.Event()
    append_log = server.engine.store.append_log

    def held_back(entries):
        gate.wait(10.0)
        return append_log(entries)

    monkeypatch.setattr(server.engine.store, "append_log", held_back)
    try:
        call = stubs.events.StreamEvents(_event_batches(200, size=1), timeout=TIMEOUT)
        _wait_for(lambda: _reader_threads() > before)
        time.sleep(1.0)  # the reader fills the in-flight queue (64 batches) and waits for room
        call.cancel()
    finally:
        gate.set()
        monkeypatch.undo()
    assert_healthy(stubs)
    _wait_for(lambda: _reader_threads() <= before, timeout_s=5.0)
