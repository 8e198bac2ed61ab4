"""Every type that crosses the Engine's boundary: what callers pass in (events, item specs, queries) and what they
get back (results, recommendations, views, stats). Plain data: no gRPC, no protobuf, no engine internals."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class EventType(IntEnum):
    """Same numbers as streamrec.v1.EventType, so conversion is a cast."""

    VIEW = 1
    CLICK = 2
    ADD_TO_CART = 3
    PURCHASE = 4
    RATING = 5
    SKIP = 6
    DISLIKE = 7


@dataclass(slots=True)
class Event:
    event_id: str
    user_id: str
    item_id: str
    type: EventType
    value: float
    timestamp_ms: int
    # The answer the event came from (RecommendResponse.recommendation_id), for attribution; not in the log.
    recommendation_id: str = ""


@dataclass(slots=True)
class ItemSpec:
    """An item as a client describes it: vector None means "derive one from categories or the catalog mean"."""

    item_id: str
    categories: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    vector: np.ndarray | None = None


@dataclass(slots=True)
class Rejection:
    index: int
    event_id: str
    field: str
    reason: str


# --- results of writes ---
@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    first_seq: int = 0
    durable_seq: int = 0


@dataclass
class UpsertResult:
    created: int = 0
    updated: int = 0
    durable_seq: int = 0


@dataclass
class DeleteResult:
    deleted: int = 0
    not_found: list[str] = field(default_factory=list)
    durable_seq: int = 0


@dataclass
class ForgetResult:
    events_erased: int = 0
    durable_seq: int = 0  # the erasure's marker in the log: a read with this min_seq no longer sees the user


# --- reads ---
@dataclass
class RecommendQuery:
    user_id: str
    k: int
    exclude_seen: bool = True
    exclude_item_ids: list[str] = field(default_factory=list)
    include_categories: list[str] = field(default_factory=list)
    exclude_categories: list[str] = field(default_factory=list)
    request_id: str = ""
    rerank: bool | None = None  # None: the server default (rerank when a model is loaded)
    candidates: int = 0  # retrieved candidates to rerank; 0: the server default
    user_model: str = ""  # "ials" or "sequence" (config.py: user_model); "": the server default
    experiment: str = ""  # set by the engine: the running experiment and the user's arm (feedback/experiments.py)
    arm: str = ""
    mmr_lambda: float = 0.0  # diversity (engine/retrieval/diversity.py): MMR weight in [0, 1]; 0: off
    max_per_category: int = 0  # diversity: at most this many items of one category; 0: off
    explain: bool = False  # fill Recommendation.because (engine/retrieval/explain.py)


@dataclass
class Recommendation:
    request_id: str
    user_id: str
    item_ids: list[str]
    scores: np.ndarray  # float32, descending
    categories: list[list[str]]
    strategy: str  # "personalized" | "popular"
    retrieval_scores: np.ndarray | None = None  # float32, when reranked (scores are then the model's)
    reranker: str = ""  # version of the reranking model that ordered the items; "" when not reranked
    user_model: str = ""  # the user model whose query retrieved the items ("ials" or "sequence"); "" for popularity
    because: list[list[tuple[str, float]]] | None = None  # per item, (recent positive item id, cosine); when asked
    recommendation_id: str = ""  # this answer's impression (events that name it are attributed to it)
    experiment: str = ""  # the experiment and arm whose options answered; "" outside an experiment
    arm: str = ""


@dataclass
class ItemView:
    item_id: str
    categories: list[str]
    attributes: dict[str, str]
    vector: np.ndarray
    deleted: bool
    interactions: int
    popularity: float
    last_event_ms: int


@dataclass
class UserView:
    user_id: str
    vector: np.ndarray  # unit query vector (zeros when the user has no positive interest yet)
    history: list[tuple[str, int, float, int]]  # (item_id, type, value, timestamp_ms), most recent first
    event_count: int
    seen_items: int
    last_event_ms: int


# --- experiments (feedback/experiments.py) ---
ARM_OPTIONS = ("rerank", "candidates", "user_model", "mmr_lambda", "max_per_category", "explain")  # RecommendQuery
# fields an arm may set; the rest (user, k, filters) belong to the request


@dataclass
class Arm:
    name: str
    weight: float  # share of users, relative to the other arms'
    options: dict = field(default_factory=dict)  # RecommendQuery field (ARM_OPTIONS) -> value


@dataclass
class Experiment:
    name: str
    arms: list[Arm]
    description: str = ""
    created_ms: int = 0
    stopped_ms: int = 0  # 0: running

    @property
    def running(self) -> bool:
        return self.stopped_ms == 0


# --- replication (a replica on another machine; engine/replica/feed.py and remote.py) ---
@dataclass
class SnapshotData:
    """A primary's checkpointed state as replication ships it: records in the store's own encoding."""

    log_id: str
    watermark: int  # the last log seq the snapshot reflects
    meta: dict[str, bytes]  # store meta: dimension, model version, serving reranker, ...
    items: list[bytes]
    users: list[bytes]


# --- what the engine reports about itself ---
@dataclass(frozen=True, slots=True)
class ServedBy:
    """Which model and state answered: every response carries it."""

    model_version: str
    embedding_version: int
    applied_seq: int  # the last log record applied to the state that answered
    backend: str  # the top-k backend's name
    log_id: str = ""  # the log applied_seq counts in


@dataclass
class EngineStats:
    served_by: ServedBy
    dim: int
    items: int  # live items
    deleted_items: int
    users: int
    log_events: int
    last_seq: int
    checkpoint_seq: int
    uptime_s: float
    last_checkpoint_wall: float  # time.time() of the last checkpoint written
    write_queue: int  # operations waiting for the writer
    recovered_records: int  # log records replayed at the last start
    recommend_batch_sizes: dict[int, int]  # kernel batches by size bucket (1, 2, 4, ... by upper bound)
    recommend_batches: int
    reranker: dict  # Engine.reranker_info()
    events_accepted: int
    events_rejected: int
    events_duplicate: int
    recommendations: int
    data_dir: str
    role: str = "primary"  # "primary" (the writer) or "replica"
    replicas: int = 0  # on the primary: replicas registered for wake-ups
    replica_reloads: int = 0  # on a replica: reloads from a checkpoint after an erasure
    pid: int = 0  # the process that answered
    snapshots_served: int = 0  # on the primary: snapshots copied by replicas on other machines
    user_model: dict = field(default_factory=dict)  # Engine.user_model_info()
    impressions: dict = field(default_factory=dict)  # Engine.impressions_info()
