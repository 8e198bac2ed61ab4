"""Protobuf <-> engine types. Only translation: no decisions."""
from __future__ import annotations

import numpy as np

from streamrec.engine.engine import Engine, IngestResult, ItemView, UserView
from streamrec.engine.retrieval import Recommendation, RecommendQuery
from streamrec.engine.types import Event, ItemSpec
from streamrec.v1 import catalog_pb2, common_pb2, events_pb2, recommend_pb2


def events_from(batch: events_pb2.EventBatch) -> list[Event]:
    # The enum stays an int: unknown values from newer clients must reach validation, not crash here.
    return [Event(e.event_id, e.user_id, e.item_id, e.type, e.value, e.timestamp_ms) for e in batch.events]


def ack_from(batch_id: str, result: IngestResult) -> events_pb2.EventAck:
    return events_pb2.EventAck(
        batch_id=batch_id,
        accepted=result.accepted,
        duplicates=result.duplicates,
        rejections=[events_pb2.EventRejection(index=r.index, event_id=r.event_id, field=r.field, reason=r.reason)
                    for r in result.rejections],
        durable_seq=result.durable_seq,
        first_seq=result.first_seq,
    )


def query_from(engine: Engine, request: recommend_pb2.RecommendRequest) -> RecommendQuery:
    return engine.build_query(
        user_id=request.user_id,
        k=request.k if request.HasField("k") else None,
        exclude_seen=request.exclude_seen if request.HasField("exclude_seen") else True,
        exclude_item_ids=request.exclude_item_ids,
        include_categories=request.include_categories,
        exclude_categories=request.exclude_categories,
        request_id=request.request_id,
    )


def served_by(engine: Engine) -> common_pb2.ServedBy:
    return common_pb2.ServedBy(
        model_version=engine.model_version,
        embedding_version=engine.state.embedding_version,
        applied_seq=engine.state.applied_seq,
        backend=engine.backend.name,
    )


def scored_items(result: Recommendation) -> list[common_pb2.ScoredItem]:
    return [
        common_pb2.ScoredItem(item_id=i, score=float(s), retrieval_score=float(s), categories=c)
        for i, s, c in zip(result.item_ids, result.scores, result.categories)
    ]


def recommend_response(engine: Engine, result: Recommendation, latency_us: int) -> recommend_pb2.RecommendResponse:
    return recommend_pb2.RecommendResponse(
        request_id=result.request_id, user_id=result.user_id, items=scored_items(result),
        strategy=result.strategy, served_by=served_by(engine), server_latency_us=latency_us,
    )


def item_spec_from(item: catalog_pb2.Item) -> ItemSpec:
    vector = np.asarray(item.embedding, np.float64) if len(item.embedding) else None
    return ItemSpec(item.item_id, list(item.categories), dict(item.attributes), vector)


def item_message(view: ItemView, include_embedding: bool) -> catalog_pb2.Item:
    return catalog_pb2.Item(
        item_id=view.item_id, categories=view.categories, attributes=view.attributes,
        embedding=view.vector.tolist() if include_embedding else [], deleted=view.deleted,
        interactions=view.interactions, popularity=view.popularity, last_event_ms=view.last_event_ms,
    )


def user_message(view: UserView, include_embedding: bool) -> catalog_pb2.User:
    return catalog_pb2.User(
        user_id=view.user_id,
        embedding=view.vector.tolist() if include_embedding else [],
        history=[catalog_pb2.HistoryEntry(item_id=i, type=t, value=v, timestamp_ms=ts) for i, t, v, ts in view.history],
        event_count=view.event_count, seen_items=view.seen_items, last_event_ms=view.last_event_ms,
    )


def stats_message(engine: Engine) -> catalog_pb2.StatsResponse:
    stats, limits = engine.stats(), engine.limits
    return catalog_pb2.StatsResponse(
        dim=stats["dim"], items=stats["items"], deleted_items=stats["deleted_items"], users=stats["users"],
        log_events=stats["log_events"], last_seq=stats["last_seq"], checkpoint_seq=stats["checkpoint_seq"],
        served_by=served_by(engine), uptime_s=stats["uptime_s"],
        limits=catalog_pb2.Limits(
            max_k=limits.max_k, max_events_per_batch=limits.max_events_per_batch,
            max_requests_per_batch=limits.max_requests_per_batch, max_filter_ids=limits.max_filter_ids,
            max_id_bytes=limits.max_id_bytes, max_items_per_upsert=limits.max_items_per_upsert,
        ),
        events_accepted=stats["events_accepted"], events_rejected=stats["events_rejected"],
        events_duplicate=stats["events_duplicate"], recommendations=stats["recommendations"],
        data_dir=str(engine.data_dir),
        recommend_batch_sizes=stats["recommend_batch_sizes"], recommend_batches=stats["recommend_batches"],
        write_queue=stats["write_queue"],
    )
