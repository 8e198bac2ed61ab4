"""LMDB persistence: the write-ahead log, idempotency keys, and checkpoints of item and user state.

One LMDB environment (a folder) holds these named databases:

=============  ======================================  ==============================================
name           key                                     value
=============  ======================================  ==============================================
log            seq (u64 big-endian, from 1)            codec payload (the write-ahead log)
idem           event_id                                seq (u64 BE) of the record that carried it
user_log       user_id (dupsort, dupfixed)             seq (u64 BE) of each record of that user
items          item_id                                 packed ItemRecord metadata (no vector)
item_vectors   row (u32 BE)                            float32 little-endian vector
item_rows      row (u32 BE)                            item_id utf-8 (keeps rows unique)
users          user_id                                 packed UserRecord
meta           str                                     bytes (last_seq, checkpoint_seq, anything)
index_journal  first seq of a group commit (u64 BE)    its records' idem and user_log keys, not yet
                                                       merged into those trees (engine/index_journal.py)
=============  ======================================  ==============================================

``idem`` and ``user_log`` are therefore the trees plus the journal: a group commit appends its log records and
ONE journal record, and the keys reach the trees later, many commits at a time (at checkpoints, before
an erasure, or when more than ``_PENDING_INDEX_CAP`` are waiting). Both are durable from the commit on.

Keys are the UTF-8 id, except that the empty id becomes ``b"\\xfe"`` and ids longer than LMDB's
511-byte key limit become ``b"\\xff" + blake2b-256(id)``: neither byte occurs in UTF-8, so these
never collide with a plain id. Records keep the full id in their value.

Recovery contract: the state after a crash is "checkpoint (items, users) + replay of every log
record with seq > checkpoint_seq()". Sequence numbers are never reused: ``meta["last_seq"]`` keeps
the high-water mark even when forget_user erases the newest records.

Thread-safety contract: the engine calls every write method (append_log, write_checkpoint,
forget_user, merge_index, put_meta) from a single writer thread, the only one that touches the journal's
keys in memory; reads (load_*, iter_log) happen at start-up.
Concurrent readers are still safe: each read is its own LMDB read transaction, no record is cached,
and a gate keeps transactions out while the map is being resized (LMDB requires that no
transaction of this process is open during ``set_mapsize``). Never share a Store across fork(),
and open the folder from one process at a time (another process's map growth is not adopted).
Keep readers from spinning while the writer runs: with py-lmdb 3 a write-transaction abort (the
MapFullError path) waits for other threads' in-flight LMDB calls, so back-to-back reads starve it.
"""
from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np

from streamrec.engine import codec, index_journal
from streamrec.engine.index_journal import PendingIndex
from streamrec.engine.types import Event

logger = logging.getLogger(__name__)

__all__ = ["HISTORY_DTYPE", "ItemRecord", "UserRecord", "LogEntry", "Store"]

HISTORY_DTYPE = np.dtype([("row", "<i4"), ("type", "u1"), ("value", "<f4"), ("ts", "<i8")])

_T = TypeVar("_T")

_SEQ = struct.Struct(">Q")
_ROW = struct.Struct(">I")
# version, flags (bit 0: deleted), row, popularity, last_event_ms, interactions
_ITEM_HDR = struct.Struct("<BBIdqq")
# version, dim, len(seen), len(history), event_count, last_event_ms, positive_count
_USER_HDR = struct.Struct("<BIIIqqq")
_RECORD_VERSION = 1
_ITEM_DELETED = 1

_MAX_KEY = 511  # LMDB's default MDB_MAXKEYSIZE, also the limit for dupsort values
_EMPTY_KEY = b"\xfe"
_HASHED_KEY = b"\xff"

_STORE_FORMAT = b"\x02"  # 2 added index_journal (an older build would not see the keys waiting there)
_UPGRADABLE_FORMATS = (b"\x01",)  # format 1 is format 2 with an empty journal
_META_FORMAT = "store_format"
_META_LAST_SEQ = "last_seq"
_META_CHECKPOINT = "checkpoint_seq"
RESERVED_META = frozenset({_META_FORMAT, _META_LAST_SEQ, _META_CHECKPOINT})

_DBS: dict[str, dict[str, bool]] = {
    "log": {},
    "idem": {},
    "user_log": {"dupsort": True, "dupfixed": True},
    "items": {},
    "item_vectors": {},
    "item_rows": {},
    "users": {},
    "meta": {},
    "index_journal": {},
}

