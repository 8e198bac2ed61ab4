"""Recovery: the state is the last checkpoint plus the log after its watermark, replayed through the same State
functions that applied each record live. Replay is deterministic, so the rebuilt state is bit for bit the state
that was acknowledged."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from streamrec.engine.api import Event, ItemSpec
from streamrec.engine.state.state import State
from streamrec.engine.store import codec
from streamrec.engine.store.store import Store

log = logging.getLogger(__name__)


def apply_log(state: State, records: Iterable[tuple[int, bytes]],
              on_reranker: Callable[[codec.RerankerSwap], None] | None = None) -> int:
    """Apply encoded log records (seq, payload) in seq order; consecutive events go to State in one call, as a
    group commit applies them. A reranker swap goes to `on_reranker` (the model is not part of the State); a
    user-forgotten marker changes nothing here: the erasure it marks is in the checkpoint written with it.
    Returns how many records were applied."""
    pending: list[Event] = []
    pending_seq = applied = 0
    for seq, payload in records:
        record = codec.decode(payload)
        applied += 1
        if isinstance(record, Event):
            pending.append(record)
            pending_seq = seq
            continue
        if pending:
            state.apply_events(pending)
            state.applied_seq, pending = pending_seq, []
        if isinstance(record, ItemSpec):
            state.apply_upsert(record)
        elif isinstance(record, codec.DeleteItem):
            state.apply_delete(record.item_id)
        elif isinstance(record, codec.RerankerSwap) and on_reranker is not None:
            on_reranker(record)
        state.applied_seq = seq  # only once the record is in the state
    if pending:
        state.apply_events(pending)
        state.applied_seq = pending_seq
    return applied


def recover(store: Store, state: State, on_reranker: Callable[[codec.RerankerSwap], None] | None = None) -> int:
    """Load the checkpoint into an empty state and replay the log after it; returns the records replayed."""
    started = time.perf_counter()
    watermark, items, users = store.load_checkpoint()
    state.load(items, users)
    state.applied_seq = watermark
    replayed = apply_log(state, store.iter_log(after_seq=watermark), on_reranker)
    log.info("loaded checkpoint at seq %d (%d items, %d users) and replayed %d log records in %.2f s",
             watermark, len(state.items), len(state.users), replayed, time.perf_counter() - started)
    return replayed
