"""Second stage: the feature builder, the ONNX model checks, hot swap and reranked answers over gRPC."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from streamrec.clients.client import StreamrecClient, make_event
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.offline.datasets import synthetic
from streamrec.engine.offline.seeding import seed_engine
from streamrec.engine.rerank.features import (
    FEATURE_SPEC,
    N_SCALARS,
    RECENT_NEGATIVES,
    RECENT_POSITIVES,
    SCALAR_FEATURES,
    ItemArrays,
    UserContext,
    build_features,
    build_features_numpy,
    capture_user,
    feature_count,
    state_clock_ms,
)
from streamrec.engine.rerank.reranker import WARM_CANDIDATES, Reranker, RerankerRejected, RerankModel
from streamrec.engine.signals import positive_mask
from streamrec.server.app import ServerConfig, StreamrecServer

onnx = pytest.importorskip("onnx")  # builds the test models (extra `test`)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

DIM = 32
WIDTH = feature_count(DIM)


def make_model(path: Path, weights: np.ndarray | None = None, width: int = WIDTH, nan: bool = False,
               fixed_batch: int | None = None, sidecar: dict | None = None, seed: int = 0) -> Path:
    """A linear ONNX scorer: score = features @ w (optionally * NaN), float32 [N, width] -> [N]."""
    w = weights if weights is not None else np.random.default_rng(seed).standard_normal((width, 1)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["features", "w"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["raw"])]
    init = [numpy_helper.from_array(np.asarray(w, np.float32).reshape(width, 1), "w"),
            numpy_helper.from_array(np.array([-1], np.int64), "shape")]
    if nan:
        nodes.append(helper.make_node("Mul", ["raw", "nan"], ["score"]))
        init.append(numpy_helper.from_array(np.array([np.nan], np.float32), "nan"))
    else:
        nodes.append(helper.make_node("Identity", ["raw"], ["score"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [fixed_batch or "batch", width])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, [fixed_batch or "batch"])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def score_weights(name: str, sign: float = 1.0) -> np.ndarray:
    """Weights that score by one scalar feature (e.g. most popular first)."""
    w = np.zeros((WIDTH, 1), np.float32)
    w[3 * DIM + SCALAR_FEATURES.index(name)] = sign
    return w


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    logging.getLogger("streamrec").setLevel(logging.WARNING)
    folder = tmp_path_factory.mktemp("rerank-engine")
    eng = Engine(folder / "lmdb", EngineConfig(dim=DIM, sync=False, backend="numpy"))
    seed_engine(eng, synthetic(n_users=120, n_items=600, seed=3))
    yield eng
    eng.close(checkpoint=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rerank-models")
    return {
        "good": make_model(folder / "good.onnx", sidecar={"feature_spec": FEATURE_SPEC, "dim": DIM, "version": "good-v1"}),
        "popular": make_model(folder / "popular.onnx", score_weights("item_log_interactions"),
                              sidecar={"feature_spec": FEATURE_SPEC, "dim": DIM, "version": "popular-v1"}),
        "folder": folder,
    }


def users_with_vectors(engine: Engine, n: int) -> list[str]:
    users = engine.state.users
    return [u for u in users.ids if u is not None and users.query_vector(users.rows[u]) is not None][:n]


# --- features -----------------------------------------------------------------------------------------


def test_batched_features_equal_one_query_at_a_time(engine):
    state = engine.state
    items = ItemArrays.of(state.items)
    now = state_clock_ms(state.items)
    contexts, candidates, scores = [], [], []
    for n, user in enumerate(users_with_vectors(engine, 5)):
        row = state.users.rows[user]
        ctx = capture_user(state.users, row, state.users.query_vector(row))
        sims = items.vectors @ ctx.vector
        top = np.argsort(-sims)[: 20 + 7 * n]  # lists of different lengths
        contexts.append(ctx)
        candidates.append(top.astype(np.int64))
        scores.append(sims[top].astype(np.float32))
    batch = build_features(contexts, candidates, scores, items, now)
    single = np.concatenate([build_features([c], [r], [s], items, now) for c, r, s in zip(contexts, candidates, scores)])
    assert batch.shape == (sum(len(c) for c in candidates), WIDTH) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, single)
    assert np.all(np.isfinite(batch))


@pytest.mark.parametrize("build", [build_features, build_features_numpy], ids=["kernel", "numpy-reference"])
def test_feature_values_by_hand(build):
    dim = 4
    vectors = np.eye(dim, dtype=np.float32)
    vectors = np.concatenate([vectors, np.full((1, dim), 0.5, np.float32)])  # row 4: (0.5, 0.5, 0.5, 0.5)
    bits = np.array([[1], [2], [1], [4], [3]], np.uint64)  # categories: 0, 1, 0, 2, {0, 1}
    items = ItemArrays(vectors, np.array([10.0, 0.0, -np.inf, 5.0, 3.0]), np.array([8, 1, 0, 3, 2]),
                       np.array([3_600_000, 0, 0, 7_200_000, 0]), bits, 3_600_000.0)
    user = UserContext(np.array([1, 0, 0, 0], np.float32), event_count=4, seen_count=3, last_event_ms=10_800_000,
                       positive_rows=np.array([0, 2]), negative_rows=np.array([3]), recent_positive_frac=2 / 3)
    rows = np.array([4, 1, 2])
    f = build([user], [rows], [np.array([0.5, 0.2, 0.1], np.float32)], items, now_ms=10_800_000)
    s = {name: f[:, 3 * dim + j] for j, name in enumerate(SCALAR_FEATURES)}
    np.testing.assert_allclose(f[:, :dim], np.tile(user.vector, (3, 1)))
    np.testing.assert_allclose(f[:, dim:2 * dim], vectors[rows])
    np.testing.assert_allclose(f[:, 2 * dim:3 * dim], vectors[rows] * user.vector)
    np.testing.assert_allclose(s["retrieval_rank_frac"], [0, 1 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(s["retrieval_score_gap"], [0, 0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(s["item_log_interactions"], np.log1p([2, 1, 0]), rtol=1e-6)
    np.testing.assert_allclose(s["item_log2_pop_now"], [0, -3, -40], rtol=1e-6)  # 3 half-lives later; none: -40
    np.testing.assert_allclose(s["item_pop_trend"], [-np.log2(3), -4, -40], rtol=1e-6)
    np.testing.assert_allclose(s["item_pop_rel"], [0, -3, -40], rtol=1e-6)
    np.testing.assert_allclose(s["item_never"], [0, 0, 1])
    np.testing.assert_allclose(s["item_num_categories"], [2, 1, 1])
    np.testing.assert_allclose(s["item_log_hours_idle"], [np.log1p(3.0), np.log1p(3.0), np.log1p(1e6)], rtol=1e-6)
    # positives: rows 0 and 2 (category 0, vectors e0 and e2); negative: row 3 (e3)
    np.testing.assert_allclose(s["cat_match_frac"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(s["hist_max_cos"], [0.5, 0.0, 1.0])
    np.testing.assert_allclose(s["hist_last_cos"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(s["hist_mean_cos5"], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(s["neg_max_cos"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(s["user_log_events"], np.log1p(4.0), rtol=1e-6)
    np.testing.assert_allclose(s["user_log_hours_idle"], 0.0)
    assert len(SCALAR_FEATURES) == N_SCALARS


# Columns that are copies, float32 products, differences or ratios of counts: the kernel must give the
# reference's exact float32 values. The cosines differ in rounding only: the kernel sums in float64 (then
# rounds to float32), the reference is a float32 BLAS matmul, so they agree to ~1e-7 on a scale of 1.
_COSINE_COLUMNS = ("hist_max_cos", "hist_mean_cos5", "hist_last_cos", "neg_max_cos")
_EXACT_COLUMNS = ("retrieval_score", "retrieval_rank_frac", "retrieval_score_gap", "item_pop_rank_frac", "item_never",
                  "item_num_categories", "user_recent_positive_frac", "cat_match_frac")


def assert_kernel_matches_reference(fast: np.ndarray, ref: np.ndarray, dim: int) -> None:
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == np.float32
    assert np.all(np.isfinite(fast))
    np.testing.assert_array_equal(fast[:, : 3 * dim], ref[:, : 3 * dim])  # user, item, user * item
    for j, name in enumerate(SCALAR_FEATURES):
        a, b = fast[:, 3 * dim + j], ref[:, 3 * dim + j]
        if name in _EXACT_COLUMNS:
            np.testing.assert_array_equal(a, b, err_msg=name)
        elif name in _COSINE_COLUMNS:  # 1e-6 relative to the cosine's scale (|cos| <= 1)
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, err_msg=name)


def random_batch(rng: np.random.Generator, dim: int = 16, n: int = 400, words: int = 2, batch: int = 6):
    """Random catalog and queries, with the edge cases: items never seen (-inf popularity, no events),
    equal popularity (rank ties), several category words, users without history or with more history
    than the features read, a user with no event time, lists of different lengths and an empty one."""
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    log2_pop = rng.normal(30.0, 20.0, n)
    log2_pop[rng.random(n) < 0.1] = -np.inf
    log2_pop[rng.random(n) < 0.1] = 35.0  # ties
    interactions = rng.integers(0, 50, n)
    interactions[np.isinf(log2_pop) | (rng.random(n) < 0.05)] = 0
    last = rng.integers(0, 10**9, n)
    bits = np.zeros((n, words), np.uint64)
    for w in range(words):
        bits[:, w] = (rng.integers(0, 1 << 62, n) & rng.integers(0, 1 << 62, n) & rng.integers(0, 1 << 62, n)).astype(np.uint64)
    items = ItemArrays(vectors, log2_pop, interactions, last, bits, 86_400_000.0)
    users, candidates, scores = [], [], []
    for b in range(batch):
        vector = rng.standard_normal(dim).astype(np.float32)
        vector /= np.linalg.norm(vector)
        n_pos = [0, 3, 7, RECENT_POSITIVES + 5][b % 4]
        n_neg = [0, 1, RECENT_NEGATIVES + 3][b % 3]
        users.append(UserContext(vector, int(rng.integers(0, 100)), int(rng.integers(0, 60)),
                                 0 if b == 1 else int(rng.integers(1, 10**9)), rng.integers(0, n, n_pos),
                                 rng.integers(0, n, n_neg), float(rng.random())))
        rows = np.zeros(0, np.int64) if b == 2 else rng.choice(n, int(rng.integers(1, 230)), replace=False)
        candidates.append(rows)
        scores.append(np.sort(vectors[rows] @ vector)[::-1].astype(np.float32))
    return users, candidates, scores, items, int(10**9 + rng.integers(0, 10**7))


@pytest.mark.parametrize("seed", range(6))
def test_kernel_equals_numpy_reference_on_random_inputs(seed):
    args = random_batch(np.random.default_rng(seed), words=1 + seed % 3)
    fast = build_features(*args)
    assert_kernel_matches_reference(fast, build_features_numpy(*args), 16)
    # and one query at a time gives the same rows (a query's features do not depend on its batch)
    users, candidates, scores, items, now = args
    single = np.concatenate([build_features([u], [c], [s], items, now) for u, c, s in zip(users, candidates, scores)])
    np.testing.assert_array_equal(fast, single)


def test_kernel_equals_numpy_reference_on_engine_state(engine):
    state = engine.state
    users = users_with_vectors(engine, 12)
    answers = engine.recommend([engine.build_query(u, 150, rerank=False) for u in users])
    with engine.lock:
        contexts = [capture_user(state.users, state.users.rows[u], state.users.query_vector(state.users.rows[u])) for u in users]
        items = ItemArrays.of(state.items)
        now = state_clock_ms(state.items)
    rows = [np.fromiter((state.items.rows[i] for i in a.item_ids), np.int64) for a in answers]
    assert any(len(c.positive_rows) for c in contexts) and any(len(c.negative_rows) for c in contexts)
    args = (contexts, rows, [a.scores for a in answers], items, now)
    assert_kernel_matches_reference(build_features(*args), build_features_numpy(*args), DIM)


def test_capture_user_equals_the_array_version(engine):
    """capture_user's plain loop gives what the former NumPy version (positive_mask on the history) gave."""
    users = engine.state.users
    checked = 0
    for user in users_with_vectors(engine, 40):
        row = users.rows[user]
        history = users.history[row]
        ctx = capture_user(users, row, users.query_vector(row))
        if history:
            item_rows, types, values, _ = (np.asarray(column) for column in zip(*history))
            positive = positive_mask(types[::-1], values[::-1])
            np.testing.assert_array_equal(ctx.positive_rows, item_rows[::-1][positive][:RECENT_POSITIVES])
            np.testing.assert_array_equal(ctx.negative_rows, item_rows[::-1][~positive][:RECENT_NEGATIVES])
            assert ctx.recent_positive_frac == float(positive.mean())
            checked += 1
        assert ctx.positive_rows.dtype == ctx.negative_rows.dtype == np.int64
    assert checked