_ITER_CHUNK = 4096  # log records per read transaction in iter_log
# Keys waiting in the journal before an append merges them itself (~300 bytes of memory each); checkpoints
# (every 50k records by default) usually merge them first.
_PENDING_INDEX_CAP = 200_000


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


@dataclass(slots=True)
class LogEntry:
    payload: bytes
    event_id: str | None = None  # idempotency key; None or "" means "no key"
    user_id: str | None = None  # indexes the record for forget_user


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


def _assign_seqs(idem_keys: list[bytes | None], present: set[bytes], last_seq: int) -> list[int | None]:
    """Consecutive seqs after last_seq for the records to write; None for a record whose idempotency key is
    already stored (`present`) or was taken by an earlier record of the same call."""
    if not present and None not in idem_keys and len(set(idem_keys)) == len(idem_keys):
        return list(range(last_seq + 1, last_seq + 1 + len(idem_keys)))  # the usual case: all new
    taken = set(present)
    seqs: list[int | None] = []
    seq = last_seq
    for key in idem_keys:
        if key is not None:
            if key in taken:
                seqs.append(None)
                continue
            taken.add(key)
        seq += 1
        seqs.append(seq)
    return seqs


def _pick(column: list, kept: Sequence[int]) -> list:
    return column if isinstance(kept, range) else [column[k] for k in kept]


def _put_all(cursor: lmdb.Cursor, items: list[tuple[bytes, bytes]], append: bool = False) -> None:
    """putmulti that must write every pair (dupsort databases keep every value of a key)."""
    if not items:
        return
    consumed, added = cursor.putmulti(items, append=append)
    if added != len(items):  # append=True refuses a key below the last one: a broken seq invariant
        raise RuntimeError(f"wrote {added} of {len(items)} records (consumed {consumed})")


# --- record packing ---------------------------------------------------------------------------


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


# --- resize gate ------------------------------------------------------------------------------


