"""Binary encoding of write-ahead-log records and small packing helpers shared with the store.

Every payload starts with two bytes: the record kind and a format version, so the layout of one
kind can change later without ambiguity. Integers and floats are little-endian; strings are UTF-8
prefixed by a u32 byte length. This is on the event hot path, so it is plain ``struct`` with
precompiled formats: no JSON, no pickle.

Layouts (after the common ``kind:u8 version:u8`` prefix):

- EVENT (1):       type:u8 value:f64 timestamp_ms:i64 len(event_id):u32 len(user_id):u32
                   len(item_id):u32, then the three UTF-8 strings back to back.
- UPSERT_ITEM (2): flags:u8 (bit 0 = vector present), item_id:str, categories:str-list,
                   attributes:str-map, then if flagged: dim:u32 + dim float32.
- DELETE_ITEM (3): item_id:str
- USER_FORGOTTEN (4): count:u32 + count seq:u64: the records a ForgetUser erased (who is not said: the log keeps
                   no trace of a forgotten user). Replicas reload from the checkpoint written after it; one that
                   keeps its own copy of the log erases the same seqs from it.
- RERANKER (5):    path:str version:str; path "" = unloaded (retrieval only). The serving second stage from
                   this seq on, so replicas swap the same model at the same point of the log.

str-list = count:u32 + count strings; str-map = count:u32 + count (key, value) string pairs, in
the dict's iteration order (so round trips keep it).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from streamrec.engine.api import Event, EventType, ItemSpec

__all__ = [
    "VERSION",
    "RecordKind",
    "DeleteItem",
    "UserForgotten",
    "RerankerSwap",
    "LogRecord",
    "encode_event",
    "encode_events",
    "encode_upsert",
    "encode_delete",
    "encode_user_forgotten",
    "encode_reranker",
    "decode",
    "decode_kind",
    "encode_str",
    "decode_str",
    "encode_str_list",
    "decode_str_list",
    "encode_str_map",
    "decode_str_map",
    "vector_to_bytes",
    "vector_from_bytes",
    "array_to_bytes",
    "array_from_bytes",
]


class RecordKind(IntEnum):
    EVENT = 1
    UPSERT_ITEM = 2
    DELETE_ITEM = 3
    USER_FORGOTTEN = 4
    RERANKER = 5


VERSION = 1  # bump per kind when its layout changes; decode rejects versions it does not know

VECTOR_DTYPE = np.dtype("<f4")

_U32 = struct.Struct("<I")
_EVENT = struct.Struct("<BBBdqIII")
_EVENT_HDR_SIZE = _EVENT.size
_EVENT_KIND = int(RecordKind.EVENT)

_UPSERT_PREFIX = bytes([RecordKind.UPSERT_ITEM, VERSION])
_DELETE_PREFIX = bytes([RecordKind.DELETE_ITEM, VERSION])
_FORGOTTEN_PREFIX = bytes([RecordKind.USER_FORGOTTEN, VERSION])
_RERANKER_PREFIX = bytes([RecordKind.RERANKER, VERSION])

_FLAG_VECTOR = 1


@dataclass(slots=True)
class DeleteItem:
    item_id: str


@dataclass(slots=True)
class UserForgotten:
    """Marks an erasure: the records it removed lie before this one."""

    erased_seqs: list[int]


@dataclass(slots=True)
class RerankerSwap:
    path: str  # "" = unloaded
    version: str


LogRecord = Event | ItemSpec | DeleteItem | UserForgotten | RerankerSwap


# --- strings and containers -------------------------------------------------------------------


def encode_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return _U32.pack(len(b)) + b


def decode_str(buf: bytes, offset: int) -> tuple[str, int]:
    """Read one length-prefixed string at ``offset``; returns (string, offset after it)."""
    (n,) = _U32.unpack_from(buf, offset)
    start = offset + 4
    end = start + n
    if end > len(buf):
        raise ValueError("truncated string")
    return buf[start:end].decode("utf-8"), end


def encode_str_list(items: list[str] | tuple[str, ...]) -> bytes:
    parts = [_U32.pack(len(items))]
    for s in items:
        parts.append(encode_str(s))
    return b"".join(parts)


def decode_str_list(buf: bytes, offset: int) -> tuple[list[str], int]:
    (n,) = _U32.unpack_from(buf, offset)
    offset += 4
    out: list[str] = []
    for _ in range(n):
        s, offset = decode_str(buf, offset)
        out.append(s)
    return out, offset


def encode_str_map(mapping: dict[str, str]) -> bytes:
    parts = [_U32.pack(len(mapping))]
    for k, v in mapping.items():
        parts.append(encode_str(k))
        parts.append(encode_str(v))
    return b"".join(parts)


def decode_str_map(buf: bytes, offset: int) -> tuple[dict[str, str], int]:
    (n,) = _U32.unpack_from(buf, offset)
    offset += 4
    out: dict[str, str] = {}
    for _ in range(n):
        k, offset = decode_str(buf, offset)
        v, offset = decode_str(buf, offset)
        out[k] = v
    return out, offset


# --- arrays -----------------------------------------------------------------------------------


def array_to_bytes(a: np.ndarray, dtype: np.dtype | str) -> bytes:
    """Raw little-endian bytes of a 1-D array converted to ``dtype`` (no header)."""
    arr = np.asarray(a, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {arr.shape}")
    return arr.tobytes()


def array_from_bytes(buf: bytes | memoryview, dtype: np.dtype | str, count: int = -1, offset: int = 0) -> np.ndarray:
    """Inverse of array_to_bytes. Returns an owned, writable, aligned copy (never a view of ``buf``)."""
    return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).copy()


def vector_to_bytes(v: np.ndarray) -> bytes:
    """float32 little-endian bytes of a 1-D vector."""
    return array_to_bytes(v, VECTOR_DTYPE)


def vector_from_bytes(buf: bytes | memoryview, count: int = -1, offset: int = 0) -> np.ndarray:
    """A native float32 array from vector_to_bytes output."""
    return array_from_bytes(buf, VECTOR_DTYPE, count, offset).astype(np.float32, copy=False)


# --- log records ------------------------------------------------------------------------------


def encode_event(e: Event) -> bytes:
    eid = e.event_id.encode("utf-8")
    uid = e.user_id.encode("utf-8")
    iid = e.item_id.encode("utf-8")
    try:
        head = _EVENT.pack(_EVENT_KIND, VERSION, int(e.type), e.value, e.timestamp_ms, len(eid), len(uid), len(iid))
    except struct.error as exc:  # e.g. timestamp outside int64, type outside u8
        raise ValueError(f"cannot encode event {e.event_id!r}: {exc}") from exc
    return b"".join((head, eid, uid, iid))


def encode_events(events: list[Event]) -> list[bytes]:
    """encode_event of each event (same bytes), for the writer's hot path: one loop with the packer bound
    locally and the enum turned into an int once, about half the cost per event."""
    pack, kind, out = _EVENT.pack, _EVENT_KIND, []
    append = out.append
    try:
        for e in events:
            eid = e.event_id.encode("utf-8")
            uid = e.user_id.encode("utf-8")
            iid = e.item_id.encode("utf-8")
            append(b"".join((pack(kind, VERSION, e.type, e.value, e.timestamp_ms, len(eid), len(uid), len(iid)),
                             eid, uid, iid)))
    except struct.error:
        for e in events:  # raises the ValueError naming the event at fault
            encode_event(e)
        raise
    return out


def encode_upsert(spec: ItemSpec) -> bytes:
    vec = spec.vector
    parts = [
        _UPSERT_PREFIX,
        bytes([_FLAG_VECTOR if vec is not None else 0]),
        encode_str(spec.item_id),
        encode_str_list(spec.categories),
        encode_str_map(spec.attributes),
    ]
    if vec is not None:
        raw = vector_to_bytes(vec)
        parts.append(_U32.pack(len(raw) // 4))
        parts.append(raw)
    return b"".join(parts)


def encode_delete(item_id: str) -> bytes:
    return _DELETE_PREFIX + encode_str(item_id)


def encode_user_forgotten(erased_seqs: list[int]) -> bytes:
    return _FORGOTTEN_PREFIX + struct.pack(f"<I{len(erased_seqs)}Q", len(erased_seqs), *erased_seqs)


def encode_reranker(path: str, version: str) -> bytes:
    return _RERANKER_PREFIX + encode_str(path) + encode_str(version)


def decode_kind(payload: bytes | memoryview) -> RecordKind:
    """Kind of a payload without decoding it (e.g. to skip records cheaply)."""
    if not payload:
        raise ValueError("empty payload")
    try:
        return RecordKind(payload[0])
    except ValueError:
        raise ValueError(f"unknown record kind {payload[0]}") from None


def decode(payload: bytes | memoryview) -> LogRecord:
    """Decode one payload. Raises ValueError for unknown kinds/versions and malformed data."""
    if not isinstance(payload, bytes):
        payload = bytes(payload)
    if len(payload) < 2:
        raise ValueError("payload too short")
    kind, version = payload[0], payload[1]
    if version != VERSION:
        raise ValueError(f"unsupported version {version} for record kind {kind}")
    try:
        if kind == RecordKind.EVENT:
            return _decode_event(payload)
        if kind == RecordKind.UPSERT_ITEM:
            return _decode_upsert(payload)
        if kind == RecordKind.DELETE_ITEM:
            item_id, end = decode_str(payload, 2)
            _check_end(payload, end)
            return DeleteItem(item_id)
        if kind == RecordKind.USER_FORGOTTEN:
            (count,) = _U32.unpack_from(payload, 2)
            _check_end(payload, 6 + 8 * count)
            return UserForgotten(list(struct.unpack_from(f"<{count}Q", payload, 6)))
        if kind == RecordKind.RERANKER:
            path, off = decode_str(payload, 2)
            version, end = decode_str(payload, off)
            _check_end(payload, end)
            return RerankerSwap(path, version)
    except struct.error as exc:
        raise ValueError(f"malformed record of kind {kind}: {exc}") from exc
    raise ValueError(f"unknown record kind {kind}")


def _check_end(payload: bytes, end: int) -> None:
    if end != len(payload):
        raise ValueError(f"record length mismatch: parsed {end} of {len(payload)} bytes")


def _decode_event(payload: bytes) -> Event:
    _, _, etype, value, ts, n1, n2, n3 = _EVENT.unpack_from(payload, 0)
    a = _EVENT_HDR_SIZE
    b = a + n1
    c = b + n2
    d = c + n3
    _check_end(payload, d)
    return Event(
        payload[a:b].decode("utf-8"),
        payload[b:c].decode("utf-8"),
        payload[c:d].decode("utf-8"),
        EventType(etype),
        value,
        ts,
    )


def _decode_upsert(payload: bytes) -> ItemSpec:
    flags = payload[2]
    item_id, off = decode_str(payload, 3)
    categories, off = decode_str_list(payload, off)
    attributes, off = decode_str_map(payload, off)
    vector = None
    if flags & _FLAG_VECTOR:
        (dim,) = _U32.unpack_from(payload, off)
        off += 4
        end = off + 4 * dim
        if end > len(payload):
            raise ValueError("truncated vector")
        vector = vector_from_bytes(payload, dim, off)
        off = end
    _check_end(payload, off)
    return ItemSpec(item_id, categories, attributes, vector)