def test_model_is_warmed_up_when_loaded(tmp_path, monkeypatch):
    """Loading runs one request's worth of rows through the features and the new session, even with no
    catalog to build a probe from, so the first real request does not compile or allocate."""
    shapes = []
    original = RerankModel.score
    monkeypatch.setattr(RerankModel, "score", lambda self, features: shapes.append(features.shape) or original(self, features))
    reranker = Reranker(DIM, provider="cpu")
    reranker.load(make_model(tmp_path / "m.onnx"))
    assert (WARM_CANDIDATES, WIDTH) in shapes
    assert reranker.model is not None


def test_serving_features_equal_training_features(engine, models, monkeypatch):
    """The rows the served model sees are exactly what the training code builds for the same state."""
    from streamrec.engine.offline.rerank_training import step_features

    engine.load_reranker(models["good"])
    captured = []
    model = engine.reranker.model
    original = type(model).score
    monkeypatch.setattr(type(model), "score", lambda self, features: captured.append(features.copy()) or original(self, features))
    users = users_with_vectors(engine, 3)
    retrieved = engine.recommend([engine.build_query(u, 50, rerank=False) for u in users])
    engine.retriever.recommend([engine.build_query(u, 10, rerank=True, candidates=50) for u in users])  # one micro-batch
    assert len(captured) == 1
    expected = np.concatenate([step_features(engine, u, r.item_ids, r.scores) for u, r in zip(users, retrieved)])
    np.testing.assert_array_equal(captured[0], expected)


