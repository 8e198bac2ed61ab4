"""Second stage: an ONNX model scores the retrieved candidates of a whole micro-batch in one ONNX Runtime call.

* The execution provider is chosen once, when the Reranker is made: CUDAExecutionProvider when the
  installed onnxruntime offers it and a session really runs on it, else CPUExecutionProvider. ORT's own
  logging is turned down to errors (to fatal while probing CUDA), so a machine without a GPU stays quiet.
* A model is validated before it serves (`load`): it must parse, take one float32 input of shape
  [N, feature_count(dim)] with a dynamic N, give one score per row, and give finite scores on a probe
  batch (random rows, rows built from the live catalog, batch sizes 1 and 257). Its sidecar
  (<model>.json), when present, must name this FEATURE_SPEC and dimension. Anything else raises
  RerankerRejected and the model that was serving keeps serving.
* A model that passed is warmed up before it serves: one request's worth of candidates (WARM_CANDIDATES)
  through the feature builder (so its Numba kernel is compiled, or loaded from Numba's cache, at load
  time) and through the new session, so the first real request does not pay for either.
* Session options, for single-request latency: intra-op threads `threads` (1 by default), inter-op 1,
  sequential execution, graph optimisation ORT_ENABLE_ALL, the CPU memory arena on, no spinning between
  calls: ORT's defaults, set explicitly (the measurements behind them: benchmarks/RESULTS.md, "Reranking").
* A swap is one reference assignment: a batch that already took the old model finishes with it.
* serving never imports torch; onnxruntime itself is optional: without it the server logs a warning and
  serves retrieval only.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamrec.engine.errors import InvalidArgument
from streamrec.engine.rerank.features import (
    FEATURE_SPEC,
    ItemArrays,
    UserContext,
    build_features,
    capture_user,
    feature_count,
    state_clock_ms,
)

log = logging.getLogger(__name__)

SHIPPED_RERANKER = Path(__file__).resolve().parent / "models" / "ml100k-reranker.onnx"
MAX_MODEL_BYTES = 256 << 20
SIDECAR_FORMAT = "streamrec-reranker"
WARM_CANDIDATES = 200  # rows of the warm-up request (the default `rerank_candidates`)


class RerankerRejected(InvalidArgument):
    """A candidate model failed validation; the serving model is unchanged."""

    def __init__(self, message: str):
        super().__init__("path", message)


def onnxruntime_module():
    """The onnxruntime module, or None when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_suffix(".json")


# A one-node ONNX graph (Identity, float32 [N, 4]) for probing a provider without the onnx package.
_PROBE_MODEL = base64.b64decode("CAg6PwoQCgF4EgF5IghJZGVudGl0eRIFcHJvYmVaEQoBeBIMCgoIARIGCgAKAggEYhEKAXkSDAoKCAESBgoACgIIBEIECgAQEQ==")


def choose_provider(preference: str = "auto") -> str | None:
    """'CUDAExecutionProvider' or 'CPUExecutionProvider' (None without onnxruntime). Decided once, at start."""
    ort = onnxruntime_module()
    if ort is None:
        return None
    ort.set_default_logger_severity(3)  # errors only: no provider/loader chatter on machines without a GPU
    if preference == "cpu":
        return "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        ort.set_default_logger_severity(4)  # a CUDA build on a machine without a usable GPU logs loudly
        try:
            session = ort.InferenceSession(_PROBE_MODEL, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            session.run(None, {"x": np.zeros((1, 4), np.float32)})
            if session.get_providers()[0] == "CUDAExecutionProvider":
                return "CUDAExecutionProvider"
        except Exception as error:  # noqa: BLE001 - any failure means: not usable here
            log.debug("CUDAExecutionProvider unusable: %s", error)
        finally:
            ort.set_default_logger_severity(3)
    if preference == "cuda":
        log.warning("reranker: CUDAExecutionProvider requested but unusable here; using CPUExecutionProvider")
    return "CPUExecutionProvider"


@dataclass
class RerankModel:
    session: object
    input_name: str
    path: str
    version: str
    sha256: str
    provider: str
    features: int
    metadata: dict = field(default_factory=dict)
    loaded_at_ms: int = 0

    def score(self, features: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: features})[0]
        return np.asarray(out, np.float32).reshape(len(features))


