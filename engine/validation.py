"""Checks on client input that need no engine state. Each failure names the field at fault."""
from __future__ import annotations

import math
import re
import time

import numpy as np

from streamrec.engine.api import Event, EventType, ItemSpec, RecommendQuery, Rejection
from streamrec.engine.config import Limits
from streamrec.engine.errors import InvalidArgument

_VALID_TYPES = frozenset(int(t) for t in EventType)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")  # a C-level scan: ids are checked on every event


def id_problem(value: str, limits: Limits) -> str | None:
    """Why an id is unusable, or None. Control characters are refused: ids end up in logs and keys."""
    if not value:
        return "must not be empty"
    if value.isascii():  # the common case: one byte per character, no surrogates
        if len(value) > limits.max_id_bytes:
            return f"longer than {limits.max_id_bytes} bytes"
    elif len(value.encode("utf-8", "surrogatepass")) > limits.max_id_bytes:
        return f"longer than {limits.max_id_bytes} bytes"
    if _CONTROL_CHARACTER.search(value):
        return "contains control characters"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid unicode (lone surrogate)"
    return None


def check_id(field: str, value: str, limits: Limits) -> str:
    problem = id_problem(value, limits)
    if problem:
        raise InvalidArgument(field, problem)
    return value


def check_k(k: int | None, limits: Limits, default: int) -> int:
    if k is None:
        return default
    if k < 1 or k > limits.max_k:
        raise InvalidArgument("k", f"must be between 1 and {limits.max_k}, got {k}")
    return k


def check_id_list(field: str, values, limits: Limits) -> list[str]:
    if len(values) > limits.max_filter_ids:
        raise InvalidArgument(field, f"at most {limits.max_filter_ids} ids, got {len(values)}")
    return [check_id(f"{field}[{i}]", v, limits) for i, v in enumerate(values)]


USER_MODELS = ("", "ials", "sequence")  # "": the server default


def check_query(limits: Limits, default_k: int, user_id: str, k: int | None, exclude_seen: bool = True,
                exclude_item_ids=(), include_categories=(), exclude_categories=(), request_id: str = "",
                user_field: str = "user_id", rerank: bool | None = None, candidates: int = 0,
                user_model: str = "", mmr_lambda: float = 0.0, max_per_category: int = 0,
                explain: bool = False) -> RecommendQuery:
    """A validated query; every problem names the request field."""
    check_diversity(mmr_lambda, max_per_category, limits)
    if user_model not in USER_MODELS:
        raise InvalidArgument("user_model", f"must be one of {', '.join(m for m in USER_MODELS if m)} (or unset: the "
                                            f"server default), got {user_model!r}")
    if not 0 <= candidates <= limits.max_k:
        raise InvalidArgument("rerank.candidates", f"must be between 0 (server default) and {limits.max_k}, got {candidates}")
    return RecommendQuery(
        user_id=check_id(user_field, user_id, limits),
        k=check_k(k, limits, default_k),
        exclude_seen=exclude_seen,
        exclude_item_ids=check_id_list("exclude_item_ids", list(exclude_item_ids), limits),
        include_categories=check_id_list("include_categories", list(include_categories), limits),
        exclude_categories=check_id_list("exclude_categories", list(exclude_categories), limits),
        request_id=request_id,
        rerank=rerank,
        candidates=candidates,
        user_model=user_model,
        mmr_lambda=float(mmr_lambda),
        max_per_category=max_per_category,
        explain=bool(explain),
    )


def check_diversity(mmr_lambda: float, max_per_category: int, limits: Limits) -> None:
    if not (math.isfinite(mmr_lambda) and 0.0 <= mmr_lambda <= 1.0):  # NaN fails the comparison too
        raise InvalidArgument("diversity.mmr_lambda", f"must be within [0, 1] (0 = off), got {mmr_lambda}")
    if not 0 <= max_per_category <= limits.max_k:
        raise InvalidArgument("diversity.max_per_category",
                              f"must be between 0 (off) and {limits.max_k}, got {max_per_category}")


def event_problem(event: Event, limits: Limits, now_ms: int) -> tuple[str, str] | None:
    """(field, reason) for an unacceptable event, or None."""
    for field in ("event_id", "user_id", "item_id"):
        problem = id_problem(getattr(event, field), limits)
        if problem:
            return field, problem
    if len(event.recommendation_id) > 64:  # 32 hex digits when it is one of ours; anything else is just unknown
        return "recommendation_id", f"is {len(event.recommendation_id)} characters; at most 64"
    if int(event.type) not in _VALID_TYPES:
        return "type", f"unknown event type {int(event.type)}"
    if not math.isfinite(event.value):
        return "value", "must be a finite number"
    if abs(event.value) > _FLOAT32_MAX:  # user histories keep values as float32: it would become inf
        return "value", f"must be within +-{_FLOAT32_MAX:.4g}, got {event.value:.4g}"
    if event.type == EventType.RATING and not (0.0 <= event.value <= 5.0):
        return "value", f"a rating must be within 0..5, got {event.value}"
    if event.timestamp_ms < limits.min_timestamp_ms:
        return "timestamp_ms", f"must not be before {limits.min_timestamp_ms}"
    if event.timestamp_ms > now_ms + limits.max_future_ms:
        return "timestamp_ms", "is more than a day in the future"
    return None


