"""Security: bearer tokens with roles (auth.py), TLS and mutual TLS (tls.py), the tokens CLI, warnings.

Servers here are built directly (start_server in conftest takes engine options only), module-scoped,
with small data: the role matrix runs against a seeded synthetic catalog, the TLS servers start empty."""
from __future__ import annotations

import datetime
import importlib.util
import logging
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from streamrec.clients.client import StreamrecClient, make_event
from streamrec.clients.retry import NO_RETRY
from streamrec.engine.config import EngineConfig
from streamrec.server import auth
from streamrec.server.app import ServerConfig, StreamrecServer
from streamrec.cli import main as cli_main
from streamrec.server.tls import TlsConfigError, tls_files
from streamrec.v1 import catalog_pb2, diagnostics_pb2

ROLES = auth.ROLES


def make_server(data_dir: Path, dataset: str = "synthetic", **security) -> StreamrecServer:
    config = ServerConfig(host="127.0.0.1", port=0, data_dir=data_dir, dataset=dataset, workers=8, grace_s=1.0,
                          engine=EngineConfig(dim=16), **security)
    server = StreamrecServer(config)
    server.start()
    return server


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


# --- the tokens file and the role table, without a server ----------------------------------------------

def test_every_rpc_of_every_service_needs_a_role():
    from streamrec.v1 import catalog_pb2 as c
    from streamrec.v1 import events_pb2 as e
    from streamrec.v1 import recommend_pb2 as r
    methods = {f"/{s.full_name}/{m.name}" for module in (c, e, r) for s in module.DESCRIPTOR.services_by_name.values()
               for m in s.methods}
    assert {auth.required_role(m) for m in methods} == set(ROLES)
    assert auth.required_role("/streamrec.v1.RecommendService/Recommend") == "reader"
    assert auth.required_role("/streamrec.v1.EventService/StreamEvents") == "writer"
    assert auth.required_role("/streamrec.v1.CatalogService/ForgetUser") == "admin"
    assert auth.required_role("/streamrec.v2.SomeFutureAdminService/Purge") == "admin", "unknown services are closed"
    assert auth.required_role("/grpc.health.v1.Health/Check") is None
    assert auth.required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


@pytest.mark.parametrize("text, problem", [
    ("writer abc", "64 hex digits"),
    ("writer " + "a" * 64 + " name extra", "fields"),
    ("root " + "a" * 64, "unknown role"),
    ("reader " + "a" * 64 + " x\nadmin " + "a" * 64 + " y", "twice"),
    ("reader " + "a" * 64 + " bad\u00e9name", "name"),
])
def test_broken_tokens_files_are_refused_naming_the_line(text, problem):
    with pytest.raises(auth.TokensFileError, match=problem) as error:
        auth.parse_tokens(text, "t.txt")
    assert "t.txt:" in str(error.value) and "a" * 64 not in str(error.value)


def test_tokens_file_format():
    entries = auth.parse_tokens(f"# comment\n\nREADER {'AB' * 32} dash-1  # trailing\nadmin {'cd' * 32}\n")
    assert [(e.role, e.name) for e in entries] == [("reader", "dash-1"), ("admin", "line4")]
    assert entries[0].digest == bytes.fromhex("ab" * 32)


@pytest.mark.parametrize("value, ok", [
    ("Bearer abc", True), ("bearer abc", True), ("Bearer  abc ", True),
    ("Basic abc", False), ("Bearer", False), ("Bearer ", False), ("abc", False), ("Bearer a b", False),
])
def test_bearer_header_parsing(value, ok):
    token, problem = auth.bearer_token([("authorization", value)])
    assert (token == "abc") if ok else (token is None and problem.startswith("malformed"))
    assert "abc" not in (problem or "")


