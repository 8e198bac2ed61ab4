"""Engine settings and the documented request limits."""
from __future__ import annotations

from dataclasses import dataclass, field

STORE_FOLDER = "lmdb"  # a server's data dir holds its Engine's folder under this name


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
    # Time decay of the events in the online fold-in: an event's confidence halves every half-life before the
    # user's latest event, but never below the floor, so older taste still counts.
    user_half_life_days: float = 30.0
    user_decay_floor: float = 0.25
    # Online learning model (engine/state/online.py): per event, an iALS fold-in of the user's latest events and a
    # small step of the item. Chosen on the ML-100K prequential replay (the grid: benchmarks/RESULTS.md, "Figures behind design choices").
    online_alpha: float = 10.0  # confidence 1 + alpha * strength of an event
    online_reg: float = 10.0
    online_cg_steps: int = 2  # warm-started conjugate-gradient steps per event
    online_history: int = 20  # latest events of the user in the fold-in (at most history_len)
    item_lr: float = 0.005  # item step per event, plus item_lr_new / (1 + interactions) for new items
    item_lr_new: float = 0.02
    popularity_half_life_days: float = 14.0
    checkpoint_interval_s: float = 30.0
    checkpoint_every_records: int = 50_000
    # A checkpoint runs on its own thread but still costs CPU (a 100k-item catalog: ~1 s to rewrite the items that
    # changed) and stops the writer for its snapshot. Under sustained ingest the records trigger above waits until
    # 1/share times as long as the last checkpoint took has passed, so checkpoints take at most this share of the
    # time; the log replays the rest.
    checkpoint_max_share: float = 0.1
    commit_queue_size: int = 4096  # pending write operations before RESOURCE_EXHAUSTED
    max_group_ops: int = 512  # operations folded into one LMDB transaction
    sync: bool = True  # fsync every commit: acks promise durability
    # Dynamic batching of concurrent recommendation requests into one kernel call.
    max_batch: int = 256
    max_wait_us: int = 500  # only waited when recent batches show concurrency
    recommend_queue_size: int = 8192  # waiting requests before RESOURCE_EXHAUSTED
    # Read-your-writes: how long a read carrying min_seq waits for this process to apply it before UNAVAILABLE.
    min_seq_wait_s: float = 1.0
    # Second stage (rerank/reranker.py): an ONNX model reorders the retrieved candidates. None: retrieval only.
    reranker_path: str | None = None
    rerank_by_default: bool = True  # requests that do not say (rerank.enabled unset) are reranked
    rerank_candidates: int = 200  # retrieved candidates per reranked request, unless the request says
    rerank_provider: str = "auto"  # auto (CUDA when usable, else CPU), cpu, cuda
    rerank_threads: int = 1  # ONNX Runtime intra-op threads
    # The user model (engine/sequence/tower.py): "ials" answers from the online fold-in, "sequence" from the ONNX
    # sequence tower at sequence_model_path, kept current with the user's events; "auto": sequence when that
    # model fits the store's item space, else ials. A request may name either; the sequence one needs a model.
    # Replicas must load the same model to give the same answers.
    user_model: str = "ials"
    sequence_model_path: str | None = None
    # When the tower recomputes a user's query: "read", on the first read after the user's events change (a
    # cache keyed by the user's event count); "event", for every user of each applied batch (the writer pays).
    # Both give the same bits: the query is a function of the user's history.
    sequence_update: str = "read"
    # The impression log (feedback/impressions.py): every answer's items, for attribution; bounded and shed
    # under overload, never waited for.
    impressions: bool = True
    impression_max_records: int = 1_000_000
    impression_max_age_days: float = 30.0
    attribution_window_s: float = 24 * 3600.0
    impression_queue: int = 65_536
    # Share of personalised answers whose reranker feature rows are logged with the impression (float16, about
    # 4 KB per answer of 10 at d = 64), computed when answering: what `train-reranker --from-log` learns from.
    impression_features: float = 0.0
    limits: Limits = field(default_factory=Limits)
