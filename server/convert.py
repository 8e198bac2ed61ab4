"""Protobuf <-> engine API types. Only translation: no decisions, and no engine object (values in, messages out)."""
from __future__ import annotations

import numpy as np

from streamrec.engine.api import (
    EngineStats,
    Event,
    IngestResult,
    ItemSpec,
    ItemView,
    Recommendation,
    ServedBy,
    UserView,
)
from streamrec.engine.config import Limits
from streamrec.v1 import catalog_pb2, common_pb2, events_pb2, recommend_pb2


def events_from(batch: events_pb2.EventBatch) -> list[Event]:
    # The enum stays an int: unknown values from newer clients must reach validation, not crash here.
    return [Event(e.event_id, e.user_id, e.item_id, e.type, e.value, e.timestamp_ms, e.recommendation_id)
            for e in batch.events]


def ack_from(batch_id: str, result: IngestResult, log_id: str = "") -> events_pb2.EventAck:
    return events_pb2.EventAck(
        batch_id=batch_id,
        log_id=log_id,
        accepted=result.accepted,
        duplicates=result.duplicates,
        rejections=[events_pb2.EventRejection(index=r.index, event_id=r.event_id, field=r.field, reason=r.reason)
                    for r in result.rejections],
        durable_seq=result.durable_seq,
        first_seq=result.first_seq,
    )


def query_fields(request: recommend_pb2.RecommendRequest) -> dict:
    """Engine.build_query's arguments: unset optional fields become None (the server's default)."""
    return dict(
        user_id=request.user_id,
        k=request.k if request.HasField("k") else None,
        exclude_seen=request.exclude_seen if request.HasField("exclude_seen") else True,
        exclude_item_ids=request.exclude_item_ids,
        include_categories=request.include_categories,
        exclude_categories=request.exclude_categories,
        request_id=request.request_id,
        rerank=request.rerank.enabled if request.rerank.HasField("enabled") else None,
        candidates=request.rerank.candidates,
        user_model=_USER_MODELS.get(request.user_model, str(request.user_model)),
        mmr_lambda=request.diversity.mmr_lambda,
        max_per_category=request.diversity.max_per_category,
        explain=request.explain,
    )


# UserModel enum -> the engine's name; an unknown number passes through as text and is refused by name.
_USER_MODELS = {recommend_pb2.USER_MODEL_DEFAULT: "", recommend_pb2.USER_MODEL_IALS: "ials",
                recommend_pb2.USER_MODEL_SEQUENCE: "sequence"}


def set_served_by(message: common_pb2.ServedBy, served_by: ServedBy) -> None:
    message.model_version = served_by.model_version
    message.embedding_version = served_by.embedding_version
    message.applied_seq = served_by.applied_seq
    message.backend = served_by.backend
    message.log_id = served_by.log_id


def add_scored_items(items, result: Recommendation) -> None:
    """Fills a response's repeated ScoredItem field in place. Built inside the response with add(): building
    ScoredItem messages and passing the list copies each one again (benchmarks/RESULTS.md, "Serving budget")."""
    scores = result.scores.tolist()  # Python floats: converting numpy scalars one by one costs more
    retrieval = scores if result.retrieval_scores is None else result.retrieval_scores.tolist()
    add = items.add
    for item_id, score, retrieval_score, categories in zip(result.item_ids, scores, retrieval, result.categories):
        add(item_id=item_id, score=score, retrieval_score=retrieval_score, categories=categories)
    if result.because is not None:
        for item, reasons in zip(items, result.because):
            for item_id, similarity in reasons:
                item.because.add(item_id=item_id, similarity=similarity)


def recommend_response(served_by: ServedBy, result: Recommendation, latency_us: int) -> recommend_pb2.RecommendResponse:
    response = recommend_pb2.RecommendResponse(request_id=result.request_id, user_id=result.user_id,
                                               strategy=result.strategy, server_latency_us=latency_us)
    add_scored_items(response.items, result)
    set_served_by(response.served_by, served_by)
    response.served_by.reranker = result.reranker
    response.served_by.user_model = result.user_model
    response.recommendation_id = result.recommendation_id
    response.experiment, response.arm = result.experiment, result.arm
    return response


