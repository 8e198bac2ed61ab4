"""The Python clients (sync and asyncio) against a live server, plus their retry, flow-control, token and TLS logic."""
from __future__ import annotations

import asyncio
import queue
import shutil
import subprocess
import threading
import time
import uuid
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from streamrec.clients.aio import AsyncStreamrecClient
from streamrec.cli.process import ServerProcess
from streamrec.clients.client import EventStream, StreamrecClient, StreamResult, make_event
from streamrec.clients.retry import NO_RETRY, RetryPolicy, call_with_retry
from streamrec.v1 import catalog_pb2, events_pb2

FAST_RETRY = RetryPolicy(max_attempts=400, initial_backoff_s=0.05, max_backoff_s=0.3)


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- the sync client against the live server ---------------------------------------------------------------

def test_recommend_calls(client):
    response = client.recommend("u3", k=5)
    assert response.user_id == "u3" and len(response.items) == 5 and response.strategy == "personalized"
    filtered = client.recommend("u3", k=5, include_categories=["c2"], exclude_seen=False)
    assert all("c2" in item.categories for item in filtered.items)

    batch = client.recommend_batch([client.recommend_request(u, k=3) for u in ("u1", "u2", "nobody")])
    assert [r.user_id for r in batch] == ["u1", "u2", "nobody"] and batch[2].strategy == "popular"

    requests = [client.recommend_request(f"u{n}", k=4, request_id=f"r{n}") for n in range(6)]
    requests.append(client.recommend_request("u1", k=0, request_id="bad"))  # a bad request does not end the stream
    by_id = {r.request_id: r for r in client.recommend_stream(requests)}
    assert set(by_id) == {f"r{n}" for n in range(6)} | {"bad"}
    assert all(len(by_id[f"r{n}"].items) == 4 for n in range(6))
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]

    similar = client.similar_items("i5", k=7)
    assert similar.item_id == "i5" and len(similar.items) == 7 and "i5" not in {i.item_id for i in similar.items}


def test_health_and_stats(client):
    assert client.health() == "SERVING"
    stats = client.stats()
    assert stats.items >= 2000 and stats.dim == 32 and stats.limits.max_k > 0


def test_publish_is_idempotent_by_event_id(client):
    user = fresh("pub")
    events = [make_event(user, f"i{n}", "click") for n in range(3)]
    first = client.publish(events, batch_id="b1")
    assert (first.batch_id, first.accepted, first.duplicates) == ("b1", 3, 0)
    again = client.publish(events)
    assert (again.accepted, again.duplicates) == (0, 3)
    assert client.get_user(user, history_limit=5).event_count == 3


def test_catalog_calls(client):
    item = fresh("item")
    created = client.upsert_items([catalog_pb2.Item(item_id=item, categories=["c1"], attributes={"title": "t"})])
    assert created.created == 1
    got = client.get_item(item, include_embedding=True)
    assert got.item_id == item and list(got.categories) == ["c1"] and len(got.embedding) == 32
    user = fresh("cat")
    client.send_events([make_event(user, item, "purchase")])
    view = client.get_user(user, history_limit=5)
    assert view.event_count == 1 and view.history[0].item_id == item
    assert client.forget_user(user).events_erased == 1
    deleted = client.delete_items([item, "no-such-item"])
    assert deleted.deleted == 1 and list(deleted.not_found) == ["no-such-item"]
    with pytest.raises(grpc.RpcError) as info:
        client.get_item("no-such-item")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # not retried: only UNAVAILABLE is


def test_send_events_waits_for_acks(client):
    user = fresh("flow")
    events = (make_event(user, f"i{n}", "view") for n in range(95))
    result = client.send_events(events, batch_size=10, max_inflight=2)
    assert isinstance(result, StreamResult)
    assert (result.batches, result.accepted, result.duplicates, result.rejections) == (10, 95, 0, [])
    assert len(result.ack_lags_s) == 10 and all(lag >= 0 for lag in result.ack_lags_s)
    assert client.get_user(user).event_count == 95


def test_send_events_without_waiting_returns_a_handle(client):
    user = fresh("nowait")
    events = [make_event(user, f"i{n}", "view") for n in range(50)]
    handle = client.send_events(events, batch_size=5, max_inflight=3, wait_for_acks=False)
    assert isinstance(handle, EventStream) and handle.sent == 10 and handle.unacked <= 3
    result = handle.result(timeout=20)
    assert handle.done() and (result.batches, result.accepted) == (10, 50)
    resent = client.send_events(events[:7], batch_size=5)  # same event_ids: duplicates, applied once
    assert (resent.accepted, resent.duplicates) == (0, 7)
    assert client.get_user(user).event_count == 50


