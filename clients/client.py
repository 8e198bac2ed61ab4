"""Python client for streamrec. Thin: builds messages, sets deadlines, retries what is safe to retry,
streams events in batches under flow control.

Retries
    A small explicit helper (`call_with_retry`), not gRPC's built-in retry service config. Reasons: the
    deadline given to a call covers all of its attempts (the service config's `maxAttempts` is capped
    at 5 and its backoff is not bounded by our deadline the same way); the event stream can be retried
    too, by resending its unacked batches on a new stream (gRPC cannot replay a stream once it has
    started); and the same policy object drives the sync and the asyncio client. Only UNAVAILABLE is
    retried, and by default only for idempotent calls: Recommend, RecommendBatch, SimilarItems,
    GetItem, GetUser, Stats, health checks, and event sends (PublishEvents / StreamEvents: every event
    carries an event_id and the server applies an id at most once, so a resend is safe). UpsertItems,
    DeleteItems and ForgetUser are retried only when the caller opts in (`retry=True` on the call, or
    `retry_non_idempotent=True` on the client). `recommend_stream` is never retried: its requests come
    from the caller's iterator and are consumed as they are sent. Channels reconnect with a short
    backoff (0.2 s .. 2 s, see DEFAULT_CHANNEL_OPTIONS) so that retries see a restarted server soon.

Authentication and TLS
    `token="..."` adds `authorization: Bearer <token>` to every call through a client interceptor
    (call credentials would refuse an insecure channel); `metadata=[(key, value), ...]` adds any other
    headers. `tls=True` / `root_certificates` / `certificate_chain` + `private_key` (mTLS) build the
    channel with `grpc.ssl_channel_credentials`; each accepts PEM bytes or a file path.
"""
from __future__ import annotations

import collections
import itertools
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamrec.clients.channel import MetadataInterceptor, auth_metadata, make_channel
from streamrec.clients.session import Session
from streamrec.clients.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy, _backoff_or_raise, _remaining, call_with_retry
from streamrec.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    experiments_pb2,
    experiments_pb2_grpc,
    recommend_pb2,
    recommend_pb2_grpc,
)

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
               timestamp_ms: int = 0, event_id: str | None = None, recommendation_id: str = "") -> events_pb2.Event:
    """recommendation_id: the answer the event responds to (RecommendResponse.recommendation_id), so the server
    attributes the outcome to it."""
    return events_pb2.Event(
        event_id=event_id or uuid.uuid4().hex, user_id=user_id, item_id=item_id, type=event_type(type),
        value=value, timestamp_ms=timestamp_ms, recommendation_id=recommendation_id,
    )


