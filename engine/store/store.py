"""LMDB persistence: the write-ahead log, idempotency keys, and checkpoints of item and user state.

Two LMDB environments, so that a checkpoint written on its own thread never holds the lock that the group
commits need (LMDB allows one write transaction per environment):

- the **log environment** (the store's folder), written by every group commit;
- the **state environment** (its ``state/`` subfolder), written by checkpoints, index merges and erasures.

The databases of each, their keys and values, and how ids become keys: layout.py. ``idem`` and ``user_log`` are
the trees plus the journal: a group commit appends its log records and ONE journal record, and the keys reach the
trees later, many commits at a time (see layout.py and journal.py).

Recovery contract: the state after a crash is "checkpoint (items, users) + replay of every log
record with seq > checkpoint_seq()". Sequence numbers are never reused: ``meta["last_seq"]`` keeps
the high-water mark even when forget_user erases the newest records. A checkpoint's watermark never
exceeds the log's durable end, so the two environments need no common transaction.

Thread-safety contract: one writer thread calls append_log/append_records, merge_index, forget_user and
put_meta, and is the only one that adds keys to the journal's memory. write_checkpoint may run on another thread
while the writer appends, given ``index=freeze_index()`` taken on the writer thread; the engine runs at most
one checkpoint at a time and no erasure during one. Reads (load_*, iter_log) happen at start-up.
Concurrent readers are still safe: each read is its own LMDB read transaction and no record is cached.
Never share a Store across fork(). One process writes a folder; replica processes may open it with
``readonly=True`` at the same time (they adopt the writer's map growth, see lmdb_env.py).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb

from streamrec.engine.api import Event
from streamrec.engine.gil import yielding
from streamrec.engine.store import codec, journal
from streamrec.engine.store.journal import Generation, PendingIndex
from streamrec.engine.store.layout import (
    _MAX_KEY,
    _META_CHECKPOINT,
    _META_LAST_SEQ,
    _META_LOG_ID,
    _ROW,
    _SEQ,
    _STATE_DIR,
    RESERVED_META,
    _key,
    _keys,
    _put_all,
)
from streamrec.engine.store.databases import open_for_writing, open_read_only
from streamrec.engine.store.lmdb_env import LmdbEnv
from streamrec.engine.store.records import (
    _ITEM_HDR,
    HISTORY_DTYPE,
    ItemRecord,
    UserRecord,
    _pack_item,
    _pack_user,
    _unpack_item,
    _unpack_user,
)

logger = logging.getLogger(__name__)

__all__ = ["HISTORY_DTYPE", "ItemRecord", "UserRecord", "LogEntry", "Store"]


_ITER_CHUNK = 4096  # log records per read transaction in iter_log
# Keys waiting in the journal before an append merges them itself (~300 bytes of memory each); checkpoints
# (every 50k records by default) usually merge them first.
_PENDING_INDEX_CAP = 200_000


@dataclass(slots=True)
class LogEntry:
    payload: bytes
    event_id: str | None = None  # idempotency key; None or "" means "no key"
    user_id: str | None = None  # indexes the record for forget_user


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


# --- store ------------------------------------------------------------------------------------


class Store:
    """The two LMDB environments of one engine. See the module docstring for layout and contracts."""

    @staticmethod
    def exists(path: Path) -> bool:
        """True when `path` holds a store (its log environment's data file)."""
        return (path / "data.mdb").exists()

    def __init__(self, path: str | Path, *, sync: bool = True, initial_map_size: int = 64 << 20,
                 readonly: bool = False) -> None:
        """readonly: a replica's view of the store another process writes (reads only; no journal in memory)."""
        self.path = Path(path)
        self.readonly = readonly
        self._closed = False
        self._log_env = LmdbEnv(self.path, sync=sync, initial_map_size=initial_map_size, min_key_size=_MAX_KEY,
                                readonly=readonly)
        try:
            self._state_env = LmdbEnv(self.path / _STATE_DIR, sync=sync, initial_map_size=initial_map_size,
                                      min_key_size=_MAX_KEY, readonly=readonly)
        except BaseException:
            self._log_env.close()
            raise
        try:
            self._open_dbs()
        except BaseException:
            self._state_env.close()
            self._log_env.close()
            raise
        self._pending = PendingIndex()
        self._trim_journal_through: bytes | None = None  # merged journal records, deleted by the next log write
        # Any process may free the slots of a dead one; a replica that restarts after a kill -9 does it too.
        freed = self._log_env.reader_check() + self._state_env.reader_check()
        if freed:
            logger.warning("freed %d LMDB reader slot(s) left by processes that died", freed)
        if readonly:
            return
        with self._log_env.read() as txn:  # keys committed before a crash or close, not merged yet
            for key, value in txn.cursor(db=self._journal).iternext():
                self._pending.add_journal_record(key, value, _SEQ.pack)

    def _open_dbs(self) -> None:
        opened = (open_read_only(self._log_env, self._state_env) if self.readonly
                  else open_for_writing(self._log_env, self._state_env, self.path))
        self._assign_dbs(*opened)

    def _assign_dbs(self, log_dbs: dict, state_dbs: dict) -> None:
        self._log, self._journal, self._log_meta = log_dbs["log"], log_dbs["index_journal"], log_dbs["meta"]
        self._idem, self._user_log = state_dbs["idem"], state_dbs["user_log"]
        self._items, self._item_vectors, self._item_rows = state_dbs["items"], state_dbs["item_vectors"], state_dbs["item_rows"]
        self._users, self._meta = state_dbs["users"], state_dbs["meta"]
        self._dbs = {**{name: (self._log_env, db) for name, db in log_dbs.items() if name != "meta"},
                     **{name: (self._state_env, db) for name, db in state_dbs.items() if name != "meta"}}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state_env.close()
        self._log_env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """Force data to disk; only needed when opened with sync=False."""
        self._log_env.env.sync(True)
        self._state_env.env.sync(True)

    def _last_seq_txn(self, txn: lmdb.Transaction) -> int:
        """Within a transaction of the log environment."""
        raw = txn.get(_META_LAST_SEQ.encode(), db=self._log_meta)
        meta_seq = _SEQ.unpack(raw)[0] if raw is not None else 0
        cur = txn.cursor(db=self._log)
        log_seq = _SEQ.unpack(cur.key())[0] if cur.last() else 0
        return max(meta_seq, log_seq)

    # --- log ---

    def last_seq(self) -> int:
        """Highest seq ever assigned (0 when nothing was ever appended)."""
        with self._log_env.read() as txn:
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
        trim_through = self._trim_journal_through

        def fn(txn: lmdb.Transaction) -> tuple[list[int | None], list[bytes], list, list]:
            self._trim_journal(txn, trim_through)
            start = self._last_seq_txn(txn)
            seqs = _assign_seqs(idem_keys, self._present_keys(idem_keys), start)
            kept = range(len(seqs)) if None not in seqs else [k for k, seq in enumerate(seqs) if seq is not None]
            if not kept:
                return seqs, [], [], []
            seq_bytes = list(map(_SEQ.pack, range(start + 1, start + 1 + len(kept))))
            kept_idem, kept_users = _pick(idem_keys, kept), _pick(user_keys, kept)
            _put_all(txn.cursor(db=self._log), list(zip(seq_bytes, _pick(payloads, kept))), append=True)
            if (any(kept_idem) or any(kept_users)) and not txn.put(
                    seq_bytes[0], journal.encode(start + 1, kept_idem, kept_users), db=self._journal, append=True):
                raise RuntimeError(f"index journal already holds a record at or after seq {start + 1}")
            txn.put(_META_LAST_SEQ.encode(), seq_bytes[-1], db=self._log_meta)
            return seqs, seq_bytes, kept_idem, kept_users

        seqs, seq_bytes, kept_idem, kept_users = self._log_env.write(fn)
        self._trimmed(trim_through)
        if seq_bytes:  # only once committed: fn may run twice
            journaled = any(kept_idem) or any(kept_users)
            self._pending.add(seq_bytes, kept_idem, kept_users, seq_bytes[0] if journaled else None)
        if len(self._pending) > _PENDING_INDEX_CAP:
            self.merge_index()
        return seqs

    def _present_keys(self, keys: list[bytes | None]) -> set[bytes]:
        """The keys among `keys` that are stored already: waiting in the journal's memory, or in the tree. Memory
        is read first: a generation gone from it by the time the tree is read had committed its merge before."""
        present = self._pending.present(keys)
        wanted = [k for k in keys if k is not None and k not in present]
        if wanted:
            with self._state_env.read() as txn:
                present.update(key for key, _ in txn.cursor(db=self._idem).getmulti(wanted))
        return present

    # --- secondary indexes ---

    @property
    def pending_index_entries(self) -> int:
        """idem + user_log entries committed in the journal and not yet merged into their trees."""
        return len(self._pending)

    def freeze_index(self) -> tuple[Generation, ...]:
        """Writer thread: the journal's keys so far, for a write_checkpoint on another thread to merge."""
        return self._pending.freeze()

    def merge_index(self) -> None:
        """Merge the journal's keys into the idem and user_log trees now and empty the journal (writer thread)."""
        merged = self._pending.freeze()
        if merged:
            self._state_env.write(lambda txn: journal.merge(txn, merged, self._idem, self._user_log))
            self._merged(merged)
            self._flush_journal_trim()

    def _merged(self, merged: tuple[Generation, ...]) -> None:
        """After the merge's transaction committed: forget the keys, and mark their journal records for deletion."""
        last = max((g.last_journal_key for g in merged if g.last_journal_key is not None), default=None)
        self._pending.drop(merged)
        if last is not None and (self._trim_journal_through is None or last > self._trim_journal_through):
            self._trim_journal_through = last

    def _trim_journal(self, txn: lmdb.Transaction, through: bytes | None) -> None:
        """Within a log transaction: delete the journal records up to `through` (merged into the trees)."""
        if through is None:
            return
        cur = txn.cursor(db=self._journal)
        while cur.first() and cur.key() <= through:
            cur.delete()

    def _trimmed(self, through: bytes | None) -> None:
        if through is not None and self._trim_journal_through == through:
            self._trim_journal_through = None  # a newer mark set meanwhile stays for the next write

    def _flush_journal_trim(self) -> None:
        through = self._trim_journal_through
        if through is not None:
            self._log_env.write(lambda txn: self._trim_journal(txn, through))
            self._trimmed(through)

    def iter_log(self, after_seq: int = 0) -> Iterator[tuple[int, bytes]]:
        """Yield (seq, payload) with seq > after_seq in seq order.

        Reads in chunks, one read transaction each, so a long replay neither pins old pages nor
        holds the resize gate while the consumer works. Records appended or erased during
        iteration may or may not be seen; each chunk is consistent.
        """
        nxt = max(after_seq, 0) + 1
        while nxt <= 0xFFFF_FFFF_FFFF_FFFF:
            batch: list[tuple[int, bytes]] = []
            with self._log_env.read() as txn:
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
        with self._log_env.read() as txn:
            return txn.stat(self._log)["entries"]

    # --- checkpoint ---

    def write_checkpoint(
        self,
        items: Iterable[ItemRecord],
        users: Iterable[UserRecord],
        deleted_user_ids: Iterable[str],
        watermark_seq: int,
        meta: dict[str, bytes] | None = None,
        index: tuple[Generation, ...] | None = None,
    ) -> None:
        """In ONE transaction of the state environment: upsert items (metadata + vector) and users, delete the
        listed users (deletion wins over an upsert of the same user), set extra meta and checkpoint_seq, and merge
        the journal's keys into their trees.

        index: the keys to merge, from freeze_index() on the writer thread, when this runs on another thread while
        the writer appends; their journal records go with the writer's next log write. Without it the caller is
        the writer thread: every waiting key is merged and the journal emptied before returning.

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
            for it in yielding(items)
        ]
        packed_users = [(_key(u.user_id), _pack_user(u)) for u in yielding(users)]
        deleted_keys = [_key(uid) for uid in deleted_user_ids]
        packed_meta = [(k.encode("utf-8"), bytes(v)) for k, v in extra.items()]
        watermark = int(watermark_seq)
        last = self.last_seq()
        if not 0 <= watermark <= last:
            raise ValueError(f"checkpoint watermark {watermark} outside [0, last_seq={last}]")
        on_writer_thread = index is None
        merged = self._pending.freeze() if on_writer_thread else index

        def fn(txn: lmdb.Transaction) -> None:
            for key, id_bytes, row, packed, vec in yielding(packed_items):
                self._put_item(txn, key, id_bytes, row, packed, vec)
            _put_all(txn.cursor(db=self._users), packed_users)
            for key in deleted_keys:
                txn.delete(key, db=self._users)
            for key, value in packed_meta:
                txn.put(key, value, db=self._meta)
            txn.put(_META_CHECKPOINT.encode(), _SEQ.pack(watermark), db=self._meta)
            journal.merge(txn, merged, self._idem, self._user_log)  # a checkpoint is already a large transaction

        self._state_env.write(fn)
        self._merged(merged)
        if on_writer_thread:
            self._flush_journal_trim()

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
        with self._state_env.read() as txn:
            return self._items_in(txn)

    def load_users(self) -> list[UserRecord]:
        with self._state_env.read() as txn:
            return self._users_in(txn)

    def load_checkpoint(self) -> tuple[int, list[ItemRecord], list[UserRecord]]:
        """(watermark, items, users) of one checkpoint, read in one transaction: a replica reads while the
        writer may be writing the next checkpoint."""
        with self._state_env.read() as txn:
            raw = txn.get(_META_CHECKPOINT.encode(), db=self._meta)
            return (_SEQ.unpack(raw)[0] if raw is not None else 0), self._items_in(txn), self._users_in(txn)

    def _items_in(self, txn: lmdb.Transaction) -> list[ItemRecord]:
        out: list[ItemRecord] = []
        for _, raw in txn.cursor(db=self._items).iternext():
            rec = _unpack_item(raw, None)
            vec = txn.get(_ROW.pack(rec.row), db=self._item_vectors)
            if vec is not None:
                rec.vector = codec.vector_from_bytes(vec)
            out.append(rec)
        out.sort(key=lambda r: r.row)
        return out

    def _users_in(self, txn: lmdb.Transaction) -> list[UserRecord]:
        return [_unpack_user(raw) for _, raw in txn.cursor(db=self._users).iternext()]

    # --- erasure ---

    def forget_user(self, user_id: str) -> int:
        """forget_user_records, counted: the number of log records erased."""
        return len(self.forget_user_records(user_id))

    def forget_user_records(self, user_id: str) -> list[int]:
        """Erase the user's record, every log record indexed under the user, the idempotency keys of those
        records and the user's user_log entries (writer thread, no checkpoint in flight).

        Returns the seqs of the log records erased. The idempotency keys go too (they are the
        user's data as well), so a later resend of a forgotten event_id is accepted as new.
        Seqs of erased records are never reassigned.

        The two environments commit separately, in an order a retry after a crash completes: the journal's keys
        are merged (and the journal emptied) so the trees list every record; then the idempotency keys go, then the
        log records, and the user_log entries that find them only last.
        """
        self.merge_index()
        self._flush_journal_trim()
        ukey = _key(user_id)
        with self._state_env.read() as txn:
            cur = txn.cursor(db=self._user_log)
            seqs = list(cur.iternext_dup(keys=False)) if cur.set_key(ukey) else []
        idem_keys: list[tuple[bytes, bytes]] = []  # (key, seq of the record that carried it)
        with self._log_env.read() as txn:
            for sb in seqs:
                payload = txn.get(sb, db=self._log)
                if not payload or payload[0] != codec.RecordKind.EVENT:
                    continue
                try:
                    ev = codec.decode(payload)
                except ValueError:  # erased anyway below; only its idempotency key can't be found
                    logger.warning("forget_user: undecodable log record %d", _SEQ.unpack(sb)[0])
                    continue
                if isinstance(ev, Event) and ev.event_id:
                    idem_keys.append((_key(ev.event_id), sb))

        def erase_keys(txn: lmdb.Transaction) -> None:
            for ik, sb in idem_keys:
                if txn.get(ik, db=self._idem) == sb:
                    txn.delete(ik, db=self._idem)

        def erase_log(txn: lmdb.Transaction) -> list[int]:
            # Pin the high-water mark before erasing what may be the newest records.
            txn.put(_META_LAST_SEQ.encode(), _SEQ.pack(self._last_seq_txn(txn)), db=self._log_meta)
            return [_SEQ.unpack(sb)[0] for sb in seqs if txn.pop(sb, db=self._log) is not None]

        def erase_user(txn: lmdb.Transaction) -> None:
            if seqs:
                txn.delete(ukey, db=self._user_log)  # no value: all duplicates of the key
            txn.delete(ukey, db=self._users)

        self._state_env.write(erase_keys)
        erased = self._log_env.write(erase_log)
        self._state_env.write(erase_user)
        return erased

    # --- meta & stats ---

    @property
    def log_id(self) -> str:
        return (self.get_meta(_META_LOG_ID) or b"").decode()

    def get_meta(self, key: str) -> bytes | None:
        # last_seq and log_id are the log's; every other key (store_format included) is read from the state's
        env, db = (self._log_env, self._log_meta) if key in (_META_LAST_SEQ, _META_LOG_ID) else (self._state_env, self._meta)
        with env.read() as txn:
            return txn.get(key.encode("utf-8"), db=db)

    def put_meta(self, key: str, value: bytes) -> None:
        if key in RESERVED_META:
            raise ValueError(f"meta key {key!r} is managed by the store")
        k, v = key.encode("utf-8"), bytes(value)
        self._state_env.write(lambda txn: txn.put(k, v, db=self._meta))

    def stats(self) -> dict[str, int]:
        """Entries per database, map_size and used_bytes (both environments together), last_seq, checkpoint_seq.
        idem and user_log count their journal entries too (index_journal counts journal records, one per group
        commit)."""
        out: dict[str, int] = {}
        for env in (self._log_env, self._state_env):
            with env.read() as txn:
                out.update({name: txn.stat(db)["entries"] for name, (owner, db) in self._dbs.items() if owner is env})
        out["idem"] += self._pending.idem_count
        out["user_log"] += self._pending.user_count
        out["last_seq"] = self.last_seq()
        out["checkpoint_seq"] = self.checkpoint_seq()
        sizes = [self._log_env.sizes(), self._state_env.sizes()]
        out["map_size"] = sum(map_size for map_size, _ in sizes)
        out["used_bytes"] = sum(used for _, used in sizes)
        return out


