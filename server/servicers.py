"""gRPC servicers: translate messages, delegate to the engine, translate back. No business logic."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import grpc

from streamrec.engine.api import IngestResult, Rejection
from streamrec.engine.engine import Engine
from streamrec.engine.errors import EngineError, InvalidArgument, Unavailable
from streamrec.server import convert
from streamrec.server.errors import status_of, streaming, unary
from streamrec.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    events_pb2_grpc,
    recommend_pb2,
    recommend_pb2_grpc,
)

# Batches one StreamEvents call may have queued for commit before the server stops reading from it:
# enough to fill group commits, few enough that a client that never reads acks cannot pile up memory.
MAX_INFLIGHT_BATCHES = 64


class EngineHolder:
    """The engine once it has loaded and recovered; until then every call gets UNAVAILABLE."""

    def __init__(self) -> None:
        self._engine: Engine | None = None

    def set(self, engine: Engine | None) -> None:
        self._engine = engine

    def get(self) -> Engine:
        if self._engine is None:
            raise Unavailable("", "the server is loading or recovering its data; retry shortly")
        return self._engine


class _Handoff:
    """Bounded queue from a stream's reader thread to its handler. When the handler ends (client gone,
    error), `close()` releases a reader blocked on a full queue, so no thread is left waiting forever."""

    def __init__(self, size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._done = threading.Event()

    def put(self, item) -> bool:
        while not self._done.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        return self._queue.get()

    def close(self) -> None:
        self._done.set()

    @property
    def closed(self) -> bool:
        return self._done.is_set()


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _micros_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1e6)


class EventServicer(events_pb2_grpc.EventServiceServicer):
    def __init__(self, holder: EngineHolder):
        self.holder = holder

    @unary
    def PublishEvents(self, request, context):
        engine = self.holder.get()
        return convert.ack_from(request.batch_id, engine.ingest(convert.events_from(request)))

    @streaming
    def StreamEvents(self, request_iterator, context):
        engine = self.holder.get()
        inflight = _Handoff(MAX_INFLIGHT_BATCHES)

        def read_batches() -> None:
            # Reading ahead lets several batches of this stream share one commit; acks stay in order.
            try:
                for number, batch in enumerate(request_iterator):
                    if inflight.closed:
                        return
                    batch_id = batch.batch_id or str(number)
                    try:
                        pending = engine.ingest_async(convert.events_from(batch))
                    except InvalidArgument as error:  # a batch-level problem fails this batch only
                        pending = Future()
                        pending.set_result(_batch_rejected(error))
                    except EngineError as error:
                        pending = Future()
                        pending.set_exception(error)
                    if not inflight.put((batch_id, pending)):
                        return
            except grpc.RpcError:
                pass  # the client went away; the writer still finishes what it accepted
            finally:
                inflight.put(None)

        threading.Thread(target=read_batches, name="stream-events-reader", daemon=True).start()
        try:
            while (entry := inflight.get()) is not None:
                batch_id, pending = entry
                yield convert.ack_from(batch_id, pending.result())
        finally:
            inflight.close()


def _batch_rejected(error: InvalidArgument) -> IngestResult:
    """A batch that fails as a whole (e.g. too many events) is one rejection naming the field."""
    return IngestResult(rejections=[Rejection(0, "", error.field, error.message)])


class RecommendServicer(recommend_pb2_grpc.RecommendServiceServicer):
    def __init__(self, holder: EngineHolder):
        self.holder = holder

    @unary
    def Recommend(self, request, context):
        started = time.perf_counter()
        engine = self.holder.get()
        result = engine.recommend([convert.query_from(engine, request)], _deadline(context))[0]
        return convert.recommend_response(engine, result, _micros_since(started))

    @unary
    def RecommendBatch(self, request, context):
        started = time.perf_counter()
        engine = self.holder.get()
        if len(request.requests) > engine.limits.max_requests_per_batch:
            raise InvalidArgument("requests", f"at most {engine.limits.max_requests_per_batch} per batch, got {len(request.requests)}")
        queries = []
        for index, item in enumerate(request.requests):
            try:
                queries.append(convert.query_from(engine, item))
            except EngineError as error:
                raise type(error)(f"requests[{index}].{error.field}", error.message) from None
        results = engine.recommend(queries, _deadline(context)) if queries else []
        latency = _micros_since(started)
        return recommend_pb2.RecommendBatchResponse(
            responses=[convert.recommend_response(engine, r, latency) for r in results])

    @streaming
    def RecommendStream(self, request_iterator, context):
        engine = self.holder.get()
        inflight = _Handoff(MAX_INFLIGHT_BATCHES)

        def read_requests() -> None:
            # Submitting ahead lets this stream's requests share kernel batches; answers keep request order.
            try:
                for request in request_iterator:
                    if inflight.closed:
                        return
                    started = time.perf_counter()
                    try:
                        pending = engine.recommend_async(convert.query_from(engine, request))
                    except EngineError as error:
                        pending = Future()
                        pending.set_exception(error)
                    if not inflight.put((request, started, pending)):
                        return
            except grpc.RpcError:
                pass
            finally:
                inflight.put(None)

        threading.Thread(target=read_requests, name="recommend-stream-reader", daemon=True).start()
        try:
            while (entry := inflight.get()) is not None:
                request, started, pending = entry
                try:
                    yield convert.recommend_response(engine, pending.result(), _micros_since(started))
                except EngineError as error:  # one bad request does not end the stream
                    code, message = status_of(error)
                    yield recommend_pb2.RecommendResponse(
                        request_id=request.request_id, user_id=request.user_id,
                        error=recommend_pb2.Status(code=code.value[0], message=message))
        finally:
            inflight.close()

    @unary
    def SimilarItems(self, request, context):
        started = time.perf_counter()
        engine = self.holder.get()
        query = engine.build_query(
            user_id=request.item_id, k=request.k if request.HasField("k") else None, exclude_seen=False,
            include_categories=request.include_categories, exclude_categories=request.exclude_categories,
            request_id=request.request_id, user_field="item_id",
        )
        result = engine.similar_items(query, request.item_id)
        return convert.similar_items_response(engine, result, request.item_id, _micros_since(started))


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, holder: EngineHolder):
        self.holder = holder

    @unary
    def UpsertItems(self, request, context):
        result = self.holder.get().upsert_items([convert.item_spec_from(i) for i in request.items])
        return catalog_pb2.UpsertItemsResponse(created=result.created, updated=result.updated, durable_seq=result.durable_seq)

    @unary
    def DeleteItems(self, request, context):
        result = self.holder.get().delete_items(list(request.item_ids))
        return catalog_pb2.DeleteItemsResponse(deleted=result.deleted, not_found=result.not_found, durable_seq=result.durable_seq)

    @unary
    def GetItem(self, request, context):
        return convert.item_message(self.holder.get().get_item(request.item_id), request.include_embedding)

    @unary
    def GetUser(self, request, context):
        view = self.holder.get().get_user(request.user_id, request.history_limit or 20)
        return convert.user_message(view, request.include_embedding)

    @unary
    def ForgetUser(self, request, context):
        return catalog_pb2.ForgetUserResponse(events_erased=self.holder.get().forget_user(request.user_id))

    @unary
    def Stats(self, request, context):
        return convert.stats_message(self.holder.get())

    @unary
    def LoadReranker(self, request, context):
        engine = self.holder.get()
        return convert.reranker_info(engine.unload_reranker() if request.unload else engine.load_reranker(request.path or None))


class DiagnosticsServicer(diagnostics_pb2_grpc.DiagnosticsServiceServicer):
    """No engine work at all: the cost of the RPC machinery alone."""

    def Ping(self, request, context):
        return diagnostics_pb2.PingResponse(id=request.id, payload=request.payload)

    def PingStream(self, request_iterator, context):
        for request in request_iterator:
            yield diagnostics_pb2.PingResponse(id=request.id, payload=request.payload)
