"""TLS for the gRPC port: a server certificate and key, and optionally a client CA for mutual TLS.

Configured by file paths only (`--tls-cert`, `--tls-key`, `--tls-client-ca`, or env STREAMREC_TLS_CERT,
STREAMREC_TLS_KEY, STREAMREC_TLS_CLIENT_CA), never by PEM text on the command line, where other users
could read it from the process list and shells keep it in their history.

    cert       PEM certificate chain of the server (leaf first); its SAN must match the name clients dial
    key        PEM private key of that certificate; should be readable by the server's user only
    client_ca  PEM bundle of the CA(s) that sign client certificates. When given, every client must
               present a certificate signed by one of them (mutual TLS); the handshake fails otherwise.

The files are read once at start: a renewed certificate takes effect on restart (the server drains in
flight calls on SIGTERM, see StreamrecServer.serve_forever).
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    pass


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def tls_files(cert: str | os.PathLike | None, key: str | os.PathLike | None,
              client_ca: str | os.PathLike | None = None) -> TlsFiles | None:
    """The TLS settings, None when TLS is off; a cert without a key (or the reverse) is an error."""
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsConfigError("a client CA (mutual TLS) needs a server certificate and key too (--tls-cert, --tls-key)")
        return None
    if cert is None or key is None:
        raise TlsConfigError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
    return TlsFiles(Path(cert), Path(key), None if client_ca is None else Path(client_ca))


def _read_pem(path: Path, what: str, marker: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TlsConfigError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    if b"-----BEGIN" not in data or marker.encode() not in data:
        raise TlsConfigError(f"the {what} {path} is not PEM ({marker} block expected)")
    return data


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the TLS private key %s is accessible to other users (mode %o); chmod 600 it", path, mode & 0o777)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """grpc server credentials for `files`; raises TlsConfigError naming the file at fault."""
    cert = _read_pem(files.cert, "TLS certificate", "CERTIFICATE")
    key = _read_pem(files.key, "TLS private key", "PRIVATE KEY")
    _warn_if_readable_by_others(files.key)
    client_ca = _read_pem(files.client_ca, "client CA bundle", "CERTIFICATE") if files.client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)