@dataclass
class RerankPlan:
    """Captured under the state lock for one micro-batch: who is reranked, with which model."""

    model: RerankModel
    users: dict[int, UserContext]  # query index -> user snapshot
    candidates: dict[int, int]     # query index -> candidates to retrieve
    items: ItemArrays
    now_ms: int


class Reranker:
    def __init__(self, dim: int, provider: str = "auto", threads: int = 1, by_default: bool = True,
                 candidates: int = 200):
        self.dim = dim
        self.threads = threads
        self.by_default = by_default  # rerank requests that do not say
        self.candidates = candidates  # retrieved candidates per reranked request, unless the request says
        self._clock: tuple[tuple, int] = ((), 0)  # (state version, latest event timestamp)
        self.provider = choose_provider(provider)
        self._model: RerankModel | None = None
        self._swap_lock = threading.Lock()  # one load at a time; readers never take it
        self.swaps = 0
        self.refused = 0
        self.last_error = ""
        self.reranked_requests = 0
        self.failed_batches = 0
        if self.provider is None:
            log.warning("reranker: onnxruntime is not installed; serving retrieval only (pip install onnxruntime)")
        else:
            log.info("reranker: ONNX Runtime provider %s", self.provider)

    @property
    def model(self) -> RerankModel | None:
        return self._model

    # --- loading ------------------------------------------------------------------------------------
    def load(self, path: str | Path, probe: np.ndarray | None = None) -> RerankModel:
        """Validate the model at `path` and make it the serving one; RerankerRejected leaves the old one."""
        with self._swap_lock:
            try:
                model = self._validated(Path(path), probe)
                self._warm_up(model)
            except RerankerRejected as error:
                self.refused += 1
                self.last_error = error.message
                log.error("reranker: refused %s: %s (still serving %s)", path, error.message,
                          self._model.version if self._model else "retrieval only")
                raise
            previous, self._model = self._model, model
            self.swaps += 1
            self.last_error = ""
        log.info("reranker: serving %s (version %s, %d features, %s)%s", model.path, model.version, model.features,
                 model.provider, f"; replaced {previous.version}" if previous else "")
        return model

    def reload(self, path: str | Path | None, items: ItemArrays, now_ms: int, embeddings_version: str) -> RerankModel:
        """`load` with a probe from the live catalog; path None or "": the serving model's file, read again."""
        if path is None or str(path) == "":
            if self._model is None:
                raise InvalidArgument("path", "no reranker is loaded; give the path of an ONNX model")
            path = self._model.path
        model = self.load(Path(path), probe=self.probe_features(items, now_ms))
        trained_on = model.metadata.get("dataset")
        if trained_on and embeddings_version != "none" and trained_on not in embeddings_version:
            log.warning("reranker %s was trained on %s; this engine's embeddings are %s: expect a weaker second stage",
                        model.version, trained_on, embeddings_version)
        return model

    def unload(self) -> None:
        with self._swap_lock:
            self._model = None
            self.swaps += 1
        log.info("reranker: unloaded; serving retrieval only")

    def _validated(self, path: Path, probe: np.ndarray | None) -> RerankModel:
        ort = onnxruntime_module()
        if ort is None or self.provider is None:
            raise RerankerRejected("onnxruntime is not installed on the server (pip install onnxruntime)")
        try:
            if not path.is_file():
                raise RerankerRejected(f"cannot read {path}: " + ("not a regular file" if path.exists() else "no such file"))
            size = path.stat().st_size
            if size > MAX_MODEL_BYTES:
                raise RerankerRejected(f"{path} is {size} bytes; the limit is {MAX_MODEL_BYTES}")
            data = path.read_bytes()
        except (OSError, ValueError) as error:  # ValueError: e.g. a NUL byte in the path
            raise RerankerRejected(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
        digest = hashlib.sha256(data).hexdigest()
        metadata = self._sidecar(path)
        expected = feature_count(self.dim)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = True
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy cores between calls
        try:
            providers = list(dict.fromkeys([self.provider, "CPUExecutionProvider"]))
            session = ort.InferenceSession(data, options, providers=providers)
        except Exception as error:  # noqa: BLE001 - ORT raises several types for a bad file
            raise RerankerRejected(f"{path} is not a loadable ONNX model: {_first_line(error)}") from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise RerankerRejected(f"the model must take exactly one input (features), it takes {len(inputs)}")
        feature_input = inputs[0]
        if feature_input.type != "tensor(float)":
            raise RerankerRejected(f"input '{feature_input.name}' must be float32 (tensor(float)), got {feature_input.type}")
        shape = list(feature_input.shape)
        if len(shape) != 2 or shape[1] != expected:
            raise RerankerRejected(f"input '{feature_input.name}' has shape {shape}; expected [N, {expected}] "
                                   f"({FEATURE_SPEC} at dimension {self.dim})")
        if isinstance(shape[0], int) and shape[0] > 0:
            raise RerankerRejected(f"input '{feature_input.name}' has a fixed batch size {shape[0]}; it must be dynamic")
        if not outputs or outputs[0].type != "tensor(float)":
            raise RerankerRejected("the model's first output must be float32 scores")
        model = RerankModel(session, feature_input.name, str(path), metadata.get("version") or f"sha256:{digest[:12]}",
                            digest, session.get_providers()[0], expected, metadata, int(time.time() * 1000))
        batches = [np.zeros((1, expected), np.float32), _random_batch(257, expected, self.dim)]
        if probe is not None and len(probe):
            batches.append(np.ascontiguousarray(probe, np.float32))
        for batch in batches:
            try:
                scores = model.session.run(None, {model.input_name: batch})[0]
            except Exception as error:  # noqa: BLE001
                raise RerankerRejected(f"the model failed on a probe batch of {len(batch)} rows: {_first_line(error)}") from None
            scores = np.asarray(scores)
            if scores.size != len(batch) or scores.shape[0] != len(batch):
                raise RerankerRejected(f"the model must give one score per row: {len(batch)} rows gave shape {list(scores.shape)}")
            if not np.all(np.isfinite(scores)):
                bad = int((~np.isfinite(scores)).sum())
                raise RerankerRejected(f"the model gives non-finite scores (NaN or inf) for {bad} of {len(batch)} probe rows")
        return model

    def _warm_up(self, model: RerankModel) -> None:
        """One request of WARM_CANDIDATES rows through build_features (Numba: compiled or loaded from the
        cache now, not on the first request) and through the model's session. Built from a small synthetic
        catalog, so it runs even while the live catalog is still empty. A failure here is logged, not a
        refusal: validation has already accepted the model."""
        started = time.perf_counter()
        try:
            rng = np.random.default_rng(1)
            n = WARM_CANDIDATES + 32
            vectors = rng.standard_normal((n, self.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            now_ms = 1_000 * 3_600_000
            items = ItemArrays(vectors, rng.normal(0.0, 10.0, n), rng.integers(0, 50, n).astype(np.int64),
                               rng.integers(0, now_ms, n).astype(np.int64), rng.integers(0, 1 << 20, (n, 1)).astype(np.uint64),
                               24 * 3_600_000.0)
            user = UserContext(vectors[0].copy(), 30, 20, now_ms - 60_000, np.arange(1, 21, dtype=np.int64),
                               np.arange(21, 31, dtype=np.int64), 0.7)
            rows = np.arange(32, n, dtype=np.int64)
            scores = np.sort(vectors[rows] @ user.vector)[::-1].astype(np.float32)
            for _ in range(2):
                model.score(build_features([user], [rows], [scores], items, now_ms))
        except Exception as error:  # noqa: BLE001 - warm-up is best effort
            log.warning("reranker: warm-up of %s failed (%s); its first requests may be slow", model.version, _first_line(error))
            return
        log.debug("reranker: warmed up %s in %.1f ms", model.version, (time.perf_counter() - started) * 1e3)

    def _sidecar(self, path: Path) -> dict:
        side = sidecar_path(path)
        if not side.exists():
            return {}
        try:
            metadata = json.loads(side.read_text())
        except (OSError, ValueError) as error:
            raise RerankerRejected(f"sidecar {side} is not valid JSON: {error}") from None
        if not isinstance(metadata, dict):
            raise RerankerRejected(f"sidecar {side} must hold a JSON object")
        if metadata.get("feature_spec") != FEATURE_SPEC:
            raise RerankerRejected(f"sidecar {side} names feature spec {metadata.get('feature_spec')!r}; "
                                   f"this server builds {FEATURE_SPEC!r}")
        if metadata.get("dim") not in (None, self.dim):
            raise RerankerRejected(f"the model was trained at dimension {metadata.get('dim')}; the engine's is {self.dim}")
        return metadata

    # --- serving --------------------------------------------------------------------------------------
    def rerank(self, plan: RerankPlan, retrieved: dict[int, tuple[np.ndarray, np.ndarray]], ks: dict[int, int]
               ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For each planned query i with retrieved (rows, scores) in retrieval order (rows < 0 = none):
        (rows, model scores, retrieval scores) of its top ks[i] by model score. One ORT call for all."""
        order = [i for i in plan.users if i in retrieved]
        candidates, scores = [], []
        for i in order:
            rows, sc = retrieved[i]
            keep = rows[: plan.candidates[i]] >= 0
            candidates.append(rows[: plan.candidates[i]][keep].astype(np.int64))
            scores.append(sc[: plan.candidates[i]][keep].astype(np.float32))
        features = build_features([plan.users[i] for i in order], candidates, scores, plan.items, plan.now_ms)
        model_scores = plan.model.score(features)
        out = {}
        start = 0
        for i, rows, sc in zip(order, candidates, scores):
            mine = model_scores[start:start + len(rows)]
            start += len(rows)
            top = np.argsort(-mine, kind="stable")[: ks[i]]
            out[i] = (rows[top], mine[top], sc[top])
        self.reranked_requests += len(order)
        return out

    # --- serving ------------------------------------------------------------------------------------
    def plan(self, queries, query_vectors: list[np.ndarray | None], state,
             user_models: list[str] | None = None) -> RerankPlan | None:
        """Under the state lock: snapshots of the users whose candidates the model will reorder (personalised
        queries that want reranking while a model is loaded); None when no query of the batch is reranked.
        By default only answers of the user model the reranker was trained behind (its sidecar's
        `user_model`, "ials" when it does not say) are reranked: its user features are that model's queries.
        A query that asks (rerank=True) is reranked whatever its user model."""
        model = self._model
        if model is None:
            return None
        trained_behind = model.metadata.get("user_model", "ials")
        users: dict[int, UserContext] = {}
        candidates: dict[int, int] = {}
        for i, query in enumerate(queries):
            if query.rerank is None:
                wanted = self.by_default and (user_models is None or user_models[i] == trained_behind)
            else:
                wanted = query.rerank
            if wanted and query_vectors[i] is not None:
                row = state.users.row_of(query.user_id)
                users[i] = capture_user(state.users, row, query_vectors[i])
                candidates[i] = max(query.k, query.candidates or self.candidates)
        if not users:
            return None
        items = state.items
        version = (state.embedding_version, state.applied_seq, len(items))
        if self._clock[0] != version:  # the latest event time moves only when the state does
            self._clock = (version, state_clock_ms(items))
        return RerankPlan(model, users, candidates, ItemArrays.of(items), self._clock[1])

    def probe_features(self, items: ItemArrays, now_ms: int, rows: int = 64, seed: int = 0) -> np.ndarray | None:
        """Feature rows built from the live catalog (random users over random live items), for validation."""
        n = len(items.vectors)
        if n == 0:
            return None
        rng = np.random.default_rng(seed)
        vector = rng.standard_normal(self.dim).astype(np.float32)
        vector /= np.linalg.norm(vector)
        picks = rng.choice(n, size=min(rows, n), replace=False).astype(np.int64)
        scores = (items.vectors[picks] @ vector).astype(np.float32)
        order = np.argsort(-scores)
        user = UserContext(vector, 10, 10, now_ms, picks[:3], picks[3:4], 0.75)
        return build_features([user], [picks[order]], [scores[order]], items, now_ms)

    def info(self) -> dict:
        model = self._model
        return {
            "loaded": model is not None,
            "path": model.path if model else "",
            "version": model.version if model else "",
            "provider": (model.provider if model else self.provider) or "",
            "features": model.features if model else feature_count(self.dim),
            "feature_spec": FEATURE_SPEC,
            "loaded_at_ms": model.loaded_at_ms if model else 0,
            "swaps": self.swaps,
            "refused": self.refused,
            "last_error": self.last_error,
            "reranked_requests": self.reranked_requests,
            "user_model": model.metadata.get("user_model", "ials") if model else "",
            "failed_batches": self.failed_batches,
            "default_candidates": self.candidates,
            "by_default": self.by_default,
        }


def _random_batch(rows: int, width: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    batch = rng.standard_normal((rows, width)).astype(np.float32)
    batch[:, : 3 * dim] /= np.sqrt(dim)  # vector parts: unit-ish scale
    return batch


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
