"""The engine API: what the gRPC servicers (and any program embedding streamrec) call. Each public method checks
its input and delegates to one stage; the stages never call back into the Engine.

Path of a write:  ingest() -> validation -> writer queue (write/writer.py) -> group commit (write/group_commit.py):
                  plan -> one LMDB transaction (store/) -> apply to the State (state/) -> ack.
Path of a read:   recommend() -> micro-batcher -> Retriever (retrieval/): ids -> rows, filters -> top-k backend
                  (cpu/ or gpu/ kernels) -> Reranker (rerank/) -> ids.
Start:            load the last checkpoint and replay the log after its watermark (write/recovery.py).
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from streamrec.engine.api import (
    Arm,
    DeleteResult,
    EngineStats,
    Event,
    Experiment,
    ForgetResult,
    IngestResult,
    ItemSpec,
    ItemView,
    Recommendation,
    RecommendQuery,
    Rejection,
    ServedBy,
    UpsertResult,
    UserView,
)
from streamrec.engine.config import EngineConfig
from streamrec.engine.cpu.online import warmup as warm_update_kernel
from streamrec.engine.feedback.experiments import Experiments, check_experiment, options_checker
from streamrec.engine.feedback.impressions import FOLDER as IMPRESSIONS_FOLDER
from streamrec.engine.feedback.impressions import Impression, ImpressionLog, RetentionPolicy, new_recommendation_id
from streamrec.engine.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, Unavailable
from streamrec.engine.sequence.tower import SequenceModelRejected
from streamrec.engine.observer import EngineObserver
from streamrec.engine.rerank.features import ItemArrays, build_features, capture_user, state_clock_ms
from streamrec.engine.rerank.reranker import Reranker, RerankerRejected
from streamrec.engine.replica.feed import LogFeed
from streamrec.engine.replica.follower import LogFollower
from streamrec.engine.replica.remote import LogSource, RemoteFollower
from streamrec.engine.replica.wakeup import WakeupSender, folder_of
from streamrec.engine.retrieval.batcher import MicroBatcher
from streamrec.engine.retrieval.retriever import Retriever
from streamrec.engine.retrieval.topk import get_backend
from streamrec.engine.state.state import State
from streamrec.engine.store import codec
from streamrec.engine.store.copy import LogCopy
from streamrec.engine.store.store import Store
from streamrec.engine.validation import check_deletes, check_id, check_query, check_upserts, split_events
from streamrec.engine.write.checkpointer import Checkpointer
from streamrec.engine.write.group_commit import MODEL_VERSION_KEY, GroupCommit, current_reranker
from streamrec.engine.write.recovery import recover
from streamrec.engine.write.writer import GroupCommitWriter, OpKind

log = logging.getLogger(__name__)

_DIM_KEY = "dim"


class Engine:
    """replica=False (the primary): the one writer of `data_dir`. replica=True: a read replica of a store another
    process writes; it applies that process's log as it grows (replica/follower.py) and refuses writes.
    source (a LogSource): a replica on another machine, keeping its own copy of the primary's log in `data_dir`
    (replica/remote.py)."""

    def __init__(self, data_dir: str | Path, config: EngineConfig | None = None, observer: EngineObserver | None = None,
                 *, replica: bool = False, source: LogSource | None = None):
        config = config or EngineConfig()
        self.data_dir = Path(data_dir)
        self.observer = observer or EngineObserver()
        if config.user_model not in ("ials", "sequence", "auto"):
            raise ValueError(f"user_model must be ials, sequence or auto, not {config.user_model!r}")
        if not 0.0 <= config.impression_features <= 1.0:
            raise ValueError(f"impression_features is a share in [0, 1], not {config.impression_features}")
        if config.sequence_update not in ("read", "event"):
            raise ValueError(f"sequence_update must be read or event, not {config.sequence_update!r}")
        if config.user_model in ("sequence", "auto") and not config.sequence_model_path:
            raise ValueError(f"user_model {config.user_model} needs a sequence model (sequence_model_path)")
        replica = replica or source is not None
        self.role = "replica" if replica else "primary"
        self.store = (LogCopy(self.data_dir, sync=config.sync) if source is not None
                      else Store(self.data_dir, sync=config.sync, readonly=replica))
        self.config = config = self._config_for_store(config)
        self.limits = config.limits
        try:
            self.state = State(config)  # loads the sequence model, if any: a bad one stops the start
        except SequenceModelRejected as error:
            if config.user_model != "auto":
                self.store.close()
                raise
            log.info("user model auto: the sequence model does not fit this store (%s); serving ials", error)
            self.config = config = replace(config, user_model="ials", sequence_model_path=None)
            self.state = State(config)
        except Exception:
            self.store.close()
            raise
        self.lock = threading.RLock()  # guards the state: the writer applies under it, readers copy under it
        # Cached: every response reports them, and request threads should not read LMDB.
        self._model_version = (self.store.get_meta(MODEL_VERSION_KEY) or b"none").decode()
        self._log_id = self.store.log_id
        self.backend = get_backend(config.backend, config.gpu_storage)
        self.backend.warmup()  # JIT-compile now, not on the first request
        warm_update_kernel()  # likewise for the online update: the first ingested event should not pay for it
        self.reranker = Reranker(config.dim, config.rerank_provider, config.rerank_threads, config.rerank_by_default,
                                 config.rerank_candidates)
        self.retriever = Retriever(self.state, self.lock, self.backend, self.reranker, config.user_model)
        self.sequence_item_cosine: float | None = None  # the model's probe items against this catalog
        self.started_at = time.time()
        self.counters = {"events_accepted": 0, "events_rejected": 0, "events_duplicate": 0, "recommendations": 0}
        self.impressions = ImpressionLog(
            self.data_dir / IMPRESSIONS_FOLDER,
            RetentionPolicy(config.impression_max_records, int(config.impression_max_age_days * 86_400_000),
                            int(config.attribution_window_s * 1000)),
            config.impression_queue, sync=config.sync) if config.impressions else None
        self.checkpointer: Checkpointer | None = None
        self.writer: GroupCommitWriter | None = None
        self.follower: LogFollower | None = None
        self.wakeups: WakeupSender | None = None
        self.feed: LogFeed | None = None  # the primary's side of replication to other machines
        if source is not None:
            self.checkpointer = Checkpointer(self.store, self.state, self.lock, config, self.observer)
            self.follower = RemoteFollower(self.store, source, self.checkpointer, self.state, self.lock, self.reranker,
                                           config, lambda: self._model_version)
            self._follow()
        elif replica:
            self.follower = LogFollower(self.store, self.state, self.lock, self.reranker, config,
                                        lambda: self._model_version)
            self._follow()
        else:
            self._start_writing(config)
            self.feed = LogFeed(self.store, self.state, self.checkpoint, self.lock)
        self.experiments = Experiments(self.impressions) if self.impressions is not None else None
        self._feature_sample = random.Random()  # which answers log their feature rows (impression_features)
        self.batcher: MicroBatcher[RecommendQuery, Recommendation] = MicroBatcher(
            self._recommend_batch, config.max_batch, config.max_wait_us, config.recommend_queue_size,
            on_batch=self.observer.recommend_batch)

    def _follow(self) -> None:
        if self.impressions is not None:
            self.follower.on_users_gone = self._forget_impressions
        self.recovered_records = self.follower.load()
        self._check_sequence_model_or_close()
        self._model_version = (self.store.get_meta(MODEL_VERSION_KEY) or b"none").decode()
        self.follower.start()

    def _start_writing(self, config: EngineConfig) -> None:
        """The primary: recover, then the writer thread; replicas are woken after each commit."""
        self.checkpointer = Checkpointer(self.store, self.state, self.lock, config, self.observer)
        self.recovered_records = recover(self.store, self.state)
        self._check_sequence_model_or_close()
        self.checkpointer.count(self.recovered_records)
        if self.recovered_records:
            self.checkpointer.now()
        if config.reranker_path:
            try:
                self.reranker.load(config.reranker_path)
            except RerankerRejected as error:
                log.error("reranker: not loaded (%s); serving retrieval only", error.message)
        self.wakeups = WakeupSender(folder_of(self.data_dir))
        self.group_commit = GroupCommit(self.store, self.state, self.lock, self.checkpointer, self.observer,
                                        self.wakeups.send)
        self.writer = GroupCommitWriter(self.group_commit.commit, self.group_commit.run_exclusive,
                                        self.checkpointer.tick, config.commit_queue_size, config.max_group_ops)
        self.writer.start()
        if not self.is_empty:  # an empty store is seeded first (seed() records it then)
            self._record_reranker()  # replicas serve the model this process serves, whatever the store last said

    def _check_sequence_model_or_close(self) -> None:
        """A sequence model must have been trained against this catalog's item space (its queries are scored
        against these vectors): SequenceModelRejected otherwise, with the store closed. An empty store (about to
        be seeded) is not checked; the engine opened on the seeded store is. user_model "auto" becomes
        "sequence" when the model fits, else "ials" without the model."""
        tower = self.state.sequence
        if tower is None or len(self.state.items) == 0:
            return
        items = self.state.items
        try:
            self.sequence_item_cosine = tower.check_item_space(
                lambda item_id: items.vectors[items.rows[item_id]] if item_id in items.rows else None)
        except SequenceModelRejected as error:
            if self.config.user_model != "auto":
                self._abandon()
                raise
            log.info("user model auto: serving ials (%s)", error)
            self._resolve_user_model(replace(self.config, user_model="ials", sequence_model_path=None))
            return
        except Exception:
            self._abandon()
            raise
        if self.config.user_model == "auto":
            self._resolve_user_model(replace(self.config, user_model="sequence"))
        log.info("sequence model %s: item space matches this catalog (probe mean cosine %.3f)", tower.version,
                 self.sequence_item_cosine)

    def _abandon(self) -> None:
        """A start that fails after opening the store: release what is open."""
        if self.impressions is not None:
            self.impressions.close()
        self.store.close()

    def _resolve_user_model(self, config: EngineConfig) -> None:
        """Settle user_model "auto": every holder of the config sees the choice (a replica's reloads too)."""
        self.config = self.state.config = config
        if config.sequence_model_path is None:
            self.state.sequence = None
        self.retriever.default_user_model = config.user_model
        if self.follower is not None:
            self.follower.config = config

    def _record_reranker(self) -> int:
        """Log the serving reranker when the store says another one serves; returns the seq (0: nothing logged)."""
        model = self.reranker.model
        serving = codec.RerankerSwap(str(Path(model.path).resolve()), model.version) if model else codec.RerankerSwap("", "")
        recorded = current_reranker(self.store)
        if recorded == serving or (recorded is None and model is None):
            return 0
        return self._write(OpKind.RERANKER, (serving.path, serving.version)).result(30)

    def _write(self, kind: OpKind, payload, **options) -> Future:
        self._write_check()
        return self.writer.submit(kind, payload, **options)

    def _config_for_store(self, config: EngineConfig) -> EngineConfig:
        """The store's dimension wins over the configured one: its vectors have it."""
        stored = self.store.get_meta(_DIM_KEY)
        if stored is not None and int(stored) != config.dim:
            log.warning("data dir holds dimension %s; using it instead of the configured %d", stored.decode(), config.dim)
            config = EngineConfig(**{**config.__dict__, "dim": int(stored)})
        if not self.store.readonly:
            self.store.put_meta(_DIM_KEY, str(config.dim).encode())
        return config

    # --- lifecycle ----------------------------------------------------------------------------
    @staticmethod
    def holds_store(folder: str | Path) -> bool:
        """True when `folder` already holds an engine's store (an Engine opened there recovers it)."""
        return Store.exists(Path(folder))

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def model_version(self) -> str:
        return self._model_version

    @property
    def is_empty(self) -> bool:
        return len(self.state.items) == 0 and self.store.last_seq() == 0

    @property
    def last_checkpoint_wall(self) -> float:
        return self.checkpointer.last_wall

    def close(self, checkpoint: bool = True) -> None:
        """Drain queued writes and stop. checkpoint=False leaves the log unreplayed, as after a crash."""
        self.batcher.close()
        if self.feed is not None:
            self.feed.close()  # replicas' streams stop reading the store before it closes
        if self.follower is not None:
            self.follower.close()  # a remote replica's also writes its copy's last checkpoint
        if self.writer is not None:
            self.writer.close(final_checkpoint=checkpoint)
            self.checkpointer.close()
            self.wakeups.close()
        if self.impressions is not None:
            self.impressions.close()  # after the writer: its last commits may still attribute events
        self.store.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def seed(self, items: list[ItemSpec], events: list[Event], user_ids: list[str], user_vectors: np.ndarray,
             model_version: str) -> None:
        """Load a trained model and its training log into an empty engine in one checkpointed step."""
        if not self.is_empty:
            raise InvalidArgument("", "seed needs an empty data dir")
        done = self._write(OpKind.SEED, (items, events, user_ids, user_vectors, model_version), timeout_s=60)
        self._model_version = done.result()
        self._record_reranker()

    # --- writes ---------------------------------------------------------------------------------
    def ingest(self, events: list[Event], timeout_s: float = 30.0) -> IngestResult:
        """Durably log and apply events. Returns once they are committed and visible to recommend()."""
        return self.ingest_async(events).result(timeout_s)

    def ingest_async(self, events: list[Event]) -> Future:
        """Validate now, then queue for the writer; the future completes after commit and apply.
        Lets one stream keep several batches in flight so they share group commits."""
        good, rejected = split_events(events, self.limits)
        finish = partial(self._count_ingest, rejected, good)
        if not good:
            done: Future = Future()
            done.set_result(finish(IngestResult(durable_seq=self.state.applied_seq)))
            return done
        return self._write(OpKind.EVENTS, good, finish=finish)

    def _count_ingest(self, rejected: list[Rejection], events: list[tuple[int, Event]], outcome: IngestResult) -> IngestResult:
        """The caller's result: validation's rejections merged with the commit's, counted (on the writer thread);
        the committed events that name an answer go to attribution."""
        if self.impressions is not None:
            refused = {r.event_id for r in outcome.rejections}
            self.impressions.attribute([e for _, e in events if e.recommendation_id and e.event_id not in refused])
        outcome.rejections = sorted(rejected + outcome.rejections, key=lambda r: r.index)
        self.counters["events_accepted"] += outcome.accepted
        self.counters["events_rejected"] += len(outcome.rejections)
        self.counters["events_duplicate"] += outcome.duplicates
        self.observer.events(outcome.accepted, outcome.duplicates, len(outcome.rejections))
        return outcome

    def upsert_items(self, specs: list[ItemSpec], timeout_s: float = 30.0) -> UpsertResult:
        return self._write(OpKind.UPSERT, check_upserts(specs, self.dim, self.limits)).result(timeout_s)

    def delete_items(self, item_ids: list[str], timeout_s: float = 30.0) -> DeleteResult:
        return self._write(OpKind.DELETE, check_deletes(item_ids, self.limits)).result(timeout_s)

    def forget_user(self, user_id: str, timeout_s: float = 60.0) -> ForgetResult:
        """Erase a user everywhere (log records, index, state; replicas reload without them)."""
        check_id("user_id", user_id, self.limits)
        if self.state.users.row_of(user_id) is None:
            raise NotFound("user_id", f"unknown user '{user_id}'")
        result = self._write(OpKind.FORGET, user_id).result(timeout_s)
        if self.impressions is not None:
            self.impressions.forget(user_id)  # what was shown to them goes too
        return result

    def checkpoint(self, timeout_s: float = 120.0) -> int:
        """Force a checkpoint now; returns its watermark."""
        return self._write(OpKind.CHECKPOINT, None).result(timeout_s)

    # --- reranking model ----------------------------------------------------------------------------
    def load_reranker(self, path: str | Path | None = None) -> dict:
        """Validate the ONNX model at `path` (None: the one serving now, re-read) and swap it in without a
        restart. A bad file raises RerankerRejected (INVALID_ARGUMENT) and the old model keeps serving.
        The swap is logged, so replicas swap too; the info's durable_seq is its seq."""
        self._write_check()
        with self.lock:
            items = ItemArrays.of(self.state.items)
            now_ms = state_clock_ms(self.state.items)
        self.reranker.reload(path, items, now_ms, self.model_version)
        return {**self.reranker_info(), "durable_seq": self._record_reranker() or self.state.applied_seq}

    def unload_reranker(self) -> dict:
        self._write_check()
        self.reranker.unload()
        return {**self.reranker_info(), "durable_seq": self._record_reranker() or self.state.applied_seq}

    def _write_check(self) -> None:
        if self.writer is None:
            raise FailedPrecondition("", "this process is a read replica: writes go to the primary")

    def reranker_info(self) -> dict:
        return self.reranker.info()

    def rerank_features(self, user_id: str, item_ids: list[str], scores: np.ndarray, user_model: str = "") -> np.ndarray:
        """The feature rows the second stage would score for this user and these retrieved candidates now, from
        the query of `user_model` (default: the server's). Training builds its examples with it, so what a
        model learns from is what serving gives it."""
        user_model = user_model or self.config.user_model
        if user_model == "sequence":
            self.retriever.refresh_sequence([user_id])
        with self.lock:
            items, users = self.state.items, self.state.users
            row = users.row_of(user_id)
            user = capture_user(users, row, users.query_vector(row, user_model))
            arrays, now_ms = ItemArrays.of(items), state_clock_ms(items)
            rows = np.fromiter((items.rows[i] for i in item_ids), np.int64, len(item_ids))
        return build_features([user], [rows], [np.asarray(scores, np.float32)], arrays, now_ms)

    # --- reads ------------------------------------------------------------------------------------
    def wait_applied(self, min_seq: int, timeout_s: float | None = None, log_id: str = "") -> None:
        """Read-your-writes: return once this process's state has applied `min_seq` (a durable_seq from an ack),
        waiting at most `timeout_s` (default: config.min_seq_wait_s). Past it: Unavailable, retryable (another
        process may have caught up). A seq beyond the log's end is no token of this store: OutOfRange; a token
        that names another log (`log_id`): FailedPrecondition."""
        if log_id and min_seq and log_id != self.log_id:
            raise FailedPrecondition("log_id", f"min_seq {min_seq} counts in log {log_id}; this server's log is "
                                               f"{self.log_id} (another primary, or its store was replaced)")
        if min_seq <= self.state.applied_seq:
            return
        # Where the log ends is known here exactly, except on a replica on another machine (as of its last batch).
        exact = self.follower is None or self.follower.log_end_is_exact
        if exact:
            self._check_in_log(min_seq)
        timeout_s = self.config.min_seq_wait_s if timeout_s is None else timeout_s
        if not self.state.wait_applied(min_seq, timeout_s):
            if not exact:
                self._check_in_log(min_seq)
            raise Unavailable("min_seq", f"this {self.role} has applied up to seq {self.state.applied_seq}, "
                                         f"behind min_seq {min_seq} after waiting {timeout_s * 1e3:.0f} ms; retry")

    def build_query(self, user_id: str, k: int | None, **options) -> RecommendQuery:
        """A validated query (options: those of validation.check_query); every problem names the request field."""
        return check_query(self.limits, self.config.default_k, user_id, k, **options)

    def recommend(self, queries: list[RecommendQuery], deadline: float | None = None) -> list[Recommendation]:
        """Answers in query order. Queries join whatever concurrent requests form the next kernel batch;
        `deadline` (time.monotonic()) drops them if they would start too late."""
        futures = [self.recommend_async(q, deadline) for q in queries]
        return [f.result() for f in futures]

    def _forget_impressions(self, user_ids: set[str]) -> None:
        """A replica's reload dropped these users (ForgetUser): erase them from this process's impression log."""
        for user_id in user_ids:
            self.impressions.forget(user_id)

    def _recommend_batch(self, queries: list[RecommendQuery]) -> list[Recommendation]:
        """The micro-batcher's call: the answers, each with its recommendation_id and its impression queued."""
        results = self.retriever.recommend(queries)
        if self.impressions is not None:
            now_ms = int(time.time() * 1000)
            for query, result in zip(queries, results):
                result.recommendation_id = new_recommendation_id()
                result.experiment, result.arm = query.experiment, query.arm
                features = None
                if result.user_model and result.item_ids and self._feature_sample.random() < self.config.impression_features:
                    retrieval = result.scores if result.retrieval_scores is None else result.retrieval_scores
                    features = self.rerank_features(result.user_id, result.item_ids, retrieval, result.user_model)
                self.impressions.record(Impression(
                    result.recommendation_id, result.user_id, list(result.item_ids), result.scores.tolist(), now_ms,
                    self._model_version, result.user_model, result.reranker, query.experiment, query.arm), features)
        return results

    # --- experiments (feedback/experiments.py) ---------------------------------------------------------
    def _experiments_check(self) -> Experiments:
        if self.experiments is None:
            raise FailedPrecondition("", "experiments need the impression log (EngineConfig.impressions)")
        return self.experiments

    def create_experiment(self, name: str, arms: list[Arm], description: str = "") -> Experiment:
        """Start an A/B experiment (one runs at a time; a name is never reused). INVALID_ARGUMENT names the
        field at fault."""
        experiment = Experiment(name, arms, description)
        check_experiment(experiment, options_checker(self.build_query, self.state.sequence is not None))
        return self._experiments_check().create(experiment)

    def stop_experiment(self, name: str) -> Experiment:
        return self._experiments_check().stop(name)

    def list_experiments(self) -> list[Experiment]:
        return self._experiments_check().list()

    def experiment_report(self, name: str) -> dict:
        """The experiment and, per arm, impressions, attributed clicks and purchases, CTR and conversion with
        Wilson 95% intervals."""
        return self._experiments_check().report(name)

    def impressions_info(self) -> dict:
        return self.impressions.info() if self.impressions is not None else {"enabled": False}

    def recommend_async(self, query: RecommendQuery, deadline: float | None = None) -> Future:
        if self.experiments is not None:
            self.experiments.apply(query)
        if query.user_model == "sequence" and self.state.sequence is None:
            raise FailedPrecondition("user_model", "this server has no sequence model (serve --user-model sequence "
                                                   "or --sequence-model PATH)")
        self.counters["recommendations"] += 1
        return self.batcher.submit(query, deadline)

    def similar_items(self, item_id: str, k: int | None = None, include_categories=(), exclude_categories=(),
                      request_id: str = "") -> Recommendation:
        """The live items nearest to `item_id` (itself excluded), under the category filters."""
        query = check_query(self.limits, self.config.default_k, item_id, k, exclude_seen=False,
                            include_categories=include_categories, exclude_categories=exclude_categories,
                            request_id=request_id, user_field="item_id")  # checks item_id, naming the field
        query.user_id = ""  # no user: the item's vector is the query
        return self.retriever.similar(item_id, query)

    def _check_in_log(self, min_seq: int) -> None:
        last = self.follower.log_end() if self.follower is not None else self.store.last_seq()
        if min_seq > last:
            raise OutOfRange("min_seq", f"{min_seq} is beyond this server's log (last seq {last}): "
                                        "a token from another server or data dir?")

    def get_item(self, item_id: str) -> ItemView:
        check_id("item_id", item_id, self.limits)
        with self.lock:
            view = self.state.item_view(item_id, int(time.time() * 1000))
        if view is None:
            raise NotFound("item_id", f"unknown item '{item_id}'")
        return view

    def get_user(self, user_id: str, history_limit: int = 20) -> UserView:
        check_id("user_id", user_id, self.limits)
        if self.config.user_model == "sequence":
            self.retriever.refresh_sequence([user_id])
        with self.lock:
            view = self.state.user_view(user_id, history_limit)
        if view is None:
            raise NotFound("user_id", f"unknown user '{user_id}'")
        return view

    def served_by(self) -> ServedBy:
        """Which model and state answer now (read without the lock: each field is one reference)."""
        state = self.state
        return ServedBy(self._model_version, state.embedding_version, state.applied_seq, self.backend.name, self.log_id)

    @property
    def log_id(self) -> str:
        """The log this process's applied seq counts in (a remote replica's: its primary's)."""
        return self._log_id if self.follower is None else self.follower.log_id

    def stats(self) -> EngineStats:
        with self.lock:
            items = self.state.items
            live = items.live_count
            return EngineStats(
                served_by=self.served_by(), dim=self.dim, items=live, deleted_items=len(items) - live,
                users=len(self.state.users), log_events=self.store.stats().get("log", 0),
                last_seq=self.store.last_seq(), checkpoint_seq=self.store.checkpoint_seq(),
                uptime_s=time.time() - self.started_at,
                last_checkpoint_wall=self.checkpointer.last_wall if self.checkpointer else 0.0,
                write_queue=self.writer.pending if self.writer else 0, recovered_records=self.recovered_records,
                recommend_batch_sizes=self.batcher.histogram.snapshot(),
                recommend_batches=self.batcher.histogram.batches, reranker=self.reranker_info(),
                data_dir=str(self.data_dir), role=self.role,
                replicas=self.wakeups.replicas if self.wakeups else 0,
                replica_reloads=self.follower.reloads if self.follower else 0, pid=os.getpid(),
                snapshots_served=self.feed.snapshots_served if self.feed else 0, user_model=self.user_model_info(),
                impressions=self.impressions_info(),
                **self.counters,
            )

    def user_model_info(self) -> dict:
        """Which user model answers by default, the sequence model when one is loaded, and the answers of each."""
        state = self.state
        info = {"default": self.config.user_model, "answers": dict(self.retriever.answers),
                "sequence_update": self.config.sequence_update}
        if state.sequence is not None:
            info["sequence"] = {**state.sequence.info(), "updates": state.sequence_updates,
                                "update_seconds": state.sequence_seconds, "item_space_cosine": self.sequence_item_cosine}
        return info
