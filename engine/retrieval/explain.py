"""Explanations (issue 20): for each answered item, the user's recent positive items (engine/signals.py
`is_positive`) that are most similar to it, with their cosine over the live item vectors. The window is the one
the reranker's history features look at, so an explanation names what the second stage saw; the cost is one
small product of the answer's vectors with that window's."""
from __future__ import annotations

import numpy as np

from streamrec.engine.rerank.features import RECENT_POSITIVES
from streamrec.engine.signals import is_positive

MAX_REASONS = 3  # items named per answered item

NO_ROWS = np.zeros(0, np.int64)


def recent_positive_rows(history, live: np.ndarray, limit: int = RECENT_POSITIVES) -> np.ndarray:
    """int64 rows of the user's last `limit` distinct positive items that are still live, most recent first.
    Call under the state lock: the writer appends to `history` (a deque of (item row, type, value, ts))."""
    rows: list[int] = []
    for item_row, event_type, value, _ in reversed(history):
        if item_row not in rows and live[item_row] and is_positive(event_type, value):
            rows.append(item_row)
            if len(rows) == limit:
                break
    return np.array(rows, np.int64) if rows else NO_ROWS


def because(item_rows, positive_rows: np.ndarray, vectors: np.ndarray, ids: list,
            limit: int = MAX_REASONS) -> list[list[tuple[str, float]]]:
    """Per answered item: up to `limit` (item id, cosine) of positive_rows, most similar first (equal cosines:
    the more recent first). Only items that point the same way (cosine > 0) count as support, and an item
    never explains itself."""
    answered = np.asarray(item_rows, np.int64)
    if len(positive_rows) == 0 or len(answered) == 0:
        return [[] for _ in range(len(answered))]
    # float64 products of the stored float32 vectors: the cosine a client recomputes from GetItem.
    similarity = np.asarray(vectors[answered], np.float64) @ np.asarray(vectors[positive_rows], np.float64).T
    similarity[answered[:, None] == positive_rows[None, :]] = -np.inf
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :limit]
    out = []
    for row, columns in enumerate(order.tolist()):
        sims = similarity[row]
        out.append([(ids[positive_rows[c]], float(sims[c])) for c in columns if sims[c] > 0.0])
    return out
