"""The fair online peers (engine/offline/peers.py) and the paired significance tests (engine/offline/significance.py)
of issue 19: each peer's math on tiny hand-made logs, the tests on cases with known answers, and `streamrec
evaluate` reporting both."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from streamrec.engine.api import Event, EventType
from streamrec.engine.offline import evaluation as ev
from streamrec.engine.offline import peers, significance
from streamrec.engine.offline.datasets import Dataset, build_interactions, synthetic
from streamrec.engine.signals import event_confidences
from streamrec.cli import evaluate as evaluate_cli

R = EventType.RATING
ITEMS = ["i0", "i1", "i2", "i3"]
NONE = np.array([], np.int64)
# The 3-user / 4-item matrix of the hand checks: u0 {i0, i1}, u1 {i0, i2}, u2 {i1, i2, i3}.
X = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]], np.float64)


def make_dataset(rows, items=ITEMS) -> Dataset:
    """rows: (user, item, type, value, timestamp_ms)."""
    users, its, types, values, ts = zip(*rows)
    return Dataset("hand", build_interactions(users, its, types, values, ts), {i: [] for i in items},
                   {i: {} for i in items})


def matrix_dataset(x: np.ndarray = X) -> Dataset:
    """A 5-star rating for every 1 of x, user by user."""
    rows = [(f"u{u}", ITEMS[i], R, 5, 10 * u + i) for u in range(x.shape[0]) for i in np.flatnonzero(x[u])]
    return make_dataset(rows)


_event_numbers = itertools.count()


def event(user, item, value=5.0, event_type=R) -> Event:
    """A replay event (later than every training event of these logs)."""
    n = next(_event_numbers)
    return Event(f"t{n}", user, item, event_type, float(value), 1000 + n)


# --- shared pieces ----------------------------------------------------------------------------------------

def test_user_history_matches_confidence_matrix():
    data = make_dataset([("a", "i0", R, 5, 0), ("a", "i0", R, 2, 1), ("a", "i2", EventType.VIEW, 1, 2),
                         ("b", "i3", EventType.DISLIKE, 1, 3), ("b", "i1", R, 4, 4), ("b", "x", R, 5, 5)])
    catalog = ev.Catalog.of(data)
    matrix, user_index = ev.confidence_matrix(data.interactions, catalog)
    history = peers.UserHistory(catalog, data.interactions)
    for user, index in user_index.items():
        rows, weights = history.row(user, "confidence")
        dense = np.zeros(len(catalog))
        dense[rows] = weights
        assert dense == pytest.approx(matrix[index].toarray().ravel(), rel=1e-6)  # the dislike is dropped
    assert history.row("b", "binary")[0].tolist() == [1] and history.row("nobody")[0].tolist() == []
    # a 4 is worth 1 + 0.5 * 0.5, a 5 then adds 1 + 0.5 * 1: learn returns (row, sum before, sum after)
    assert history.learn(event("b", "i1", 5.0)) == (1, pytest.approx(1.25), pytest.approx(2.75))


def test_rank_with_ties_goes_by_score_then_tiebreak_then_row():
    scores = np.array([0.0, 1.0, 1.0, 0.0, 0.5, 0.0])
    tiebreak = np.array([5.0, 1.0, 3.0, 9.0, 0.0, 5.0])
    assert peers.rank_with_ties(scores, tiebreak, 5, np.array([4])).tolist() == [2, 1, 3, 0, 5]
    assert peers.rank_with_ties(scores, tiebreak, 10, np.array([0, 1, 2, 3])).tolist() == [4, 5]


# --- EASE -------------------------------------------------------------------------------------------------

def test_ease_matches_the_hand_derivation():
    """With diag(B) = 0 the EASE objective splits into one ridge regression per column j: B[-j, j] =
    (X_-j^T X_-j + lam I)^-1 X_-j^T x_j. Column i3 by hand (lam = 1): X_-3^T X_-3 + I = 2I + J, whose inverse
    is I/2 - J/10, and X_-3^T x_3 = (0, 1, 1), so B[:3, 3] = (-0.2, 0.3, 0.3)."""
    from scipy.sparse import csr_matrix

    b = peers.ease_weights(csr_matrix(X), 1.0)
    assert b[:, 3] == pytest.approx([-0.2, 0.3, 0.3, 0.0])
    for j in range(4):
        others = [i for i in range(4) if i != j]
        xo = X[:, others]
        assert b[others, j] == pytest.approx(np.linalg.solve(xo.T @ xo + np.eye(3), xo.T @ X[:, j]))
        assert b[j, j] == 0.0

    catalog = ev.Catalog(ITEMS)
    model = peers.EASE(matrix_dataset(), catalog, {"lambda": 1.0, "weighting": "binary"})
    model.learn(event("new", "i1"))
    assert model.user_scores("new") == pytest.approx(b[1])  # the history row (0, 1, 0, 0) @ B
    model.learn(event("new", "i2"))
    assert model.user_scores("new") == pytest.approx(b[1] + b[2])  # updated in place, as a fresh product
    assert (b[1] + b[2])[[0, 3]] == pytest.approx([2 / 3, 0.6])  # i0 by 1/3 + 1/3, i3 by 0.3 + 0.3
    assert model.recommend("new", 2, np.array([1, 2])) == ["i0", "i3"]


# --- item-kNN ---------------------------------------------------------------------------------------------

def test_item_knn_cosines_and_scores_by_hand():
    """Columns of X: i0 = u0+u1, i1 = u0+u2, i2 = u1+u2, i3 = u2. Cosines: i0-i1, i0-i2, i1-i2 share one user of
    two each (1/2); i1-i3 and i2-i3 share u2 (1/sqrt 2); i0-i3 none (0)."""
    from scipy.sparse import csr_matrix

    h = 1 / np.sqrt(2)
    expected = np.array([[0, .5, .5, 0], [.5, 0, .5, h], [.5, .5, 0, h], [0, h, h, 0]])
    assert peers.knn_similarities(csr_matrix(X), 4) == pytest.approx(expected)
    top1 = peers.knn_similarities(csr_matrix(X), 1)  # each item keeps its single nearest neighbour
    assert (top1 > 0).sum(axis=1).tolist() == [1, 1, 1, 1] and top1[1] == pytest.approx([0, 0, 0, h])

    catalog = ev.Catalog(ITEMS)
    model = peers.ItemKNN(matrix_dataset(), catalog, {"neighbours": 4, "weighting": "binary"})
    assert model.user_scores("u0") == pytest.approx([0.5, 0.5, 1.0, h])  # sum of rows i0 and i1
    assert model.recommend("u0", 4, np.array([0, 1])) == ["i2", "i3"]
    model.learn(event("newcomer", "i1"))
    assert model.user_scores("newcomer") == pytest.approx([0.5, 0, 0.5, h])
    # i0 and i2 tie at 0.5 and on all-time popularity (2 positives each): row order; one more i2 breaks the tie
    assert model.recommend("newcomer", 3, np.array([1])) == ["i3", "i0", "i2"]
    model.learn(event("someone", "i2"))
    assert model.recommend("newcomer", 3, np.array([1])) == ["i3", "i2", "i0"]
    assert model.recommend("stranger", 2, NONE) == ["i1", "i2"] and model.popularity_steps == 1


# --- iALS fold-in -------------------------------------------------------------------------------------------

def dense_fold_in(y, rows, strengths, alpha, reg):
    """The textbook solve over every item: x = (Y^T C Y + reg I)^-1 Y^T C p, c = alpha * r observed, 1 elsewhere."""
    c = np.ones(len(y))
    c[rows] = alpha * np.asarray(strengths)
    p = np.zeros(len(y))
    p[rows] = 1.0
    return np.linalg.solve(y.T @ (c[:, None] * y) + reg * np.eye(y.shape[1]), y.T @ (c * p))


def test_ials_fold_in_equals_a_direct_solve_and_implicits_own():
    rng = np.random.default_rng(5)
    y = rng.normal(size=(12, 4))
    rows, strengths, alpha, reg = np.array([1, 4, 7]), np.array([0.7, 1.2, 0.4]), 3.0, 0.8
    x = peers.ials_fold_in(y, y.T @ y + reg * np.eye(4), rows, strengths, alpha)
    assert x == pytest.approx(dense_fold_in(y, rows, strengths, alpha, reg), rel=1e-10)

    if ev.implicit_available():
        return
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # as fit_implicit does; implicit warns about a multi-threaded BLAS otherwise
        model = AlternatingLeastSquares(factors=4, regularization=reg, alpha=alpha)
    model.item_factors = y.astype(np.float32)
    row = csr_matrix((strengths.astype(np.float32), (np.zeros(3), rows)), shape=(1, 12))
    assert x == pytest.approx(model.recalculate_user(0, row), rel=1e-3, abs=1e-4)


def test_ials_fold_in_peer_uses_the_whole_current_history():
    if reason := ev.implicit_available():
        pytest.skip(reason)
    small = synthetic(n_users=40, n_items=30, n_clusters=3, events_per_user=10, seed=1)
    catalog = ev.Catalog.of(small)
    params = {"factors": 4, "regularization": 2.0, "alpha": 3.0, "iterations": 3}
    model = peers.IALSFoldIn(small, catalog, params)
    user = str(small.interactions.user_ids[0])
    extra = catalog.ids[0]
    model.learn(event(user, extra, 5.0))
    model.learn(event(user, extra, 4.0))
    sums = {}  # the user's training events plus the two learned ones, aggregated by hand
    log = small.interactions
    learned = [(user, extra, R, 5.0), (user, extra, R, 4.0)]
    for u, i, t, v in [*zip(log.user_ids, log.item_ids, log.types, log.values), *learned]:
        if u == user:
            row = catalog.row(str(i))
            sums[row] = sums.get(row, 0.0) + float(event_confidences(np.array([int(t)]), np.array([v]))[0])
    rows = np.array(sorted(r for r, total in sums.items() if total > 0))  # net-negative pairs are unobserved
    strengths = np.log1p([sums[r] for r in rows])
    expected = dense_fold_in(model.item_factors, rows, strengths, params["alpha"], params["regularization"])
    assert model.user_vector(user) == pytest.approx(expected, rel=1e-8)
    top = model.recommend(user, 3, rows)
    assert top == [catalog.ids[r] for r in peers.rank_with_ties(model.item_factors @ expected,
                                                                 model.popularity.counts, 3, rows)]


# --- recent-window popularity ---------------------------------------------------------------------------------

def test_recent_popularity_counts_the_last_w_events():
    data = make_dataset([("a", "i0", R, 5, 0), ("b", "i0", R, 5, 1), ("c", "i1", R, 5, 2), ("d", "i2", R, 2, 3),
                         ("e", "i1", R, 4, 4)])
    catalog = ev.Catalog.of(data)
    model = peers.RecentPopularity(catalog, data.interactions, {"window": 3})
    # the training tail is i1 (+), i2 (a 2 is not positive), i1 (+); i0's two positives are older
    assert model.recent.tolist() == [0, 2, 0, 0]
    assert model.recommend("x", 3, NONE) == ["i1", "i0", "i2"]  # zeros: i0 first by all-time popularity (2)
    for item in ("i3", "i3", "i2"):
        model.learn(event("f", item))
    assert model.recent.tolist() == [0, 0, 1, 2]  # the window holds only the three learned events now
    assert model.recommend("x", 4, np.array([3])) == ["i2", "i0", "i1"]  # i0 and i1 tie on all-time counts: row
    model.learn(event("g", "i1", event_type=EventType.SKIP, value=1.0))  # not positive, still fills the window
    assert model.recent.tolist() == [0, 0, 1, 1]


def test_tune_peer_picks_the_best_validation_ndcg():
    small = synthetic(n_users=60, n_items=80, n_clusters=3, events_per_user=15, seed=2)
    catalog = ev.Catalog.of(small)
    grid = [{"window": 20}, {"window": 400}]
    chosen, trials = peers.tune_peer(peers.builders(catalog)["recent-pop"], grid, small, catalog)
    assert [t["params"] for t in trials] == grid
    assert chosen == max(trials, key=lambda t: (t["ndcg"], t["hr"]))["params"]


# --- significance -----------------------------------------------------------------------------------------------

def test_mcnemar_exact_p_values():
    def hits(only_a, only_b, both=5, neither=7):
        a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
        b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
        return np.array(a), np.array(b)

    assert significance.mcnemar(*hits(10, 0))["p_value"] == pytest.approx(2 * 0.5**10)
    assert significance.mcnemar(*hits(3, 9))["p_value"] == pytest.approx(2 * (1 + 12 + 66 + 220) / 4096)
    assert significance.mcnemar(*hits(4, 4))["p_value"] == 1.0
    assert significance.mcnemar(*hits(0, 0)) == {"only_a": 0, "only_b": 0, "p_value": 1.0,
                                                  "method": "exact McNemar (binomial)"}


def test_paired_bootstrap_known_answers():
    ones, zeros = np.ones(50), np.zeros(50)
    sure = significance.paired_bootstrap(ones, zeros, resamples=999)
    assert (sure.difference, sure.ci_low, sure.ci_high) == (1.0, 1.0, 1.0)
    assert sure.p_value == pytest.approx(2 / 1000)  # never on the other side: the smallest p it can give
    same = significance.paired_bootstrap(ones, ones, resamples=999)
    assert (same.difference, same.p_value) == (0.0, 1.0)

    # Paired normal differences: the CI and p should match the normal theory of a mean (z = 2.5 here).
    rng = np.random.default_rng(0)
    n, sd = 4000, 1.0
    diff = rng.normal(0.0, sd, n)
    diff = diff - diff.mean() + 2.5 * sd / np.sqrt(n)
    base = rng.normal(size=n)
    result = significance.paired_bootstrap(base + diff, base, resamples=10_000, seed=1)
    half = 1.96 * diff.std() / np.sqrt(n)
    assert result.difference == pytest.approx(diff.mean())
    assert result.ci_low == pytest.approx(diff.mean() - half, abs=0.1 * half)
    assert result.ci_high == pytest.approx(diff.mean() + half, abs=0.1 * half)
    assert result.p_value == pytest.approx(0.0124, abs=0.005)  # 2 * (1 - Phi(2.5))
    flipped = significance.paired_bootstrap(base, base + diff, resamples=10_000, seed=1)
    assert flipped.difference == pytest.approx(-result.difference) and flipped.p_value == pytest.approx(result.p_value)


# --- streamrec evaluate -------------------------------------------------------------------------------------------

def test_evaluate_reports_online_peers_and_paired_tests(tmp_path, capsys):
    small = synthetic(n_users=150, n_items=300, n_clusters=6, events_per_user=30, seed=3)
    parser = evaluate_cli.argparse.ArgumentParser()
    evaluate_cli.add_arguments(parser)
    models = "popularity,online,ials-foldin,ease,itemknn,recent-pop"
    args = parser.parse_args(["--models", models, "--dim", "16", "--no-tune", "--limit", "800", "--resamples", "200",
                              "--json", str(tmp_path / "q.json")])
    assert evaluate_cli.run(args, dataset=small) == 0
    by_model = {r["model"]: r for r in json.loads((tmp_path / "q.json").read_text())}
    peer_names = [evaluate_cli.NAMES[key] for key in evaluate_cli.ONLINE_PEERS]
    assert set(by_model) == {"popularity", "streamrec online", *peer_names}
    events = by_model["streamrec online"]["events"]
    for name in [*peer_names, "popularity"]:
        record = by_model[name]
        assert record["events"] == events > 100
        test = record["vs_streamrec_online"]
        ndcg = test["ndcg@10"]
        assert ndcg["difference"] == pytest.approx(by_model["streamrec online"]["ndcg@10"] - record["ndcg@10"])
        assert ndcg["ci_low"] <= ndcg["difference"] <= ndcg["ci_high"] and 0 < ndcg["p_value"] <= 1
        assert {"only_a", "only_b", "p_value"} <= set(test["mcnemar_hr@10"])
        by_user = test["ndcg@10_by_user"]  # resampling users: the same estimate, another interval
        assert by_user["difference"] == pytest.approx(ndcg["difference"]) and "users" in by_user["method"]
    assert by_model[evaluate_cli.NAMES["ease"]]["details"]["params"] == peers.EASE_DEFAULT
    out = capsys.readouterr().out
    assert "streamrec online minus" in out and evaluate_cli.NAMES["ials-foldin"] in out


def test_bootstrap_by_user_resamples_whole_users():
    rng = np.random.default_rng(3)
    a, b = rng.random(300), rng.random(300)
    # one event per user: the same resamples as the event bootstrap, so the same answer
    by_event = significance.paired_bootstrap(a, b, resamples=2000, seed=4)
    singletons = significance.paired_bootstrap(a, b, resamples=2000, seed=4, groups=np.arange(300))
    assert (singletons.ci_low, singletons.ci_high, singletons.p_value) == pytest.approx(
        (by_event.ci_low, by_event.ci_high, by_event.p_value))
    # every user's event copied 9 times: resampling users gives the interval of the 300 distinct events, while
    # resampling events wrongly treats the copies as independent and shrinks it by about sqrt(9) = 3
    copies_a, copies_b, users = np.repeat(a, 9), np.repeat(b, 9), np.repeat(np.arange(300), 9)
    clustered = significance.paired_bootstrap(copies_a, copies_b, resamples=2000, seed=4, groups=users)
    naive = significance.paired_bootstrap(copies_a, copies_b, resamples=2000, seed=4)
    assert (clustered.ci_low, clustered.ci_high) == pytest.approx((by_event.ci_low, by_event.ci_high))
    assert (clustered.ci_high - clustered.ci_low) / (naive.ci_high - naive.ci_low) == pytest.approx(3.0, rel=0.1)
    assert clustered.events == 2700 and "300 users" in clustered.method
