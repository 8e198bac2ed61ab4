"""Secondary-index entries (idempotency keys, user_log) that are durable but not yet merged into their B-trees.

Why: an event's idempotency key (a client uuid) and its user key land on random leaf pages of large trees, so
inserting them at every group commit copies and fsyncs one page per event, most of what each event cost the
commit, against a small fraction for the log itself, whose keys only grow. Instead each group commit writes ONE journal record (key: the group's
first seq, appended; value: the group's keys) in the same transaction as its log records, and keeps the keys in
memory. The store merges them into the trees many commits at a time (at checkpoints, before an erasure, or when
too many are pending), in one transaction that also empties the journal, so a leaf page is copied and written
once per merge rather than once per commit. (Sorting the keys first measured slower: the sort costs more in
Python than the locality saves in LMDB.) Figures: benchmarks/RESULTS.md, "Figures behind design choices". On open, the journal
is read back into memory, so a key acknowledged before a crash still deduplicates after it.
"""
from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Sequence

import lmdb

from streamrec.engine.gil import yielding
from streamrec.engine.store.layout import _put_all

_HEAD = struct.Struct(">QI")  # first seq, record count


def encode(first_seq: int, idem_keys: Sequence[bytes | None], user_keys: Sequence[bytes | None]) -> bytes:
    """One journal value: the keys of records first_seq, first_seq + 1, ... (None: the record has no such key;
    a stored key is never empty, so length 0 stands for None)."""
    n = len(idem_keys)
    lengths = struct.pack(f">{2 * n}H", *[len(k) if k else 0 for k in idem_keys],
                          *[len(k) if k else 0 for k in user_keys])
    return b"".join((_HEAD.pack(first_seq, n), lengths, *[k for k in idem_keys if k], *[k for k in user_keys if k]))


def decode(value: bytes) -> tuple[int, list[bytes | None], list[bytes | None]]:
    """(first seq, idem keys, user keys) of one journal value."""
    first_seq, n = _HEAD.unpack_from(value, 0)
    lengths = struct.unpack_from(f">{2 * n}H", value, _HEAD.size)
    keys: list[bytes | None] = []
    pos = _HEAD.size + 4 * n
    for length in lengths:
        keys.append(value[pos:pos + length] if length else None)
        pos += length
    if pos != len(value):
        raise ValueError(f"index journal record of seq {first_seq}: {len(value) - pos} bytes left over")
    return first_seq, keys[:n], keys[n:]


class Generation:
    """Keys of consecutive group commits: idempotency key -> seq (u64 BE), (user key, seq) pairs, and the key of the
    last journal record they came from (journal keys are first seqs, big-endian, so they sort as seqs)."""

    __slots__ = ("idem", "user_pairs", "last_journal_key")

    def __init__(self) -> None:
        self.idem: dict[bytes, bytes] = {}
        self.user_pairs: list[tuple[bytes, bytes]] = []
        self.last_journal_key: bytes | None = None

    def __len__(self) -> int:
        return len(self.user_pairs) + len(self.idem)


class PendingIndex:
    """The journal's entries in memory: what the idempotency check and user erasure must see besides the trees.

    Kept in generations so a checkpoint can merge keys on its own thread while the writer goes on adding: `freeze`
    (writer thread) closes the current generation and hands every closed one to the merge, the writer's keys go
    to a new one, and `drop` removes the merged generations once their merge has committed. `generations` is a
    tuple that is replaced, never changed in place, so a reader on any thread sees one consistent set.
    """

    def __init__(self) -> None:
        self.generations: tuple[Generation, ...] = (Generation(),)
        self._replacing = threading.Lock()  # freeze (writer thread) and drop (a checkpoint's thread) both replace it

    def __len__(self) -> int:
        return sum(map(len, self.generations))

    @property
    def idem_count(self) -> int:
        return sum(len(g.idem) for g in self.generations)

    @property
    def user_count(self) -> int:
        return sum(len(g.user_pairs) for g in self.generations)

    def add(self, seq_bytes: Sequence[bytes], idem_keys: Iterable[bytes | None], user_keys: Iterable[bytes | None],
            journal_key: bytes | None = None) -> None:
        current = self.generations[-1]
        current.idem.update((key, seq) for key, seq in zip(idem_keys, seq_bytes) if key is not None)
        current.user_pairs += [(key, seq) for key, seq in zip(user_keys, seq_bytes) if key is not None]
        if journal_key is not None:
            current.last_journal_key = journal_key

    def add_journal_record(self, key: bytes, value: bytes, pack_seq) -> None:
        first_seq, idem_keys, user_keys = decode(value)
        self.add([pack_seq(first_seq + k) for k in range(len(idem_keys))], idem_keys, user_keys, key)

    def freeze(self) -> tuple[Generation, ...]:
        """Every generation so far (earlier frozen ones whose merge failed included); new keys go to a new one."""
        with self._replacing:
            frozen = tuple(g for g in self.generations if len(g) or g.last_journal_key is not None)
            self.generations = frozen + (Generation(),)
        return frozen

    def drop(self, merged: tuple[Generation, ...]) -> None:
        gone = set(map(id, merged))
        with self._replacing:
            self.generations = tuple(g for g in self.generations if id(g) not in gone)

    def present(self, keys: Sequence[bytes | None]) -> set[bytes]:
        """The keys held by any generation (the caller reads the tree only after this, so a generation dropped
        in between had already committed its merge)."""
        found: set[bytes] = set()
        for generation in self.generations:
            if generation.idem:
                found.update(k for k in keys if k in generation.idem)
        return found


_MERGE_CHUNK = 2048  # index entries per putmulti in a merge: a bounded stretch of GIL-holding C


def merge(txn: lmdb.Transaction, generations: tuple[Generation, ...], idem_db, user_log_db) -> None:
    """Part of a state transaction: the generations' keys into their trees (writing an entry again is harmless)."""
    for generation in generations:
        for db, pairs in ((idem_db, list(generation.idem.items())), (user_log_db, generation.user_pairs)):
            cursor = txn.cursor(db=db)
            for start in yielding(range(0, len(pairs), _MERGE_CHUNK), every=1):  # hands the GIL over between chunks
                _put_all(cursor, pairs[start:start + _MERGE_CHUNK])