def test_send_events_reports_rejections_and_zero_events(client):
    result = client.send_events([make_event(fresh("rej"), "no-such-item", "view")])
    assert result.accepted == 0 and result.rejections[0].field == "item_id"
    assert client.send_events([]).batches == 0


# --- flow control and stream retries, deterministic: a fake StreamEvents ------------------------------------

class FakeEventService:
    """StreamEvents that acks a batch only when the test allows it (`release`), and can fail a stream."""

    def __init__(self, fail_after_acks: int | None = None):
        self.received: list[str] = []  # batch ids, every attempt
        self.allowed = threading.Semaphore(0)
        self.fail_after_acks = fail_after_acks
        self.calls = 0

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.allowed.release()

    def StreamEvents(self, requests, timeout=None):
        self.calls += 1
        fail_after = self.fail_after_acks if self.calls == 1 else None
        inbox: queue.Queue = queue.Queue()

        def read() -> None:
            for batch in requests:
                self.received.append(batch.batch_id)
                inbox.put(batch)
            inbox.put(None)

        threading.Thread(target=read, daemon=True).start()

        def acks():
            acked = 0
            while (batch := inbox.get()) is not None:
                if fail_after is not None and acked == fail_after:
                    raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
                self.allowed.acquire()
                acked += 1
                yield events_pb2.EventAck(batch_id=batch.batch_id, accepted=len(batch.events))

        return acks()


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def fake_client(service: FakeEventService, policy: RetryPolicy = FAST_RETRY) -> StreamrecClient:
    client = StreamrecClient("127.0.0.1:1", retry_policy=policy)  # never connects: the event stub is replaced
    client.events = SimpleNamespace(StreamEvents=service.StreamEvents)
    return client


def test_flow_control_blocks_the_generator_until_acks_catch_up():
    service = FakeEventService()
    pulled: list[int] = []

    def events():
        for n in range(100):
            pulled.append(n)
            yield make_event("u", f"i{n}")

    client = fake_client(service)
    results: list[StreamResult] = []
    sender = threading.Thread(target=lambda: results.append(client.send_events(events(), batch_size=10, max_inflight=3)))
    sender.start()
    time.sleep(0.3)
    # Three batches in flight, the fourth built and waiting in send(): the generator is paused.
    assert len(service.received) == 3 and len(pulled) == 40
    service.release(2)
    time.sleep(0.3)
    assert len(service.received) == 5 and len(pulled) == 60
    service.release(8)
    sender.join(5)
    assert results and (results[0].batches, results[0].accepted) == (10, 100)
    client.close()


def test_a_failed_stream_is_reopened_and_unacked_batches_resent():
    service = FakeEventService(fail_after_acks=2)
    service.release(100)
    client = fake_client(service)
    result = client.send_events((make_event("u", f"i{n}") for n in range(50)), batch_size=10, max_inflight=4)
    assert (result.batches, result.accepted, result.retries) == (5, 50, 1)
    assert service.calls == 2 and service.received.count("2") == 2  # batch 2 went on both streams
    assert service.received.count("0") == 1 and service.received.count("4") >= 1

    no_retry = fake_client(FakeEventService(fail_after_acks=0), policy=NO_RETRY)
    with pytest.raises(grpc.RpcError) as info:
        no_retry.send_events([make_event("u", "i1")])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_async_event_stream_is_reopened_too():
    calls: list[list[str]] = []

    def stream_events(requests, timeout=None):
        received: list[str] = []
        calls.append(received)
        fail = len(calls) == 1

        async def acks():
            async for batch in requests:
                received.append(batch.batch_id)
                if fail and len(received) == 3:
                    raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
                yield events_pb2.EventAck(batch_id=batch.batch_id, accepted=len(batch.events))
        return acks()

    async def main() -> StreamResult:
        client = AsyncStreamrecClient("127.0.0.1:1", retry_policy=FAST_RETRY)
        client.events = SimpleNamespace(StreamEvents=stream_events)
        try:
            return await client.send_events([make_event("u", f"i{n}") for n in range(60)], batch_size=10, max_inflight=2)
        finally:
            await client.close()

    result = asyncio.run(main())
    assert (result.batches, result.accepted, result.retries) == (6, 60, 1)
    assert calls[0][:3] == ["0", "1", "2"] and calls[1][0] == "2" and calls[1][-1] == "5"