class _ResizeGate:
    """Any number of transactions at once, but set_mapsize runs only when none is open."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# --- store ------------------------------------------------------------------------------------


class Store:
    """The LMDB environment of one engine. See the module docstring for layout and contracts."""

    def __init__(self, path: str | Path, *, sync: bool = True, initial_map_size: int = 64 << 20) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(self.path), map_size=initial_map_size, max_dbs=16, subdir=True, sync=sync, readahead=False
        )
        self._closed = False
        max_key = self._env.max_key_size()
        if max_key < _MAX_KEY:  # ids are hashed to fit _MAX_KEY; a smaller build would reject keys
            self._env.close()
            raise RuntimeError(f"LMDB built with max key size {max_key} < {_MAX_KEY}")
        self._gate = _ResizeGate()
        # An existing environment may already be larger than initial_map_size; LMDB adopts its size.
        self._map_size: int = self._env.info()["map_size"]

        def open_dbs(txn: lmdb.Transaction) -> dict[str, object]:
            dbs = {name: self._env.open_db(name.encode(), txn=txn, **flags) for name, flags in _DBS.items()}
            fmt = txn.get(_META_FORMAT.encode(), db=dbs["meta"])
            if fmt is None or fmt in _UPGRADABLE_FORMATS:
                txn.put(_META_FORMAT.encode(), _STORE_FORMAT, db=dbs["meta"])
            elif fmt != _STORE_FORMAT:
                raise ValueError(f"store format {fmt!r} is not supported (expected {_STORE_FORMAT!r})")
            return dbs

        try:
            dbs = self._write(open_dbs)
        except BaseException:
            self._env.close()
            raise
        self._log = dbs["log"]
        self._idem = dbs["idem"]
        self._user_log = dbs["user_log"]
        self._items = dbs["items"]
        self._item_vectors = dbs["item_vectors"]
        self._item_rows = dbs["item_rows"]
        self._users = dbs["users"]
        self._meta = dbs["meta"]
        self._journal = dbs["index_journal"]
        self._dbs = dbs
        self._pending = PendingIndex()
        with self._read() as txn:  # keys committed before a crash or close, not merged yet
            for _, value in txn.cursor(db=self._journal).iternext():
                self._pending.add_journal_value(value, _SEQ.pack)

    # --- lifecycle ---

    def close(self) -> None:
        if self._closed:
            return
        with self._gate.exclusive():  # let in-flight transactions finish first
            self._closed = True
            self._env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """Force data to disk; only needed when opened with sync=False."""
        self._env.sync(True)

    # --- transaction helpers ---

    def _write(self, fn: Callable[[lmdb.Transaction], _T]) -> _T:
        """Run fn in one write transaction; when the map is full, abort, double the map, rerun fn.

        fn must therefore be re-runnable: it may only read its arguments, never consume iterators
        or mutate caller state.
        """
        while True:
            attempt_size = self._map_size
            try:
                with self._gate.shared(), self._env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow(attempt_size)

    def _grow(self, seen_size: int) -> None:
        with self._gate.exclusive():
            if self._map_size != seen_size:  # another writer already grew it
                return
            new_size = self._map_size * 2
            self._env.set_mapsize(new_size)
            self._map_size = self._env.info()["map_size"]
        logger.info("LMDB map full at %d bytes; grew to %d", seen_size, self._map_size)

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        with self._gate.shared(), self._env.begin(write=False) as txn:
            yield txn

    def _last_seq_txn(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_META_LAST_SEQ.encode(), db=self._meta)
        meta_seq = _SEQ.unpack(raw)[0] if raw is not None else 0
        cur = txn.cursor(db=self._log)
        log_seq = _SEQ.unpack(cur.key())[0] if cur.last() else 0
        return max(meta_seq, log_seq)

    # --- log ---

    def last_seq(self) -> int:
        """Highest seq ever assigned (0 when nothing was ever appended)."""
        with self._read() as txn:
            return self._last_seq_txn(txn)

    def append_log(self, entries: Sequence[LogEntry]) -> list[int | None]:
        """Append entries in ONE write transaction (group commit); durable on return when sync=True.

        Returns the seq of each entry, or None for an entry whose event_id was already in the
        store or appeared earlier in this same call (it is not written).
        """
        entries = list(entries)
        return self.append_records([e.payload for e in entries], [e.event_id for e in entries],
                                   [e.user_id for e in entries])

    def append_records(self, payloads: Sequence[bytes], event_ids: Sequence[str | None],
                       user_ids: Sequence[str | None]) -> list[int | None]:
        """append_log for parallel columns (entry k = payloads[k], event_ids[k], user_ids[k]), so the writer
        builds no LogEntry per event. Same contract and same records as append_log.

        Per database one C-level call instead of one put per record: the duplicate check is one getmulti
        over the idempotency keys, and the writes are one putmulti each (the log's with MDB_APPEND: seqs
        only grow, so LMDB appends to the last page without searching the tree).
        """
        if not payloads:
            return []
        if not len(payloads) == len(event_ids) == len(user_ids):
            raise ValueError("payloads, event_ids and user_ids must have the same length")
        # Keys are computed outside fn: a MapFullError retry reruns fn and must find its inputs intact.
        idem_keys = _keys(event_ids, empty_is_none=True)
        user_keys = _keys(user_ids)
        payloads = list(payloads)

        def fn(txn: lmdb.Transaction) -> tuple[list[int | None], list[bytes], list, list]:
            start = self._last_seq_txn(txn)
            seqs = _assign_seqs(idem_keys, self._present_keys(txn, idem_keys), start)
            kept = range(len(seqs)) if None not in seqs else [k for k, seq in enumerate(seqs) if seq is not None]
            if not kept:
                return seqs, [], [], []
            seq_bytes = list(map(_SEQ.pack, range(start + 1, start + 1 + len(kept))))
            kept_idem, kept_users = _pick(idem_keys, kept), _pick(user_keys, kept)
            _put_all(txn.cursor(db=self._log), list(zip(seq_bytes, _pick(payloads, kept))), append=True)
            if (any(kept_idem) or any(kept_users)) and not txn.put(
                    seq_bytes[0], index_journal.encode(start + 1, kept_idem, kept_users), db=self._journal, append=True):
                raise RuntimeError(f"index journal already holds a record at or after seq {start + 1}")
            txn.put(_META_LAST_SEQ.encode(), seq_bytes[-1], db=self._meta)
            return seqs, seq_bytes, kept_idem, kept_users

        seqs, seq_bytes, kept_idem, kept_users = self._write(fn)
        self._pending.add(seq_bytes, kept_idem, kept_users)  # only once committed: fn may run twice
        if len(self._pending) > _PENDING_INDEX_CAP:
            self.merge_index()
        return seqs

    def _present_keys(self, txn: lmdb.Transaction, keys: list[bytes | None]) -> set[bytes]:
        """The keys among `keys` that are stored already: waiting in the journal, or in the tree (one getmulti)."""
        pending = self._pending.idem
        wanted = [k for k in keys if k is not None and k not in pending]
        present = {k for k in keys if k in pending} if pending else set()
        if wanted:
            present.update(key for key, _ in txn.cursor(db=self._idem).getmulti(wanted))
        return present

    # --- secondary indexes ---

    @property
    def pending_index_entries(self) -> int:
        """idem + user_log entries committed in the journal and not yet merged into their trees."""
        return len(self._pending)

    def merge_index(self) -> None:
        """Merge the journal's keys into the idem and user_log trees now, in one transaction."""
        if len(self._pending):
            self._write(self._merge_pending)
            self._pending.clear()

    def _merge_pending(self, txn: lmdb.Transaction) -> None:
        """Part of a write transaction; the caller clears `_pending` once it commits (fn may rerun)."""
        if not len(self._pending):
            return
        _put_all(txn.cursor(db=self._idem), list(self._pending.idem.items()))
        _put_all(txn.cursor(db=self._user_log), self._pending.user_pairs)
        txn.drop(self._journal, delete=False)

    def iter_log(self, after_seq: int = 0) -> Iterator[tuple[int, bytes]]:
        """Yield (seq, payload) with seq > after_seq in seq order.

        Reads in chunks, one read transaction each, so a long replay neither pins old pages nor
        holds the resize gate while the consumer works. Records appended or erased during
        iteration may or may not be seen; each chunk is consistent.
        """
        nxt = max(after_seq, 0) + 1
        while nxt <= 0xFFFF_FFFF_FFFF_FFFF:
            batch: list[tuple[int, bytes]] = []
            with self._read() as txn:
                cur = txn.cursor(db=self._log)
                if cur.set_range(_SEQ.pack(nxt)):
                    for k, v in cur.iternext():
                        batch.append((_SEQ.unpack(k)[0], v))
                        if len(batch) >= _ITER_CHUNK:
                            break
            yield from batch
            if len(batch) < _ITER_CHUNK:
                return
            nxt = batch[-1][0] + 1

    def log_count(self) -> int:
        with self._read() as txn:
            return txn.stat(self._log)["entries"]

    # --- checkpoint ---

    def write_checkpoint(
        self,
        items: Iterable[ItemRecord],
        users: Iterable[UserRecord],
        deleted_user_ids: Iterable[str],
        watermark_seq: int,
        meta: dict[str, bytes] | None = None,
    ) -> None:
        """In ONE transaction: upsert items (metadata + vector) and users, delete the listed users
        (deletion wins over an upsert of the same user), set extra meta and checkpoint_seq.

        watermark_seq must be within [0, last_seq()]: a watermark beyond the log would make
        recovery skip records appended later.
        """
        extra = dict(meta or {})
        reserved = RESERVED_META & extra.keys()
        if reserved:
            raise ValueError(f"reserved meta keys: {sorted(reserved)}")
        # Pack outside the transaction: less time holding the writer lock, and a bad record fails
        # before anything is written. Materialised lists also keep retries after MapFullError exact.
        packed_items = [
            (
                _key(it.item_id),
                it.item_id.encode("utf-8"),
                it.row,
                _pack_item(it),
                codec.vector_to_bytes(it.vector) if it.vector is not None else None,
            )
            for it in items
        ]
        packed_users = [(_key(u.user_id), _pack_user(u)) for u in users]
        deleted_keys = [_key(uid) for uid in deleted_user_ids]
        packed_meta = [(k.encode("utf-8"), bytes(v)) for k, v in extra.items()]
        watermark = int(watermark_seq)

        def fn(txn: lmdb.Transaction) -> None:
            last = self._last_seq_txn(txn)
            if not 0 <= watermark <= last:
                raise ValueError(f"checkpoint watermark {watermark} outside [0, last_seq={last}]")
            for key, id_bytes, row, packed, vec in packed_items:
                self._put_item(txn, key, id_bytes, row, packed, vec)
            _put_all(txn.cursor(db=self._users), packed_users)
            for key in deleted_keys:
                txn.delete(key, db=self._users)
            for key, value in packed_meta:
                txn.put(key, value, db=self._meta)
            txn.put(_META_CHECKPOINT.encode(), _SEQ.pack(watermark), db=self._meta)
            self._merge_pending(txn)  # a checkpoint is already a large transaction: one fsync for both

        self._write(fn)
        self._pending.clear()

    def _put_item(
        self, txn: lmdb.Transaction, key: bytes, id_bytes: bytes, row: int, packed: bytes, vec: bytes | None
    ) -> None:
        rk = _ROW.pack(row)
        old = txn.get(key, db=self._items)
        if old is not None:
            old_row = _ITEM_HDR.unpack_from(old, 0)[2]
            if old_row != row:  # the item moved: free its old row
                old_rk = _ROW.pack(old_row)
                txn.delete(old_rk, db=self._item_rows)
                txn.delete(old_rk, db=self._item_vectors)
        owner = txn.get(rk, db=self._item_rows)
        if owner is None:
            txn.put(rk, id_bytes, db=self._item_rows)
        elif owner != id_bytes:
            raise ValueError(
                f"row {row} of item {id_bytes.decode('utf-8')!r} already belongs to {owner.decode('utf-8')!r}"
            )
        txn.put(key, packed, db=self._items)
        if vec is None:
            txn.delete(rk, db=self._item_vectors)
        else:
            txn.put(rk, vec, db=self._item_vectors)

    def checkpoint_seq(self) -> int:
        """Log records with seq <= this are reflected in the stored items/users (0 if never)."""
        raw = self.get_meta(_META_CHECKPOINT)
        return _SEQ.unpack(raw)[0] if raw is not None else 0

    def load_items(self) -> list[ItemRecord]:
        """Every item record (deleted ones included), sorted by row."""
        out: list[ItemRecord] = []
        with self._read() as txn:
            for _, raw in txn.cursor(db=self._items).iternext():
                rec = _unpack_item(raw, None)
                vec = txn.get(_ROW.pack(rec.row), db=self._item_vectors)
                if vec is not None:
                    rec.vector = codec.vector_from_bytes(vec)
                out.append(rec)
        out.sort(key=lambda r: r.row)
        return out

    def load_users(self) -> list[UserRecord]:
        with self._read() as txn:
            return [_unpack_user(raw) for _, raw in txn.cursor(db=self._users).iternext()]

    # --- erasure ---

    def forget_user(self, user_id: str) -> int:
        """In ONE transaction erase the user's record, every log record indexed under the user,
        the idempotency keys of those records and the user's user_log entries.

        Returns the number of log records erased. The idempotency keys go too (they are the
        user's data as well), so a later resend of a forgotten event_id is accepted as new.
        Seqs of erased records are never reassigned.
        """
        ukey = _key(user_id)

        def fn(txn: lmdb.Transaction) -> int:
            self._merge_pending(txn)  # so the trees below hold every key of the user's records
            # Pin the high-water mark before erasing what may be the newest records.
            txn.put(_META_LAST_SEQ.encode(), _SEQ.pack(self._last_seq_txn(txn)), db=self._meta)
            cur = txn.cursor(db=self._user_log)
            seqs = list(cur.iternext_dup(keys=False)) if cur.set_key(ukey) else []
            erased = 0
            for sb in seqs:
                payload = txn.pop(sb, db=self._log)
                if payload is None:
                    continue
                erased += 1
                if payload and payload[0] == codec.RecordKind.EVENT:
                    try:
                        ev = codec.decode(payload)
                    except ValueError:  # erase it anyway; only its idempotency key can't be found
                        logger.warning("forget_user: undecodable log record %d", _SEQ.unpack(sb)[0])
                        continue
                    if isinstance(ev, Event) and ev.event_id:
                        ik = _key(ev.event_id)
                        if txn.get(ik, db=self._idem) == sb:
                            txn.delete(ik, db=self._idem)
            if seqs:
                txn.delete(ukey, db=self._user_log)  # no value: all duplicates of the key
            txn.delete(ukey, db=self._users)
            return erased

        erased = self._write(fn)
        self._pending.clear()
        return erased

    # --- meta & stats ---

    def get_meta(self, key: str) -> bytes | None:
        with self._read() as txn:
            return txn.get(key.encode("utf-8"), db=self._meta)

    def put_meta(self, key: str, value: bytes) -> None:
        if key in RESERVED_META:
            raise ValueError(f"meta key {key!r} is managed by the store")
        k, v = key.encode("utf-8"), bytes(value)
        self._write(lambda txn: txn.put(k, v, db=self._meta))

    def stats(self) -> dict[str, int]:
        """Entries per database, map_size, used_bytes (pages in use), last_seq, checkpoint_seq. idem and user_log
        count their journal entries too (index_journal counts journal records, one per group commit)."""
        with self._read() as txn:
            out = {name: txn.stat(db)["entries"] for name, db in self._dbs.items()}
            out["idem"] += len(self._pending.idem)
            out["user_log"] += len(self._pending.user_pairs)
            out["last_seq"] = self._last_seq_txn(txn)
            raw = txn.get(_META_CHECKPOINT.encode(), db=self._meta)
            out["checkpoint_seq"] = _SEQ.unpack(raw)[0] if raw is not None else 0
            info = self._env.info()
            out["map_size"] = info["map_size"]
            out["used_bytes"] = (info["last_pgno"] + 1) * self._env.stat()["psize"]
        return out
