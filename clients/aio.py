"""asyncio twin of StreamrecClient (grpc.aio): the same methods, awaited; streams are async iterators.

Retries, deadlines, TLS and the auth token behave as in `streamrec.clients.client` (see its docstring).

    async with AsyncStreamrecClient("127.0.0.1:50051", token="...") as client:
        response = await client.recommend("u1", k=10)
        async for r in client.recommend_stream(requests):
            ...
        result = await client.send_events(events, batch_size=100)          # waits for every ack
        handle = await client.send_events(events, wait_for_acks=False)     # returns once sent
        result = await handle.result()
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamrec.clients.channel import auth_metadata, channel_credentials, channel_options, uses_tls
from streamrec.clients.client import StreamrecClient, StreamResult
from streamrec.clients.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy, _backoff_or_raise, _remaining
from streamrec.clients.session import Session
from streamrec.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    experiments_pb2,
    experiments_pb2_grpc,
    recommend_pb2,
    recommend_pb2_grpc,
)

T = TypeVar("T")


async def call_with_retry_async(attempt_fn: Callable[[float | None], Awaitable[T]], policy: RetryPolicy,
                                deadline: float | None) -> T:
    """The asyncio form of `retry.call_with_retry`."""
    for attempt in itertools.count(1):
        try:
            return await attempt_fn(_remaining(deadline))
        except grpc.RpcError as error:
            delay = _backoff_or_raise(policy, error, attempt, deadline)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


# --- metadata interceptors (grpc.aio files an interceptor under one kind only, hence four) -------------------

class _AioMetadata:
    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self.metadata = tuple(metadata)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return details._replace(metadata=metadata)


class _UnaryUnaryMetadata(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamMetadata(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryMetadata(_AioMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamMetadata(_AioMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def metadata_interceptors(metadata: Sequence[tuple[str, str]]) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding `metadata` to every call of a grpc.aio channel ([] when there is none)."""
    if not metadata:
        return []
    return [kind(metadata) for kind in (_UnaryUnaryMetadata, _UnaryStreamMetadata, _StreamUnaryMetadata, _StreamStreamMetadata)]


def make_aio_channel(address: str, *, tls: bool = False, root_certificates=None, certificate_chain=None, private_key=None,
                     server_name: str | None = None, options: Sequence[tuple[str, object]] = (),
                     metadata: Sequence[tuple[str, str]] = ()) -> grpc.aio.Channel:
    opts = channel_options(options, server_name)
    interceptors = metadata_interceptors(metadata) or None
    if uses_tls(tls, root_certificates, certificate_chain, private_key):
        credentials = channel_credentials(root_certificates, certificate_chain, private_key)
        return grpc.aio.secure_channel(address, credentials, opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, opts, interceptors=interceptors)


# --- the event stream with flow control -------------------------------------------------------------------

async def _drain(requests: asyncio.Queue) -> AsyncIterator[events_pb2.EventBatch]:
    while (batch := await requests.get()) is not None:
        yield batch


async def _aiter(events: Iterable | AsyncIterable) -> AsyncIterator:
    if hasattr(events, "__aiter__"):
        async for event in events:
            yield event
    else:
        for event in events:
            yield event


async def async_event_batches(events: Iterable | AsyncIterable, batch_size: int) -> AsyncIterator[events_pb2.EventBatch]:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    chunk: list = []
    number = 0
    async for event in _aiter(events):
        chunk.append(event)
        if len(chunk) == batch_size:
            yield events_pb2.EventBatch(batch_id=str(number), events=chunk)
            chunk, number = [], number + 1
    if chunk:
        yield events_pb2.EventBatch(batch_id=str(number), events=chunk)


def _cancelled_error() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), "cancelled by the client")