# --- model files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, message", [
    ("corrupt", "not a loadable ONNX model"),
    ("empty", "not a loadable ONNX model"),
    ("missing", "cannot read"),
    ("wrong_width", f"expected [N, {WIDTH}]"),
    ("fixed_batch", "must be dynamic"),
    ("nan", "non-finite scores"),
    ("wrong_spec", "feature spec"),
    ("wrong_dim", "dimension"),
    ("bad_sidecar", "not valid JSON"),
])
def test_bad_model_is_refused_and_the_old_one_keeps_serving(engine, models, tmp_path, case, message):
    engine.load_reranker(models["good"])
    path = tmp_path / f"{case}.onnx"
    if case == "corrupt":
        path.write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "wrong_width":
        make_model(path, width=WIDTH - 1)
    elif case == "fixed_batch":
        make_model(path, fixed_batch=200)
    elif case == "nan":
        make_model(path, nan=True)
    elif case == "wrong_spec":
        make_model(path, sidecar={"feature_spec": "something-else-v0", "dim": DIM})
    elif case == "wrong_dim":
        make_model(path, sidecar={"feature_spec": FEATURE_SPEC, "dim": 64})
    elif case == "bad_sidecar":
        make_model(path)
        path.with_suffix(".json").write_text("{not json")
    with pytest.raises(RerankerRejected) as refused:
        engine.load_reranker(path)
    assert message in str(refused.value) and str(refused.value).startswith("path: ")
    user = users_with_vectors(engine, 1)[0]
    answer = engine.recommend([engine.build_query(user, 5)])[0]
    assert answer.reranker == "good-v1" and len(answer.item_ids) == 5
    assert engine.reranker_info()["last_error"]


