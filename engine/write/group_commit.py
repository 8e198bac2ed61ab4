"""What the writer thread does with a group of queued operations: plan -> append -> apply -> complete.

The group becomes one plan (the columns `Store.append_records` takes, no object per event), is written in one
LMDB transaction, applied to the state in log order under the engine lock, and only then are the callers'
futures completed: an acknowledged write is durable and already visible to reads. Operations that must run alone
(erasure, forced checkpoints, seeding) go through `run_exclusive`.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter

import numpy as np

from streamrec.engine.api import DeleteResult, Event, ForgetResult, IngestResult, ItemSpec, Rejection, UpsertResult
from streamrec.engine.observer import EngineObserver
from streamrec.engine.state.state import State
from streamrec.engine.store import codec
from streamrec.engine.store.store import LogEntry, Store
from streamrec.engine.write.checkpointer import Checkpointer
from streamrec.engine.write.writer import Op, OpKind

MODEL_VERSION_KEY = "model_version"  # store meta: the version of the model the engine was seeded with
RERANKER_KEY = "reranker"  # store meta: the serving reranker, as codec.encode_reranker gives it

_EVENT_ID, _USER_ID, _ITEM_ID = attrgetter("event_id"), attrgetter("user_id"), attrgetter("item_id")


@dataclass(slots=True)
class _Step:
    """Records of one op that a group commit writes consecutively and applies together."""

    op: Op
    records: list  # the op's accepted Events, or one ItemSpec / DeleteItem
    start: int  # index of the first record in the transaction


def current_reranker(store: Store) -> codec.RerankerSwap | None:
    """The serving reranker as the primary last recorded it (None: it never recorded one)."""
    raw = store.get_meta(RERANKER_KEY)
    record = codec.decode(raw) if raw is not None else None
    return record if isinstance(record, codec.RerankerSwap) else None


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
        if op.kind is OpKind.EVENTS:
            result = self.results[id(op)] = IngestResult()
            events = self._live_events(op.payload, result)
            self._write(op, events, codec.encode_events(events), map(_EVENT_ID, events), map(_USER_ID, events))
        elif op.kind is OpKind.UPSERT:
            self.results[id(op)] = UpsertResult()
            for spec in op.payload:
                self._write(op, [spec], [codec.encode_upsert(spec)], [None], [None])
                self.pending_live[spec.item_id] = True
        elif op.kind is OpKind.DELETE:
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


class GroupCommit:
    """The writer thread's side of every write (GroupCommitWriter calls `commit` and `run_exclusive`)."""

    def __init__(self, store: Store, state: State, lock: threading.RLock, checkpointer: Checkpointer,
                 observer: EngineObserver, on_durable: Callable[[], None] = lambda: None):
        self.store, self.state, self.lock = store, state, lock
        self.checkpointer, self.observer = checkpointer, observer
        self.on_durable = on_durable  # after each write reaches the log: wakes the replicas

    def commit(self, group: list[Op]) -> None:
        """Validate against current state, write one transaction, apply in log order, complete futures."""
        plan = GroupPlan(self.state.items)
        for op in group:
            plan.add(op)
        started = time.perf_counter()
        seqs = self.store.append_records(plan.payloads, plan.event_ids, plan.user_ids)
        # Seqs only grow, so the group's last one is the log's; reading it back costs a transaction per group.
        durable = next((seq for seq in reversed(seqs) if seq is not None), None) or self.store.last_seq()
        self.observer.commit(time.perf_counter() - started, len(plan.payloads))
        self.on_durable()
        with self.lock:
            self._apply(plan, seqs)
            self.state.applied_seq = durable
        self.checkpointer.count(len(seqs) - seqs.count(None))
        for op in group:
            result = plan.results[id(op)]
            result.durable_seq = durable
            op.complete(result)

    def _apply(self, plan: GroupPlan, seqs: list[int | None]) -> None:
        """Apply what was written, in log order; runs of events (several ops' worth) go to State in one call."""
        state = self.state
        batch: list[Event] = []
        for step in plan.steps:
            result = plan.results[id(step.op)]
            step_seqs = seqs[step.start:step.start + len(step.records)]
            if step.op.kind is OpKind.EVENTS:
                batch += count_accepted(step.records, step_seqs, result)
                continue
            state.apply_events(batch)
            batch = []
            record = step.records[0]
            if isinstance(record, ItemSpec):
                if state.apply_upsert(record):
                    result.created += 1
                else:
                    result.updated += 1
            else:
                state.apply_delete(record.item_id)
                result.deleted += 1
        state.apply_events(batch)

    def run_exclusive(self, op: Op):
        self.checkpointer.wait()  # erasure and seeding write the checkpointed state themselves
        if op.kind is OpKind.CHECKPOINT:
            return self.checkpointer.now()
        if op.kind is OpKind.FORGET:
            erased = self.store.forget_user_records(op.payload)
            # The marker (it names no one) tells replicas to reload from the checkpoint below.
            marker = self._append_alone(codec.encode_user_forgotten(erased))
            with self.lock:
                self.state.users.forget(op.payload)
                self.state.applied_seq = marker
            # Popularity already counted the erased events; checkpoint now so a replay after a crash
            # starts from the same aggregates instead of recounting without them.
            self.checkpointer.now()
            return ForgetResult(len(erased), marker)
        if op.kind is OpKind.RERANKER:
            path, version = op.payload
            seq = self._append_alone(codec.encode_reranker(path, version))
            self.store.put_meta(RERANKER_KEY, codec.encode_reranker(path, version))
            self.state.applied_seq = seq  # the model already serves here; replicas swap at this seq
            return seq
        if op.kind is OpKind.SEED:
            return self._seed(*op.payload)
        raise AssertionError(f"unexpected op {op.kind}")

    def _append_alone(self, payload: bytes) -> int:
        seq = self.store.append_log([LogEntry(payload)])[0]
        self.checkpointer.count(1)
        self.on_durable()
        return seq

    def _seed(self, items: list[ItemSpec], events: list[Event], user_ids, user_vectors, model_version: str) -> str:
        """A trained model and its training log, written and applied as one checkpointed step."""
        entries = [LogEntry(codec.encode_upsert(spec)) for spec in items]
        entries += [LogEntry(codec.encode_event(e), e.event_id, e.user_id) for e in events]
        self.store.append_log(entries)
        with self.lock:
            for spec in items:
                self.state.apply_upsert(spec)
            self.state.seed_users(events, user_ids, np.asarray(user_vectors, np.float32))
            self.state.applied_seq = self.store.last_seq()
        self.store.put_meta(MODEL_VERSION_KEY, model_version.encode())
        self.checkpointer.now()
        return model_version
