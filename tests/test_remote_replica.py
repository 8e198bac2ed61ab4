"""A replica on another machine (`streamrec serve --replicate-from`): it copies the primary's state over the
ReplicationService into a data dir of its own, follows the log, and after a restart resumes from its copy.
Here the "other machine" is another process with another data dir; the transport is the same gRPC."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from conftest import start_server
from streamrec.cli.process import free_port
from streamrec.clients.client import StreamrecClient, make_event
from streamrec.engine.store.copy import LogCopy

pytestmark = pytest.mark.slow


class RemoteReplica:
    def __init__(self, primary: str, data_dir: Path, extra: tuple[str, ...] = ()):
        self.primary, self.data_dir, self.extra = primary, data_dir, extra
        self.port = free_port()
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen | None = None
        self.client = StreamrecClient(f"127.0.0.1:{self.port}", timeout_s=20)

    def start(self) -> "RemoteReplica":
        args = [sys.executable, "-m", "streamrec.cli", "serve", "--replicate-from", self.primary, "--data-dir",
                str(self.data_dir), "--port", str(self.port), "--dim", "32", "--reranker", "none", *self.extra]
        self.proc = subprocess.Popen(args, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        self.client.wait_until_serving(120)
        return self

    def snapshots_logged(self) -> int:
        return self.log_path.read_text().count("remote replica: snapshot at seq")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0


@pytest.fixture()
def primary(tmp_path):
    server = start_server(tmp_path / "primary")
    yield server
    server.stop(grace_s=1.0)


def test_a_remote_replica_copies_follows_forgets_and_resumes_from_its_copy(primary, tmp_path):
    with StreamrecClient(primary.address) as writer:
        writer.publish([make_event("before", f"i{n}", "purchase") for n in range(5)])
        remote = RemoteReplica(primary.address, tmp_path / "remote").start()
        try:
            assert remote.client.stats().role == "replica" and remote.snapshots_logged() == 1
            # Follows: read-your-writes with the ack's seq, and the same vector bit for bit.
            for n in range(20):
                ack = writer.publish([make_event(f"remote-{n}", f"i{n}", "purchase")])
                remote.client.session.saw(ack.durable_seq)
                assert remote.client.recommend(f"remote-{n}", k=5).strategy == "personalized"
            reference = writer.get_user("remote-7", include_embedding=True).embedding
            assert remote.client.get_user("remote-7", include_embedding=True).embedding == reference

            # Killed and restarted: resumes from its own copy (no second snapshot), catches up on what it missed.
            remote.kill()
            missed = writer.publish([make_event("while-away", "i3", "click")])
            remote.start()
            remote.client.session.saw(missed.durable_seq)
            assert remote.client.get_user("while-away").event_count == 1
            assert remote.snapshots_logged() == 1

            # Forgotten through the remote (the write is forwarded): gone from its state, its copy and the
            # impression log it keeps of its own answers.
            remote.client.recommend("before", k=3)
            forgotten = remote.client.forget_user("before")
            assert forgotten.events_erased == 5
            remote.client.session.saw(forgotten.durable_seq)
            with pytest.raises(grpc.RpcError) as error:
                remote.client.get_user("before")
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            remote.stop()
    with LogCopy(tmp_path / "remote" / "lmdb") as copy:
        assert not any(b"before" in payload for _, payload in copy.iter_log())
        assert all(user.user_id != "before" for user in copy.load_users())
        assert copy.log_id == primary.engine.store.log_id
    from streamrec.engine.feedback.impressions import ImpressionLog

    log = ImpressionLog(tmp_path / "remote" / "lmdb" / "impressions", readonly=True)
    try:
        users = {impression.user_id for impression in log.iter_impressions()}
        assert "before" not in users and "remote-7" in users  # the others' answers stay
    finally:
        log.close()


def test_a_copy_of_another_log_is_refused_and_replaced(primary, tmp_path):
    other = start_server(tmp_path / "other-primary")
    try:
        remote = RemoteReplica(other.address, tmp_path / "remote").start()
        remote.stop()
    finally:
        other.stop(grace_s=1.0)
    with StreamrecClient(primary.address) as writer:
        ack = writer.publish([make_event("only-on-this-primary", "i1", "click")])
    remote = RemoteReplica(primary.address, tmp_path / "remote").start()  # same folder, another primary
    try:
        deadline = time.monotonic() + 30
        while remote.snapshots_logged() < 2:  # its copy followed another log: replaced, not mixed
            assert time.monotonic() < deadline, "the copy of another log was not replaced"
            time.sleep(0.1)
        remote.client.session.saw(ack.durable_seq)
        assert remote.client.get_user("only-on-this-primary").event_count == 1
        assert remote.client.stats().served_by.applied_seq == primary.engine.store.last_seq()
    finally:
        remote.stop()
