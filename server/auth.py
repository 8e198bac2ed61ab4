"""Bearer-token authentication with roles, as a gRPC server interceptor.

Roles (each includes the ones before it)
    reader  RecommendService (Recommend, RecommendBatch, RecommendStream, SimilarItems)
    writer  + EventService (PublishEvents, StreamEvents)
    admin   + CatalogService (UpsertItems, DeleteItems, GetItem, GetUser, ForgetUser, Stats, LoadReranker)
            + ExperimentService (CreateExperiment, StopExperiment, GetExperiment, ListExperiments)
            and any RPC of a service this module does not know (a future admin RPC is closed by default)

    The role of each service comes from the proto descriptors (SERVICE_ROLES); METHOD_ROLES can give a
    single method another role. Health checking and reflection stay open (OPEN_SERVICES): load
    balancers and orchestrators probe health without credentials, and grpcurl / Postman discover the
    API through reflection before anyone has typed a token; neither reveals data. A method no service
    registers is passed through, so it gets UNIMPLEMENTED (reflection lists the methods anyway).

The call
    Every call sends the metadata `authorization: Bearer <token>`. Missing, malformed (not `Bearer` plus
    one token) or unknown tokens get UNAUTHENTICATED; a known token whose role is too low gets
    PERMISSION_DENIED. Messages say what is wrong and never echo the token.

The tokens file (`--tokens-file`, env STREAMREC_TOKENS_FILE)
    One token a line: `ROLE SHA256HEX [NAME]`, e.g. `writer 9f86d08...0f00a08 ingest-job`; `#` starts a
    comment, blank lines are skipped. NAME (optional, no spaces) appears in logs and PERMISSION_DENIED
    messages, so an operator can tell tokens apart and revoke one. Only the SHA-256 of each token is
    stored, so a leaked file (or backup) grants nothing. No salt and no slow KDF: tokens are 256 random
    bits (secrets.token_urlsafe(32), see `streamrec token new`), not passwords; salts and stretching
    defend low-entropy secrets against dictionaries and precomputed tables, and against 2**256
    candidates neither helps, while a KDF would cost milliseconds on every RPC. A presented token is
    hashed and compared with every entry by hmac.compare_digest, without stopping at a match, so the
    time taken does not depend on which entry (if any) matched.

Rotation without restart
    The file is stat'ed at most once a second (TokenTable.refresh_interval_s); when its mtime, size or
    inode changed it is re-read. A file that no longer parses (or has vanished) keeps the previous
    table and logs an error once per change: a half-written edit must neither lock everyone out nor
    open the server. Add the new token, roll it out to clients, then delete the old line.
    `streamrec token new` rewrites the file atomically (temp file + rename), so the server never reads
    a half-written line.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from streamrec.v1 import catalog_pb2, diagnostics_pb2, events_pb2, experiments_pb2, recommend_pb2, replication_pb2

log = logging.getLogger(__name__)

ROLES = ("reader", "writer", "admin")  # each includes the ones before it
_RANK = {role: rank for rank, role in enumerate(ROLES)}

SERVICE_ROLES: dict[str, str] = {
    recommend_pb2.DESCRIPTOR.services_by_name["RecommendService"].full_name: "reader",
    diagnostics_pb2.DESCRIPTOR.services_by_name["DiagnosticsService"].full_name: "reader",
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name: "writer",
    catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name: "admin",
    # Starts and stops A/B tests that change what every user is served.
    experiments_pb2.DESCRIPTOR.services_by_name["ExperimentService"].full_name: "admin",
    # The whole state and log, every user's events included: only for replicas, which hold an admin token.
    replication_pb2.DESCRIPTOR.services_by_name["ReplicationService"].full_name: "admin",
}
# Per-method exceptions to SERVICE_ROLES, keyed by full method name ("/package.Service/Method").
METHOD_ROLES: dict[str, str] = {
    # Loads a model file from the server's disk: admin, stated here so it stays admin if the service moves.
    "/streamrec.v1.CatalogService/LoadReranker": "admin",
}
DEFAULT_ROLE = "admin"  # services not listed above: closed unless someone decides otherwise
OPEN_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"})

_HASH = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9._@:/+-]{1,64}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """256 random bits, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def service_of(method: str) -> str:
    """'/streamrec.v1.EventService/PublishEvents' -> 'streamrec.v1.EventService'."""
    return method.lstrip("/").split("/", 1)[0]