def test_hot_swap_changes_the_order(engine, models):
    user = users_with_vectors(engine, 1)[0]
    engine.load_reranker(models["popular"])
    by_popularity = engine.recommend([engine.build_query(user, 10)])[0]
    assert by_popularity.reranker == "popular-v1"
    counts = [engine.get_item(i).interactions for i in by_popularity.item_ids]
    assert counts == sorted(counts, reverse=True)
    np.testing.assert_allclose(by_popularity.scores, np.log1p(counts), rtol=1e-5)
    engine.load_reranker(models["good"])
    assert engine.recommend([engine.build_query(user, 10)])[0].reranker == "good-v1"
    engine.unload_reranker()
    plain = engine.recommend([engine.build_query(user, 10)])[0]
    assert plain.reranker == "" and plain.retrieval_scores is None
    engine.load_reranker(models["good"])


def test_model_without_sidecar_gets_a_hash_version(engine, tmp_path):
    info = engine.load_reranker(make_model(tmp_path / "bare.onnx", seed=5))
    assert info["version"].startswith("sha256:") and info["loaded"] and info["features"] == WIDTH


def test_provider_is_chosen_once_and_reported(engine):
    assert engine.reranker.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert engine.reranker_info()["provider"] == engine.reranker.provider


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed (extra `train`)")
def test_export_round_trip_torch_vs_onnxruntime(tmp_path):
    from streamrec.engine.offline.rerank_training import TrainConfig, build_model, export_onnx

    cfg = TrainConfig(dim=DIM, hidden=(16, 8), cross_rank=4)
    rng = np.random.default_rng(0)
    model = build_model(WIDTH, rng.standard_normal(WIDTH).astype(np.float32), rng.uniform(0.5, 2, WIDTH).astype(np.float32), cfg)
    import torch

    with torch.no_grad():  # non-trivial weights (the cross layers start as the identity)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    check = export_onnx(model, WIDTH, tmp_path / "m.onnx")
    assert check["max_abs_diff"] <= 1e-5
    loaded = Reranker(DIM, provider="cpu").load(tmp_path / "m.onnx")
    assert loaded.features == WIDTH


