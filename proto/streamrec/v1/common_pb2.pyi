from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_VIEW: _ClassVar[EventType]
    EVENT_TYPE_CLICK: _ClassVar[EventType]
    EVENT_TYPE_ADD_TO_CART: _ClassVar[EventType]
    EVENT_TYPE_PURCHASE: _ClassVar[EventType]
    EVENT_TYPE_RATING: _ClassVar[EventType]
    EVENT_TYPE_SKIP: _ClassVar[EventType]
    EVENT_TYPE_DISLIKE: _ClassVar[EventType]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_VIEW: EventType
EVENT_TYPE_CLICK: EventType
EVENT_TYPE_ADD_TO_CART: EventType
EVENT_TYPE_PURCHASE: EventType
EVENT_TYPE_RATING: EventType
EVENT_TYPE_SKIP: EventType
EVENT_TYPE_DISLIKE: EventType

class ServedBy(_message.Message):
    __slots__ = ("model_version", "embedding_version", "applied_seq", "backend", "reranker", "log_id", "user_model")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQ_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RERANKER_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_MODEL_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    embedding_version: int
    applied_seq: int
    backend: str
    reranker: str
    log_id: str
    user_model: str
    def __init__(self, model_version: _Optional[str] = ..., embedding_version: _Optional[int] = ..., applied_seq: _Optional[int] = ..., backend: _Optional[str] = ..., reranker: _Optional[str] = ..., log_id: _Optional[str] = ..., user_model: _Optional[str] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "retrieval_score", "categories", "because")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    BECAUSE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    retrieval_score: float
    categories: _containers.RepeatedScalarFieldContainer[str]
    because: _containers.RepeatedCompositeFieldContainer[Because]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., retrieval_score: _Optional[float] = ..., categories: _Optional[_Iterable[str]] = ..., because: _Optional[_Iterable[_Union[Because, _Mapping]]] = ...) -> None: ...

class Because(_message.Message):
    __slots__ = ("item_id", "similarity")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    similarity: float
    def __init__(self, item_id: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...
