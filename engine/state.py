"""The in-memory model: catalog + users, and the rules that apply each kind of log record to them.
Live ingestion and crash recovery call the same functions, so a replay rebuilds the same state."""
from __future__ import annotations

import numpy as np

from .catalog import ItemCatalog
from .config import EngineConfig
from .cpu.update import apply_events as apply_update_kernel
from .store import ItemRecord, UserRecord
from .types import Event, ItemSpec, event_weight, is_positive
from .users import HISTORY_DTYPE, UserTable

_DAY_MS = 24 * 3600 * 1000.0


class State:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.dim = config.dim
        self.items = ItemCatalog(config.dim, config.popularity_half_life_days * _DAY_MS)
        self.users = UserTable(config.dim, config.history_len)
        self.user_half_life_ms = config.user_half_life_days * _DAY_MS
        self.applied_seq = 0
        self.embedding_version = 0

    # --- log records ------------------------------------------------------------------------
    def apply_events(self, events: list[Event]) -> None:
        """Apply events whose items exist (the writer checked), in log order."""
        if not events:
            return
        items, users = self.items, self.users
        user_rows = np.fromiter((users.ensure(e.user_id) for e in events), np.int64, len(events))
        item_rows = np.fromiter((items.rows[e.item_id] for e in events), np.int64, len(events))
        weights = np.fromiter((event_weight(e.type, e.value) for e in events), np.float32, len(events))
        timestamps = np.fromiter((e.timestamp_ms for e in events), np.int64, len(events))
        apply_update_kernel(  # bit-identical to online.apply_events_reference
            users.accumulators, users.last_event_ms, items.vectors, user_rows, item_rows, weights, timestamps,
            self.user_half_life_ms, self.config.user_decay_floor,
        )
        for event, u, i, w in zip(events, user_rows, item_rows, weights):
            positive = is_positive(event.type, event.value)
            users.record(int(u), int(i), int(event.type), float(event.value), event.timestamp_ms, positive)
            items.record_interaction(int(i), float(w) if positive else 0.0, event.timestamp_ms, positive)
        self.embedding_version += 1

    def apply_upsert(self, spec: ItemSpec) -> bool:
        created = self.items.upsert(spec.item_id, spec.categories, spec.attributes, spec.vector)
        self.embedding_version += 1
        return created

    def apply_delete(self, item_id: str) -> bool:
        return self.items.delete(item_id)

    # --- bootstrap ----------------------------------------------------------------------------
    def seed_users(self, events: list[Event], user_ids: list[str], user_vectors: np.ndarray) -> None:
        """Record a trained model's history without the online rule: the factorisation already
        summarises these events. Each user's accumulator is their factor scaled by sqrt(#events),
        so a long history is not overturned by one new event, yet one event visibly moves it."""
        items, users = self.items, self.users
        for event in events:
            row = users.ensure(event.user_id)
            item_row = items.rows[event.item_id]
            positive = is_positive(event.type, event.value)
            weight = event_weight(event.type, event.value)
            users.record(row, item_row, int(event.type), float(event.value), event.timestamp_ms, positive)
            users.last_event_ms[row] = max(users.last_event_ms[row], event.timestamp_ms)
            items.record_interaction(item_row, weight if positive else 0.0, event.timestamp_ms, positive)
        for user_id, vector in zip(user_ids, user_vectors):
            row = users.rows.get(user_id)
            if row is None:
                continue
            users.accumulators[row] = vector * np.float32(np.sqrt(users.event_counts[row]))
            # A trained vector is interest enough to personalise, even when no event was "positive".
            users.positive_counts[row] = max(users.positive_counts[row], 1) if np.any(vector) else users.positive_counts[row]
        self.embedding_version += 1

    # --- checkpoint --------------------------------------------------------------------------
    def dirty_records(self) -> tuple[list[ItemRecord], list[UserRecord], list[str]]:
        items, users = self.items, self.users
        item_records = [self.item_record(row) for row in sorted(items.dirty_rows)]
        user_records = [self.user_record(users.rows[uid]) for uid in sorted(users.dirty) if uid in users.rows]
        return item_records, user_records, sorted(users.forgotten)

    def clear_dirty(self) -> None:
        self.items.dirty_rows.clear()
        self.users.dirty.clear()
        self.users.forgotten.clear()

    def item_record(self, row: int) -> ItemRecord:
        items = self.items
        return ItemRecord(
            item_id=items.ids[row], row=row, categories=list(items.categories[row]),
            attributes=dict(items.attributes[row]), deleted=not bool(items.live[row]),
            vector=items.vectors[row].copy(), popularity=float(items.log2_popularity[row]),
            last_event_ms=int(items.last_event_ms[row]), interactions=int(items.interactions[row]),
        )

    def user_record(self, row: int) -> UserRecord:
        users = self.users
        return UserRecord(
            user_id=users.ids[row], vector=users.accumulators[row].copy(),
            seen=np.array(sorted(users.seen[row]), np.int32), history=users.history_array(row),
            event_count=int(users.event_counts[row]), last_event_ms=int(users.last_event_ms[row]),
            positive_count=int(users.positive_counts[row]),
        )

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
            users.accumulators[row] = record.vector
            users.seen[row] = set(int(r) for r in record.seen)
            users.history[row].extend(tuple(h) for h in record.history.tolist())
            users.event_counts[row] = record.event_count
            users.positive_counts[row] = record.positive_count
            users.last_event_ms[row] = record.last_event_ms
        self.clear_dirty()


__all__ = ["State", "HISTORY_DTYPE"]
