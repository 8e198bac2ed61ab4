"""Secondary-index entries (idempotency keys, user_log) that are durable but not yet merged into their B-trees.

Why: an event's idempotency key (a client uuid) and its user key land on random leaf pages of large trees, so
inserting them at every group commit copies and fsyncs one page per event: on a store holding 100k events that
was ~20 of the ~30 µs of wall time (and 7 of the 10 µs of CPU) each event cost the commit, against ~1 µs for
the log itself, whose keys only grow. Instead each group commit writes ONE journal record (key: the group's
first seq, appended; value: the group's keys) in the same transaction as its log records, and keeps the keys in
memory. The store merges them into the trees many commits at a time (at checkpoints, before an erasure, or when
too many are pending), in one transaction that also empties the journal, so a leaf page is copied and written
once per merge rather than once per commit: ~1.7 µs of CPU per record. (Sorting the keys first measured slower:
the sort costs more in Python than the locality saves in LMDB.) On open, the journal
is read back into memory, so a key acknowledged before a crash still deduplicates after it.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

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


class PendingIndex:
    """The journal's entries in memory: what the idempotency check and user erasure must see besides the trees."""

    def __init__(self) -> None:
        self.idem: dict[bytes, bytes] = {}  # idempotency key -> seq (u64 BE) of the record that carried it
        self.user_pairs: list[tuple[bytes, bytes]] = []  # (user key, seq u64 BE), one per keyed record

    def __len__(self) -> int:
        return len(self.user_pairs) + len(self.idem)

    def add(self, seq_bytes: Sequence[bytes], idem_keys: Iterable[bytes | None], user_keys: Iterable[bytes | None]) -> None:
        self.idem.update((key, seq) for key, seq in zip(idem_keys, seq_bytes) if key is not None)
        self.user_pairs += [(key, seq) for key, seq in zip(user_keys, seq_bytes) if key is not None]

    def add_journal_value(self, value: bytes, pack_seq) -> None:
        first_seq, idem_keys, user_keys = decode(value)
        self.add([pack_seq(first_seq + k) for k in range(len(idem_keys))], idem_keys, user_keys)

    def clear(self) -> None:
        self.idem.clear()
        self.user_pairs.clear()