def similar_items_response(served_by: ServedBy, result: Recommendation, item_id: str,
                           latency_us: int) -> recommend_pb2.SimilarItemsResponse:
    response = recommend_pb2.SimilarItemsResponse(request_id=result.request_id, item_id=item_id, server_latency_us=latency_us)
    add_scored_items(response.items, result)
    set_served_by(response.served_by, served_by)
    return response


def reranker_info(info: dict) -> catalog_pb2.RerankerInfo:
    return catalog_pb2.RerankerInfo(**{f: info[f] for f in catalog_pb2.RerankerInfo.DESCRIPTOR.fields_by_name if f in info})


def user_model_info(info: dict) -> catalog_pb2.UserModelInfo:
    sequence = info.get("sequence") or {}
    return catalog_pb2.UserModelInfo(
        default_model=info.get("default", ""), sequence_version=sequence.get("version", ""),
        sequence_path=sequence.get("path", ""), sequence_length=sequence.get("length", 0),
        sequence_updates=sequence.get("updates", 0), sequence_update_seconds=sequence.get("update_seconds", 0.0),
        item_space_cosine=sequence.get("item_space_cosine") or 0.0, answers=info.get("answers", {}),
        sequence_update=info.get("sequence_update", ""))


def impression_info(info: dict) -> catalog_pb2.ImpressionInfo:
    if not info.get("enabled"):
        return catalog_pb2.ImpressionInfo(enabled=False)
    arms = []
    for key, counts in sorted(info.get("arms", {}).items()):
        experiment, _, arm = key.partition("/")
        events = {name: n for name, n in counts.items() if name not in ("impressions", "attributed") and n}
        arms.append(catalog_pb2.ArmOutcomes(experiment=experiment, arm=arm, impressions=counts.get("impressions", 0),
                                            attributed=counts.get("attributed", 0), events=events))
    return catalog_pb2.ImpressionInfo(
        enabled=True, stored=info["stored"], queued=info["queued"], recorded=info.get("recorded", 0),
        shed=info.get("shed", 0), attributed=info.get("attributed", 0),
        unattributed={k[len("unattributed_"):]: v for k, v in info.items() if k.startswith("unattributed_")},
        pruned=info.get("pruned", 0), arms=arms, max_records=info["max_records"],
        max_age_days=info["max_age_ms"] / 86_400_000, attribution_window_s=info["attribution_window_ms"] / 1000)


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


def stats_message(stats: EngineStats, limits: Limits) -> catalog_pb2.StatsResponse:
    response = catalog_pb2.StatsResponse(
        dim=stats.dim, items=stats.items, deleted_items=stats.deleted_items, users=stats.users,
        log_events=stats.log_events, last_seq=stats.last_seq, checkpoint_seq=stats.checkpoint_seq,
        uptime_s=stats.uptime_s,
        limits=catalog_pb2.Limits(
            max_k=limits.max_k, max_events_per_batch=limits.max_events_per_batch,
            max_requests_per_batch=limits.max_requests_per_batch, max_filter_ids=limits.max_filter_ids,
            max_id_bytes=limits.max_id_bytes, max_items_per_upsert=limits.max_items_per_upsert,
        ),
        events_accepted=stats.events_accepted, events_rejected=stats.events_rejected,
        events_duplicate=stats.events_duplicate, recommendations=stats.recommendations, data_dir=stats.data_dir,
        recommend_batch_sizes=stats.recommend_batch_sizes, recommend_batches=stats.recommend_batches,
        write_queue=stats.write_queue, reranker=reranker_info(stats.reranker), role=stats.role,
        replicas=stats.replicas, replica_reloads=stats.replica_reloads, pid=stats.pid,
        snapshots_served=stats.snapshots_served, user_model=user_model_info(stats.user_model),
        impressions=impression_info(stats.impressions),
    )
    set_served_by(response.served_by, stats.served_by)
    return response
