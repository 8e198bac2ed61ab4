"""Run `streamrec serve` as a separate process: tests and benchmarks SIGKILL it like a real crash."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from streamrec.clients.client import StreamrecClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, dataset: str = "synthetic", dim: int = 16, port: int | None = None,
                 extra_args: tuple[str, ...] = (), cpus: set[int] | None = None):
        """cpus: pin the server to these CPUs (benchmarks keep it apart from the load generator)."""
        self.data_dir, self.dataset, self.dim, self.extra_args = Path(data_dir), dataset, dim, tuple(extra_args)
        self.cpus = set(cpus) if cpus else None
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"

    def start(self, timeout_s: float = 90.0) -> "ServerProcess":
        args = [sys.executable, "-m", "streamrec.cli", "serve", "--port", str(self.port), "--data-dir",
                str(self.data_dir), "--dataset", self.dataset, "--dim", str(self.dim), *self.extra_args]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        pin = None
        if self.cpus:
            env["NUMBA_NUM_THREADS"] = str(len(self.cpus))  # Numba sizes its pool by the machine, not the mask
            cpus = self.cpus
            pin = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731  before exec, so every thread inherits it
        self.proc = subprocess.Popen(args, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=pin)
        with StreamrecClient(self.address) as client:
            try:
                client.wait_until_serving(timeout_s)
            except TimeoutError:
                self.kill()
                raise RuntimeError(f"server did not start; log:\n{self.log_path.read_text()[-3000:]}") from None
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (all its threads)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)
