"""Channels for the sync and the asyncio client: default options, TLS credentials, the auth metadata and
the interceptor that adds it to every call of a sync channel (see streamrec.clients.client's docstring)."""
from __future__ import annotations

import collections
import os
from typing import Sequence

import grpc

DEFAULT_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 16 << 20),  # the server's own limit
    ("grpc.max_send_message_length", 16 << 20),
    # Reconnect quickly after a server restart, so retries have a chance within a short deadline.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    return open(os.fspath(value), "rb").read()


def channel_credentials(root_certificates=None, certificate_chain=None, private_key=None) -> grpc.ChannelCredentials:
    """TLS credentials: root_certificates None = the system roots; chain + key = a client certificate (mTLS)."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("mTLS needs both certificate_chain and private_key")
    return grpc.ssl_channel_credentials(_pem(root_certificates), _pem(private_key), _pem(certificate_chain))


def uses_tls(tls: bool, root_certificates, certificate_chain, private_key) -> bool:
    return bool(tls or root_certificates is not None or certificate_chain is not None or private_key is not None)


def channel_options(options: Sequence[tuple[str, object]] = (), server_name: str | None = None) -> list[tuple[str, object]]:
    merged = dict(DEFAULT_CHANNEL_OPTIONS)
    if server_name:
        merged["grpc.ssl_target_name_override"] = server_name  # a certificate for another host name (tests)
    merged.update(options)
    return list(merged.items())


def auth_metadata(token: str | None, metadata: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    extra = tuple((str(k).lower(), str(v)) for k, v in metadata)
    return ((("authorization", f"Bearer {token}"),) if token else ()) + extra


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                          grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (e.g. `authorization: Bearer <token>`) to every call of a sync channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self.metadata = tuple(metadata)

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, tuple(details.metadata or ()) + self.metadata,
                            details.credentials, getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def make_channel(address: str, *, tls: bool = False, root_certificates=None, certificate_chain=None, private_key=None,
                 server_name: str | None = None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    opts = channel_options(options, server_name)
    if uses_tls(tls, root_certificates, certificate_chain, private_key):
        return grpc.secure_channel(address, channel_credentials(root_certificates, certificate_chain, private_key), opts)
    return grpc.insecure_channel(address, opts)