class AsyncEventStream:
    """asyncio form of `client.EventStream`: `await send(batch)` waits while `max_inflight` batches are
    unacked; a task reads the acks; a retryable failure reopens the stream and resends the unacked batches."""

    def __init__(self, method, max_inflight: int, policy: RetryPolicy, deadline: float | None,
                 session: Session | None = None):
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self._method, self._max_inflight, self._policy, self._deadline = method, max_inflight, policy, deadline
        self._cond = asyncio.Condition()
        self._pending: collections.deque[tuple[events_pb2.EventBatch, float]] = collections.deque()
        self._requests: asyncio.Queue | None = None
        self._call = None
        self._closed = False
        self._cancelled = False
        self._error: BaseException | None = None
        self._finished = asyncio.Event()
        self._result = StreamResult(0, 0, 0, [], 0, session=session)
        self._reader: asyncio.Task | None = None
        self.sent = 0

    def _open(self) -> None:
        requests: asyncio.Queue = asyncio.Queue()
        for batch, _ in self._pending:
            requests.put_nowait(batch)
        if self._closed:
            requests.put_nowait(None)
        self._requests = requests
        self._call = self._method(_drain(requests), timeout=_remaining(self._deadline))

    async def start(self) -> "AsyncEventStream":
        self._open()
        self._reader = asyncio.create_task(self._read_acks())
        return self

    async def send(self, batch: events_pb2.EventBatch) -> None:
        async with self._cond:
            if self._closed:
                raise RuntimeError("send after close_sending")
            await self._cond.wait_for(lambda: len(self._pending) < self._max_inflight or self._finished.is_set())
            if self._error is not None:
                raise self._error
            if self._finished.is_set():
                raise RuntimeError("the event stream has ended")
            self._pending.append((batch, time.perf_counter()))
            self._requests.put_nowait(batch)
            self.sent += 1

    def close_sending(self) -> None:
        if not self._closed:
            self._closed = True
            self._requests.put_nowait(None)

    def cancel(self) -> None:
        self._cancelled = True
        if hasattr(self._call, "cancel"):
            self._call.cancel()

    async def _finish(self, error: BaseException | None) -> None:
        async with self._cond:
            self._error = error
            self._requests.put_nowait(None)
            self._finished.set()
            self._cond.notify_all()

    async def _read_acks(self) -> None:
        attempt = 1
        while True:
            try:
                async for ack in self._call:
                    async with self._cond:
                        if not self._pending:
                            raise RuntimeError(f"ack for batch {ack.batch_id!r} that was never sent")
                        batch, sent_at = self._pending.popleft()
                        if ack.batch_id != batch.batch_id:
                            raise RuntimeError(f"ack for batch {ack.batch_id!r}, expected {batch.batch_id!r}")
                        self._result.add(ack, time.perf_counter() - sent_at)
                        attempt = 1
                        self._cond.notify_all()
                unacked = len(self._pending)
                await self._finish(None if not unacked else RuntimeError(f"the stream ended with {unacked} batch(es) unacked"))
                return
            except asyncio.CancelledError:
                # grpc.aio raises this when the call is cancelled (cancel()), or the task itself was cancelled.
                await self._finish(_cancelled_error())
                if not self._cancelled:
                    raise
                return
            except grpc.RpcError as error:
                if self._cancelled:
                    await self._finish(error)
                    return
                try:
                    delay = _backoff_or_raise(self._policy, error, attempt, self._deadline)
                except BaseException as final:  # noqa: BLE001 - reported through result()
                    await self._finish(final)
                    return
                await asyncio.sleep(delay)
                attempt += 1
                async with self._cond:
                    self._requests.put_nowait(None)
                    self._result.retries += 1
                    self._open()
            except BaseException as error:  # noqa: BLE001
                self.cancel()
                await self._finish(error)
                return

    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def unacked(self) -> int:
        return len(self._pending)

    async def result(self, timeout: float | None = None) -> StreamResult:
        try:
            await asyncio.wait_for(self._finished.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"acks still pending after {timeout} s") from None
        if self._error is not None:
            raise self._error
        return self._result


# --- the client ---------------------------------------------------------------------------------------------