def event_batches(events: Iterable[events_pb2.Event], batch_size: int) -> Iterator[events_pb2.EventBatch]:
    """Consecutive EventBatches of at most `batch_size` events, numbered "0", "1", ..."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    iterator = iter(events)
    for number in itertools.count():
        chunk = list(itertools.islice(iterator, batch_size))
        if not chunk:
            return
        yield events_pb2.EventBatch(batch_id=str(number), events=chunk)


@dataclass
class StreamResult:
    batches: int
    accepted: int
    duplicates: int
    rejections: list[events_pb2.EventRejection]
    durable_seq: int
    ack_lags_s: list[float] = field(default_factory=list)  # per batch: first send -> its ack
    retries: int = 0  # streams reopened after UNAVAILABLE (unacked batches were resent)
    session: Session | None = field(default=None, repr=False)  # told each ack's durable_seq

    def add(self, ack: events_pb2.EventAck, lag_s: float) -> None:
        if self.session is not None:
            self.session.saw(ack.durable_seq, ack.log_id)
        self.batches += 1
        self.accepted += ack.accepted
        self.duplicates += ack.duplicates
        self.rejections.extend(ack.rejections)
        self.durable_seq = max(self.durable_seq, ack.durable_seq)
        self.ack_lags_s.append(lag_s)


# --- the event stream with flow control -------------------------------------------------------------------

_END = None  # closes a request queue


def _drain(requests: queue.SimpleQueue) -> Iterator[events_pb2.EventBatch]:
    while (batch := requests.get()) is not _END:
        yield batch


class EventStream:
    """One StreamEvents call: batches go out through `send` (which blocks while `max_inflight` batches are
    unacked), acks are read by a background thread. When the stream fails with a retryable status, a
    new stream is opened and the unacked batches are resent (same event_ids: the server counts them as
    duplicates if they had been applied). `result()` waits for every ack; `cancel()` ends the call."""

    def __init__(self, method, max_inflight: int, policy: RetryPolicy, deadline: float | None,
                 session: Session | None = None):
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self._method, self._max_inflight, self._policy, self._deadline = method, max_inflight, policy, deadline
        self._cond = threading.Condition()
        self._pending: collections.deque[tuple[events_pb2.EventBatch, float]] = collections.deque()
        self._requests: queue.SimpleQueue | None = None
        self._call = None
        self._closed = False  # no more batches will be sent
        self._cancelled = False
        self._error: BaseException | None = None
        self._finished = threading.Event()
        self._result = StreamResult(0, 0, 0, [], 0, session=session)
        self.sent = 0

    def _open(self) -> None:
        """New call; the unacked batches go first. Caller holds the lock."""
        requests: queue.SimpleQueue = queue.SimpleQueue()
        for batch, _ in self._pending:
            requests.put(batch)
        if self._closed:
            requests.put(_END)
        self._requests = requests
        self._call = self._method(_drain(requests), timeout=_remaining(self._deadline))

    def start(self) -> "EventStream":
        with self._cond:
            self._open()
        threading.Thread(target=self._read_acks, name="streamrec-acks", daemon=True).start()
        return self

    def send(self, batch: events_pb2.EventBatch) -> None:
        """Queue one batch for sending; blocks while too many batches are unacked. Raises if the stream failed."""
        with self._cond:
            if self._closed:
                raise RuntimeError("send after close_sending")
            self._cond.wait_for(lambda: len(self._pending) < self._max_inflight or self._finished.is_set())
            if self._error is not None:
                raise self._error
            if self._finished.is_set():
                raise RuntimeError("the event stream has ended")
            self._pending.append((batch, time.perf_counter()))
            self._requests.put(batch)
            self.sent += 1

    def close_sending(self) -> None:
        with self._cond:
            if not self._closed:
                self._closed = True
                self._requests.put(_END)

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            call = self._call
        if hasattr(call, "cancel"):
            call.cancel()

    def _finish(self, error: BaseException | None) -> None:
        with self._cond:
            self._error = error
            self._requests.put(_END)  # frees gRPC's thread that reads the requests
            self._finished.set()
            self._cond.notify_all()

    def _read_acks(self) -> None:
        attempt = 1
        while True:
            try:
                for ack in self._call:
                    with self._cond:
                        if not self._pending:
                            raise RuntimeError(f"ack for batch {ack.batch_id!r} that was never sent")
                        batch, sent_at = self._pending.popleft()
                        if ack.batch_id != batch.batch_id:
                            raise RuntimeError(f"ack for batch {ack.batch_id!r}, expected {batch.batch_id!r}")
                        self._result.add(ack, time.perf_counter() - sent_at)
                        attempt = 1  # progress: a later outage gets the full retry budget again
                        self._cond.notify_all()
                with self._cond:
                    unacked = len(self._pending)
                self._finish(None if not unacked else RuntimeError(f"the stream ended with {unacked} batch(es) unacked"))
                return
            except grpc.RpcError as error:
                try:
                    if self._cancelled:
                        raise error
                    delay = _backoff_or_raise(self._policy, error, attempt, self._deadline)
                except BaseException as final:  # noqa: BLE001 - reported through result()
                    self._finish(final)
                    return
                time.sleep(delay)
                attempt += 1
                with self._cond:
                    self._requests.put(_END)
                    self._result.retries += 1
                    self._open()
            except BaseException as error:  # noqa: BLE001
                self.cancel()
                self._finish(error)
                return

    # --- the handle's public side -------------------------------------------------------------------
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def unacked(self) -> int:
        with self._cond:
            return len(self._pending)

    def result(self, timeout: float | None = None) -> StreamResult:
        """Wait for every ack (or the stream's failure, raised here)."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"acks still pending after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


# --- the client ---------------------------------------------------------------------------------------------

class StreamrecClient:
    """Synchronous client. Every call has a deadline (`timeout_s`, overridable per call) that covers its
    retries; idempotent calls retry UNAVAILABLE with backoff (see the module docstring)."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float | None = 10.0, channel: grpc.Channel | None = None,
                 *, retry_policy: RetryPolicy = DEFAULT_RETRY, retry_non_idempotent: bool = False,
                 token: str | None = None, metadata: Sequence[tuple[str, str]] = (), tls: bool = False,
                 root_certificates: bytes | str | os.PathLike | None = None,
                 certificate_chain: bytes | str | os.PathLike | None = None,
                 private_key: bytes | str | os.PathLike | None = None, server_name: str | None = None,
                 options: Sequence[tuple[str, object]] = (), consistency: str = "session"):
        self.address = address
        self.timeout_s = timeout_s
        self.retry_policy = retry_policy
        self.retry_non_idempotent = retry_non_idempotent
        self.session = Session(consistency)  # reads carry the highest seq seen (session.py); "eventual": off
        self._raw_channel = channel or make_channel(
            address, tls=tls, root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, server_name=server_name, options=options)
        self.metadata = auth_metadata(token, metadata)
        self.channel = grpc.intercept_channel(self._raw_channel, MetadataInterceptor(self.metadata)) if self.metadata else self._raw_channel
        self.events = events_pb2_grpc.EventServiceStub(self.channel)
        self.recommender = recommend_pb2_grpc.RecommendServiceStub(self.channel)
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(self.channel)
        self.experiments = experiments_pb2_grpc.ExperimentServiceStub(self.channel)
        self.diagnostics = diagnostics_pb2_grpc.DiagnosticsServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> "StreamrecClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def _policy(self, idempotent: bool, retry: bool | None) -> RetryPolicy:
        wanted = (idempotent or self.retry_non_idempotent) if retry is None else retry
        return self.retry_policy if wanted else NO_RETRY

    def _deadline(self, timeout_s: float | None) -> float | None:
        timeout = self._timeout(timeout_s)
        return None if timeout is None else time.monotonic() + timeout

    def _unary(self, method, request, timeout_s: float | None, idempotent: bool, retry: bool | None = None):
        request = self.session.stamp(request)
        return self.session.observe(call_with_retry(lambda remaining: method(request, timeout=remaining),
                                                    self._policy(idempotent, retry), self._deadline(timeout_s)))

    # --- health ----------------------------------------------------------------------------------
    def health(self, service: str = "", timeout_s: float | None = None, retry: bool | None = None) -> str:
        response = self._unary(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service), timeout_s, True, retry)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health(timeout_s=2.0, retry=False) == "SERVING":
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
                          exclude_categories: Sequence[str] = (), request_id: str = "", rerank: bool | None = None,
                          candidates: int = 0, user_model: str = "", mmr_lambda: float = 0.0,
                          max_per_category: int = 0, explain: bool = False) -> recommend_pb2.RecommendRequest:
        """rerank: None = the server's default, False = retrieval order only, True = rerank (when a model is
        loaded); candidates: how many retrieved items the model reorders (0 = server default); user_model:
        "ials" or "sequence" (the served_by.user_model of the answer says which answered), "" = the server's;
        mmr_lambda (0..1) and max_per_category: diversity (0 = off); explain: fill each item's `because`."""
        request = recommend_pb2.RecommendRequest(
            request_id=request_id, user_id=user_id, exclude_item_ids=exclude_item_ids,
            include_categories=include_categories, exclude_categories=exclude_categories,
        )
        if k is not None:
            request.k = k
        if exclude_seen is not None:
            request.exclude_seen = exclude_seen
        if rerank is not None:
            request.rerank.enabled = rerank
        if candidates:
            request.rerank.candidates = candidates
        if user_model:
            request.user_model = recommend_pb2.UserModel.Value(f"USER_MODEL_{user_model.upper()}")
        if mmr_lambda:
            request.diversity.mmr_lambda = mmr_lambda
        if max_per_category:
            request.diversity.max_per_category = max_per_category
        request.explain = explain
        return request

    def recommend(self, user_id: str, k: int | None = None, timeout_s: float | None = None, retry: bool | None = None,
                  **filters) -> recommend_pb2.RecommendResponse:
        return self._unary(self.recommender.Recommend, self.recommend_request(user_id, k, **filters), timeout_s, True, retry)

    def recommend_batch(self, requests: Sequence[recommend_pb2.RecommendRequest], timeout_s: float | None = None,
                        retry: bool | None = None) -> list[recommend_pb2.RecommendResponse]:
        response = self._unary(self.recommender.RecommendBatch, recommend_pb2.RecommendBatchRequest(requests=requests),
                               timeout_s, True, retry)
        return list(response.responses)

    def recommend_stream(self, requests: Iterable[recommend_pb2.RecommendRequest], timeout_s: float | None = None) -> Iterator[recommend_pb2.RecommendResponse]:
        """One response per request (matched by request_id; order may differ). Not retried: the requests
        come from your iterator and are consumed as they are sent."""
        responses = self.recommender.RecommendStream(map(self.session.stamp, requests), timeout=self._timeout(timeout_s))
        return map(self.session.observe, responses)

    def similar_items(self, item_id: str, k: int | None = None, timeout_s: float | None = None,
                      retry: bool | None = None) -> recommend_pb2.SimilarItemsResponse:
        request = recommend_pb2.SimilarItemsRequest(item_id=item_id)
        if k is not None:
            request.k = k
        return self._unary(self.recommender.SimilarItems, request, timeout_s, True, retry)

    # --- events ----------------------------------------------------------------------------------------
    def publish(self, events: Sequence[events_pb2.Event], batch_id: str = "", timeout_s: float | None = None,
                retry: bool | None = None) -> events_pb2.EventAck:
        return self._unary(self.events.PublishEvents, events_pb2.EventBatch(batch_id=batch_id, events=events), timeout_s, True, retry)

    def send_events(self, events: Iterable[events_pb2.Event], batch_size: int = 100, timeout_s: float | None = None,
                    *, max_inflight: int = 16, wait_for_acks: bool = True, retry: bool | None = None) -> StreamResult | EventStream:
        """Send events over the bidirectional stream in batches of `batch_size`.

        Flow control: at most `max_inflight` batches are unacked at a time; `events` is read lazily (in
        this thread), so a generator is paused until acks catch up. With wait_for_acks=True (default)
        this returns the StreamResult once every batch is acked; with False it returns as soon as the
        last batch is handed to gRPC, with the EventStream handle: `handle.result()` waits for the acks.
        `timeout_s` is the deadline of the whole stream, retries included."""
        stream = EventStream(self.events.StreamEvents, max_inflight, self._policy(True, retry), self._deadline(timeout_s),
                             self.session).start()
        try:
            for batch in event_batches(events, batch_size):
                stream.send(batch)
        except BaseException:
            stream.cancel()
            raise
        stream.close_sending()
        return stream.result() if wait_for_acks else stream

    # --- catalog / admin -------------------------------------------------------------------------------
    def upsert_items(self, items: Sequence[catalog_pb2.Item], timeout_s: float | None = None,
                     retry: bool | None = None) -> catalog_pb2.UpsertItemsResponse:
        return self._unary(self.catalog.UpsertItems, catalog_pb2.UpsertItemsRequest(items=items), timeout_s, False, retry)

    def delete_items(self, item_ids: Sequence[str], timeout_s: float | None = None,
                     retry: bool | None = None) -> catalog_pb2.DeleteItemsResponse:
        return self._unary(self.catalog.DeleteItems, catalog_pb2.DeleteItemsRequest(item_ids=item_ids), timeout_s, False, retry)

    def get_item(self, item_id: str, include_embedding: bool = False, timeout_s: float | None = None,
                 retry: bool | None = None) -> catalog_pb2.Item:
        request = catalog_pb2.GetItemRequest(item_id=item_id, include_embedding=include_embedding)
        return self._unary(self.catalog.GetItem, request, timeout_s, True, retry)

    def get_user(self, user_id: str, include_embedding: bool = False, history_limit: int = 0, timeout_s: float | None = None,
                 retry: bool | None = None) -> catalog_pb2.User:
        request = catalog_pb2.GetUserRequest(user_id=user_id, include_embedding=include_embedding, history_limit=history_limit)
        return self._unary(self.catalog.GetUser, request, timeout_s, True, retry)

    def forget_user(self, user_id: str, timeout_s: float | None = None, retry: bool | None = None) -> catalog_pb2.ForgetUserResponse:
        return self._unary(self.catalog.ForgetUser, catalog_pb2.ForgetUserRequest(user_id=user_id), timeout_s, False, retry)

    def stats(self, timeout_s: float | None = None, retry: bool | None = None) -> catalog_pb2.StatsResponse:
        return self._unary(self.catalog.Stats, catalog_pb2.StatsRequest(), timeout_s, True, retry)

    def load_reranker(self, path: str = "", unload: bool = False, timeout_s: float | None = None,
                      retry: bool | None = None) -> catalog_pb2.RerankerInfo:
        """Swap the server's reranking model for the ONNX file at `path` (on the server); "" re-reads the
        current one; unload=True serves retrieval only. A model that fails validation: INVALID_ARGUMENT."""
        request = catalog_pb2.LoadRerankerRequest(path=path, unload=unload)
        return self._unary(self.catalog.LoadReranker, request, timeout_s, True, retry)

    # --- experiments (admin) ---------------------------------------------------------------------------
    def create_experiment(self, name: str, arms: Sequence[tuple[str, float, dict]], description: str = "",
                          timeout_s: float | None = None) -> experiments_pb2.Experiment:
        """arms: (name, weight, options), options being recommend_request keyword arguments the arm sets,
        e.g. {"rerank": False} or {"user_model": "sequence"}."""
        request = self.experiment_request(name, arms, description)
        return self._unary(self.experiments.CreateExperiment, request, timeout_s, False, False)

    @classmethod
    def experiment_request(cls, name: str, arms: Sequence[tuple[str, float, dict]],
                           description: str = "") -> experiments_pb2.CreateExperimentRequest:
        return experiments_pb2.CreateExperimentRequest(experiment=experiments_pb2.Experiment(
            name=name, description=description, arms=[
                experiments_pb2.ExperimentArm(name=arm, weight=weight, options=cls.recommend_request("", **options))
                for arm, weight, options in arms]))

    def stop_experiment(self, name: str, timeout_s: float | None = None) -> experiments_pb2.Experiment:
        return self._unary(self.experiments.StopExperiment, experiments_pb2.StopExperimentRequest(name=name),
                           timeout_s, True, None)

    def get_experiment(self, name: str, timeout_s: float | None = None) -> experiments_pb2.Experiment:
        """The experiment with its arms' outcomes so far (impressions, attributed clicks and purchases, CTR and
        conversion with 95% intervals)."""
        return self._unary(self.experiments.GetExperiment, experiments_pb2.GetExperimentRequest(name=name),
                           timeout_s, True, None)

    def list_experiments(self, timeout_s: float | None = None) -> list[experiments_pb2.Experiment]:
        return list(self._unary(self.experiments.ListExperiments, experiments_pb2.ListExperimentsRequest(),
                                timeout_s, True, None).experiments)

    # --- diagnostics -------------------------------------------------------------------------------------
    def ping(self, payload: bytes = b"", timeout_s: float | None = None) -> diagnostics_pb2.PingResponse:
        """An RPC that does no work: the server's per-call floor."""
        return self._unary(self.diagnostics.Ping, diagnostics_pb2.PingRequest(payload=payload), timeout_s, True, None)

    def ping_stream(self, requests: Iterable[diagnostics_pb2.PingRequest], timeout_s: float | None = None):
        return self.diagnostics.PingStream(iter(requests), timeout=self._timeout(timeout_s))
