"""Turns recommendation requests into one batched top-k call: resolves ids to rows, builds the
filter arrays the kernels read, and splits personalised queries from cold-start (popularity) ones."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from streamrec.engine.api import Recommendation, RecommendQuery
from streamrec.engine.errors import NotFound
from streamrec.engine.rerank.reranker import Reranker
from streamrec.engine.retrieval import diversity, explain
from streamrec.engine.retrieval.topk import Filters, TopKBackend
from streamrec.engine.state.state import State

log = logging.getLogger(__name__)

_NO_ROWS = np.zeros(0, np.int64)


@dataclass
class _Prepared:
    """What a batch needs from the state, captured under the lock so the search can run without it."""

    vectors: np.ndarray
    live: np.ndarray
    category_bits: np.ndarray
    queries: list[np.ndarray | None]
    excluded: list[np.ndarray]  # int64 item rows per query (may be shared with caches: never modified)
    include: np.ndarray
    exclude: np.ndarray
    user_models: list[str] | None = None  # per query, the user model asked for (None: item-to-item)
    positives: dict[int, np.ndarray] | None = None  # query index -> recent positive item rows, for explanations


class Retriever:
    """Reads the state under the engine lock, searches without it (the kernels release the GIL)."""

    def __init__(self, state: State, lock: threading.RLock, backend: TopKBackend, reranker: Reranker | None = None,
                 default_user_model: str = "ials"):
        self.state = state
        self.default_user_model = default_user_model  # for queries that name none
        self.answers = {"ials": 0, "sequence": 0}  # personalised answers by user model
        self.lock = lock
        self.backend = backend
        self.reranker = reranker  # second stage; None or no model loaded: retrieval only
        # Sync and search in pairs: a backend's resident copy of the catalog (GPU) is not changed under a search.
        self._search_lock = threading.Lock()

    def _search_vectors(self, queries: np.ndarray, host_items: np.ndarray, k: int, filters: Filters):
        with self._search_lock:
            with self.lock:
                items = self.state.items
                self.backend.sync(items.vectors, items.live, items.category_bits, len(items),
                                  items.take_device_changes())
            return self.backend.search_synced(queries, host_items, k, filters)

    def _prepare(self, queries: list[RecommendQuery], vectors_for: list[np.ndarray] | None = None) -> _Prepared:
        items, users = self.state.items, self.state.users
        n, b = len(items), len(queries)
        include = np.zeros((b, items.words), np.uint64)
        exclude = np.zeros((b, items.words), np.uint64)
        user_rows = [users.row_of(query.user_id) for query in queries]
        user_models = None if vectors_for is not None else [q.user_model or self.default_user_model for q in queries]
        if vectors_for is not None:
            query_vectors: list[np.ndarray | None] = list(vectors_for)
        else:
            query_vectors = [None] * b
            for model in set(user_models):
                known = [i for i, row in enumerate(user_rows) if row is not None and user_models[i] == model]
                if known:
                    vectors, usable = users.query_vectors(np.array([user_rows[i] for i in known], np.int64), model)
                    for j, i in enumerate(known):
                        if usable[j]:
                            query_vectors[i] = vectors[j]
        excluded: list[np.ndarray] = []
        for q_index, (query, row) in enumerate(zip(queries, user_rows)):
            parts = []
            if row is not None and query.exclude_seen:
                parts.append(users.seen_rows(row))
            if query.exclude_item_ids:
                parts.append(np.array([r for r in map(items.row_of, query.exclude_item_ids) if r is not None], np.int64))
            if query.include_categories:
                include[q_index] = items.category_mask(query.include_categories)
                if not include[q_index].any():
                    # Every requested category is unknown: nothing can match. An impossible bit pattern
                    # would need an extra word, so mark it by excluding all live rows instead.
                    parts.append(np.flatnonzero(items.live[:n]))
            if query.exclude_categories:
                exclude[q_index] = items.category_mask(query.exclude_categories)
            excluded.append(parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else _NO_ROWS)
        return _Prepared(items.vectors[:n], items.live[:n].copy(), items.category_bits[:n], query_vectors, excluded,
                         include, exclude, user_models)

    def _filters(self, prepared: _Prepared, picks: list[int]) -> Filters:
        lists = [prepared.excluded[p] for p in picks]
        indptr = np.zeros(len(picks) + 1, np.int64)
        np.cumsum([len(rows) for rows in lists], out=indptr[1:])
        return Filters(
            valid=prepared.live, exclude_indptr=indptr, exclude_rows=np.concatenate(lists) if lists else _NO_ROWS,
            item_cats=prepared.category_bits, include_cats=prepared.include[picks], exclude_cats=prepared.exclude[picks],
        )

    def refresh_sequence(self, user_ids: list[str]) -> None:
        """Compute the sequence queries of these users that are not current (sequence_update "read"), running
        the tower off the engine lock so that writes and other reads go on meanwhile."""
        state = self.state
        if state.sequence is None:
            return
        with self.lock:
            users = state.users
            rows = [row for row in map(users.row_of, user_ids) if row is not None]
            jobs = state.stale_sequence(rows) if rows else []
        if not jobs:
            return
        started = time.perf_counter()
        vectors = [state.sequence.query_window(window) for _, _, window in jobs]
        with self.lock:
            if state.users is users:  # rows still name the same users (a replica's reload replaces the table)
                state.store_sequence(jobs, vectors, time.perf_counter() - started)

    def recommend(self, queries: list[RecommendQuery]) -> list[Recommendation]:
        sequence_users = [q.user_id for q in queries if (q.user_model or self.default_user_model) == "sequence"]
        if sequence_users:
            self.refresh_sequence(sequence_users)
        with self.lock:
            prepared = self._prepare(queries)
            if any(q.explain for q in queries):
                prepared.positives = self._positives(queries)
            # Only cold-start queries rank by popularity: skip the pass over every item when none is in the batch.
            cold = any(vector is None for vector in prepared.queries)
            popularity = self.state.items.popularity_scores() if cold else None
            plan = (self.reranker.plan(queries, prepared.queries, self.state, prepared.user_models)
                    if self.reranker is not None else None)
        return self._search(queries, prepared, popularity, plan)

    def _positives(self, queries: list[RecommendQuery]) -> dict[int, np.ndarray]:
        users, live = self.state.users, self.state.items.live
        positives = {}
        for i, query in enumerate(queries):
            row = users.row_of(query.user_id) if query.explain else None
            if row is not None:
                positives[i] = explain.recent_positive_rows(users.history[row], live)
        return positives

    def _ranked(self, query: RecommendQuery) -> int:
        """How many ranked items the query chooses its answer from: k, or a diversity pool."""
        if diversity.wanted(query):
            return diversity.pool_size(query.k, self.state.config.limits.max_k)
        return query.k

    def similar(self, item_id: str, query: RecommendQuery) -> Recommendation:
        """The items nearest to a live item, under the query's k and category filters; the item itself excluded."""
        with self.lock:
            items = self.state.items
            item_row = items.row_of(item_id)
            if item_row is None or not items.live[item_row]:
                raise NotFound("item_id", f"unknown item '{item_id}'" if item_row is None else f"item '{item_id}' is deleted")
            vector = items.vectors[item_row].copy()
            prepared = self._prepare([query], vectors_for=[vector])
            prepared.excluded[0] = np.append(prepared.excluded[0], np.int64(item_row))
        result = self._search([query], prepared, None)[0]
        result.strategy = "similar"
        return result

    def _search(self, queries: list[RecommendQuery], prepared: _Prepared, popularity: np.ndarray | None,
                plan=None) -> list[Recommendation]:
        results: list[Recommendation | None] = [None] * len(queries)
        personal = [i for i, v in enumerate(prepared.queries) if v is not None]
        popular = [i for i, v in enumerate(prepared.queries) if v is None]
        if personal:
            k = max(max(plan.candidates[i], self._ranked(queries[i])) if plan is not None and i in plan.candidates
                    else self._ranked(queries[i]) for i in personal)
            matrix = np.stack([prepared.queries[i] for i in personal]).astype(np.float32)
            rows, scores = self._search_vectors(matrix, prepared.vectors, k, self._filters(prepared, personal))
            reranked = self._rerank(plan, queries, personal, rows, scores) if plan is not None else {}
            row_lists = rows.tolist()  # one conversion for the batch, not one per query
            for j, i in enumerate(personal):
                if i in reranked:
                    results[i] = self._reranked_result(queries[i], *reranked[i], plan.model.version, prepared, i)
                else:
                    results[i] = self._result(queries[i], row_lists[j], scores[j], "personalized", prepared, i)
                if prepared.user_models is not None:
                    results[i].user_model = prepared.user_models[i]
                    self.answers[prepared.user_models[i]] += 1
        if popular:
            k = max(self._ranked(queries[i]) for i in popular)
            rows, scores = self.backend.rank_scores(popularity, k, self._filters(prepared, popular))
            row_lists = rows.tolist()
            for j, i in enumerate(popular):
                results[i] = self._result(queries[i], row_lists[j], scores[j], "popular", prepared, i)
        return results  # type: ignore[return-value]

    def _rerank(self, plan, queries: list[RecommendQuery], personal: list[int], rows: np.ndarray, scores: np.ndarray) -> dict:
        """One model call for every reranked query of the batch; on a model failure, retrieval order."""
        retrieved = {i: (rows[j], scores[j]) for j, i in enumerate(personal) if i in plan.users}
        try:
            return self.reranker.rerank(plan, retrieved, {i: self._ranked(queries[i]) for i in retrieved})
        except Exception:  # noqa: BLE001 - a failing model must not fail requests
            self.reranker.failed_batches += 1
            log.exception("reranker %s failed on a batch of %d; answering in retrieval order", plan.model.version, len(retrieved))
            return {}

    def _reranked_result(self, query: RecommendQuery, rows: np.ndarray, model_scores: np.ndarray,
                         retrieval_scores: np.ndarray, version: str, prepared: _Prepared, index: int) -> Recommendation:
        if diversity.wanted(query):
            picks = self._diversify(query, rows, model_scores, prepared)
            rows, model_scores, retrieval_scores = rows[picks], model_scores[picks], retrieval_scores[picks]
        items = self.state.items
        result = Recommendation(
            request_id=query.request_id, user_id=query.user_id, item_ids=[items.ids[r] for r in rows],
            scores=model_scores.astype(np.float32), categories=[list(items.categories[r]) for r in rows],
            strategy="personalized", retrieval_scores=retrieval_scores.astype(np.float32), reranker=version,
        )
        return self._explained(query, rows, result, prepared, index)

    def _result(self, query: RecommendQuery, rows: list[int], scores: np.ndarray, strategy: str,
                prepared: _Prepared | None = None, index: int = 0) -> Recommendation:
        """rows: the query's row of the backend's answer as a list; scores: its float32 row (a view is kept)."""
        found = rows[: self._ranked(query)]
        while found and found[-1] < 0:  # backends pad missing places at the end
            found.pop()
        scores = scores[: len(found)]
        if diversity.wanted(query):
            picks = self._diversify(query, np.array(found, np.int64), scores, prepared)
            found, scores = [found[p] for p in picks.tolist()], scores[picks]
        items = self.state.items
        ids, categories = items.ids, items.categories
        # An item's category list is replaced, never changed in place, on update: safe to share.
        result = Recommendation(
            request_id=query.request_id, user_id=query.user_id, item_ids=[ids[r] for r in found],
            scores=np.asarray(scores, np.float32), categories=[categories[r] for r in found], strategy=strategy,
        )
        return self._explained(query, found, result, prepared, index)

    @staticmethod
    def _diversify(query: RecommendQuery, rows: np.ndarray, scores: np.ndarray, prepared: _Prepared) -> np.ndarray:
        return diversity.select(scores, prepared.vectors[rows], prepared.category_bits[rows], query.k,
                                query.mmr_lambda, query.max_per_category)

    def _explained(self, query: RecommendQuery, rows, result: Recommendation, prepared: _Prepared | None,
                   index: int) -> Recommendation:
        if query.explain and prepared is not None:
            positives = (prepared.positives or {}).get(index, explain.NO_ROWS)
            result.because = explain.because(rows, positives, prepared.vectors, self.state.items.ids)
        return result
