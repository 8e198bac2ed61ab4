"""`streamrec serve --replicas N`: the primary and N read replicas, each a process of its own, on one port.

Why processes: one Python process serves about one core's worth of calls (the GIL), so more cores need more
processes. The primary is the one writer; each replica opens the same store read-only and applies the
primary's log (engine/replica/), serving reads and forwarding writes (server/forward.py).

- **Ports.** Every process binds the shared port (SO_REUSEPORT, gRPC's default on Linux): the kernel hands each
  new *connection* to one of them; the calls of a connection all go to that process. Each process also binds a
  port of its own (`process_ports`), which clients that keep one channel can balance over call by call
  (`round_robin` over the list; README) and which this supervisor checks health on.
- **Start order.** The children are new programs (fork + exec), so no gRPC server or LMDB environment crosses a
  fork. The primary starts first (it seeds an empty data dir and fixes LMDB's reader table size); replicas
  start once it answers SERVING.
- **Restarts.** A child that exits while the supervisor runs is started again at once if it had come up
  (answered SERVING), after a growing back-off if it died while starting (a crash loop: bad flags, a full disk).
  Replicas keep serving reads while the primary is down; writes meanwhile get UNAVAILABLE.
- **Stopping.** SIGTERM or SIGINT: replicas drain first, then the primary, which commits what is queued and
  writes a final checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from streamrec.clients.client import StreamrecClient
from streamrec.server.tls import TlsFiles

log = logging.getLogger(__name__)

_POLL_S = 0.2
_BACKOFF_MAX_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Member:
    name: str  # "primary", "replica-1", ...
    argv: list[str]
    process_port: int
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    serving: bool = False  # answered SERVING since its last start
    backoff_s: float = 0.0
    due_at: float = 0.0  # when a dead one may start again


@dataclass
class Supervisor:
    """serve_argv(role, process_port, primary_target) -> the `streamrec serve` arguments of one child."""

    serve_argv: object
    host: str
    port: int
    replicas: int
    process_ports: list[int] = field(default_factory=list)  # primary first; free ports when empty
    tls: TlsFiles | None = None
    start_timeout_s: float = 900.0  # the primary may seed a dataset first
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stopping = threading.Event()
        if not self.port:
            self.port = free_port(self.host)
        ports = list(self.process_ports) or [free_port(self.host) for _ in range(self.replicas + 1)]
        if len(ports) != self.replicas + 1:
            raise ValueError(f"{self.replicas + 1} process ports needed (the primary's first), got {len(ports)}")
        primary_target = f"{self.host}:{ports[0]}"
        self.members = [Member("primary", self.serve_argv("primary", ports[0], None), ports[0])]
        self.members += [Member(f"replica-{i}", self.serve_argv("replica", ports[i], primary_target), ports[i])
                         for i in range(1, self.replicas + 1)]

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """The primary, then the replicas, each waited for until SERVING."""
        for member in self.members:
            self._spawn(member)
            self._wait_serving(member)
        log.info("serving on %s:%d from %d processes (process ports %s)", self.host, self.port, len(self.members),
                 ", ".join(str(m.process_port) for m in self.members))

    def run_forever(self) -> int:
        def on_signal(signum, _frame):
            log.info("received %s: stopping the replicas, then the primary", signal.Signals(signum).name)
            self._stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            self.start()
            while not self._stopping.wait(_POLL_S):
                self.watch()
        finally:
            self.stop()
        return 0

    def watch(self) -> None:
        """Start again any child that exited (after its back-off); note which restarted ones came up."""
        now = time.monotonic()
        for member in self.members:
            if member.proc is None:
                continue
            if member.proc.poll() is None:
                if not member.serving:
                    member.serving = self._is_serving(member)
                continue
            if member.due_at == 0.0:
                member.backoff_s = 0.0 if member.serving else min(max(2 * member.backoff_s, 0.5), _BACKOFF_MAX_S)
                member.due_at = now + member.backoff_s
                log.warning("%s (pid %d) exited with %s after %.1f s; restarting%s", member.name, member.proc.pid,
                            member.proc.returncode, now - member.started_at,
                            f" in {member.backoff_s:.1f} s (it died while starting)" if member.backoff_s else "")
            if now >= member.due_at:
                member.restarts += 1
                self._spawn(member)

    def stop(self, grace_s: float = 30.0) -> None:
        self._stopping.set()
        for group in (self.members[1:], self.members[:1]):  # replicas first: the primary drains writes last
            running = [m for m in group if m.proc is not None and m.proc.poll() is None]
            for member in running:
                member.proc.send_signal(signal.SIGTERM)
            for member in running:
                try:
                    member.proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.error("%s did not stop in %.0f s: killing it", member.name, grace_s)
                    member.proc.kill()
                    member.proc.wait()

    # --- children -----------------------------------------------------------------------------------
    def _spawn(self, member: Member) -> None:
        env = {**os.environ, "STREAMREC_PROCESS_NAME": member.name}
        member.proc = subprocess.Popen([sys.executable, "-m", "streamrec.cli", *member.argv], env=env)
        member.started_at, member.due_at, member.serving = time.monotonic(), 0.0, False
        log.info("%s started (pid %d, process port %d)", member.name, member.proc.pid, member.process_port)

    def _wait_serving(self, member: Member) -> None:
        address = f"{self.host}:{member.process_port}"
        with self._client(address) as client:
            deadline = time.monotonic() + self.start_timeout_s
            while not self._stopping.is_set():
                if member.proc.poll() is not None:
                    raise RuntimeError(f"{member.name} exited with {member.proc.returncode} while starting")
                try:
                    client.wait_until_serving(min(5.0, max(deadline - time.monotonic(), 0.1)))
                    member.serving = True
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{member.name} not SERVING after {self.start_timeout_s:.0f} s") from None

    def _is_serving(self, member: Member) -> bool:
        with self._client(f"{self.host}:{member.process_port}") as client:
            try:
                return client.health(timeout_s=0.1, retry=False) == "SERVING"
            except grpc.RpcError:
                return False

    def _client(self, address: str) -> StreamrecClient:
        if self.tls is None:
            return StreamrecClient(address)
        return StreamrecClient(address, tls=True, root_certificates=Path(self.tls.cert),
                               certificate_chain=Path(self.tls.cert) if self.tls.mutual else None,
                               private_key=Path(self.tls.key) if self.tls.mutual else None)