# Below this many events the per-event checks are cheaper than the batch check's fixed NumPy cost (benchmarks/RESULTS.md, "Figures behind design choices").
_BATCH_CHECK_MIN_EVENTS = 16


def split_events(events: list[Event], limits: Limits) -> tuple[list[tuple[int, Event]], list[Rejection]]:
    """Separate well-formed events (with their batch index) from rejected ones; fill absent timestamps."""
    if len(events) > limits.max_events_per_batch:
        raise InvalidArgument("events", f"at most {limits.max_events_per_batch} events per batch, got {len(events)}")
    now_ms = int(time.time() * 1000)
    for event in events:
        if event.timestamp_ms == 0:
            event.timestamp_ms = now_ms  # stored in the log, so replay sees the same time
    if len(events) >= _BATCH_CHECK_MIN_EVENTS and _all_acceptable(events, limits, now_ms):
        return list(enumerate(events)), []
    good: list[tuple[int, Event]] = []
    rejected: list[Rejection] = []
    for index, event in enumerate(events):
        problem = event_problem(event, limits, now_ms)
        if problem:
            rejected.append(Rejection(index, event.event_id, *problem))
        else:
            good.append((index, event))
    return good, rejected


def _all_acceptable(events: list[Event], limits: Limits, now_ms: int) -> bool:
    """True only if event_problem finds nothing in any event: the same rules, checked a batch at a time
    (a few C-level passes instead of per-event Python).
    False sends the batch to the per-event path, which says what is wrong and where; non-ASCII ids always take it."""
    if not events:
        return True
    ids = [e.event_id for e in events] + [e.user_id for e in events] + [e.item_id for e in events]
    joined = "".join(ids)
    if not joined.isascii() or _CONTROL_CHARACTER.search(joined):
        return False
    lengths = list(map(len, ids))
    if min(lengths) == 0 or max(lengths) > limits.max_id_bytes:
        return False
    if max(len(e.recommendation_id) for e in events) > 64:
        return False
    types = [int(e.type) for e in events]
    if not _VALID_TYPES.issuperset(types):
        return False
    values = np.fromiter([e.value for e in events], np.float64, len(events))
    if not np.all(np.abs(values) <= _FLOAT32_MAX):  # NaN fails every comparison; inf exceeds the bound
        return False
    is_rating = np.fromiter(types, np.int64, len(types)) == int(EventType.RATING)
    if is_rating.any() and not np.all((values[is_rating] >= 0.0) & (values[is_rating] <= 5.0)):
        return False
    stamps = [e.timestamp_ms for e in events]
    return min(stamps) >= limits.min_timestamp_ms and max(stamps) <= now_ms + limits.max_future_ms


def check_upserts(specs: list[ItemSpec], dim: int, limits: Limits) -> list[ItemSpec]:
    """The specs, checked, with their vectors as float32."""
    if not specs:
        raise InvalidArgument("items", "must not be empty")
    if len(specs) > limits.max_items_per_upsert:
        raise InvalidArgument("items", f"at most {limits.max_items_per_upsert} items per call, got {len(specs)}")
    for index, spec in enumerate(specs):
        check_item_spec(index, spec, dim, limits)
        if spec.vector is not None:
            spec.vector = np.asarray(spec.vector, np.float32)
    return specs


def check_deletes(item_ids: list[str], limits: Limits) -> list[str]:
    if not item_ids:
        raise InvalidArgument("item_ids", "must not be empty")
    if len(item_ids) > limits.max_items_per_upsert:
        raise InvalidArgument("item_ids", f"at most {limits.max_items_per_upsert} ids per call")
    for index, item_id in enumerate(item_ids):
        check_id(f"item_ids[{index}]", item_id, limits)
    return list(item_ids)


def check_item_spec(index: int, spec: ItemSpec, dim: int, limits: Limits) -> None:
    prefix = f"items[{index}]"
    check_id(f"{prefix}.item_id", spec.item_id, limits)
    if len(spec.categories) > limits.max_categories_per_item:
        raise InvalidArgument(f"{prefix}.categories", f"at most {limits.max_categories_per_item} categories")
    for j, category in enumerate(spec.categories):
        check_id(f"{prefix}.categories[{j}]", category, limits)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in spec.attributes.items())
    if size > limits.max_attribute_bytes:
        raise InvalidArgument(f"{prefix}.attributes", f"larger than {limits.max_attribute_bytes} bytes")
    if spec.vector is not None:
        vector = np.asarray(spec.vector, dtype=np.float64)
        if vector.shape != (dim,):
            raise InvalidArgument(f"{prefix}.embedding", f"must have dimension {dim}, got {vector.size}")
        if not np.all(np.isfinite(vector)):
            raise InvalidArgument(f"{prefix}.embedding", "must contain only finite numbers")
        if not np.any(vector):
            raise InvalidArgument(f"{prefix}.embedding", "must not be all zeros (cosine needs a direction)")