class AsyncStreamrecClient:
    """The asyncio client: create it inside a running event loop (grpc.aio channels belong to one loop)."""

    recommend_request = staticmethod(StreamrecClient.recommend_request)

    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float | None = 10.0, channel: grpc.aio.Channel | None = None,
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
        self.session = Session(consistency)  # as in StreamrecClient (session.py)
        self.metadata = auth_metadata(token, metadata)
        if channel is not None and self.metadata:
            raise ValueError("grpc.aio interceptors are set when a channel is made: pass token/metadata or a channel, not both")
        self.channel = channel or make_aio_channel(
            address, tls=tls, root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, server_name=server_name, options=options, metadata=self.metadata)
        self.events = events_pb2_grpc.EventServiceStub(self.channel)
        self.recommender = recommend_pb2_grpc.RecommendServiceStub(self.channel)
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(self.channel)
        self.experiments = experiments_pb2_grpc.ExperimentServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncStreamrecClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def _policy(self, idempotent: bool, retry: bool | None) -> RetryPolicy:
        wanted = (idempotent or self.retry_non_idempotent) if retry is None else retry
        return self.retry_policy if wanted else NO_RETRY

    def _deadline(self, timeout_s: float | None) -> float | None:
        timeout = self._timeout(timeout_s)
        return None if timeout is None else time.monotonic() + timeout

    async def _unary(self, method, request, timeout_s: float | None, idempotent: bool, retry: bool | None = None):
        request = self.session.stamp(request)
        return self.session.observe(await call_with_retry_async(lambda remaining: method(request, timeout=remaining),
                                                                self._policy(idempotent, retry),
                                                                self._deadline(timeout_s)))

    # --- health ----------------------------------------------------------------------------------
    async def health(self, service: str = "", timeout_s: float | None = None, retry: bool | None = None) -> str:
        response = await self._unary(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service), timeout_s, True, retry)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_until_serving(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if await self.health(timeout_s=2.0, retry=False) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.address} not SERVING after {timeout_s} s")
            await asyncio.sleep(0.1)

    # --- recommendations ----------------------------------------------------------------------------
    async def recommend(self, user_id: str, k: int | None = None, timeout_s: float | None = None, retry: bool | None = None,
                        **filters) -> recommend_pb2.RecommendResponse:
        return await self._unary(self.recommender.Recommend, self.recommend_request(user_id, k, **filters), timeout_s, True, retry)

    async def recommend_batch(self, requests: Sequence[recommend_pb2.RecommendRequest], timeout_s: float | None = None,
                              retry: bool | None = None) -> list[recommend_pb2.RecommendResponse]:
        response = await self._unary(self.recommender.RecommendBatch, recommend_pb2.RecommendBatchRequest(requests=requests),
                                     timeout_s, True, retry)
        return list(response.responses)

    def recommend_stream(self, requests: Iterable[recommend_pb2.RecommendRequest] | AsyncIterable[recommend_pb2.RecommendRequest],
                         timeout_s: float | None = None) -> AsyncIterator[recommend_pb2.RecommendResponse]:
        """An async iterator of responses (matched by request_id; order may differ). Not retried."""
        return self._observed(self.recommender.RecommendStream(self._stamped(requests), timeout=self._timeout(timeout_s)))

    async def _stamped(self, requests) -> AsyncIterator[recommend_pb2.RecommendRequest]:
        async for request in _aiter(requests):
            yield self.session.stamp(request)

    async def _observed(self, responses) -> AsyncIterator[recommend_pb2.RecommendResponse]:
        async for response in responses:
            yield self.session.observe(response)

    async def similar_items(self, item_id: str, k: int | None = None, timeout_s: float | None = None,
                            retry: bool | None = None) -> recommend_pb2.SimilarItemsResponse:
        request = recommend_pb2.SimilarItemsRequest(item_id=item_id)
        if k is not None:
            request.k = k
        return await self._unary(self.recommender.SimilarItems, request, timeout_s, True, retry)

    # --- events ----------------------------------------------------------------------------------------
    async def publish(self, events: Sequence[events_pb2.Event], batch_id: str = "", timeout_s: float | None = None,
                      retry: bool | None = None) -> events_pb2.EventAck:
        return await self._unary(self.events.PublishEvents, events_pb2.EventBatch(batch_id=batch_id, events=events),
                                 timeout_s, True, retry)

    async def send_events(self, events: Iterable[events_pb2.Event] | AsyncIterable[events_pb2.Event], batch_size: int = 100,
                          timeout_s: float | None = None, *, max_inflight: int = 16, wait_for_acks: bool = True,
                          retry: bool | None = None) -> StreamResult | AsyncEventStream:
        """As `StreamrecClient.send_events`; `events` may be an async iterable. With wait_for_acks=False the
        AsyncEventStream handle comes back once the last batch is queued: `await handle.result()`."""
        stream = await AsyncEventStream(self.events.StreamEvents, max_inflight, self._policy(True, retry),
                                        self._deadline(timeout_s), self.session).start()
        try:
            async for batch in async_event_batches(events, batch_size):
                await stream.send(batch)
        except BaseException:
            stream.cancel()
            raise
        stream.close_sending()
        return await stream.result() if wait_for_acks else stream

    # --- catalog / admin -------------------------------------------------------------------------------
    async def upsert_items(self, items: Sequence[catalog_pb2.Item], timeout_s: float | None = None,
                           retry: bool | None = None) -> catalog_pb2.UpsertItemsResponse:
        return await self._unary(self.catalog.UpsertItems, catalog_pb2.UpsertItemsRequest(items=items), timeout_s, False, retry)

    async def delete_items(self, item_ids: Sequence[str], timeout_s: float | None = None,
                           retry: bool | None = None) -> catalog_pb2.DeleteItemsResponse:
        return await self._unary(self.catalog.DeleteItems, catalog_pb2.DeleteItemsRequest(item_ids=item_ids), timeout_s, False, retry)

    async def get_item(self, item_id: str, include_embedding: bool = False, timeout_s: float | None = None,
                       retry: bool | None = None) -> catalog_pb2.Item:
        request = catalog_pb2.GetItemRequest(item_id=item_id, include_embedding=include_embedding)
        return await self._unary(self.catalog.GetItem, request, timeout_s, True, retry)

    async def get_user(self, user_id: str, include_embedding: bool = False, history_limit: int = 0,
                       timeout_s: float | None = None, retry: bool | None = None) -> catalog_pb2.User:
        request = catalog_pb2.GetUserRequest(user_id=user_id, include_embedding=include_embedding, history_limit=history_limit)
        return await self._unary(self.catalog.GetUser, request, timeout_s, True, retry)

    async def forget_user(self, user_id: str, timeout_s: float | None = None, retry: bool | None = None) -> catalog_pb2.ForgetUserResponse:
        return await self._unary(self.catalog.ForgetUser, catalog_pb2.ForgetUserRequest(user_id=user_id), timeout_s, False, retry)

    async def stats(self, timeout_s: float | None = None, retry: bool | None = None) -> catalog_pb2.StatsResponse:
        return await self._unary(self.catalog.Stats, catalog_pb2.StatsRequest(), timeout_s, True, retry)

    async def load_reranker(self, path: str = "", unload: bool = False, timeout_s: float | None = None,
                            retry: bool | None = None) -> catalog_pb2.RerankerInfo:
        request = catalog_pb2.LoadRerankerRequest(path=path, unload=unload)
        return await self._unary(self.catalog.LoadReranker, request, timeout_s, True, retry)

    # --- experiments (admin; StreamrecClient's, awaited) ------------------------------------------------
    async def create_experiment(self, name: str, arms, description: str = "",
                                timeout_s: float | None = None) -> experiments_pb2.Experiment:
        request = StreamrecClient.experiment_request(name, arms, description)
        return await self._unary(self.experiments.CreateExperiment, request, timeout_s, False, False)

    async def stop_experiment(self, name: str, timeout_s: float | None = None) -> experiments_pb2.Experiment:
        return await self._unary(self.experiments.StopExperiment, experiments_pb2.StopExperimentRequest(name=name),
                                 timeout_s, True, None)

    async def get_experiment(self, name: str, timeout_s: float | None = None) -> experiments_pb2.Experiment:
        return await self._unary(self.experiments.GetExperiment, experiments_pb2.GetExperimentRequest(name=name),
                                 timeout_s, True, None)

    async def list_experiments(self, timeout_s: float | None = None) -> list[experiments_pb2.Experiment]:
        response = await self._unary(self.experiments.ListExperiments, experiments_pb2.ListExperimentsRequest(),
                                     timeout_s, True, None)
        return list(response.experiments)