def test_token_cli_prints_the_token_once_and_stores_only_its_hash(tmp_path, capsys):
    path = tmp_path / "tokens.txt"
    assert cli_main(["token", "new", "--role", "writer", "--file", str(path), "--name", "ingest"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert len(token) >= 43 and token not in out.err
    text = path.read_text()
    assert token not in text and f"writer {auth.hash_token(token)} ingest" in text
    assert path.stat().st_mode & 0o077 == 0, "created readable by its owner only"
    assert cli_main(["token", "new", "--role", "reader", "--file", str(path)]) == 0
    assert [(e.role, e.name) for e in auth.parse_tokens(path.read_text())] == [("writer", "ingest"), ("reader", "reader-1")]
    assert cli_main(["token", "new", "--role", "reader", "--file", str(path), "--name", "ingest"]) == 1, "names are unique"
    capsys.readouterr()
    assert cli_main(["token", "revoke", "ingest", "--file", str(path)]) == 0
    assert [e.name for e in auth.parse_tokens(path.read_text())] == ["reader-1"]


def test_token_table_reloads_at_most_once_per_interval_and_keeps_the_old_table_when_broken(tmp_path, caplog):
    path = tmp_path / "tokens.txt"
    first = auth.add_token(path, "reader")
    now = [0.0]
    table = auth.TokenTable(path, refresh_interval_s=1.0, clock=lambda: now[0])
    assert table.lookup(first).role == "reader" and table.lookup("nope") is None
    second = auth.add_token(path, "admin")
    assert table.lookup(second) is None, "not re-read before the interval"
    now[0] = 1.0
    assert table.lookup(second).role == "admin"
    path.write_text(path.read_text() + "garbage line here now\n")
    now[0] = 2.0
    with caplog.at_level(logging.ERROR, logger="streamrec.server.auth"):
        assert table.lookup(second).role == "admin", "a broken file keeps the previous table"
    assert "not reloaded" in caplog.text and second not in caplog.text
    path.unlink()
    now[0] = 3.0
    assert table.lookup(first).role == "reader", "a vanished file keeps the previous table"


def test_misconfiguration_stops_the_server_before_it_binds(tmp_path):
    with pytest.raises(auth.TokensFileError, match="does not exist"):
        StreamrecServer(ServerConfig(port=0, data_dir=tmp_path, tokens_file=tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_text("writer not-a-hash\n")
    with pytest.raises(auth.TokensFileError, match="64 hex"):
        StreamrecServer(ServerConfig(port=0, data_dir=tmp_path, tokens_file=tmp_path / "bad.txt"))
    with pytest.raises(TlsConfigError, match="private key"):
        tls_files(tmp_path / "cert.pem", None)
    with pytest.raises(TlsConfigError, match="client CA"):
        tls_files(None, None, tmp_path / "ca.pem")
    (tmp_path / "cert.pem").write_text("not pem")
    (tmp_path / "key.pem").write_text("not pem")
    with pytest.raises(TlsConfigError, match="cert.pem is not PEM"):
        StreamrecServer(ServerConfig(port=0, data_dir=tmp_path, tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem"))


@pytest.mark.parametrize("tls, tokens, expected", [
    (False, False, "without TLS and without authentication"),
    (False, True, "without TLS:"),
    (True, False, "with TLS but without authentication"),
    (True, True, None),
])
def test_listening_beyond_loopback_warns_about_what_is_missing(tmp_path, caplog, pki, tls, tokens, expected):
    security = {}
    if tls:
        security.update(tls_cert=pki["server.crt"], tls_key=pki["server.key"])
    if tokens:
        auth.add_token(tmp_path / "tokens.txt", "reader")
        security["tokens_file"] = tmp_path / "tokens.txt"
    server = StreamrecServer(ServerConfig(host="0.0.0.0", port=0, data_dir=tmp_path, **security))
    with caplog.at_level(logging.WARNING, logger="streamrec.server.app"):
        server._warn_if_exposed()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if expected is None:
        assert not warnings
    else:
        assert len(warnings) == 1 and expected in warnings[0] and "SECURITY" in warnings[0]


# --- tokens and roles against a running server -----------------------------------------------------------

@pytest.fixture(scope="module")
def tokens_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("auth") / "tokens.txt"


@pytest.fixture(scope="module")
def tokens(tokens_path) -> dict[str, str]:
    return {role: auth.add_token(tokens_path, role, name=f"test-{role}") for role in ROLES}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, tokens, tokens_path):
    logging.getLogger("streamrec").setLevel(logging.WARNING)
    server = make_server(tmp_path_factory.mktemp("auth-data"), tokens_file=tokens_path)
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def clients(auth_server, tokens):
    made = {role: StreamrecClient(auth_server.address, timeout_s=10.0, token=token) for role, token in tokens.items()}
    made[None] = StreamrecClient(auth_server.address, timeout_s=10.0)
    # Warm up: a top-k kernel may compile on its first call, which must not eat a test's deadline.
    made["admin"].recommend("u1", k=1, timeout_s=180.0)
    made["admin"].similar_items("i1", k=1, timeout_s=180.0)
    yield made
    for client in made.values():
        client.close()


def _forget(client: StreamrecClient, admin: StreamrecClient):
    user = f"forget-{uuid.uuid4().hex[:8]}"
    admin.publish([make_event(user, "i1", "view")])
    return client.forget_user(user)


# One harmless call per RPC; test_the_matrix_covers_every_rpc keeps this in step with the protos.
CALLS = {
    "Recommend": lambda c, a: c.recommend("u1", k=3),
    "RecommendBatch": lambda c, a: c.recommend_batch([c.recommend_request("u1", k=2)]),
    "RecommendStream": lambda c, a: list(c.recommend_stream([c.recommend_request("u1", k=2, request_id="r")])),
    "SimilarItems": lambda c, a: c.similar_items("i1", k=3),
    "PublishEvents": lambda c, a: c.publish([make_event("u1", "i2", "view")]),
    "StreamEvents": lambda c, a: c.send_events([make_event("u1", "i3", "view")], timeout_s=10.0),
    "UpsertItems": lambda c, a: c.upsert_items([catalog_pb2.Item(item_id="sec-item", categories=["c1"])]),
    "DeleteItems": lambda c, a: c.delete_items(["sec-never-existed"]),
    "GetItem": lambda c, a: c.get_item("i1"),
    "GetUser": lambda c, a: c.get_user("u1"),
    "ForgetUser": _forget,
    "Stats": lambda c, a: c.stats(),
    "LoadReranker": lambda c, a: c.load_reranker(unload=True),  # no model loaded here: a no-op
    "Ping": lambda c, a: c.ping(),
    "PingStream": lambda c, a: list(c.ping_stream([diagnostics_pb2.PingRequest(id="p")])),
}


def _full_method(name: str) -> str:
    from streamrec.v1 import catalog_pb2 as c
    from streamrec.v1 import diagnostics_pb2 as g
    from streamrec.v1 import events_pb2 as e
    from streamrec.v1 import recommend_pb2 as r
    for module in (c, e, r, g):
        for service in module.DESCRIPTOR.services_by_name.values():
            if name in service.methods_by_name:
                return f"/{service.full_name}/{name}"
    raise KeyError(name)


def test_the_matrix_covers_every_rpc():
    from streamrec.v1 import catalog_pb2 as c
    from streamrec.v1 import diagnostics_pb2 as g
    from streamrec.v1 import events_pb2 as e
    from streamrec.v1 import recommend_pb2 as r
    names = {m.name for module in (c, e, r, g) for s in module.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert names == set(CALLS)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("rpc", list(CALLS))
def test_roles_against_every_rpc(clients, role, rpc):
    needed = auth.required_role(_full_method(rpc))
    call = lambda: CALLS[rpc](clients[role], clients["admin"])  # noqa: E731
    if auth.role_allows(role, needed):
        call()
    else:
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        assert f"role {role}" in error.details() and f"needs {needed}" in error.details()
        assert f"test-{role}" in error.details(), "names the token (not the token itself)"


@pytest.mark.parametrize("rpc", ["Recommend", "RecommendStream", "StreamEvents", "ForgetUser"])
@pytest.mark.parametrize("header, problem", [
    (None, "missing authorization"),
    ("Bearer not-a-real-token-" + "x" * 20, "invalid token"),
    ("Basic dXNlcjpwYXNz", "malformed"),
    ("Bearer", "malformed"),
    ("Bearer two words", "malformed"),
    ("sometoken", "malformed"),
])
def test_missing_wrong_or_malformed_tokens_are_unauthenticated(auth_server, clients, rpc, header, problem):
    metadata = [] if header is None else [("authorization", header)]
    with StreamrecClient(auth_server.address, timeout_s=10.0, metadata=metadata) as client:
        error = rpc_error(lambda: CALLS[rpc](client, clients["admin"]))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert problem in error.details()
    secret = (header or "Bearer").split()[-1]
    if secret != "Bearer":
        assert secret not in error.details(), "the token is never echoed"


def test_health_and_reflection_need_no_token(auth_server, clients):
    assert clients[None].health() == "SERVING"
    assert clients[None].health("streamrec.v1.CatalogService") == "SERVING"
    with grpc.insecure_channel(auth_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for s in next(responses).list_services_response.service}
    assert "streamrec.v1.CatalogService" in names


def test_rejected_calls_are_counted_in_metrics(auth_server, clients):
    def count(code: str) -> float:
        return auth_server.metrics.registry.get_sample_value(
            "streamrec_rpc_requests_total", {"method": "Recommend", "code": code}) or 0.0

    before = count("UNAUTHENTICATED")
    rpc_error(lambda: clients[None].recommend("u1"))
    assert count("UNAUTHENTICATED") == before + 1


def _wait_for(predicate, timeout_s: float = 4.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "not within the time limit"
        time.sleep(0.05)
    return time.monotonic() - started


def _code(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def test_tokens_rotate_without_restart(auth_server, clients, tokens_path, caplog):
    original = tokens_path.read_text()
    try:
        new = auth.add_token(tokens_path, "writer", name="rotated-in")
        with StreamrecClient(auth_server.address, timeout_s=5.0, token=new, retry_policy=NO_RETRY) as client:
            publish = lambda: client.publish([make_event("u2", "i1", "view")])  # noqa: E731
            took = _wait_for(lambda: _code(publish) == grpc.StatusCode.OK)
            assert took < 2.5, took
            # A broken edit keeps the previous table (the new token still works) and logs an error.
            with caplog.at_level(logging.ERROR, logger="streamrec.server.auth"):
                tokens_path.write_text(tokens_path.read_text() + "this line is broken\n")
                time.sleep(1.3)
                assert _code(publish) == grpc.StatusCode.OK
            assert any("not reloaded" in r.getMessage() for r in caplog.records)
            tokens_path.write_text(tokens_path.read_text().replace("this line is broken\n", ""))
            assert auth.revoke_token(tokens_path, "rotated-in") == 1
            took = _wait_for(lambda: _code(publish) == grpc.StatusCode.UNAUTHENTICATED)
            assert took < 2.5, took
        assert _code(lambda: clients["writer"].publish([make_event("u2", "i1", "view")])) == grpc.StatusCode.OK
    finally:
        tokens_path.write_text(original)


# --- TLS -----------------------------------------------------------------------------------------------

def _pki_with_cryptography(out: Path) -> None:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def save(name: str, key, cert) -> None:
        (out / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def build(cn: str, issuer_name, issuer_key, key, extensions):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    cas = {}
    for ca in ("ca", "other-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"streamrec test {ca}")])
        cert = build(f"streamrec test {ca}", name, key, key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
        save(ca, key, cert)
        cas[ca] = (name, key)
    name, ca_key = cas["ca"]
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    for leaf, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        save(leaf, key, build(f"streamrec test {leaf}", name, ca_key, key,
                              [(san, False), (x509.ExtendedKeyUsage([usage]), False)]))


def _pki_with_openssl(out: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=out, check=True, capture_output=True, timeout=60)

    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        run("req", "-x509", *ec_key, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "1",
            "-subj", f"/CN=streamrec test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for leaf, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (out / f"{leaf}.ext").write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        run("req", *ec_key, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr", "-subj", f"/CN=streamrec test {leaf}")
        run("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{leaf}.crt", "-days", "1", "-extfile", f"{leaf}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A test CA, another CA, a server certificate (localhost, 127.0.0.1) and a client certificate."""
    out = tmp_path_factory.mktemp("pki")
    if importlib.util.find_spec("cryptography") is not None:
        _pki_with_cryptography(out)
    elif shutil.which("openssl"):
        _pki_with_openssl(out)
    else:
        pytest.skip("TLS tests need the `cryptography` package or the `openssl` command to make test certificates")
    for key in out.glob("*.key"):
        key.chmod(0o600)
    return {p.name: p for p in out.iterdir()}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki):
    server = make_server(tmp_path_factory.mktemp("tls-data"), dataset="none",
                         tls_cert=pki["server.crt"], tls_key=pki["server.key"])
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, pki, tokens, tokens_path):
    server = make_server(tmp_path_factory.mktemp("mtls-data"), dataset="none", tls_cert=pki["server.crt"],
                         tls_key=pki["server.key"], tls_client_ca=pki["ca.crt"], tokens_file=tokens_path)
    yield server
    server.stop(grace_s=1.0)


def _fails_to_connect(client: StreamrecClient) -> None:
    error = rpc_error(lambda: client.health(timeout_s=3.0, retry=False))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error


def test_tls_server_serves_tls_clients_only(tls_server, pki):
    with StreamrecClient(tls_server.address, timeout_s=10.0, root_certificates=pki["ca.crt"]) as client:
        assert client.health() == "SERVING"
        assert client.stats().items == 0
    with StreamrecClient(tls_server.address, timeout_s=10.0, root_certificates=pki["ca.crt"],
                         server_name="localhost") as client:
        assert client.stats().dim == 16
    with StreamrecClient(tls_server.address, timeout_s=10.0) as plaintext:
        _fails_to_connect(plaintext)
    with StreamrecClient(tls_server.address, timeout_s=10.0, root_certificates=pki["other-ca.crt"]) as untrusting:
        _fails_to_connect(untrusting)


def test_mutual_tls_with_tokens(mtls_server, pki, tokens):
    certs = dict(root_certificates=pki["ca.crt"], certificate_chain=pki["client.crt"], private_key=pki["client.key"])
    with StreamrecClient(mtls_server.address, timeout_s=10.0, token=tokens["admin"], **certs) as admin:
        assert admin.health() == "SERVING"
        assert admin.stats().dim == 16
    with StreamrecClient(mtls_server.address, timeout_s=10.0, token=tokens["reader"], **certs) as reader:
        assert rpc_error(reader.stats).code() == grpc.StatusCode.PERMISSION_DENIED
    with StreamrecClient(mtls_server.address, timeout_s=10.0, **certs) as anonymous:
        assert anonymous.health() == "SERVING", "health needs a certificate but no token"
        assert rpc_error(anonymous.stats).code() == grpc.StatusCode.UNAUTHENTICATED
    with StreamrecClient(mtls_server.address, timeout_s=10.0, token=tokens["admin"], root_certificates=pki["ca.crt"]) as no_cert:
        _fails_to_connect(no_cert)
    with StreamrecClient(mtls_server.address, timeout_s=10.0, token=tokens["admin"]) as plaintext:
        _fails_to_connect(plaintext)
