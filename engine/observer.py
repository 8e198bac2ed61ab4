"""Hooks through which the engine reports what it does, without depending on a metrics library.
The server plugs a Prometheus implementation in (server/metrics.py)."""
from __future__ import annotations


class EngineObserver:
    def commit(self, seconds: float, records: int) -> None:
        """One group commit: the LMDB transaction took `seconds` and wrote `records` log records."""

    def checkpoint(self, seconds: float, items: int, users: int) -> None:
        """A checkpoint was written."""

    def recommend_batch(self, size: int) -> None:
        """One kernel call served `size` requests."""

    def events(self, accepted: int, duplicates: int, rejected: int) -> None:
        """An ingest call finished."""
