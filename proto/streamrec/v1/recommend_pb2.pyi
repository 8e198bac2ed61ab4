from streamrec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UserModel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USER_MODEL_DEFAULT: _ClassVar[UserModel]
    USER_MODEL_IALS: _ClassVar[UserModel]
    USER_MODEL_SEQUENCE: _ClassVar[UserModel]
USER_MODEL_DEFAULT: UserModel
USER_MODEL_IALS: UserModel
USER_MODEL_SEQUENCE: UserModel

class RerankOptions(_message.Message):
    __slots__ = ("enabled", "candidates")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    candidates: int
    def __init__(self, enabled: _Optional[bool] = ..., candidates: _Optional[int] = ...) -> None: ...

class Diversity(_message.Message):
    __slots__ = ("mmr_lambda", "max_per_category")
    MMR_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    mmr_lambda: float
    max_per_category: int
    def __init__(self, mmr_lambda: _Optional[float] = ..., max_per_category: _Optional[int] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "k", "exclude_seen", "exclude_item_ids", "include_categories", "exclude_categories", "rerank", "min_seq", "log_id", "user_model", "diversity", "explain")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_MODEL_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    k: int
    exclude_seen: bool
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_categories: _containers.RepeatedScalarFieldContainer[str]
    rerank: RerankOptions
    min_seq: int
    log_id: str
    user_model: UserModel
    diversity: Diversity
    explain: bool
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_seen: _Optional[bool] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., include_categories: _Optional[_Iterable[str]] = ..., exclude_categories: _Optional[_Iterable[str]] = ..., rerank: _Optional[_Union[RerankOptions, _Mapping]] = ..., min_seq: _Optional[int] = ..., log_id: _Optional[str] = ..., user_model: _Optional[_Union[UserModel, str]] = ..., diversity: _Optional[_Union[Diversity, _Mapping]] = ..., explain: _Optional[bool] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("request_id", "user_id", "items", "strategy", "served_by", "server_latency_us", "error", "recommendation_id", "experiment", "arm")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    SERVER_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredItem]
    strategy: str
    served_by: _common_pb2.ServedBy
    server_latency_us: int
    error: Status
    recommendation_id: str
    experiment: str
    arm: str
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[_common_pb2.ScoredItem, _Mapping]]] = ..., strategy: _Optional[str] = ..., served_by: _Optional[_Union[_common_pb2.ServedBy, _Mapping]] = ..., server_latency_us: _Optional[int] = ..., error: _Optional[_Union[Status, _Mapping]] = ..., recommendation_id: _Optional[str] = ..., experiment: _Optional[str] = ..., arm: _Optional[str] = ...) -> None: ...

class RecommendBatchRequest(_message.Message):
    __slots__ = ("requests", "min_seq", "log_id")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RecommendRequest]
    min_seq: int
    log_id: str
    def __init__(self, requests: _Optional[_Iterable[_Union[RecommendRequest, _Mapping]]] = ..., min_seq: _Optional[int] = ..., log_id: _Optional[str] = ...) -> None: ...

class RecommendBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[RecommendResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[RecommendResponse, _Mapping]]] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("request_id", "item_id", "k", "include_categories", "exclude_categories", "min_seq", "log_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    item_id: str
    k: int
    include_categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_categories: _containers.RepeatedScalarFieldContainer[str]
    min_seq: int
    log_id: str
    def __init__(self, request_id: _Optional[str] = ..., item_id: _Optional[str] = ..., k: _Optional[int] = ..., include_categories: _Optional[_Iterable[str]] = ..., exclude_categories: _Optional[_Iterable[str]] = ..., min_seq: _Optional[int] = ..., log_id: _Optional[str] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("request_id", "item_id", "items", "served_by", "server_latency_us")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    SERVER_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    item_id: str
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.ScoredItem]
    served_by: _common_pb2.ServedBy
    server_latency_us: int
    def __init__(self, request_id: _Optional[str] = ..., item_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[_common_pb2.ScoredItem, _Mapping]]] = ..., served_by: _Optional[_Union[_common_pb2.ServedBy, _Mapping]] = ..., server_latency_us: _Optional[int] = ...) -> None: ...
