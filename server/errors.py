"""Maps engine exceptions to gRPC status codes, so every servicer fails the same way."""
from __future__ import annotations

import concurrent.futures
import functools
import logging

import grpc

from streamrec.engine.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    FailedPrecondition,
    OutOfRange,
    Unavailable,
)

log = logging.getLogger(__name__)

_CODES = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, EngineError):
        # The nearest mapped class, so subclasses (e.g. reranker.RerankerRejected) keep their base's code.
        code = next((_CODES[cls] for cls in type(error).__mro__ if cls in _CODES), grpc.StatusCode.INTERNAL)
        return code, str(error)
    if isinstance(error, grpc.RpcError) and isinstance(error, grpc.Call):  # a forwarded call's own status
        return error.code(), error.details() or ""
    if isinstance(error, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the request could be served"
    if isinstance(error, concurrent.futures.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the write was not committed in time; it may still be applied (resend with the same event_id)"
    log.exception("internal error", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"


def unary(method):
    """Run a unary handler, turning engine errors into a status on the call."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as error:  # noqa: BLE001 - every failure must reach the client as a status
            code, message = status_of(error)
            context.abort(code, message)

    return wrapper


def streaming(method):
    """The same for handlers that yield responses."""

    @functools.wraps(method)
    def wrapper(self, request_iterator, context):
        try:
            yield from method(self, request_iterator, context)
        except Exception as error:  # noqa: BLE001
            code, message = status_of(error)
            context.abort(code, message)

    return wrapper
