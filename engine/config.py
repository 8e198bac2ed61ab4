"""Engine settings and the documented request limits."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """Hard limits on one request; anything beyond gets INVALID_ARGUMENT naming the field."""

    max_k: int = 1000
    max_events_per_batch: int = 10_000
    max_requests_per_batch: int = 1024
    max_filter_ids: int = 10_000
    max_id_bytes: int = 256
    max_items_per_upsert: int = 10_000
    max_categories_per_item: int = 64
    max_attribute_bytes: int = 4096
    # Timestamps outside [min, now + max_future] are rejected: they would poison time decay.
    min_timestamp_ms: int = 0
    max_future_ms: int = 24 * 3600 * 1000


@dataclass(frozen=True)
class EngineConfig:
    dim: int = 64
    backend: str = "auto"  # top-k: auto (cuda if a GPU is usable, else numba), numpy, numba, cuda
    gpu_storage: str = "float32"  # item matrix on the GPU: float32 or float16 (float32 accumulation)
    default_k: int = 10
    history_len: int = 50  # recent events kept per user (seen items are kept in full)
    # Online rule: the user's accumulator decays with this half-life between their events, but never
    # below the floor, so a long-idle user keeps part of their taste instead of being reset by one event.
    user_half_life_days: float = 30.0
    user_decay_floor: float = 0.25
    popularity_half_life_days: float = 14.0
    checkpoint_interval_s: float = 30.0
    checkpoint_every_records: int = 50_000
    commit_queue_size: int = 4096  # pending write operations before RESOURCE_EXHAUSTED
    max_group_ops: int = 512  # operations folded into one LMDB transaction
    sync: bool = True  # fsync every commit: acks promise durability
    # Dynamic batching of concurrent recommendation requests into one kernel call.
    max_batch: int = 256
    max_wait_us: int = 500  # only waited when recent batches show concurrency
    recommend_queue_size: int = 8192  # waiting requests before RESOURCE_EXHAUSTED
    limits: Limits = field(default_factory=Limits)
