from streamrec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Item(_message.Message):
    __slots__ = ("item_id", "categories", "attributes", "embedding", "deleted", "interactions", "popularity", "last_event_ms")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    POPULARITY_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_MS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    categories: _containers.RepeatedScalarFieldContainer[str]
    attributes: _containers.ScalarMap[str, str]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    deleted: bool
    interactions: int
    popularity: float
    last_event_ms: int
    def __init__(self, item_id: _Optional[str] = ..., categories: _Optional[_Iterable[str]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., embedding: _Optional[_Iterable[float]] = ..., deleted: _Optional[bool] = ..., interactions: _Optional[int] = ..., popularity: _Optional[float] = ..., last_event_ms: _Optional[int] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("created", "updated", "durable_seq", "log_id")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    created: int
    updated: int
    durable_seq: int
    log_id: str
    def __init__(self, created: _Optional[int] = ..., updated: _Optional[int] = ..., durable_seq: _Optional[int] = ..., log_id: _Optional[str] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ("deleted", "not_found", "durable_seq", "log_id")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    DURABLE_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    durable_seq: int
    log_id: str
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ..., durable_seq: _Optional[int] = ..., log_id: _Optional[str] = ...) -> None: ...

class GetItemRequest(_message.Message):
    __slots__ = ("item_id", "include_embedding", "min_seq", "log_id")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    include_embedding: bool
    min_seq: int
    log_id: str
    def __init__(self, item_id: _Optional[str] = ..., include_embedding: _Optional[bool] = ..., min_seq: _Optional[int] = ..., log_id: _Optional[str] = ...) -> None: ...

class GetUserRequest(_message.Message):
    __slots__ = ("user_id", "include_embedding", "history_limit", "min_seq", "log_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    HISTORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    include_embedding: bool
    history_limit: int
    min_seq: int
    log_id: str
    def __init__(self, user_id: _Optional[str] = ..., include_embedding: _Optional[bool] = ..., history_limit: _Optional[int] = ..., min_seq: _Optional[int] = ..., log_id: _Optional[str] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("item_id", "type", "value", "timestamp_ms")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    type: _common_pb2.EventType
    value: float
    timestamp_ms: int
    def __init__(self, item_id: _Optional[str] = ..., type: _Optional[_Union[_common_pb2.EventType, str]] = ..., value: _Optional[float] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class User(_message.Message):
    __slots__ = ("user_id", "embedding", "history", "event_count", "seen_items", "last_event_ms")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    SEEN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_MS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    history: _containers.RepeatedCompositeFieldContainer[HistoryEntry]
    event_count: int
    seen_items: int
    last_event_ms: int
    def __init__(self, user_id: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., history: _Optional[_Iterable[_Union[HistoryEntry, _Mapping]]] = ..., event_count: _Optional[int] = ..., seen_items: _Optional[int] = ..., last_event_ms: _Optional[int] = ...) -> None: ...

class ForgetUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ForgetUserResponse(_message.Message):
    __slots__ = ("events_erased", "durable_seq", "log_id")
    EVENTS_ERASED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    events_erased: int
    durable_seq: int
    log_id: str
    def __init__(self, events_erased: _Optional[int] = ..., durable_seq: _Optional[int] = ..., log_id: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("min_seq", "log_id")
    MIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    min_seq: int
    log_id: str
    def __init__(self, min_seq: _Optional[int] = ..., log_id: _Optional[str] = ...) -> None: ...

class LoadRerankerRequest(_message.Message):
    __slots__ = ("path", "unload")
    PATH_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_FIELD_NUMBER: _ClassVar[int]
    path: str
    unload: bool
    def __init__(self, path: _Optional[str] = ..., unload: _Optional[bool] = ...) -> None: ...

class RerankerInfo(_message.Message):
    __slots__ = ("loaded", "path", "version", "provider", "features", "feature_spec", "default_candidates", "by_default", "loaded_at_ms", "swaps", "refused", "last_error", "reranked_requests", "failed_batches", "durable_seq", "user_model")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SPEC_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BY_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SWAPS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    RERANKED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    DURABLE_SEQ_FIELD_NUMBER: _ClassVar[int]
    USER_MODEL_FIELD_NUMBER: _ClassVar[int]
    loaded: bool
    path: str
    version: str
    provider: str
    features: int
    feature_spec: str
    default_candidates: int
    by_default: bool
    loaded_at_ms: int
    swaps: int
    refused: int
    last_error: str
    reranked_requests: int
    failed_batches: int
    durable_seq: int
    user_model: str
    def __init__(self, loaded: _Optional[bool] = ..., path: _Optional[str] = ..., version: _Optional[str] = ..., provider: _Optional[str] = ..., features: _Optional[int] = ..., feature_spec: _Optional[str] = ..., default_candidates: _Optional[int] = ..., by_default: _Optional[bool] = ..., loaded_at_ms: _Optional[int] = ..., swaps: _Optional[int] = ..., refused: _Optional[int] = ..., last_error: _Optional[str] = ..., reranked_requests: _Optional[int] = ..., failed_batches: _Optional[int] = ..., durable_seq: _Optional[int] = ..., user_model: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_k", "max_events_per_batch", "max_requests_per_batch", "max_filter_ids", "max_id_bytes", "max_items_per_upsert")
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_EVENTS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_FILTER_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ID_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_UPSERT_FIELD_NUMBER: _ClassVar[int]
    max_k: int
    max_events_per_batch: int
    max_requests_per_batch: int
    max_filter_ids: int
    max_id_bytes: int
    max_items_per_upsert: int
    def __init__(self, max_k: _Optional[int] = ..., max_events_per_batch: _Optional[int] = ..., max_requests_per_batch: _Optional[int] = ..., max_filter_ids: _Optional[int] = ..., max_id_bytes: _Optional[int] = ..., max_items_per_upsert: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("dim", "items", "deleted_items", "users", "log_events", "last_seq", "checkpoint_seq", "served_by", "uptime_s", "limits", "events_accepted", "events_rejected", "events_duplicate", "recommendations", "data_dir", "recommend_batch_sizes", "recommend_batches", "write_queue", "reranker", "role", "replicas", "replica_reloads", "pid", "snapshots_served", "user_model", "impressions")
    class RecommendBatchSizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    DIM_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DELETED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    LOG_EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SEQ_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    RECOMMEND_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    RECOMMEND_BATCHES_FIELD_NUMBER: _ClassVar[int]
    WRITE_QUEUE_FIELD_NUMBER: _ClassVar[int]
    RERANKER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_RELOADS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    USER_MODEL_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    dim: int
    items: int
    deleted_items: int
    users: int
    log_events: int
    last_seq: int
    checkpoint_seq: int
    served_by: _common_pb2.ServedBy
    uptime_s: float
    limits: Limits
    events_accepted: int
    events_rejected: int
    events_duplicate: int
    recommendations: int
    data_dir: str
    recommend_batch_sizes: _containers.ScalarMap[int, int]
    recommend_batches: int
    write_queue: int
    reranker: RerankerInfo
    role: str
    replicas: int
    replica_reloads: int
    pid: int
    snapshots_served: int
    user_model: UserModelInfo
    impressions: ImpressionInfo
    def __init__(self, dim: _Optional[int] = ..., items: _Optional[int] = ..., deleted_items: _Optional[int] = ..., users: _Optional[int] = ..., log_events: _Optional[int] = ..., last_seq: _Optional[int] = ..., checkpoint_seq: _Optional[int] = ..., served_by: _Optional[_Union[_common_pb2.ServedBy, _Mapping]] = ..., uptime_s: _Optional[float] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., events_accepted: _Optional[int] = ..., events_rejected: _Optional[int] = ..., events_duplicate: _Optional[int] = ..., recommendations: _Optional[int] = ..., data_dir: _Optional[str] = ..., recommend_batch_sizes: _Optional[_Mapping[int, int]] = ..., recommend_batches: _Optional[int] = ..., write_queue: _Optional[int] = ..., reranker: _Optional[_Union[RerankerInfo, _Mapping]] = ..., role: _Optional[str] = ..., replicas: _Optional[int] = ..., replica_reloads: _Optional[int] = ..., pid: _Optional[int] = ..., snapshots_served: _Optional[int] = ..., user_model: _Optional[_Union[UserModelInfo, _Mapping]] = ..., impressions: _Optional[_Union[ImpressionInfo, _Mapping]] = ...) -> None: ...

class ImpressionInfo(_message.Message):
    __slots__ = ("enabled", "stored", "queued", "recorded", "shed", "attributed", "unattributed", "pruned", "arms", "max_records", "max_age_days", "attribution_window_s")
    class UnattributedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    SHED_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    UNATTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    PRUNED_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    MAX_RECORDS_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_DAYS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    stored: int
    queued: int
    recorded: int
    shed: int
    attributed: int
    unattributed: _containers.ScalarMap[str, int]
    pruned: int
    arms: _containers.RepeatedCompositeFieldContainer[ArmOutcomes]
    max_records: int
    max_age_days: float
    attribution_window_s: float
    def __init__(self, enabled: _Optional[bool] = ..., stored: _Optional[int] = ..., queued: _Optional[int] = ..., recorded: _Optional[int] = ..., shed: _Optional[int] = ..., attributed: _Optional[int] = ..., unattributed: _Optional[_Mapping[str, int]] = ..., pruned: _Optional[int] = ..., arms: _Optional[_Iterable[_Union[ArmOutcomes, _Mapping]]] = ..., max_records: _Optional[int] = ..., max_age_days: _Optional[float] = ..., attribution_window_s: _Optional[float] = ...) -> None: ...

class ArmOutcomes(_message.Message):
    __slots__ = ("experiment", "arm", "impressions", "attributed", "events")
    class EventsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    arm: str
    impressions: int
    attributed: int
    events: _containers.ScalarMap[str, int]
    def __init__(self, experiment: _Optional[str] = ..., arm: _Optional[str] = ..., impressions: _Optional[int] = ..., attributed: _Optional[int] = ..., events: _Optional[_Mapping[str, int]] = ...) -> None: ...

class UserModelInfo(_message.Message):
    __slots__ = ("default_model", "sequence_version", "sequence_path", "sequence_length", "sequence_updates", "sequence_update_seconds", "item_space_cosine", "answers", "sequence_update")
    class AnswersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_PATH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_UPDATES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_UPDATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_SPACE_COSINE_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_UPDATE_FIELD_NUMBER: _ClassVar[int]
    default_model: str
    sequence_version: str
    sequence_path: str
    sequence_length: int
    sequence_updates: int
    sequence_update_seconds: float
    item_space_cosine: float
    answers: _containers.ScalarMap[str, int]
    sequence_update: str
    def __init__(self, default_model: _Optional[str] = ..., sequence_version: _Optional[str] = ..., sequence_path: _Optional[str] = ..., sequence_length: _Optional[int] = ..., sequence_updates: _Optional[int] = ..., sequence_update_seconds: _Optional[float] = ..., item_space_cosine: _Optional[float] = ..., answers: _Optional[_Mapping[str, int]] = ..., sequence_update: _Optional[str] = ...) -> None: ...
