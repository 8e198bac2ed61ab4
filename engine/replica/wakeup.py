"""Wake-up hints from the primary to its replicas, one FIFO per replica in ``<store>/replicas/``.

LMDB has no commit notification, so after each group commit the primary writes one byte down every replica's
FIFO and the replica reads the log at once instead of at its next poll. The hint carries nothing: a replica reads
by sequence number, so a lost, late or duplicated hint changes only how soon it reads (replicas also poll).

FIFOs rather than Unix sockets: their path is a plain file name (socket paths stop at 108 bytes), and writing to
one whose reader died fails with EPIPE, which tells the primary to drop it.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import time
from pathlib import Path

log = logging.getLogger(__name__)

FOLDER = "replicas"  # inside the store's folder
_SUFFIX = ".fifo"
_RELIST_S = 1.0  # the primary re-lists the folder at least this often (directory mtimes are coarse)


def folder_of(store_path: Path) -> Path:
    return Path(store_path) / FOLDER


class WakeupSender:
    """The primary's side: `send()` after each commit costs one non-blocking write per replica."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._fds: dict[str, int] = {}
        self._listed_mtime: int | None = None
        self._listed_at = 0.0

    @property
    def replicas(self) -> int:
        """Replicas registered (a FIFO with a live reader)."""
        self._refresh()
        return len(self._fds)

    def _refresh(self) -> None:
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return
        now = time.monotonic()
        if mtime == self._listed_mtime and now - self._listed_at < _RELIST_S:
            return
        self._listed_mtime, self._listed_at = mtime, now
        names = {entry.name for entry in os.scandir(self.folder) if entry.name.endswith(_SUFFIX)}
        for name in set(self._fds) - names:
            os.close(self._fds.pop(name))
        for name in names - set(self._fds):
            try:
                self._fds[name] = os.open(self.folder / name, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as error:
                if error.errno == errno.ENXIO:  # no reader: the replica died
                    self._remove(name)
                elif error.errno != errno.ENOENT:
                    raise

    def send(self) -> None:
        self._refresh()
        for name, fd in list(self._fds.items()):
            try:
                os.write(fd, b"\0")
            except BlockingIOError:
                pass  # the FIFO is full of hints it has not read yet: one more adds nothing
            except BrokenPipeError:  # its reader died
                os.close(self._fds.pop(name))
                self._remove(name)

    def _remove(self, name: str) -> None:
        try:
            os.unlink(self.folder / name)
            log.info("replica wake-up %s removed: its process is gone", name)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class WakeupReceiver:
    """A replica's side: `wait(timeout_s)` returns at the next hint or after the timeout."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{os.getpid()}{_SUFFIX}"
        staging = folder / f".{os.getpid()}.staging"
        staging.unlink(missing_ok=True)
        os.mkfifo(staging)
        # Read-write: the FIFO always has a writer (this process), so it never reads as end-of-file when the
        # primary restarts. Renamed into place only once open, so the primary never finds it without a reader.
        self._fd = os.open(staging, os.O_RDWR | os.O_NONBLOCK)
        os.rename(staging, self.path)

    def wait(self, timeout_s: float) -> bool:
        """True when woken by a hint (all pending hints are consumed), False on timeout."""
        ready, _, _ = select.select([self._fd], [], [], timeout_s)
        if not ready:
            return False
        try:
            while os.read(self._fd, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        os.close(self._fd)
        self.path.unlink(missing_ok=True)