def required_role(method: str) -> str | None:
    """The least role that may call `method` (a full method name), or None for open services."""
    if method in METHOD_ROLES:
        return METHOD_ROLES[method]
    service = service_of(method)
    if service in OPEN_SERVICES:
        return None
    return SERVICE_ROLES.get(service, DEFAULT_ROLE)


def role_allows(role: str, needed: str) -> bool:
    return _RANK[role] >= _RANK[needed]


# --- the tokens file ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenEntry:
    role: str
    digest: bytes  # the SHA-256 of the token, raw
    name: str


class TokensFileError(ValueError):
    pass


def parse_tokens(text: str, source: str = "tokens file") -> list[TokenEntry]:
    """Entries of a tokens file; raises TokensFileError naming the line (never printing a hash)."""
    entries: list[TokenEntry] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            raise TokensFileError(f"{source}:{number}: expected 'ROLE SHA256HEX [NAME]', got {len(parts)} fields")
        role, digest_hex = parts[0].lower(), parts[1].lower()
        name = parts[2] if len(parts) == 3 else f"line{number}"
        if role not in _RANK:
            raise TokensFileError(f"{source}:{number}: unknown role {parts[0]!r} (one of {', '.join(ROLES)})")
        if not _HASH.match(digest_hex):
            raise TokensFileError(f"{source}:{number}: the hash must be 64 hex digits (the SHA-256 of the token, "
                                  "not the token itself)")
        if not _NAME.match(name):
            raise TokensFileError(f"{source}:{number}: a name is 1..64 of A-Z a-z 0-9 . _ @ : / + -")
        digest = bytes.fromhex(digest_hex)
        if digest in seen:
            raise TokensFileError(f"{source}:{number}: the same token appears twice")
        seen.add(digest)
        entries.append(TokenEntry(role, digest, name))
    return entries


