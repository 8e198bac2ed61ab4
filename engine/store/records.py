"""The checkpoint records of the state environment: items and users, and how each is packed into an LMDB value.

An item record holds the item's metadata (its vector lives in ``item_vectors``); a user record holds the user's
vector, seen rows and recent history. Both start with a version byte; a record of another version is refused.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from streamrec.engine.store import codec

__all__ = ["HISTORY_DTYPE", "ItemRecord", "UserRecord"]

HISTORY_DTYPE = np.dtype([("row", "<i4"), ("type", "u1"), ("value", "<f4"), ("ts", "<i8")])


# version, flags (bit 0: deleted), row, popularity, last_event_ms, interactions
_ITEM_HDR = struct.Struct("<BBIdqq")


# version, dim, len(seen), len(history), event_count, last_event_ms, positive_count
_USER_HDR = struct.Struct("<BIIIqqq")


_RECORD_VERSION = 1


_ITEM_DELETED = 1


@dataclass
class ItemRecord:
    item_id: str
    row: int
    categories: list[str]
    attributes: dict[str, str]
    deleted: bool
    vector: np.ndarray | None  # float32 [d]
    popularity: float  # time-decayed positive-event count
    last_event_ms: int
    interactions: int


@dataclass
class UserRecord:
    user_id: str
    vector: np.ndarray  # float32 [d] (unnormalised accumulator)
    seen: np.ndarray  # int32 item rows the user interacted with (sorted unique)
    history: np.ndarray  # HISTORY_DTYPE, most recent last
    event_count: int
    last_event_ms: int
    positive_count: int = 0  # events that expressed interest: zero means "serve popular items"


def _pack_item(rec: ItemRecord) -> bytes:
    try:
        head = _ITEM_HDR.pack(
            _RECORD_VERSION,
            _ITEM_DELETED if rec.deleted else 0,
            rec.row,
            rec.popularity,
            rec.last_event_ms,
            rec.interactions,
        )
    except struct.error as exc:
        raise ValueError(f"cannot pack item {rec.item_id!r}: {exc}") from exc
    return b"".join(
        (head, codec.encode_str(rec.item_id), codec.encode_str_list(rec.categories), codec.encode_str_map(rec.attributes))
    )


def _unpack_item(raw: bytes, vector: np.ndarray | None) -> ItemRecord:
    version, flags, row, popularity, last_ms, interactions = _ITEM_HDR.unpack_from(raw, 0)
    if version != _RECORD_VERSION:
        raise ValueError(f"unsupported item record version {version}")
    item_id, off = codec.decode_str(raw, _ITEM_HDR.size)
    categories, off = codec.decode_str_list(raw, off)
    attributes, off = codec.decode_str_map(raw, off)
    if off != len(raw):
        raise ValueError(f"item record {item_id!r} has trailing bytes")
    return ItemRecord(item_id, row, categories, attributes, bool(flags & _ITEM_DELETED), vector, popularity, last_ms, interactions)


def _pack_user(rec: UserRecord) -> bytes:
    vec = codec.vector_to_bytes(rec.vector)
    seen = codec.array_to_bytes(rec.seen, "<i4")
    history = np.asarray(rec.history)
    if history.dtype != HISTORY_DTYPE:
        if history.dtype.names != HISTORY_DTYPE.names:
            raise ValueError(f"user {rec.user_id!r}: history dtype {history.dtype} is not HISTORY_DTYPE")
        history = history.astype(HISTORY_DTYPE)
    if history.ndim != 1:
        raise ValueError(f"user {rec.user_id!r}: history must be 1-D")
    try:
        head = _USER_HDR.pack(
            _RECORD_VERSION, len(vec) // 4, len(seen) // 4, len(history), rec.event_count, rec.last_event_ms,
            rec.positive_count,
        )
    except struct.error as exc:
        raise ValueError(f"cannot pack user {rec.user_id!r}: {exc}") from exc
    return b"".join((head, codec.encode_str(rec.user_id), vec, seen, history.tobytes()))


def _unpack_user(raw: bytes) -> UserRecord:
    version, dim, n_seen, n_hist, event_count, last_ms, positive_count = _USER_HDR.unpack_from(raw, 0)
    if version != _RECORD_VERSION:
        raise ValueError(f"unsupported user record version {version}")
    user_id, off = codec.decode_str(raw, _USER_HDR.size)
    end = off + 4 * dim + 4 * n_seen + HISTORY_DTYPE.itemsize * n_hist
    if end != len(raw):
        raise ValueError(f"user record {user_id!r} has length {len(raw)}, expected {end}")
    vector = codec.vector_from_bytes(raw, dim, off)
    off += 4 * dim
    seen = codec.array_from_bytes(raw, "<i4", n_seen, off).astype(np.int32, copy=False)
    off += 4 * n_seen
    history = codec.array_from_bytes(raw, HISTORY_DTYPE, n_hist, off)
    return UserRecord(user_id, vector, seen, history, event_count, last_ms, positive_count)


# --- records as a snapshot ships them (replication) ----------------------------------------------------------

def pack_item_for_transfer(rec: ItemRecord) -> bytes:
    """An item record with its vector (the store keeps them apart): u32 length of the record, record, vector."""
    packed = _pack_item(rec)
    vector = codec.vector_to_bytes(rec.vector) if rec.vector is not None else b""
    return struct.pack("<I", len(packed)) + packed + vector


def unpack_item_transfer(raw: bytes) -> ItemRecord:
    (length,) = struct.unpack_from("<I", raw, 0)
    vector = raw[4 + length:]
    return _unpack_item(raw[4:4 + length], codec.vector_from_bytes(vector) if vector else None)
