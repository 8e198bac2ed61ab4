"""The in-memory model: catalog + users, and the rules that apply each kind of log record to them.
Live ingestion and crash recovery call the same functions, so a replay rebuilds the same state."""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from operator import attrgetter

import numpy as np

from streamrec.engine.api import Event, ItemSpec, ItemView, UserView
from streamrec.engine.config import EngineConfig
from streamrec.engine.cpu.online import apply_events as apply_update_kernel
from streamrec.engine.signals import event_strengths, event_weight, event_weights, is_positive
from streamrec.engine.state.catalog import ItemCatalog
from streamrec.engine.state.online import (
    GRAM_SCALE,
    OnlineArrays,
    OnlineParams,
    fold_in_exact,
    gram_fixed,
    history_weights,
)
from streamrec.engine.state.snapshot import CheckpointSnapshot, ItemColumns, UserColumns
from streamrec.engine.state.users import UserTable
from streamrec.engine.store.store import HISTORY_DTYPE, ItemRecord, UserRecord

_DAY_MS = 24 * 3600 * 1000.0
_USER_ID, _ITEM_ID, _TYPE = attrgetter("user_id"), attrgetter("item_id"), attrgetter("type")
_VALUE, _TIMESTAMP = attrgetter("value"), attrgetter("timestamp_ms")
# Below this many events a thread hand-off (tens of microseconds) costs more than the overlap saves.
_OVERLAP_MIN_EVENTS = 64
_kernel_executor: tuple[int, ThreadPoolExecutor] | None = None


@lru_cache(maxsize=4)
def sequence_tower(path: str, dim: int):
    """The loaded sequence tower of `path`, one per process: every State of an Engine (a replica's reloads too)
    shares it. SequenceModelRejected when the file is not a usable tower."""
    from streamrec.engine.sequence.tower import SequenceTower

    return SequenceTower(path, dim)


def _kernel_thread() -> ThreadPoolExecutor:
    """One helper thread for the update kernel, shared by every State of the process (each call waits for its
    kernel). Keyed by pid: a forked child has the executor but not its thread."""
    global _kernel_executor
    if _kernel_executor is None or _kernel_executor[0] != os.getpid():
        _kernel_executor = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="streamrec-update"))
    return _kernel_executor[1]


