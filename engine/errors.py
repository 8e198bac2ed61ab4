"""Engine exceptions. Each names the request field at fault; the server maps the class to a gRPC status."""
from __future__ import annotations


class EngineError(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class InvalidArgument(EngineError):
    pass


class NotFound(EngineError):
    pass


class ResourceExhausted(EngineError):
    pass


class Unavailable(EngineError):
    pass


class OutOfRange(EngineError):
    pass


class FailedPrecondition(EngineError):
    pass


class OtherLog(FailedPrecondition):
    """A replica asked to follow a log this primary does not serve (another primary's, or a restored backup's)."""


class DeadlineExceeded(Exception):
    """The caller's deadline passed while its request waited; the work was skipped."""
