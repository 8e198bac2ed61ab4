from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SnapshotRequest(_message.Message):
    __slots__ = ("log_id", "at_least_seq")
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    AT_LEAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    log_id: str
    at_least_seq: int
    def __init__(self, log_id: _Optional[str] = ..., at_least_seq: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("log_id", "watermark", "meta", "items", "users")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    log_id: str
    watermark: int
    meta: _containers.ScalarMap[str, bytes]
    items: _containers.RepeatedScalarFieldContainer[bytes]
    users: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, log_id: _Optional[str] = ..., watermark: _Optional[int] = ..., meta: _Optional[_Mapping[str, bytes]] = ..., items: _Optional[_Iterable[bytes]] = ..., users: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TailLogRequest(_message.Message):
    __slots__ = ("log_id", "from_seq")
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    log_id: str
    from_seq: int
    def __init__(self, log_id: _Optional[str] = ..., from_seq: _Optional[int] = ...) -> None: ...

class LogRecord(_message.Message):
    __slots__ = ("seq", "payload")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    seq: int
    payload: bytes
    def __init__(self, seq: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class LogBatch(_message.Message):
    __slots__ = ("records", "last_seq")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[LogRecord]
    last_seq: int
    def __init__(self, records: _Optional[_Iterable[_Union[LogRecord, _Mapping]]] = ..., last_seq: _Optional[int] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("name", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...