# --- over gRPC -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rerank_server(tmp_path_factory, models):
    logging.getLogger("streamrec").setLevel(logging.WARNING)
    engine = EngineConfig(dim=DIM, sync=False, reranker_path=str(models["good"]), rerank_candidates=100)
    srv = StreamrecServer(ServerConfig(host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("rerank-server"),
                                       dataset="synthetic", workers=8, grace_s=1.0, engine=engine))
    srv.start()
    yield srv
    srv.stop(grace_s=1.0)


def test_rerank_on_and_off_return_k_valid_filtered_items(rerank_server):
    with StreamrecClient(rerank_server.address, timeout_s=60.0) as client:
        user = "rr-user"
        client.publish([make_event(user, f"i{n}", "purchase") for n in (1, 2, 3, 4)])
        client.delete_items(["i5"])
        seen = {f"i{n}" for n in (1, 2, 3, 4)}
        excluded = {"i6", "i7"}
        answers = {}
        for mode in (None, True, False):
            response = client.recommend(user, k=25, rerank=mode, exclude_item_ids=sorted(excluded))
            ids = [item.item_id for item in response.items]
            assert len(ids) == 25 and len(set(ids)) == 25
            assert not set(ids) & (seen | excluded | {"i5"})
            assert response.strategy == "personalized"
            answers[mode] = response
        on, off = answers[True], answers[False]
        assert on.served_by.reranker == "good-v1" and answers[None].served_by.reranker == "good-v1"
        assert off.served_by.reranker == ""
        assert all(item.score == item.retrieval_score for item in off.items)
        assert [item.score for item in on.items] == sorted((item.score for item in on.items), reverse=True)
        assert any(item.score != item.retrieval_score for item in on.items)
        # category filter, both ways
        for mode in (True, False):
            response = client.recommend(user, k=5, rerank=mode, include_categories=["c1"])
            assert len(response.items) == 5 and all("c1" in item.categories for item in response.items)
        # bad candidate count names the field
        with pytest.raises(grpc.RpcError) as error:
            client.recommend(user, k=5, rerank=True, candidates=5000)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rerank.candidates" in error.value.details()


def test_load_reranker_rpc_refuses_bad_files_and_keeps_serving(rerank_server, models, tmp_path):
    with StreamrecClient(rerank_server.address, timeout_s=60.0) as client:
        bad = tmp_path / "nan.onnx"
        make_model(bad, nan=True)
        with pytest.raises(grpc.RpcError) as error:
            client.load_reranker(str(bad))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in error.value.details()
        stats = client.stats()
        assert stats.reranker.loaded and stats.reranker.version == "good-v1" and stats.reranker.refused >= 1
        assert "non-finite" in stats.reranker.last_error
        assert stats.reranker.default_candidates == 100 and stats.reranker.feature_spec == FEATURE_SPEC
        assert client.recommend("u1", k=3).served_by.reranker in ("good-v1", "")  # "" only if u1 is cold

        info = client.load_reranker(str(models["popular"]))
        assert info.version == "popular-v1" and info.loaded and info.provider
        assert client.load_reranker().version == "popular-v1"  # re-read the current file
        assert not client.load_reranker(unload=True).loaded
        assert client.recommend("rr-user", k=3).served_by.reranker == ""
        assert client.load_reranker(str(models["good"])).version == "good-v1"