def test_call_with_retry_retries_unavailable_only_and_keeps_the_deadline():
    attempts: list[float | None] = []

    def flaky(remaining):
        attempts.append(remaining)
        if len(attempts) < 3:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
        return "ok"

    assert call_with_retry(flaky, FAST_RETRY, time.monotonic() + 10, sleep=lambda s: None) == "ok"
    assert len(attempts) == 3 and all(r is not None and r <= 10 for r in attempts)

    def invalid(remaining):
        attempts.append(remaining)
        raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)

    attempts.clear()
    with pytest.raises(FakeRpcError):
        call_with_retry(invalid, FAST_RETRY, None)
    assert len(attempts) == 1

    def down(remaining):
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

    started = time.monotonic()
    with pytest.raises(FakeRpcError):
        call_with_retry(down, RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.05), time.monotonic() + 0.5)
    assert time.monotonic() - started < 0.6  # gives up when the next backoff would pass the deadline

    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0, jitter=0.5)
    for retry in range(1, 8):
        base = min(1.0, 0.1 * 2 ** (retry - 1))
        assert all(base * 0.5 <= policy.delay(retry) <= base for _ in range(20))


# --- retries across a real server restart -------------------------------------------------------------------

def event_count(client: StreamrecClient, user: str) -> int:
    try:
        return client.get_user(user).event_count
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise


def test_retries_ride_out_a_server_restart(tmp_path):
    proc = ServerProcess(tmp_path / "data").start()
    client = StreamrecClient(proc.address, timeout_s=60.0, retry_policy=FAST_RETRY)
    restarter = threading.Thread(target=lambda: (time.sleep(1.0), proc.start()))
    try:
        assert len(client.recommend("u1", k=5).items) == 5
        user = fresh("restart")
        results: list = []

        def slow_events():
            for n in range(400):
                if n % 10 == 0:
                    time.sleep(0.02)
                yield make_event(user, f"i{n}", "view")

        def send() -> None:
            try:
                results.append(client.send_events(slow_events(), batch_size=10, max_inflight=4))
            except BaseException as error:  # noqa: BLE001 - checked below
                results.append(error)

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 20
        while event_count(client, user) < 50 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:  # not idempotent, no opt-in: fails at once
            client.upsert_items([catalog_pb2.Item(item_id="new-item")])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as info:  # idempotent but retries switched off for this call
            client.recommend("u1", retry=False)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2.0

        restarter.start()
        started = time.monotonic()
        response = client.recommend("u1", k=5)  # retried with backoff until the server is back
        assert len(response.items) == 5 and time.monotonic() - started >= 0.9
        restarter.join(120)

        sender.join(60)
        result = results[0]
        assert isinstance(result, StreamResult), result
        assert result.retries >= 1 and result.accepted + result.duplicates == 400 and not result.rejections
        assert client.get_user(user).event_count == 400  # resent batches were applied once
    finally:
        client.close()
        if restarter.is_alive():
            restarter.join(120)
        proc.kill()


# --- the asyncio client -------------------------------------------------------------------------------------

def test_async_client_calls(server):
    async def main() -> None:
        async with AsyncStreamrecClient(server.address, timeout_s=20.0) as client:
            assert await client.health() == "SERVING"
            assert (await client.stats()).items >= 2000
            response = await client.recommend("u4", k=6)
            assert len(response.items) == 6 and response.user_id == "u4"
            batch = await client.recommend_batch([client.recommend_request(u, k=2) for u in ("u1", "u2")])
            assert [r.user_id for r in batch] == ["u1", "u2"]

            async def requests():
                for n in range(5):
                    yield client.recommend_request(f"u{n}", k=3, request_id=f"a{n}")
            ids = {r.request_id async for r in client.recommend_stream(requests())}
            assert ids == {f"a{n}" for n in range(5)}
            assert len((await client.similar_items("i9", k=4)).items) == 4

            user = fresh("aio")
            ack = await client.publish([make_event(user, "i1", "click")])
            assert ack.accepted == 1

            async def events():
                for n in range(2, 47):
                    yield make_event(user, f"i{n}", "view")
            result = await client.send_events(events(), batch_size=10, max_inflight=2)
            assert (result.batches, result.accepted) == (5, 45) and len(result.ack_lags_s) == 5
            handle = await client.send_events([make_event(user, f"i{n}", "view") for n in range(50, 80)], batch_size=4,
                                              max_inflight=2, wait_for_acks=False)
            assert handle.sent == 8 and handle.unacked <= 2
            later = await handle.result(timeout=20)
            assert (later.batches, later.accepted) == (8, 30)
            assert (await client.get_user(user)).event_count == 76

            item = fresh("aio-item")
            assert (await client.upsert_items([catalog_pb2.Item(item_id=item, categories=["c3"])])).created == 1
            assert (await client.get_item(item)).item_id == item
            assert (await client.delete_items([item])).deleted == 1
            assert (await client.forget_user(user)).events_erased == 76
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.recommend("u1", k=0)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())


