"""What lies where in the store's two LMDB environments: the databases of each, the store format, the meta keys,
and how ids become LMDB keys (the contracts: store.py's docstring).

=============  =====  ======================================  ==============================================
name           env    key                                     value
=============  =====  ======================================  ==============================================
log            log    seq (u64 big-endian, from 1)            codec payload (the write-ahead log)
index_journal  log    first seq of a group commit (u64 BE)    its records' idem and user_log keys, not yet
                                                              merged into those trees (journal.py)
meta           log    str                                     store_format, last_seq, log_id
idem           state  event_id                                seq (u64 BE) of the record that carried it
user_log       state  user_id (dupsort, dupfixed)             seq (u64 BE) of each record of that user
items          state  item_id                                 packed ItemRecord metadata (no vector)
item_vectors   state  row (u32 BE)                            float32 little-endian vector
item_rows      state  row (u32 BE)                            item_id utf-8 (keeps rows unique)
users          state  user_id                                 packed UserRecord
meta           state  str                                     store_format, checkpoint_seq, anything else
=============  =====  ======================================  ==============================================

``idem`` and ``user_log`` are therefore the trees plus the journal: a group commit appends its log records and
ONE journal record, and the keys reach the trees later, many commits at a time (in a checkpoint's transaction,
before an erasure, or when more than ``_PENDING_INDEX_CAP`` are waiting). Both are durable from the commit on.
A merge commits in the state environment first; the journal records it covered are deleted afterwards by the
next log write, and merging a key twice (after a crash in between) writes the same entry again.

Keys are the UTF-8 id, except that the empty id becomes ``b"\\xfe"`` and ids longer than LMDB's
511-byte key limit become ``b"\\xff" + blake2b-256(id)``: neither byte occurs in UTF-8, so these
never collide with a plain id. Records keep the full id in their value.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import lmdb

_SEQ = struct.Struct(">Q")


_ROW = struct.Struct(">I")


_MAX_KEY = 511  # LMDB's default MDB_MAXKEYSIZE, also the limit for dupsort values


_EMPTY_KEY = b"\xfe"


_HASHED_KEY = b"\xff"


# 2 added index_journal (an older build would not see the keys waiting there); 3 moved the checkpointed state
# into its own environment. Formats 1 and 2 are one environment holding every database: upgraded on open.
_STORE_FORMAT = b"\x03"


_UPGRADABLE_FORMATS = (b"\x01", b"\x02")


_META_FORMAT = "store_format"


_META_LAST_SEQ = "last_seq"


_META_LOG_ID = "log_id"  # a random id given to the log when created: a replica never follows two logs as one


_META_CHECKPOINT = "checkpoint_seq"


RESERVED_META = frozenset({_META_FORMAT, _META_LAST_SEQ, _META_CHECKPOINT, _META_LOG_ID})


_LOG_DBS: dict[str, dict[str, bool]] = {"log": {}, "index_journal": {}, "meta": {}}


_STATE_DBS: dict[str, dict[str, bool]] = {
    "idem": {},
    "user_log": {"dupsort": True, "dupfixed": True},
    "items": {},
    "item_vectors": {},
    "item_rows": {},
    "users": {},
    "meta": {},
}


_STATE_DIR = "state"


_LOG_META = (_META_FORMAT, _META_LAST_SEQ, _META_LOG_ID)  # the log environment's meta keys; the rest: the state's


def _key(s: str) -> bytes:
    b = s.encode("utf-8")
    if not b:
        return _EMPTY_KEY
    if len(b) > _MAX_KEY:
        return _HASHED_KEY + hashlib.blake2b(b, digest_size=32).digest()
    return b


def _keys(ids: Sequence[str | None], empty_is_none: bool = False) -> list[bytes | None]:
    """_key of each id; None for None (and for "" when empty_is_none: an event_id "" means "no key"). Ids on
    the event path are validated non-empty and short, so the usual case is one C-level encode per id;
    anything else takes _key's path."""
    try:
        keys = list(map(str.encode, ids))
    except TypeError:  # a None among them: a record without this key
        keys = None
    if keys is None or (keys and not 0 < min(map(len, keys)) <= max(map(len, keys)) <= _MAX_KEY):
        keys = [None if s is None or (empty_is_none and not s) else _key(s) for s in ids]
    return keys


def _put_all(cursor: lmdb.Cursor, items: list[tuple[bytes, bytes]], append: bool = False) -> None:
    """putmulti that must write every pair (dupsort databases keep every value of a key)."""
    if not items:
        return
    consumed, added = cursor.putmulti(items, append=append)
    if added != len(items):  # append=True refuses a key below the last one: a broken seq invariant
        raise RuntimeError(f"wrote {added} of {len(items)} records (consumed {consumed})")
