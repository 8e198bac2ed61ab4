"""What one group commit writes and how it is applied: the writer thread turns a group of queued operations
into one plan (the columns `Store.append_records` takes, no object per event), commits it in one LMDB
transaction, then applies its steps to the state in log order (`Engine._apply_plan`)."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter

import numpy as np

from streamrec.engine.api import DeleteResult, Event, IngestResult, Rejection, UpsertResult
from streamrec.engine.store import codec
from streamrec.engine.write.writer import Op

_EVENT_ID, _USER_ID, _ITEM_ID = attrgetter("event_id"), attrgetter("user_id"), attrgetter("item_id")


@dataclass(slots=True)
class _Step:
    """Records of one op that a group commit writes consecutively and applies together."""

    op: Op
    records: list  # the op's accepted Events, or one ItemSpec / DeleteItem
    start: int  # index of the first record in the transaction


class GroupPlan:
    """What one group commit writes, as the columns Store.append_records takes (no object per event), and the
    steps that apply it afterwards in log order. Item liveness is checked against the state as changed by the
    earlier ops of the same group."""

    def __init__(self, items):
        self.items = items
        self.pending_live: dict[str, bool] = {}  # items upserted (True) or deleted (False) by earlier ops
        self.payloads: list[bytes] = []
        self.event_ids: list[str | None] = []
        self.user_ids: list[str | None] = []
        self.steps: list[_Step] = []
        self.results: dict[int, object] = {}

    def add(self, op: Op) -> None:
        if op.kind == "events":
            result = self.results[id(op)] = IngestResult()
            events = self._live_events(op.payload, result)
            self._write(op, events, codec.encode_events(events), map(_EVENT_ID, events), map(_USER_ID, events))
        elif op.kind == "upsert":
            self.results[id(op)] = UpsertResult()
            for spec in op.payload:
                self._write(op, [spec], [codec.encode_upsert(spec)], [None], [None])
                self.pending_live[spec.item_id] = True
        elif op.kind == "delete":
            result = self.results[id(op)] = DeleteResult()
            for item_id in dict.fromkeys(op.payload):
                if self._item_problem(item_id) is None:
                    self._write(op, [codec.DeleteItem(item_id)], [codec.encode_delete(item_id)], [None], [None])
                    self.pending_live[item_id] = False
                else:
                    result.not_found.append(item_id)
        else:
            raise AssertionError(f"unexpected op {op.kind}")

    def _write(self, op: Op, records: list, payloads, event_ids, user_ids) -> None:
        self.steps.append(_Step(op, records, len(self.payloads)))
        self.payloads += payloads
        self.event_ids += event_ids
        self.user_ids += user_ids

    def _live_events(self, indexed: list[tuple[int, Event]], result: IngestResult) -> list[Event]:
        """The events whose item is live; the others go into the result's rejections."""
        events = [event for _, event in indexed]
        n = len(events)
        # The usual case, one vectorised check of the whole batch (a few events: the loop below is cheaper).
        if n >= 16 and not self.pending_live:
            rows = np.fromiter(map(self.items.rows.get, map(_ITEM_ID, events), repeat(-1, n)), np.int64, n)
            if (rows >= 0).all() and self.items.live[rows].all():
                return events
        live = []
        for index, event in indexed:
            problem = self._item_problem(event.item_id)
            if problem is None:
                live.append(event)
            else:
                result.rejections.append(Rejection(index, event.event_id, "item_id", problem))
        return live

    def _item_problem(self, item_id: str) -> str | None:
        """Why an event cannot refer to this item (or a delete find it), or None when the item is live."""
        live = self.pending_live.get(item_id)
        if live is None:
            live = self.items.is_live(item_id)
        if live:
            return None
        known = item_id in self.pending_live or self.items.row_of(item_id) is not None
        return f"item '{item_id}' is deleted" if known else f"unknown item '{item_id}'"


def count_accepted(events: list[Event], seqs: list[int | None], result: IngestResult) -> list[Event]:
    """The events that were written (seq None: a duplicate event_id), counted into the op's result."""
    if None in seqs:
        written = [event for event, seq in zip(events, seqs) if seq is not None]
        first = next((seq for seq in seqs if seq is not None), 0)
    else:
        written, first = events, (seqs[0] if seqs else 0)
    result.accepted = len(written)
    result.duplicates = len(events) - len(written)
    result.first_seq = first
    return written
