"""A replica's own copy of another machine's store: the primary's log records at the primary's seqs, and the
checkpointed state a snapshot gave. Its one writer is the replica's follower thread (it copies, then applies),
which also writes this copy's own checkpoints, so a restarted replica resumes from its last seq here.

A copy differs from a primary's store in how records arrive: with their seqs already assigned, possibly with gaps
(records the primary erased), and without idempotency or user-index keys (nobody writes to a copy but the copier;
erasures reach it as the seqs to erase).
"""
from __future__ import annotations

import lmdb

from streamrec.engine.store.layout import _META_CHECKPOINT, _META_LAST_SEQ, _META_LOG_ID, _SEQ, _key, _put_all
from streamrec.engine.store import codec
from streamrec.engine.store.records import ItemRecord, UserRecord, _pack_item, _pack_user
from streamrec.engine.store.store import Store


class LogCopy(Store):
    def adopt_log_id(self, log_id: str) -> None:
        """This copy follows the log `log_id` from now on (a new copy, or one reset for another primary)."""
        self._log_env.write(lambda txn: txn.put(_META_LOG_ID.encode(), log_id.encode(), db=self._log_meta))

    def append_at(self, records: list[tuple[int, bytes]]) -> None:
        """The primary's records at their seqs, which must lie after this copy's last seq (gaps allowed)."""
        if not records:
            return
        pairs = [(_SEQ.pack(seq), payload) for seq, payload in records]

        def fn(txn: lmdb.Transaction) -> None:
            last = self._last_seq_txn(txn)
            if records[0][0] <= last:
                raise ValueError(f"record {records[0][0]} is not after this copy's last seq {last}")
            _put_all(txn.cursor(db=self._log), pairs, append=True)
            txn.put(_META_LAST_SEQ.encode(), pairs[-1][0], db=self._log_meta)

        self._log_env.write(fn)

    def erase_seqs(self, seqs: list[int]) -> int:
        """Erase the records a ForgetUser erased on the primary; returns how many this copy held."""
        keys = [_SEQ.pack(seq) for seq in seqs]
        return self._log_env.write(lambda txn: sum(txn.pop(key, db=self._log) is not None for key in keys))

    def replace_checkpoint(self, watermark: int, items: list[ItemRecord], users: list[UserRecord],
                           meta: dict[str, bytes], drop_log: bool = False) -> None:
        """This copy's checkpointed state becomes a snapshot's, wholly (users the snapshot lacks are gone); its log
        goes on after the watermark (records up to it are covered by the snapshot and dropped). drop_log: the
        copy followed another log, whose records after the watermark go too."""
        packed_users = [(_key(u.user_id), _pack_user(u)) for u in users]

        def state(txn: lmdb.Transaction) -> None:
            for db in (self._items, self._item_vectors, self._item_rows, self._users):
                txn.drop(db, delete=False)
            for item in items:
                vector = codec.vector_to_bytes(item.vector) if item.vector is not None else None
                self._put_item(txn, _key(item.item_id), item.item_id.encode("utf-8"), item.row, _pack_item(item), vector)
            _put_all(txn.cursor(db=self._users), packed_users)
            for key, value in meta.items():
                txn.put(key.encode(), value, db=self._meta)
            txn.put(_META_CHECKPOINT.encode(), _SEQ.pack(watermark), db=self._meta)

        def log(txn: lmdb.Transaction) -> None:
            cursor = txn.cursor(db=self._log)
            while cursor.first() and (drop_log or _SEQ.unpack(cursor.key())[0] <= watermark):
                cursor.delete()
            if drop_log or self._last_seq_txn(txn) < watermark:
                txn.put(_META_LAST_SEQ.encode(), _SEQ.pack(watermark), db=self._log_meta)

        self._log_env.write(log)  # first: a checkpoint's watermark never exceeds the log's end
        self._state_env.write(state)

