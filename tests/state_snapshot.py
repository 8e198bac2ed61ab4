"""Everything a State holds, as comparable values keyed by id (user rows differ between a live state and one
rebuilt from a checkpoint; item rows do not). Two states are bit for bit the same when their snapshots are equal."""
from __future__ import annotations


def state_snapshot(state) -> dict:
    users, items = state.users, state.items
    n = len(items)
    return {
        "users": {uid: (users.vectors[row].tobytes(), int(users.last_event_ms[row]), sorted(users.seen[row]),
                        list(users.history[row]), int(users.event_counts[row]), int(users.positive_counts[row]),
                        users.hist_items[row].tobytes(), users.hist_strength[row].tobytes(),
                        users.hist_ts[row].tobytes(), int(users.hist_count[row]))
                  for uid, row in users.rows.items()},
        # the sequence tower's queries (empty without one)
        "sequence": {uid: (users.sequence_vectors[row].tobytes(), bool(users.sequence_ready[row]))
                     for uid, row in users.rows.items()} if users.sequence_enabled else {},
        "items": (items.vectors[:n].tobytes(), items.live[:n].tobytes(), items.log2_popularity[:n].tobytes(),
                  items.interactions[:n].tobytes(), items.last_event_ms[:n].tobytes()),
        "ids": list(items.ids),
        "categories": [list(c) for c in items.categories[:n]],
        "gram": state.gram_fixed.tobytes(),
    }
