"""The engine API that the gRPC servicers call: durable ingestion, recommendations, catalog, admin.

Path of a write:  ingest() -> validation -> writer queue -> GroupPlan (commit_plan.py) -> one LMDB txn (log)
                  -> apply to State -> ack.
Path of a read:   recommend() -> Retriever (ids -> rows, filters) -> top-k backend -> ids.
Recovery:         load the last checkpoint, replay the log after its watermark.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from streamrec.engine.api import (
    DeleteResult,
    Event,
    IngestResult,
    ItemSpec,
    ItemView,
    Recommendation,
    RecommendQuery,
    UpsertResult,
    UserView,
)
from streamrec.engine.config import EngineConfig
from streamrec.engine.cpu.online import warmup as warm_update_kernel
from streamrec.engine.errors import InvalidArgument, NotFound
from streamrec.engine.observer import EngineObserver
from streamrec.engine.rerank.features import ItemArrays, state_clock_ms
from streamrec.engine.rerank.reranker import Reranker, RerankerRejected
from streamrec.engine.retrieval.batcher import MicroBatcher
from streamrec.engine.retrieval.retriever import Retriever
from streamrec.engine.retrieval.topk import get_backend
from streamrec.engine.state.snapshot import CheckpointSnapshot
from streamrec.engine.state.state import State
from streamrec.engine.store import codec
from streamrec.engine.store.store import LogEntry, Store
from streamrec.engine.validation import check_id, check_id_list, check_item_spec, check_k, split_events
from streamrec.engine.write.group_commit import GroupPlan, count_accepted
from streamrec.engine.write.writer import GroupCommitWriter, Op

log = logging.getLogger(__name__)

_MODEL_VERSION_KEY = "model_version"
_DIM_KEY = "dim"


class Engine:
    def __init__(self, data_dir: str | Path, config: EngineConfig | None = None, observer: EngineObserver | None = None):
        self.data_dir = Path(data_dir)
        self.observer = observer or EngineObserver()
        self.store = Store(self.data_dir, sync=(config or EngineConfig()).sync)
        stored_dim = self.store.get_meta(_DIM_KEY)
        config = config or EngineConfig()
        if stored_dim is not None and int(stored_dim) != config.dim:
            log.warning("data dir holds dimension %s; using it instead of the configured %d", stored_dim.decode(), config.dim)
            config = EngineConfig(**{**config.__dict__, "dim": int(stored_dim)})
        self.store.put_meta(_DIM_KEY, str(config.dim).encode())
        self.config = config
        self.limits = config.limits
        self.state = State(config)
        # Cached: every response reports it, and request threads should not read LMDB.
        self._model_version = (self.store.get_meta(_MODEL_VERSION_KEY) or b"none").decode()
        self.lock = threading.RLock()
        self.backend = get_backend(config.backend)
        if hasattr(self.backend, "warmup"):
            self.backend.warmup()  # JIT-compile now, not on the first request
        warm_update_kernel()  # likewise for the online update: the first ingested event should not pay for it
        self.retriever = Retriever(self.state, self.lock, self.backend, np.dtype(config.gpu_storage))
        self.reranker = Reranker(config.dim, config.rerank_provider, config.rerank_threads)
        self.retriever.reranker = self.reranker
        self.retriever.rerank_by_default = config.rerank_by_default
        self.retriever.rerank_candidates = config.rerank_candidates
        self.started_at = time.time()
        self.counters = {"events_accepted": 0, "events_rejected": 0, "events_duplicate": 0, "recommendations": 0}
        self._last_checkpoint_at = time.monotonic()
        self._last_checkpoint_s = 0.0  # how long the last checkpoint took (paces the records trigger)
        self.last_checkpoint_wall = time.time()
        self._records_since_checkpoint = 0
        # Checkpoints triggered by volume or time are written on this thread while the writer goes on committing
        # (the store keeps them in an LMDB environment of their own); at most one at a time.
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="streamrec-checkpoint")
        self._checkpoint_running: Future | None = None
        self.recovered_records = 0
        self._recover()
        if config.reranker_path:
            try:
                self.load_reranker(config.reranker_path)
            except RerankerRejected as error:
                log.error("reranker: not loaded (%s); serving retrieval only", error.message)
        self.writer = GroupCommitWriter(
            self._commit_group, self._run_exclusive, self._maybe_checkpoint,
            config.commit_queue_size, config.max_group_ops,
        )
        self.writer.start()
        self.batcher: MicroBatcher[RecommendQuery, Recommendation] = MicroBatcher(
            self.retriever.recommend, config.max_batch, config.max_wait_us, config.recommend_queue_size,
            on_batch=self.observer.recommend_batch)

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def model_version(self) -> str:
        return self._model_version

    @property
    def is_empty(self) -> bool:
        return len(self.state.items) == 0 and self.store.last_seq() == 0

    def _recover(self) -> None:
        started = time.perf_counter()
        self.state.load(self.store.load_items(), self.store.load_users())
        watermark = self.store.checkpoint_seq()
        self.state.applied_seq = watermark
        pending: list[Event] = []
        replayed = 0
        for seq, payload in self.store.iter_log(after_seq=watermark):
            record = codec.decode(payload)
            if isinstance(record, Event):
                pending.append(record)
            else:
                self.state.apply_events(pending)
                pending = []
                if isinstance(record, ItemSpec):
                    self.state.apply_upsert(record)
                else:
                    self.state.apply_delete(record.item_id)
            self.state.applied_seq = seq
            replayed += 1
        self.state.apply_events(pending)
        self.recovered_records = replayed
        self._records_since_checkpoint = replayed
        log.info(
            "loaded checkpoint at seq %d (%d items, %d users) and replayed %d log records in %.2f s",
            watermark, len(self.state.items), len(self.state.users), replayed, time.perf_counter() - started,
        )
        if replayed:
            self._checkpoint()

    def close(self, checkpoint: bool = True) -> None:
        """Drain queued writes and stop. checkpoint=False leaves the log unreplayed, as after a crash."""
        self.batcher.close()
        self.writer.close(final_checkpoint=checkpoint)
        self._await_checkpoint()  # a checkpoint still writing must finish before the store closes
        self._checkpointer.shutdown()
        self.store.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- bootstrap ------------------------------------------------------------------------------
    def seed(self, items: list[ItemSpec], events: list[Event], user_ids: list[str], user_vectors: np.ndarray, model_version: str) -> None:
        """Load a trained model and its training log into an empty engine in one checkpointed step."""
        if not self.is_empty:
            raise InvalidArgument("", "seed needs an empty data dir")
        done = self.writer.submit("seed", (items, events, user_ids, user_vectors, model_version), timeout_s=60)
        done.result()

    # --- writes ---------------------------------------------------------------------------------
    def ingest(self, events: list[Event], timeout_s: float = 30.0) -> IngestResult:
        """Durably log and apply events. Returns once they are committed and visible to recommend()."""
        return self.ingest_async(events).result(timeout_s)

    def ingest_async(self, events: list[Event]) -> Future:
        """Validate now, then queue for the writer; the future completes after commit and apply.
        Lets one stream keep several batches in flight so they share group commits."""
        good, rejected = split_events(events, self.limits)

        def finish(outcome: IngestResult) -> IngestResult:
            outcome.rejections = sorted(rejected + outcome.rejections, key=lambda r: r.index)
            self.counters["events_accepted"] += outcome.accepted
            self.counters["events_rejected"] += len(outcome.rejections)
            self.counters["events_duplicate"] += outcome.duplicates
            self.observer.events(outcome.accepted, outcome.duplicates, len(outcome.rejections))
            return outcome

        if not good:
            done: Future = Future()
            done.set_result(finish(IngestResult(durable_seq=self.state.applied_seq)))
            return done
        return self.writer.submit("events", good, finish=finish)

    def build_query(self, user_id: str, k: int | None, exclude_seen: bool = True, exclude_item_ids=(),
                    include_categories=(), exclude_categories=(), request_id: str = "", user_field: str = "user_id",
                    rerank: bool | None = None, candidates: int = 0) -> RecommendQuery:
        """A validated query; every problem names the request field."""
        limits = self.limits
        if not 0 <= candidates <= limits.max_k:
            raise InvalidArgument("rerank.candidates", f"must be between 0 (server default) and {limits.max_k}, got {candidates}")
        return RecommendQuery(
            user_id=check_id(user_field, user_id, limits),
            k=check_k(k, limits, self.config.default_k),
            exclude_seen=exclude_seen,
            exclude_item_ids=check_id_list("exclude_item_ids", list(exclude_item_ids), limits),
            include_categories=check_id_list("include_categories", list(include_categories), limits),
            exclude_categories=check_id_list("exclude_categories", list(exclude_categories), limits),
            request_id=request_id,
            rerank=rerank,
            candidates=candidates,
        )

    # --- reranking model ----------------------------------------------------------------------------
    def load_reranker(self, path: str | Path | None = None) -> dict:
        """Validate the ONNX model at `path` (None: the one serving now, re-read) and swap it in without a
        restart. A bad file raises RerankerRejected (INVALID_ARGUMENT) and the old model keeps serving."""
        if path is None or str(path) == "":
            current = self.reranker.model
            if current is None:
                raise InvalidArgument("path", "no reranker is loaded; give the path of an ONNX model")
            path = current.path
        with self.lock:
            items = ItemArrays.of(self.state.items)
            now_ms = state_clock_ms(self.state.items)
        model = self.reranker.load(Path(path), probe=self.reranker.probe_features(items, now_ms))
        trained_on = model.metadata.get("dataset")
        if trained_on and self.model_version != "none" and trained_on not in self.model_version:
            log.warning("reranker %s was trained on %s; this engine's embeddings are %s: expect a weaker second stage",
                        model.version, trained_on, self.model_version)
        return self.reranker_info()

    def unload_reranker(self) -> dict:
        self.reranker.unload()
        return self.reranker_info()

    def reranker_info(self) -> dict:
        return {**self.reranker.info(), "default_candidates": self.config.rerank_candidates,
                "by_default": self.config.rerank_by_default}

    def upsert_items(self, specs: list[ItemSpec], timeout_s: float = 30.0) -> UpsertResult:
        if not specs:
            raise InvalidArgument("items", "must not be empty")
        if len(specs) > self.limits.max_items_per_upsert:
            raise InvalidArgument("items", f"at most {self.limits.max_items_per_upsert} items per call, got {len(specs)}")
        for index, spec in enumerate(specs):
            check_item_spec(index, spec, self.dim, self.limits)
            if spec.vector is not None:
                spec.vector = np.asarray(spec.vector, np.float32)
        return self.writer.submit("upsert", specs).result(timeout_s)

    def delete_items(self, item_ids: list[str], timeout_s: float = 30.0) -> DeleteResult:
        if not item_ids:
            raise InvalidArgument("item_ids", "must not be empty")
        if len(item_ids) > self.limits.max_items_per_upsert:
            raise InvalidArgument("item_ids", f"at most {self.limits.max_items_per_upsert} ids per call")
        for index, item_id in enumerate(item_ids):
            check_id(f"item_ids[{index}]", item_id, self.limits)
        return self.writer.submit("delete", list(item_ids)).result(timeout_s)

    def forget_user(self, user_id: str, timeout_s: float = 60.0) -> int:
        check_id("user_id", user_id, self.limits)
        if self.state.users.row_of(user_id) is None:
            raise NotFound("user_id", f"unknown user '{user_id}'")
        return self.writer.submit("forget", user_id).result(timeout_s)

    def checkpoint(self, timeout_s: float = 120.0) -> int:
        """Force a checkpoint now; returns its watermark."""
        return self.writer.submit("checkpoint", None).result(timeout_s)

    # --- writer thread ---------------------------------------------------------------------------
    def _commit_group(self, group: list[Op]) -> None:
        """Validate against current state, write one transaction, apply in log order, complete futures."""
        plan = GroupPlan(self.state.items)
        for op in group:
            plan.add(op)
        started = time.perf_counter()
        seqs = self.store.append_records(plan.payloads, plan.event_ids, plan.user_ids)
        # Seqs only grow, so the group's last one is the log's; reading it back costs a transaction per group.
        durable = next((seq for seq in reversed(seqs) if seq is not None), None) or self.store.last_seq()
        self.observer.commit(time.perf_counter() - started, len(plan.payloads))
        with self.lock:
            self._apply_plan(plan, seqs)
            self.state.applied_seq = durable
        self._records_since_checkpoint += len(seqs) - seqs.count(None)
        for op in group:
            result = plan.results[id(op)]
            result.durable_seq = durable
            op.complete(result)

    def _apply_plan(self, plan: "GroupPlan", seqs: list[int | None]) -> None:
        """Apply what was written, in log order; runs of events (several ops' worth) go to State in one call."""
        batch: list[Event] = []
        for step in plan.steps:
            result = plan.results[id(step.op)]
            step_seqs = seqs[step.start:step.start + len(step.records)]
            if step.op.kind == "events":
                batch += count_accepted(step.records, step_seqs, result)
                continue
            self.state.apply_events(batch)
            batch = []
            record = step.records[0]
            if isinstance(record, ItemSpec):
                if self.state.apply_upsert(record):
                    result.created += 1
                else:
                    result.updated += 1
            else:
                self.state.apply_delete(record.item_id)
                result.deleted += 1
        self.state.apply_events(batch)

    def _run_exclusive(self, op: Op):
        self._await_checkpoint()  # erasure and seeding write the checkpointed state themselves
        if op.kind == "checkpoint":
            return self._checkpoint()
        if op.kind == "forget":
            erased = self.store.forget_user(op.payload)
            with self.lock:
                self.state.users.forget(op.payload)
            # Popularity already counted the erased events; checkpoint now so a replay after a crash
            # starts from the same aggregates instead of recounting without them.
            self._checkpoint()
            return erased
        if op.kind == "seed":
            return self._seed(*op.payload)
        raise AssertionError(f"unexpected op {op.kind}")

    def _seed(self, items: list[ItemSpec], events: list[Event], user_ids, user_vectors, model_version: str) -> None:
        entries = [LogEntry(codec.encode_upsert(spec)) for spec in items]
        entries += [LogEntry(codec.encode_event(e), e.event_id, e.user_id) for e in events]
        self.store.append_log(entries)
        with self.lock:
            for spec in items:
                self.state.apply_upsert(spec)
            self.state.seed_users(events, user_ids, np.asarray(user_vectors, np.float32))
            self.state.applied_seq = self.store.last_seq()
        self.store.put_meta(_MODEL_VERSION_KEY, model_version.encode())
        self._model_version = model_version
        self._checkpoint()

    def _checkpoint(self) -> int:
        """A checkpoint written before returning (forced, after an erasure or seeding, at close)."""
        self._await_checkpoint()
        started = time.perf_counter()
        return self._write_snapshot(self._take_snapshot(), None, started)

    def _take_snapshot(self) -> CheckpointSnapshot:
        with self.lock:  # copies only: 50-190 ms with 2k changed users, where the whole checkpoint took ~1.2 s
            snapshot = self.state.checkpoint_snapshot()
        self._last_checkpoint_at = time.monotonic()
        self._records_since_checkpoint = 0
        return snapshot

    def _write_snapshot(self, snapshot: CheckpointSnapshot, index, started: float) -> int:
        """Build and write the snapshot's records; index is None on the writer thread (see Store.write_checkpoint)."""
        try:
            item_records, user_records, forgotten = snapshot.records()
            self.store.write_checkpoint(item_records, user_records, forgotten, snapshot.watermark, index=index)
        except BaseException:
            with self.lock:
                self.state.mark_dirty(snapshot)  # the next checkpoint writes them; the log holds every event
            raise
        self._last_checkpoint_s = time.perf_counter() - started
        self.last_checkpoint_wall = time.time()
        self.observer.checkpoint(self._last_checkpoint_s, len(item_records), len(user_records))
        log.info("checkpoint at seq %d: %d items, %d users written in %.1f ms", snapshot.watermark, len(item_records),
                 len(user_records), self._last_checkpoint_s * 1e3)
        return snapshot.watermark

    def _await_checkpoint(self) -> None:
        running, self._checkpoint_running = self._checkpoint_running, None
        if running is not None:
            try:
                running.result()
            except Exception:
                log.exception("checkpoint failed; the log still holds every event, will retry")

    def _maybe_checkpoint(self, final: bool) -> None:
        if final:
            if self._records_since_checkpoint or self._checkpoint_running is not None:
                self._checkpoint()
            return
        if not self._records_since_checkpoint:
            return
        if self._checkpoint_running is not None:
            if not self._checkpoint_running.done():
                return
            self._await_checkpoint()  # collects (and logs) how it ended
        config, since = self.config, time.monotonic() - self._last_checkpoint_at
        due = since >= config.checkpoint_interval_s or (
            self._records_since_checkpoint >= config.checkpoint_every_records
            and since * config.checkpoint_max_share >= self._last_checkpoint_s)
        if due:
            started = time.perf_counter()
            snapshot = self._take_snapshot()
            index = self.store.freeze_index()  # the keys of every commit so far, merged by the same transaction
            self._checkpoint_running = self._checkpointer.submit(self._write_snapshot, snapshot, index, started)

    # --- reads ------------------------------------------------------------------------------------
    def recommend(self, queries: list[RecommendQuery], deadline: float | None = None) -> list[Recommendation]:
        """Answers in query order. Queries join whatever concurrent requests form the next kernel batch;
        `deadline` (time.monotonic()) drops them if they would start too late."""
        futures = [self.recommend_async(q, deadline) for q in queries]
        return [f.result() for f in futures]

    def recommend_async(self, query: RecommendQuery, deadline: float | None = None) -> Future:
        self.counters["recommendations"] += 1
        return self.batcher.submit(query, deadline)

    def similar_items(self, query: RecommendQuery, item_id: str) -> Recommendation:
        check_id("item_id", item_id, self.limits)
        with self.lock:
            row = self.state.items.row_of(item_id)
            if row is None or not self.state.items.live[row]:
                raise NotFound("item_id", f"unknown item '{item_id}'" if row is None else f"item '{item_id}' is deleted")
        result = self.retriever.similar(row, query)
        result.strategy = "similar"
        return result

    def get_item(self, item_id: str) -> ItemView:
        check_id("item_id", item_id, self.limits)
        items = self.state.items
        with self.lock:
            row = items.row_of(item_id)
            if row is None:
                raise NotFound("item_id", f"unknown item '{item_id}'")
            return ItemView(
                item_id, list(items.categories[row]), dict(items.attributes[row]), items.vectors[row].copy(),
                not bool(items.live[row]), int(items.interactions[row]),
                items.popularity_at(row, int(time.time() * 1000)), int(items.last_event_ms[row]),
            )

    def get_user(self, user_id: str, history_limit: int = 20) -> UserView:
        check_id("user_id", user_id, self.limits)
        users, items = self.state.users, self.state.items
        with self.lock:
            row = users.row_of(user_id)
            if row is None:
                raise NotFound("user_id", f"unknown user '{user_id}'")
            vector = users.query_vector(row)
            recent = list(users.history[row])[::-1][:history_limit]
            return UserView(
                user_id, vector if vector is not None else np.zeros(self.dim, np.float32),
                [(items.ids[r], t, v, ts) for r, t, v, ts in recent], int(users.event_counts[row]),
                len(users.seen[row]), int(users.last_event_ms[row]),
            )

    def stats(self) -> dict:
        with self.lock:
            items = self.state.items
            live = items.live_count
            store_stats = self.store.stats()
            return {
                "dim": self.dim,
                "items": live,
                "deleted_items": len(items) - live,
                "users": len(self.state.users),
                "log_events": store_stats.get("log", 0),
                "last_seq": self.store.last_seq(),
                "checkpoint_seq": self.store.checkpoint_seq(),
                "applied_seq": self.state.applied_seq,
                "embedding_version": self.state.embedding_version,
                "model_version": self.model_version,
                "backend": self.backend.name,
                "uptime_s": time.time() - self.started_at,
                "write_queue": self.writer.pending,
                "recovered_records": self.recovered_records,
                "recommend_batch_sizes": self.batcher.histogram.snapshot(),
                "recommend_batches": self.batcher.histogram.batches,
                "reranker": self.reranker_info(),
                **self.counters,
            }