class TokenTable:
    """The tokens of a file, re-read when the file changes (checked at most every refresh_interval_s)."""

    def __init__(self, path: str | os.PathLike, refresh_interval_s: float = 1.0, clock=time.monotonic):
        self.path = Path(path)
        self.refresh_interval_s = refresh_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        signature = self._signature()
        if signature is None:
            raise TokensFileError(f"tokens file {self.path} does not exist (create one with `streamrec token new`)")
        try:
            text = self.path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise TokensFileError(f"cannot read the tokens file {self.path}: {error}") from None
        self._entries: tuple[TokenEntry, ...] = tuple(parse_tokens(text, str(self.path)))
        self._signature_seen = signature
        self._checked_at = clock()
        self.reloads = 0
        self._log_loaded()

    def _signature(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _log_loaded(self) -> None:
        counts = {role: sum(e.role == role for e in self._entries) for role in ROLES}
        log.info("loaded %d token(s) from %s (%s)", len(self._entries), self.path,
                 ", ".join(f"{n} {role}" for role, n in counts.items()))
        if not self._entries:
            log.warning("tokens file %s holds no tokens: every authenticated RPC is refused", self.path)

    def entries(self) -> tuple[TokenEntry, ...]:
        now = self._clock()
        if now - self._checked_at >= self.refresh_interval_s and self._lock.acquire(blocking=False):
            try:  # one thread checks; the others go on with the current table
                self._checked_at = now
                self._maybe_reload()
            finally:
                self._lock.release()
        return self._entries

    def reload_now(self) -> None:
        with self._lock:
            self._checked_at = self._clock()
            self._maybe_reload()

    def _maybe_reload(self) -> None:
        signature = self._signature()
        if signature == self._signature_seen:
            return
        self._signature_seen = signature  # a broken version is reported once, not every second
        if signature is None:
            log.error("tokens file %s has vanished; keeping the previous %d token(s)", self.path, len(self._entries))
            return
        try:
            entries = parse_tokens(self.path.read_text("utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, TokensFileError) as error:
            log.error("tokens file not reloaded, keeping the previous %d token(s): %s", len(self._entries), error)
            return
        self._entries = tuple(entries)
        self.reloads += 1
        self._log_loaded()

    def lookup(self, token: str) -> TokenEntry | None:
        """The entry of `token`, comparing its hash with every entry in constant time per entry."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for entry in self.entries():
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry
        return found


def add_token(path: str | os.PathLike, role: str, name: str | None = None) -> str:
    """Generate a token, append its hash to the tokens file (created 0600 if absent), return the token.
    The file is replaced atomically, so a server re-reading it never sees half a line."""
    role = role.lower()
    if role not in _RANK:
        raise TokensFileError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    path = Path(path)
    existing = path.read_text("utf-8") if path.exists() else ""
    names = {e.name for e in parse_tokens(existing, str(path))}  # refuses to add to a broken file
    if name is None:
        name = next(f"{role}-{n}" for n in range(1, 1 << 30) if f"{role}-{n}" not in names)
    elif not _NAME.match(name):
        raise TokensFileError("a name is 1..64 of A-Z a-z 0-9 . _ @ : / + -")
    elif name in names:
        raise TokensFileError(f"a token named {name!r} already exists (revoke it first)")
    token = new_token()
    if existing and not existing.endswith("\n"):
        existing += "\n"
    if not existing:
        existing = "# streamrec tokens: ROLE SHA256HEX [NAME]  (roles: reader < writer < admin)\n"
    _write_atomic(path, existing + f"{role} {hash_token(token)} {name}\n")
    return token


def revoke_token(path: str | os.PathLike, name: str) -> int:
    """Drop the lines of the token(s) named `name`; returns how many were dropped."""
    path = Path(path)
    text = path.read_text("utf-8")
    parse_tokens(text, str(path))
    kept, dropped = [], 0
    for raw in text.splitlines(keepends=True):
        parts = raw.split("#", 1)[0].split()
        if len(parts) == 3 and parts[2] == name:
            dropped += 1
        else:
            kept.append(raw)
    if dropped:
        _write_atomic(path, "".join(kept))
    return dropped


def _write_atomic(path: Path, text: str) -> None:
    mode = (path.stat().st_mode & 0o777) if path.exists() else 0o600
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


# --- the interceptor -------------------------------------------------------------------------------------

def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, str | None]:
    """(token, None) or (None, why the authorization metadata is unusable)."""
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if not values:
        return None, "missing authorization metadata: send 'authorization: Bearer <token>'"
    if len(values) > 1:
        return None, "malformed authorization metadata: sent more than once"
    value = values[0]
    if isinstance(value, bytes):
        return None, "malformed authorization metadata: expected 'Bearer <token>'"
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        return None, "malformed authorization metadata: expected 'Bearer <token>'"
    return token, None


def _rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails the call with `code` without running it."""

    def unary_response(_request, context):
        context.abort(code, details)

    def stream_response(_request, context):
        context.abort(code, details)
        yield  # pragma: no cover - makes this a generator, as stream handlers are

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response, **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream_response, **kwargs)


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every RPC against a TokenTable and the method's role.

    It sits after the MetricsInterceptor in the server's list (gRPC runs the first one outermost), so
    rejected calls are still counted, by code: a burst of UNAUTHENTICATED is worth an alert."""

    def __init__(self, tokens: TokenTable):
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        needed = required_role(method)
        if handler is None or needed is None:
            return handler
        token, problem = bearer_token(handler_call_details.invocation_metadata)
        if problem:
            return _rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem)
        entry = self.tokens.lookup(token)
        if entry is None:
            return _rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                      "invalid token: not in the server's tokens file (revoked or mistyped?)")
        if not role_allows(entry.role, needed):
            log.info("token %r (%s) refused for %s", entry.name, entry.role, method)
            return _rejecting_handler(handler, grpc.StatusCode.PERMISSION_DENIED,
                                      f"token {entry.name!r} has role {entry.role}; {method.lstrip('/')} needs {needed}")
        return handler