def test_async_client_does_not_retry_writes_without_opt_in():
    async def main() -> None:
        async with AsyncStreamrecClient("127.0.0.1:1", timeout_s=5.0, retry_policy=FAST_RETRY) as client:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.forget_user("u1")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 1.0
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:  # idempotent: retried until the deadline is near
                await client.stats(timeout_s=0.8)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started >= 0.4

    asyncio.run(main())


# --- token and TLS: a tiny gRPC server that records what arrives ---------------------------------------------

class MetadataRecorder(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    def intercept_service(self, continuation, handler_call_details):
        self.seen.append((handler_call_details.method, dict(handler_call_details.invocation_metadata)))
        return continuation(handler_call_details)


def tiny_server(credentials: grpc.ServerCredentials | None = None):
    recorder = MetadataRecorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[recorder])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)  # "" is SERVING
    port = server.add_secure_port("127.0.0.1:0", credentials) if credentials else server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", recorder


def test_token_is_sent_on_every_kind_of_call():
    server, address, recorder = tiny_server()
    try:
        with StreamrecClient(address, timeout_s=5.0, token="s3cret", metadata=[("x-tenant", "t1")], retry_policy=NO_RETRY) as client:
            assert client.health() == "SERVING"
            with pytest.raises(grpc.RpcError):  # not served here: the headers still arrive
                client.send_events([make_event("u", "i")])
            with pytest.raises(grpc.RpcError):
                list(client.recommend_stream([client.recommend_request("u")]))

        async def main() -> None:
            async with AsyncStreamrecClient(address, timeout_s=5.0, token="s3cret", retry_policy=NO_RETRY) as client:
                assert await client.health() == "SERVING"
                with pytest.raises(grpc.RpcError):
                    await client.send_events([make_event("u", "i")])
        asyncio.run(main())
    finally:
        server.stop(0)
    methods = [method for method, _ in recorder.seen]
    assert methods.count("/grpc.health.v1.Health/Check") == 2 and "/streamrec.v1.EventService/StreamEvents" in methods
    assert "/streamrec.v1.RecommendService/RecommendStream" in methods
    assert all(headers.get("authorization") == "Bearer s3cret" for _, headers in recorder.seen)
    assert recorder.seen[0][1].get("x-tenant") == "t1"

    no_token, address, recorder = tiny_server()
    try:
        with StreamrecClient(address, timeout_s=5.0) as client:
            client.health()
    finally:
        no_token.stop(0)
    assert "authorization" not in recorder.seen[0][1]


def _self_signed(directory, name: str) -> tuple[bytes, bytes]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}"], check=True, capture_output=True)
    return key.read_bytes(), cert.read_bytes()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_tls_and_mutual_tls(tmp_path):
    server_key, server_cert = _self_signed(tmp_path, "streamrec.test")
    client_key, client_cert = _self_signed(tmp_path, "client.test")
    credentials = grpc.ssl_server_credentials([(server_key, server_cert)], root_certificates=client_cert,
                                              require_client_auth=True)
    server, address, _ = tiny_server(credentials)
    try:
        with StreamrecClient(address, timeout_s=5.0, root_certificates=tmp_path / "streamrec.test.pem",
                             certificate_chain=client_cert, private_key=tmp_path / "client.test.key",
                             server_name="streamrec.test", retry_policy=NO_RETRY) as client:
            assert client.health() == "SERVING"

        async def main() -> str:
            async with AsyncStreamrecClient(address, timeout_s=5.0, root_certificates=server_cert, certificate_chain=client_cert,
                                            private_key=client_key, server_name="streamrec.test", retry_policy=NO_RETRY) as client:
                return await client.health()
        assert asyncio.run(main()) == "SERVING"

        with StreamrecClient(address, timeout_s=5.0, root_certificates=server_cert, server_name="streamrec.test",
                             retry_policy=NO_RETRY) as client, pytest.raises(grpc.RpcError):
            client.health()  # no client certificate: the server refuses the handshake
    finally:
        server.stop(0)
    with pytest.raises(ValueError):
        StreamrecClient("127.0.0.1:1", certificate_chain=client_cert)  # a chain without its key
