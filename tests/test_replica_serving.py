"""`streamrec serve --replicas 2`: three processes on one port. Writes through any process, read-your-writes
through any other, and the faults: a replica or the primary killed -9 under load."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from streamrec.cli.process import free_port
from streamrec.clients.client import StreamrecClient, make_event
from streamrec.v1 import catalog_pb2

pytestmark = pytest.mark.slow


class Topology:
    def __init__(self, data_dir: Path, replicas: int = 2, extra_args: tuple[str, ...] = (), token: str | None = None):
        self.port = free_port()
        self.process_ports = [free_port() for _ in range(replicas + 1)]
        args = [sys.executable, "-m", "streamrec.cli", "--log-level", "WARNING", "serve", "--data-dir", str(data_dir),
                "--dataset", "synthetic", "--dim", "16", "--port", str(self.port), "--replicas", str(replicas),
                "--process-ports", ",".join(map(str, self.process_ports)), "--checkpoint-interval", "2", *extra_args]
        self.log = open(data_dir.parent / "supervisor.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        # Session consistency (the default): a seq from another client's ack is handed over with session.saw(),
        # as a web backend hands the ack's durable_seq from its write handler to its read handler.
        self.clients = [StreamrecClient(f"127.0.0.1:{port}", timeout_s=20.0, token=token)
                        for port in self.process_ports]
        for client in self.clients:
            client.wait_until_serving(180)

    @property
    def primary(self) -> StreamrecClient:
        return self.clients[0]

    @property
    def replicas(self) -> list[StreamrecClient]:
        return self.clients[1:]

    def pid(self, client: StreamrecClient) -> int:
        return client.stats().pid

    def kill(self, client: StreamrecClient) -> int:
        pid = self.pid(client)
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_restarted(self, client: StreamrecClient, old_pid: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if client.health(timeout_s=1, retry=False) == "SERVING" and self.pid(client) != old_pid:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{client.address} not restarted in {timeout_s} s")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        for client in self.clients:
            client.close()
        self.log.close()
        return code


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    top = Topology(tmp_path_factory.mktemp("replicas") / "data")
    yield top
    if top.proc.poll() is None:
        top.stop()


def test_every_process_reports_its_role(topology):
    stats = [client.stats() for client in topology.clients]
    assert [s.role for s in stats] == ["primary", "replica", "replica"]
    assert len({s.served_by.log_id for s in stats}) == 1 and stats[0].served_by.log_id  # one log, one clock
    assert len({s.pid for s in stats}) == 3
    assert stats[0].replicas == 2


def test_round_robin_over_the_process_ports_spreads_calls_over_every_process(topology):
    """One channel on the shared port keeps one connection, so one process; a channel balancing over the
    process ports (grpc's round_robin policy) sends successive calls to every process."""
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in topology.process_ports)
    with StreamrecClient(target, options=[("grpc.lb_policy_name", "round_robin")]) as client:
        client.wait_until_serving(30)
        pids = {client.stats().pid for _ in range(30)}
    assert pids == {topology.pid(c) for c in topology.clients}
    with StreamrecClient(f"127.0.0.1:{topology.port}") as shared:
        assert len({shared.stats().pid for _ in range(30)}) == 1


def test_writes_through_a_replica_reach_the_primary(topology):
    replica = topology.replicas[0]
    upserted = replica.upsert_items([catalog_pb2.Item(item_id="via-replica", categories=["c1"])])
    assert upserted.created == 1
    ack = replica.publish([make_event("rw-user", "via-replica", "purchase")])
    assert ack.accepted == 1 and ack.durable_seq >= upserted.durable_seq
    streamed = replica.send_events([make_event("rw-user", f"i{n}", "view") for n in range(30)], batch_size=10)
    assert streamed.accepted == 30
    user = topology.primary.get_user("rw-user")
    assert user.event_count == 31


def test_a_write_without_a_deadline_is_forwarded(topology):
    from streamrec.v1 import events_pb2, events_pb2_grpc

    stub = events_pb2_grpc.EventServiceStub(topology.replicas[0].channel)
    ack = stub.PublishEvents(events_pb2.EventBatch(events=[make_event("no-deadline", "i2", "view")]))  # no timeout
    assert ack.accepted == 1


def test_read_your_writes_across_processes(topology):
    """Each event goes through one process and the next read through another, carrying the ack's seq: the
    read reflects the event every time (never a stale answer)."""
    clients = topology.clients
    violations = 0
    for n in range(300):
        writer, reader = clients[n % 3], clients[(n + 1) % 3]
        ack = writer.publish([make_event(f"ryw-{n}", f"i{n % 50}", "purchase")])
        reader.session.saw(ack.durable_seq)
        response = reader.recommend(f"ryw-{n}", k=5)
        if response.served_by.applied_seq < ack.durable_seq or response.strategy != "personalized":
            violations += 1
    assert violations == 0