class State:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.dim = config.dim
        self.items = ItemCatalog(config.dim, config.popularity_half_life_days * _DAY_MS)
        self.users = UserTable(config.dim, config.history_len)
        self.user_half_life_ms = config.user_half_life_days * _DAY_MS
        self.online = OnlineParams(
            alpha=config.online_alpha, reg=config.online_reg, cg_steps=config.online_cg_steps,
            half_life_ms=self.user_half_life_ms, decay_floor=config.user_decay_floor,
            item_lr=config.item_lr, item_lr_new=config.item_lr_new, history=config.online_history)
        # G = Y^T Y over live items, exact fixed point (see state/online.py); `gram` is its float64 value.
        self.gram_fixed = np.zeros((config.dim, config.dim))
        self.gram = np.zeros((config.dim, config.dim))
        self._seq_changed = threading.Condition()
        self._applied_seq = 0
        self.embedding_version = 0
        # The second user model, when configured: per event, the user's query from their latest events.
        self.sequence = sequence_tower(str(config.sequence_model_path), config.dim) if config.sequence_model_path else None
        self.sequence_updates = 0
        self.sequence_seconds = 0.0
        if self.sequence is not None:
            if self.sequence.length > config.history_len:
                raise ValueError(f"the sequence model reads {self.sequence.length} events; the engine keeps "
                                 f"history_len={config.history_len}")
            self.users.enable_sequence()

    # --- the applied seq, and waiting for it (read-your-writes) ---------------------------------
    @property
    def applied_seq(self) -> int:
        """The last log record this state reflects."""
        return self._applied_seq

    @applied_seq.setter
    def applied_seq(self, seq: int) -> None:
        with self._seq_changed:
            self._applied_seq = seq
            self._seq_changed.notify_all()

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """True once the state has applied `seq` (at once when it has); False after timeout_s without."""
        if self._applied_seq >= seq:
            return True
        with self._seq_changed:
            return self._seq_changed.wait_for(lambda: self._applied_seq >= seq, timeout_s)

    def adopt(self, other: "State") -> None:
        """Become `other`, a state rebuilt from a checkpoint (a replica's reload), so that everything holding this
        State sees the rebuilt one. The caller holds the engine lock; waiters on the applied seq stay attached."""
        seq_changed = self._seq_changed
        self.__dict__.update(other.__dict__)
        self._seq_changed = seq_changed
        self.applied_seq = other.applied_seq

    # --- log records ------------------------------------------------------------------------
    def apply_events(self, events: list[Event]) -> None:
        """Apply events whose items exist (the writer checked), in log order: the online model
        (state/online.py, kernel cpu/online.py) moves each user's vector and, by a smaller step, the
        item's; the same events give bit-identical state however they are batched."""
        if not events:
            return
        items, n = self.items, len(events)
        user_rows = self._user_rows(list(map(_USER_ID, events)))
        item_rows = np.fromiter(map(items.rows.__getitem__, map(_ITEM_ID, events)), np.int64, n)
        types = np.fromiter(map(_TYPE, events), np.int64, n)
        values = np.fromiter(map(_VALUE, events), np.float64, n)
        timestamps = np.fromiter(map(_TIMESTAMP, events), np.int64, n)
        moved = np.full(n, -1, np.int64)
        kernel_args = (self.online_arrays(moved), user_rows, item_rows, event_strengths(types, values), timestamps,
                       self.online)
        # The kernel releases the GIL and writes only the model's arrays (user and item vectors, rings, Gram,
        # interaction counts); the bookkeeping writes only other ones (event counts, seen sets, histories,
        # popularity). So a large batch runs the kernel on a helper thread while this one does the bookkeeping.
        # Both finish before returning, and each is deterministic alone, so the state is the same.
        running = _kernel_thread().submit(apply_update_kernel, *kernel_args) if n >= _OVERLAP_MIN_EVENTS else None
        if running is None:
            apply_update_kernel(*kernel_args)
        try:
            self._record_events(user_rows, item_rows, types, values, timestamps)
            if self.sequence is not None and self.config.sequence_update == "event":
                self.update_sequence(np.unique(user_rows))  # reads only histories, which the kernel does not write
        finally:  # never return (or raise) while the kernel still writes the state
            if running is not None:
                running.result()
        changed = moved[moved >= 0].tolist()
        items.dirty_rows.update(changed)
        items.device_changes.update(changed)
        self.embedding_version += 1

    def _record_events(self, user_rows, item_rows, types, values, timestamps) -> None:
        """Counters, seen sets, histories and popularity, batched (each bit-identical to its per-event form)."""
        weights, positive = event_weights(types, values)
        self.users.record_events(user_rows, item_rows, types, values, timestamps, positive)
        self.items.record_interactions(item_rows, weights, timestamps, positive)

    def update_sequence(self, rows) -> None:
        """Each row's sequence query from its current history (one user per tower run: see sequence/tower.py)."""
        users, ids, tower = self.users, self.items.ids, self.sequence
        started = time.perf_counter()
        for row in rows.tolist() if isinstance(rows, np.ndarray) else rows:
            history = users.history[row]
            if history:
                users.sequence_vectors[row] = tower.query(history, ids.__getitem__)
                users.sequence_ready[row] = True
                users.sequence_stamp[row] = users.event_counts[row]
        self.sequence_updates += len(rows)
        self.sequence_seconds += time.perf_counter() - started

    def stale_sequence(self, rows) -> list[tuple[int, int, list]]:
        """(row, stamp, model window) of each row whose sequence query is not current, to compute off the lock
        (the caller holds it now); store_sequence() keeps the results."""
        users, ids, tower = self.users, self.items.ids, self.sequence
        jobs = []
        for row in set(rows):
            if users.history[row] and not (users.sequence_ready[row] and users.sequence_stamp[row] == users.event_counts[row]):
                jobs.append((row, int(users.event_counts[row]), tower.window(users.history[row], ids.__getitem__)))
        return jobs

    def store_sequence(self, jobs: list[tuple[int, int, list]], vectors: list[np.ndarray], seconds: float) -> None:
        """Keep the queries computed for stale_sequence's jobs whose user has had no event since (the caller
        holds the lock); a user who has is stale again and computed on their next read."""
        users = self.users
        for (row, stamp, _), vector in zip(jobs, vectors):
            if users.event_counts[row] == stamp and users.history[row]:
                users.sequence_vectors[row] = vector
                users.sequence_ready[row] = True
                users.sequence_stamp[row] = stamp
        self.sequence_updates += len(jobs)
        self.sequence_seconds += seconds

    def _user_rows(self, user_ids: list[str]) -> np.ndarray:
        """Row of each event's user; new users get rows in order of first appearance, as ensure() per event."""
        users = self.users
        rows = list(map(users.rows.get, user_ids))
        if None in rows:
            rows = [users.ensure(uid) if row is None else row for uid, row in zip(user_ids, rows)]
        return np.array(rows, np.int64)

    def online_arrays(self, moved: np.ndarray) -> OnlineArrays:
        items, users = self.items, self.users
        return OnlineArrays(users.vectors, users.last_event_ms, users.hist_items, users.hist_strength,
                            users.hist_ts, users.hist_count, items.vectors, items.live, items.interactions,
                            self.gram_fixed, self.gram, moved)

    # --- the Gram of live item vectors ---------------------------------------------------------
    def _gram_change(self, row: int, sign: float) -> None:
        if self.items.live[row]:
            y = self.items.vectors[row].astype(np.float64)
            self.gram_fixed += sign * np.rint(np.outer(y, y) * GRAM_SCALE)
            self.gram[:] = self.gram_fixed / GRAM_SCALE

    def rebuild_gram(self) -> None:
        n = len(self.items)
        self.gram_fixed[:] = gram_fixed(self.items.vectors[:n], self.items.live[:n])
        self.gram[:] = self.gram_fixed / GRAM_SCALE

    def apply_upsert(self, spec: ItemSpec) -> bool:
        row = self.items.row_of(spec.item_id)
        if row is not None:
            self._gram_change(row, -1.0)
        created = self.items.upsert(spec.item_id, spec.categories, spec.attributes, spec.vector)
        self._gram_change(self.items.rows[spec.item_id], 1.0)
        self.embedding_version += 1
        return created

    def apply_delete(self, item_id: str) -> bool:
        row = self.items.row_of(item_id)
        if row is not None:
            self._gram_change(row, -1.0)
        return self.items.delete(item_id)

    # --- bootstrap ----------------------------------------------------------------------------
    def seed_users(self, events: list[Event], user_ids: list[str], user_vectors: np.ndarray, refold: bool = True) -> None:
        """Record a trained model's history without the online rule: the model already summarises these
        events. Each user's vector is the model's (unnormalised: training solves it as a fold-in against the
        unit item vectors, so the online fold-in continues from it)."""
        items, users = self.items, self.users
        strengths = event_strengths([e.type for e in events], [e.value for e in events])
        for event, strength in zip(events, strengths):
            row = users.ensure(event.user_id)
            item_row = items.rows[event.item_id]
            positive = is_positive(event.type, event.value)
            weight = event_weight(event.type, event.value)
            users.record(row, item_row, int(event.type), float(event.value), event.timestamp_ms, positive)
            users.append_ring(row, item_row, float(strength), event.timestamp_ms)
            users.last_event_ms[row] = max(users.last_event_ms[row], event.timestamp_ms)
            items.record_interaction(item_row, weight if positive else 0.0, event.timestamp_ms, positive)
        for user_id, vector in zip(user_ids, user_vectors):
            row = users.rows.get(user_id)
            if row is None:
                continue
            users.vectors[row] = vector
            # A trained vector is interest enough to personalise, even when no event was "positive".
            users.positive_counts[row] = max(users.positive_counts[row], 1) if np.any(vector) else users.positive_counts[row]
        if refold:
            self.refold_users()
        if self.sequence is not None and self.config.sequence_update == "event":
            self.update_sequence(sorted(users.rows.values()))
        self.embedding_version += 1

    def refold_users(self) -> None:
        """Set every user's vector to the exact online fold-in of their latest events (the state the online
        model converges to), so the seeded model is the online model at the end of training: recent taste
        predicts the next items better than full-history vectors (benchmarks/RESULTS.md, "Figures behind design choices")."""
        users, items, p = self.users, self.items, self.online
        window = min(users.history_len, p.history)
        for row in users.rows.values():
            n = int(min(users.hist_count[row], window))
            if n == 0:
                continue
            slots = (users.hist_count[row] - n + np.arange(n)) % users.history_len
            cw, pref = history_weights(users.hist_strength[row, slots], users.hist_ts[row, slots],
                                       int(users.last_event_ms[row]), p)
            if not pref.any():
                continue
            x = fold_in_exact(self.gram, items.vectors[users.hist_items[row, slots]], cw, pref, p.reg)
            users.vectors[row] = x.astype(np.float32)

    # --- views (the caller holds the engine lock) ---------------------------------------------------
    def item_view(self, item_id: str, now_ms: int) -> ItemView | None:
        items = self.items
        row = items.row_of(item_id)
        if row is None:
            return None
        return ItemView(item_id, list(items.categories[row]), dict(items.attributes[row]), items.vectors[row].copy(),
                        not bool(items.live[row]), int(items.interactions[row]), items.popularity_at(row, now_ms),
                        int(items.last_event_ms[row]))

    def user_view(self, user_id: str, history_limit: int) -> UserView | None:
        users, items = self.users, self.items
        row = users.row_of(user_id)
        if row is None:
            return None
        vector = users.query_vector(row, self.config.user_model)
        recent = list(users.history[row])[::-1][:history_limit]
        return UserView(user_id, vector if vector is not None else np.zeros(self.dim, np.float32),
                        [(items.ids[r], t, v, ts) for r, t, v, ts in recent], int(users.event_counts[row]),
                        len(users.seen[row]), int(users.last_event_ms[row]))

    # --- checkpoint --------------------------------------------------------------------------
    def checkpoint_snapshot(self) -> CheckpointSnapshot:
        """Copies of everything changed since the last snapshot (the caller holds the engine lock), and the
        changes forgotten: a checkpoint that fails hands them back with mark_dirty."""
        items, users = self.items, self.users
        item_rows = sorted(items.dirty_rows)
        index = np.asarray(item_rows, np.int64)
        ids, categories, attributes = items.ids, items.categories, items.attributes
        item_columns = ItemColumns(item_rows, [ids[r] for r in item_rows], [categories[r] for r in item_rows],
                                   [attributes[r] for r in item_rows], items.live[index], items.vectors[index],
                                   items.log2_popularity[index], items.last_event_ms[index], items.interactions[index])
        user_ids = [uid for uid in sorted(users.dirty) if uid in users.rows]
        index = np.fromiter(map(users.rows.__getitem__, user_ids), np.int64, len(user_ids))
        seen, history = users.seen, users.history
        user_columns = UserColumns(user_ids, users.vectors[index], [set(seen[r]) for r in index.tolist()],
                                   [tuple(history[r]) for r in index.tolist()], users.event_counts[index],
                                   users.last_event_ms[index], users.positive_counts[index])
        snapshot = CheckpointSnapshot(self.applied_seq, item_columns, user_columns, sorted(users.forgotten))
        self.clear_dirty()
        return snapshot

    def mark_dirty(self, snapshot: CheckpointSnapshot) -> None:
        """A snapshot that was not written: its rows go into the next one."""
        self.items.dirty_rows.update(snapshot.items.rows)
        self.users.dirty.update(snapshot.users.ids)
        self.users.forgotten.update(snapshot.forgotten)

    def clear_dirty(self) -> None:
        self.items.dirty_rows.clear()
        self.users.dirty.clear()
        self.users.forgotten.clear()

    def load(self, item_records: list[ItemRecord], user_records: list[UserRecord]) -> None:
        """Rebuild from a checkpoint (items sorted by row)."""
        items, users = self.items, self.users
        for record in item_records:
            assert record.row == len(items), "item rows in the store must be dense"
            items.upsert(record.item_id, record.categories, record.attributes, record.vector)
            items.vectors[record.row] = record.vector  # exactly as stored, no renormalisation drift
            items.live[record.row] = not record.deleted
            items.log2_popularity[record.row] = record.popularity
            items.last_event_ms[record.row] = record.last_event_ms
            items.interactions[record.row] = record.interactions
        for record in user_records:
            row = users.ensure(record.user_id)
            users.vectors[row] = record.vector
            users.seen[row] = set(int(r) for r in record.seen)
            users.history[row].extend(tuple(h) for h in record.history.tolist())
            history = record.history[-users.history_len:]
            for entry, strength in zip(history, event_strengths(history["type"], history["value"])):
                users.append_ring(row, int(entry["row"]), float(strength), int(entry["ts"]))
            users.event_counts[row] = record.event_count
            users.positive_counts[row] = record.positive_count
            users.last_event_ms[row] = record.last_event_ms
        if self.sequence is not None and self.config.sequence_update == "event":
            self.update_sequence(sorted(users.rows.values()))
        self.rebuild_gram()
        self.clear_dirty()


__all__ = ["State", "HISTORY_DTYPE"]
