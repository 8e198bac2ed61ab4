"""gRPC servicers: translate messages, delegate to the engine, translate back. No business logic."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from contextlib import closing

import grpc

from streamrec.engine import Engine
from streamrec.engine.api import IngestResult, Rejection
from streamrec.engine.errors import EngineError, InvalidArgument, Unavailable
from streamrec.server import convert
from streamrec.server.errors import status_of, streaming, unary
from streamrec.server.forward import PrimaryForwarder
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
    """The engine once it has loaded and recovered; until then every call gets UNAVAILABLE. On a replica,
    `primary` forwards the write RPCs (forward.py); on the primary it is None."""

    def __init__(self, primary: PrimaryForwarder | None = None) -> None:
        self._engine: Engine | None = None
        self.primary = primary

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


def _done(result=None, error: BaseException | None = None) -> Future:
    future: Future = Future()
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
    return future


def _read_ahead(request_iterator, submit, thread_name: str):
    """Reads a stream on its own thread and submits each request as it arrives, so several requests of one stream
    share a group commit or a kernel batch; yields (number, request, started, pending future) in request order.
    At most MAX_INFLIGHT_BATCHES wait for their answer; closing the generator releases the reader."""
    inflight = _Handoff(MAX_INFLIGHT_BATCHES)

    def read() -> None:
        try:
            for number, request in enumerate(request_iterator):
                if inflight.closed:
                    return
                started = time.perf_counter()
                try:
                    pending = submit(request)
                except EngineError as error:  # answered in its turn; the stream goes on
                    pending = _done(error=error)
                if not inflight.put((number, request, started, pending)):
                    return
        except grpc.RpcError:
            pass  # the client went away; what was submitted still completes
        finally:
            inflight.put(None)

    threading.Thread(target=read, name=thread_name, daemon=True).start()
    try:
        while (entry := inflight.get()) is not None:
            yield entry
    finally:
        inflight.close()


class EventServicer(events_pb2_grpc.EventServiceServicer):
    def __init__(self, holder: EngineHolder):
        self.holder = holder

    @unary
    def PublishEvents(self, request, context):
        if primary := self.holder.primary:
            return primary.unary(primary.events.PublishEvents, request, context)
        engine = self.holder.get()
        return convert.ack_from(request.batch_id, engine.ingest(convert.events_from(request)), engine.log_id)

    @streaming
    def StreamEvents(self, request_iterator, context):
        if primary := self.holder.primary:
            yield from primary.stream(primary.events.StreamEvents, request_iterator, context)
            return
        engine = self.holder.get()

        def submit(batch) -> Future:
            try:
                return engine.ingest_async(convert.events_from(batch))
            except InvalidArgument as error:  # a batch-level problem fails this batch only
                return _done(_batch_rejected(error))

        with closing(_read_ahead(request_iterator, submit, "stream-events-reader")) as entries:
            for number, batch, _, pending in entries:
                yield convert.ack_from(batch.batch_id or str(number), pending.result(), engine.log_id)


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
        engine.wait_applied(request.min_seq, log_id=request.log_id)
        result = engine.recommend([engine.build_query(**convert.query_fields(request))], _deadline(context))[0]
        return convert.recommend_response(engine.served_by(), result, _micros_since(started))

    @unary
    def RecommendBatch(self, request, context):
        started = time.perf_counter()
        engine = self.holder.get()
        if len(request.requests) > engine.limits.max_requests_per_batch:
            raise InvalidArgument("requests", f"at most {engine.limits.max_requests_per_batch} per batch, got {len(request.requests)}")
        engine.wait_applied(max([request.min_seq, *(item.min_seq for item in request.requests)]),
                            log_id=request.log_id or next((item.log_id for item in request.requests if item.log_id), ""))
        queries = []
        for index, item in enumerate(request.requests):
            try:
                queries.append(engine.build_query(**convert.query_fields(item)))
            except EngineError as error:
                raise type(error)(f"requests[{index}].{error.field}", error.message) from None
        results = engine.recommend(queries, _deadline(context)) if queries else []
        latency, served_by = _micros_since(started), engine.served_by()
        return recommend_pb2.RecommendBatchResponse(
            responses=[convert.recommend_response(served_by, r, latency) for r in results])

    @streaming
    def RecommendStream(self, request_iterator, context):
        engine = self.holder.get()

        def submit(request) -> Future:
            engine.wait_applied(request.min_seq, log_id=request.log_id)  # on the reader thread: later ones wait too
            return engine.recommend_async(engine.build_query(**convert.query_fields(request)))

        with closing(_read_ahead(request_iterator, submit, "recommend-stream-reader")) as entries:
            for _, request, started, pending in entries:
                try:
                    yield convert.recommend_response(engine.served_by(), pending.result(), _micros_since(started))
                except EngineError as error:  # one bad request does not end the stream
                    code, message = status_of(error)
                    yield recommend_pb2.RecommendResponse(
                        request_id=request.request_id, user_id=request.user_id,
                        error=recommend_pb2.Status(code=code.value[0], message=message))

    @unary
    def SimilarItems(self, request, context):
        started = time.perf_counter()
        engine = self.holder.get()
        engine.wait_applied(request.min_seq, log_id=request.log_id)
        result = engine.similar_items(request.item_id, request.k if request.HasField("k") else None,
                                      request.include_categories, request.exclude_categories, request.request_id)
        return convert.similar_items_response(engine.served_by(), result, request.item_id, _micros_since(started))


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, holder: EngineHolder):
        self.holder = holder

    @unary
    def UpsertItems(self, request, context):
        if primary := self.holder.primary:
            return primary.unary(primary.catalog.UpsertItems, request, context)
        engine = self.holder.get()
        result = engine.upsert_items([convert.item_spec_from(i) for i in request.items])
        return catalog_pb2.UpsertItemsResponse(created=result.created, updated=result.updated,
                                               durable_seq=result.durable_seq, log_id=engine.log_id)

    @unary
    def DeleteItems(self, request, context):
        if primary := self.holder.primary:
            return primary.unary(primary.catalog.DeleteItems, request, context)
        engine = self.holder.get()
        result = engine.delete_items(list(request.item_ids))
        return catalog_pb2.DeleteItemsResponse(deleted=result.deleted, not_found=result.not_found,
                                               durable_seq=result.durable_seq, log_id=engine.log_id)

    @unary
    def GetItem(self, request, context):
        engine = self.holder.get()
        engine.wait_applied(request.min_seq, log_id=request.log_id)
        return convert.item_message(engine.get_item(request.item_id), request.include_embedding)

    @unary
    def GetUser(self, request, context):
        engine = self.holder.get()
        engine.wait_applied(request.min_seq, log_id=request.log_id)
        return convert.user_message(engine.get_user(request.user_id, request.history_limit or 20),
                                    request.include_embedding)

    @unary
    def ForgetUser(self, request, context):
        if primary := self.holder.primary:
            return primary.unary(primary.catalog.ForgetUser, request, context)
        engine = self.holder.get()
        result = engine.forget_user(request.user_id)
        return catalog_pb2.ForgetUserResponse(events_erased=result.events_erased, durable_seq=result.durable_seq,
                                              log_id=engine.log_id)

    @unary
    def Stats(self, request, context):
        engine = self.holder.get()
        engine.wait_applied(request.min_seq, log_id=request.log_id)
        return convert.stats_message(engine.stats(), engine.limits)

    @unary
    def LoadReranker(self, request, context):
        if primary := self.holder.primary:
            return primary.unary(primary.catalog.LoadReranker, request, context)
        engine = self.holder.get()
        return convert.reranker_info(engine.unload_reranker() if request.unload else engine.load_reranker(request.path or None))


class DiagnosticsServicer(diagnostics_pb2_grpc.DiagnosticsServiceServicer):
    """No engine work at all: the cost of the RPC machinery alone."""

    def Ping(self, request, context):
        return diagnostics_pb2.PingResponse(id=request.id, payload=request.payload)

    def PingStream(self, request_iterator, context):
        for request in request_iterator:
            yield diagnostics_pb2.PingResponse(id=request.id, payload=request.payload)