def test_session_client_reads_its_writes_through_the_shared_port(topology):
    with StreamrecClient(f"127.0.0.1:{topology.port}") as client:  # consistency="session" by default
        for n in range(50):
            ack = client.publish([make_event(f"shared-{n}", "i3", "click")])
            assert client.session.seq >= ack.durable_seq
            assert client.get_user(f"shared-{n}").event_count == 1


def test_forget_user_through_a_replica_is_seen_by_every_process(topology):
    topology.primary.publish([make_event("forget-me", f"i{n}", "purchase") for n in range(4)])
    forgotten = topology.replicas[1].forget_user("forget-me")
    assert forgotten.events_erased == 4
    for client in topology.clients:
        client.session.saw(forgotten.durable_seq)
        with pytest.raises(grpc.RpcError) as error:
            client.get_user("forget-me")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_min_seq_beyond_the_log_is_out_of_range(topology):
    from streamrec.v1 import recommend_pb2
    request = recommend_pb2.RecommendRequest(user_id="u1", min_seq=topology.primary.stats().last_seq + 10**6)
    with pytest.raises(grpc.RpcError) as error:
        topology.replicas[0].recommender.Recommend(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE and "min_seq" in error.value.details()


def _read_load(clients: list[StreamrecClient], stop: threading.Event, failures: list) -> None:
    n = 0
    while not stop.is_set():
        client = clients[n % len(clients)]
        try:
            client.recommend(f"u{n % 400}", k=5, timeout_s=5, retry=False)
        except grpc.RpcError as error:
            failures.append(error.code())
        n += 1


def test_a_replica_killed_under_load_is_restarted_and_catches_up(topology):
    victim, survivor = topology.replicas
    stop, survivor_failures = threading.Event(), []
    reader = threading.Thread(target=_read_load, args=([topology.primary, survivor], stop, survivor_failures))
    reader.start()
    try:
        old = topology.kill(victim)
        for n in range(20):  # writes go on while it is down
            topology.primary.publish([make_event(f"while-down-{n}", "i1", "view")])
        topology.wait_restarted(victim, old)
    finally:
        stop.set()
        reader.join()
    assert survivor_failures == []  # the other processes never failed a read
    last = topology.primary.stats().last_seq
    victim.session.saw(last)
    assert victim.get_user("while-down-19").event_count == 1
    assert victim.stats().served_by.applied_seq >= last


def test_the_primary_killed_under_event_load_loses_no_acked_event(topology):
    acked: list[str] = []
    refused: list[grpc.StatusCode] = []
    stop = threading.Event()

    def write() -> None:  # through a replica: forwarded while the primary lives, UNAVAILABLE while it does not
        n = 0
        while not stop.is_set():
            event = make_event(f"crash-{n % 50}", f"i{n % 100}", "view", event_id=f"crash-event-{n}")
            try:
                topology.replicas[0].publish([event], timeout_s=5, retry=False)
                acked.append(event.event_id)
            except grpc.RpcError as error:
                refused.append(error.code())
            n += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(1.0)
        old = topology.kill(topology.primary)
        read_during = [topology.replicas[1].recommend(f"u{n}", k=3, retry=False) for n in range(20)]
        assert len(read_during) == 20  # replicas keep answering reads
        topology.wait_restarted(topology.primary, old)
        time.sleep(0.5)
    finally:
        stop.set()
        writer.join()
    assert acked and set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    # Every acked event is in the restarted primary's log: sent again, each is a duplicate.
    resent = [make_event(f"crash-{n % 50}", f"i{n % 100}", "view", event_id=event_id)
              for n, event_id in ((int(e.rsplit("-", 1)[1]), e) for e in acked)]
    last = 0
    for start in range(0, len(resent), 1000):
        ack = topology.primary.publish(resent[start:start + 1000])
        assert (ack.duplicates, ack.accepted) == (len(resent[start:start + 1000]), 0)
        last = max(last, ack.durable_seq)
    # Replicas converge on the restarted primary: same vectors bit for bit at the same seq.
    for client in topology.clients:
        client.session.saw(last)
    vectors = [tuple(c.get_user("crash-7", include_embedding=True).embedding) for c in topology.clients]
    assert vectors[0] == vectors[1] == vectors[2]


def test_sigterm_stops_every_process(topology):
    pids = [topology.pid(client) for client in topology.clients]
    assert topology.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_forwarded_writes_keep_the_callers_token(tmp_path):
    """A replica checks the caller's token itself, and the primary checks it again on the forwarded call."""
    from streamrec.server.auth import hash_token

    tokens = tmp_path / "tokens"
    tokens.write_text(f"reader {hash_token('read-token')}\nwriter {hash_token('write-token')}\n")
    top = Topology(tmp_path / "data", replicas=1, extra_args=("--tokens-file", str(tokens)), token="write-token")
    try:
        replica = top.replicas[0]
        assert replica.publish([make_event("tok-user", "i1", "click")]).accepted == 1
        with StreamrecClient(replica.address, token="read-token") as reader:
            reader.recommend("tok-user", k=3)
            with pytest.raises(grpc.RpcError) as error:
                reader.publish([make_event("tok-user", "i2", "click")], retry=False)
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        assert top.stop() == 0
