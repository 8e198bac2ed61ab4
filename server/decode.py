"""Requests that do not parse.

gRPC turns a request its deserializer cannot parse (invalid UTF-8 in a string field, which proto3 forbids, or bytes
that are not the message at all) into INTERNAL "Exception deserializing request!". That is the client's fault, so
RequestDecodeInterceptor makes it INVALID_ARGUMENT naming the field.
"""
from __future__ import annotations

import grpc


class Undecodable:
    """Stands in for a request that did not parse; `problem` is the status message ("field: reason")."""

    __slots__ = ("problem",)

    def __init__(self, problem: str):
        self.problem = problem


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _bad_utf8_path(descriptor, data: bytes, depth: int = 0) -> str | None:
    """Path ("events[2].user_id") of the first string field whose bytes are not UTF-8, or None."""
    if depth > 32:
        return None
    seen: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            chunk, pos = data[pos:pos + length], pos + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            index = seen[number] = seen.get(number, -1) + 1
            name = f"{field.name}[{index}]" if field.is_repeated else field.name
            if field.type == field.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == field.TYPE_MESSAGE:
                inner = _bad_utf8_path(field.message_type, chunk, depth + 1)
                if inner:
                    return f"{name}.{inner}"
        else:
            return None  # groups or garbage: no field to name
    return None


def undecodable_problem(descriptor, data: bytes) -> str:
    try:
        path = _bad_utf8_path(descriptor, data) if descriptor is not None else None
    except (IndexError, ValueError):
        path = None
    if path:
        return f"{path}: is not valid UTF-8"
    name = descriptor.full_name if descriptor is not None else "request"
    return f"request: the bytes are not a valid {name} message"


def lenient_deserializer(deserializer):
    """`deserializer` (a generated Message.FromString), returning Undecodable instead of raising."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError, or whatever a custom deserializer raises
            return Undecodable(undecodable_problem(descriptor, data))

    return deserialize


def _checked_unary(behavior):
    def handler(request, context):
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
        return behavior(request, context)
    return handler


def _checked_stream(behavior):
    def handler(request_iterator, context):
        def requests():
            for request in request_iterator:
                if isinstance(request, Undecodable):
                    # Ends the request stream (as a half-close would): what came before is still
                    # answered, then the call ends with this status.
                    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                    context.set_details(request.problem)
                    return
                yield request
        return behavior(requests(), context)
    return handler


class RequestDecodeInterceptor(grpc.ServerInterceptor):
    """Requests that do not parse fail with INVALID_ARGUMENT naming the field, not INTERNAL."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        handler = handler._replace(request_deserializer=lenient_deserializer(handler.request_deserializer))
        if handler.unary_unary:
            return handler._replace(unary_unary=_checked_unary(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_checked_unary(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=_checked_stream(handler.stream_unary))
        return handler._replace(stream_stream=_checked_stream(handler.stream_stream))
