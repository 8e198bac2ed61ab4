"""A replica's writes go to the primary: the same call, forwarded over one local channel with the caller's
metadata (its bearer token, so the primary authorises it again) and what is left of its deadline. The primary's
status comes back unchanged, so a client cannot tell which process it reached; while the primary is down,
writes get UNAVAILABLE, which clients retry.

Why forward instead of telling the client where to go: SO_REUSEPORT hands each connection to any process on
the shared port, so a client must be able to write through whichever one it reached.
"""
from __future__ import annotations

import grpc

from streamrec.server.tls import TlsFiles
from streamrec.v1 import catalog_pb2_grpc, events_pb2_grpc, experiments_pb2_grpc

_HOP_HEADERS = ("grpc-", ":")  # set by each hop's transport, not by the caller


def primary_channel(target: str, tls: TlsFiles | None, max_message_bytes: int = 16 << 20) -> grpc.Channel:
    """A channel to the primary, with this server's TLS settings."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    # The primary serves the same certificate; with mutual TLS this process presents it as its client identity,
    # which the primary accepts when one CA signs both (the usual internal set-up).
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.cert.read_bytes(),
        private_key=tls.key.read_bytes() if tls.mutual else None,
        certificate_chain=tls.cert.read_bytes() if tls.mutual else None)
    return grpc.secure_channel(target, credentials, options=options)


class PrimaryForwarder:
    def __init__(self, target: str, tls: TlsFiles | None = None, max_message_bytes: int = 16 << 20):
        self.target = target
        self._channel = primary_channel(target, tls, max_message_bytes)
        self.events = events_pb2_grpc.EventServiceStub(self._channel)
        self.catalog = catalog_pb2_grpc.CatalogServiceStub(self._channel)
        self.experiments = experiments_pb2_grpc.ExperimentServiceStub(self._channel)

    def unary(self, method, request, context):
        """method: a stub's callable, e.g. self.catalog.UpsertItems. The primary's status is raised as a
        grpc.RpcError, which the servicer's error mapping (errors.py) passes on unchanged."""
        return method(request, timeout=_time_left(context), metadata=_caller_metadata(context))

    def stream(self, method, request_iterator, context):
        call = method(request_iterator, timeout=_time_left(context), metadata=_caller_metadata(context))
        context.add_callback(call.cancel)  # the caller went away: end the call to the primary too
        yield from call

    def close(self) -> None:
        self._channel.close()


def _time_left(context) -> float | None:
    """The caller's remaining deadline; None when it set none (grpcio then reports about 9.2e18 seconds, which
    as a timeout fails the forwarded call at once)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e9 else None


def _caller_metadata(context) -> list[tuple[str, str | bytes]]:
    return [(key, value) for key, value in context.invocation_metadata() if not key.startswith(_HOP_HEADERS)
            and key != "user-agent"]
