"""Python client for streamrec. Thin: builds messages, sets deadlines, streams events in batches."""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamrec.v1 import catalog_pb2, catalog_pb2_grpc, common_pb2, events_pb2, events_pb2_grpc, recommend_pb2, recommend_pb2_grpc

EVENT_TYPES = {name.removeprefix("EVENT_TYPE_").lower(): value for name, value in common_pb2.EventType.items() if value}


def event_type(name_or_number: str | int) -> int:
    """'purchase', 'PURCHASE', 'EVENT_TYPE_PURCHASE' or 4 -> 4."""
    if isinstance(name_or_number, int):
        return name_or_number
    key = name_or_number.strip().lower().removeprefix("event_type_")
    if key.isdigit():
        return int(key)
    if key not in EVENT_TYPES:
        raise ValueError(f"unknown event type '{name_or_number}' (one of {', '.join(EVENT_TYPES)})")
    return EVENT_TYPES[key]


def make_event(user_id: str, item_id: str, type: str | int = "view", value: float = 0.0,
               timestamp_ms: int = 0, event_id: str | None = None) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=event_id or uuid.uuid4().hex, user_id=user_id, item_id=item_id, type=event_type(type),
        value=value, timestamp_ms=timestamp_ms,
    )


@dataclass
class StreamResult:
    batches: int
    accepted: int
    duplicates: int
    rejections: list[events_pb2.EventRejection]
    durable_seq: int


class StreamrecClient:
    """Synchronous client. Every call has a deadline (`timeout_s`), overridable per call."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float = 10.0, channel: grpc.Channel | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.channel = channel or grpc.insecure_channel(address)
        self.events = events_pb2_grpc.EventServiceStub(self.channel)
        self.recommender = recommend_pb2_grpc.RecommendServiceStub(self.channel)
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "StreamrecClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    # --- health ----------------------------------------------------------------------------------
    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout_s))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health(timeout_s=2.0) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.address} not SERVING after {timeout_s} s")
            time.sleep(0.1)

    # --- recommendations ----------------------------------------------------------------------------
    @staticmethod
    def recommend_request(user_id: str, k: int | None = None, exclude_seen: bool | None = None,
                          exclude_item_ids: Sequence[str] = (), include_categories: Sequence[str] = (),
                          exclude_categories: Sequence[str] = (), request_id: str = "") -> recommend_pb2.RecommendRequest:
        request = recommend_pb2.RecommendRequest(
            request_id=request_id, user_id=user_id, exclude_item_ids=exclude_item_ids,
            include_categories=include_categories, exclude_categories=exclude_categories,
        )
        if k is not None:
            request.k = k
        if exclude_seen is not None:
            request.exclude_seen = exclude_seen
        return request

    def recommend(self, user_id: str, k: int | None = None, timeout_s: float | None = None, **filters) -> recommend_pb2.RecommendResponse:
        return self.recommender.Recommend(self.recommend_request(user_id, k, **filters), timeout=self._timeout(timeout_s))

    def recommend_batch(self, requests: Sequence[recommend_pb2.RecommendRequest], timeout_s: float | None = None) -> list[recommend_pb2.RecommendResponse]:
        response = self.recommender.RecommendBatch(recommend_pb2.RecommendBatchRequest(requests=requests), timeout=self._timeout(timeout_s))
        return list(response.responses)

    def recommend_stream(self, requests: Iterable[recommend_pb2.RecommendRequest], timeout_s: float | None = None) -> Iterator[recommend_pb2.RecommendResponse]:
        return self.recommender.RecommendStream(iter(requests), timeout=self._timeout(timeout_s))

    def similar_items(self, item_id: str, k: int | None = None, timeout_s: float | None = None) -> recommend_pb2.SimilarItemsResponse:
        request = recommend_pb2.SimilarItemsRequest(item_id=item_id)
        if k is not None:
            request.k = k
        return self.recommender.SimilarItems(request, timeout=self._timeout(timeout_s))

    # --- events ----------------------------------------------------------------------------------------
    def publish(self, events: Sequence[events_pb2.Event], batch_id: str = "", timeout_s: float | None = None) -> events_pb2.EventAck:
        return self.events.PublishEvents(events_pb2.EventBatch(batch_id=batch_id, events=events), timeout=self._timeout(timeout_s))

    def send_events(self, events: Iterable[events_pb2.Event], batch_size: int = 100, timeout_s: float | None = None) -> StreamResult:
        """Send events over the bidirectional stream in batches; returns once every batch is acked."""
        def batches() -> Iterator[events_pb2.EventBatch]:
            iterator = iter(events)
            for number in itertools.count():
                chunk = list(itertools.islice(iterator, batch_size))
                if not chunk:
                    return
                yield events_pb2.EventBatch(batch_id=str(number), events=chunk)

        result = StreamResult(0, 0, 0, [], 0)
        for ack in self.events.StreamEvents(batches(), timeout=self._timeout(timeout_s)):
            result.batches += 1
            result.accepted += ack.accepted
            result.duplicates += ack.duplicates
            result.rejections.extend(ack.rejections)
            result.durable_seq = max(result.durable_seq, ack.durable_seq)
        return result

    # --- catalog / admin -------------------------------------------------------------------------------
    def upsert_items(self, items: Sequence[catalog_pb2.Item], timeout_s: float | None = None) -> catalog_pb2.UpsertItemsResponse:
        return self.catalog.UpsertItems(catalog_pb2.UpsertItemsRequest(items=items), timeout=self._timeout(timeout_s))

    def delete_items(self, item_ids: Sequence[str], timeout_s: float | None = None) -> catalog_pb2.DeleteItemsResponse:
        return self.catalog.DeleteItems(catalog_pb2.DeleteItemsRequest(item_ids=item_ids), timeout=self._timeout(timeout_s))

    def get_item(self, item_id: str, include_embedding: bool = False, timeout_s: float | None = None) -> catalog_pb2.Item:
        return self.catalog.GetItem(catalog_pb2.GetItemRequest(item_id=item_id, include_embedding=include_embedding), timeout=self._timeout(timeout_s))

    def get_user(self, user_id: str, include_embedding: bool = False, history_limit: int = 0, timeout_s: float | None = None) -> catalog_pb2.User:
        request = catalog_pb2.GetUserRequest(user_id=user_id, include_embedding=include_embedding, history_limit=history_limit)
        return self.catalog.GetUser(request, timeout=self._timeout(timeout_s))

    def forget_user(self, user_id: str, timeout_s: float | None = None) -> catalog_pb2.ForgetUserResponse:
        return self.catalog.ForgetUser(catalog_pb2.ForgetUserRequest(user_id=user_id), timeout=self._timeout(timeout_s))

    def stats(self, timeout_s: float | None = None) -> catalog_pb2.StatsResponse:
        return self.catalog.Stats(catalog_pb2.StatsRequest(), timeout=self._timeout(timeout_s))
