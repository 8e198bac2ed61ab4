"""Offline training: iALS kernels against the NumPy reference, loss and recovery of planted structure, the
fold-in, and the `streamrec train` command."""
from __future__ import annotations

import numpy as np
import pytest

from streamrec.engine.config import EngineConfig
from streamrec.engine.cpu.ials import solve_sweep
from streamrec.engine.engine import Engine
from streamrec.engine.offline import ials
from streamrec.engine.offline.datasets import synthetic, synthetic_truth
from streamrec.engine.offline.training import fold_in_users, hit_rate, leave_last_out, train
from streamrec.engine.state import online

SMALL = dict(n_users=300, n_items=600, n_clusters=6, events_per_user=40, seed=3)


@pytest.fixture(scope="module")
def syn():
    return synthetic(**SMALL)


@pytest.fixture(scope="module")
def trained(syn):
    train_part, held = leave_last_out(syn.interactions)
    result = train(train_part, dim=16, epochs=8, item_ids=list(syn.item_categories), validation=held, progress=False)
    return train_part, held, result


def random_pairs(seed=0, users=30, items=40, density=0.2):
    rng = np.random.default_rng(seed)
    mask = rng.random((users, items)) < density
    rows, cols = np.nonzero(mask)
    return ials.PairMatrix([f"u{u}" for u in range(users)], [f"i{i}" for i in range(items)], rows, cols,
                           rng.uniform(0.1, 1.5, len(rows)), (rng.random(len(rows)) < 0.8).astype(np.float64))


def test_cg_sweep_equals_exact_reference_solves():
    pairs = random_pairs()
    rng = np.random.default_rng(1)
    y = rng.normal(size=(40, 8))
    exact = ials.solve_sweep_reference(y, pairs.csr(), alpha=5.0, reg=0.5)
    x = solve_sweep(rng.normal(size=(30, 8)), y, pairs.csr(), alpha=5.0, reg=0.5, steps=40)  # any warm start
    np.testing.assert_allclose(x, exact, rtol=1e-7, atol=1e-9)
    # A few steps from a warm start already land close (what training uses).
    start = exact + 0.01 * rng.normal(size=exact.shape)
    x3 = solve_sweep(start.copy(), y, pairs.csr(), 5.0, 0.5, steps=3)
    assert np.linalg.norm(x3 - exact) < 0.5 * np.linalg.norm(start - exact)


def test_exact_epochs_lower_the_loss_monotonically():
    pairs = random_pairs(2)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 6)) * 0.1, rng.normal(size=(40, 6)) * 0.1
    losses = [ials.loss(x, y, pairs, 5.0, 0.5)]
    for _ in range(5):
        x, y = ials.ials_epoch_reference(x, y, pairs, 5.0, 0.5)
        losses.append(ials.loss(x, y, pairs, 5.0, 0.5))
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:])) and losses[-1] < 0.5 * losses[0]


def test_loss_matches_the_dense_definition():
    pairs = random_pairs(4, users=6, items=7, density=0.4)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(7, 3))
    p, c = np.zeros((6, 7)), np.ones((6, 7))
    p[pairs.rows, pairs.cols] = pairs.pref
    c[pairs.rows, pairs.cols] = 1 + 4.0 * pairs.strength
    dense = (np.sum(c * (p - x @ y.T) ** 2) + 0.3 * (np.sum(x * x) + np.sum(y * y))) / len(pairs.rows)
    assert ials.loss(x, y, pairs, 4.0, 0.3) == pytest.approx(dense, rel=1e-12)


def test_training_lowers_loss_and_beats_random(trained, syn):
    train_part, held, result = trained
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.7 * losses[0] and min(losses[2:]) < losses[1]
    hr = result.history[-1]["hr@10 (served)"]
    random_hr = 10 / len(syn.item_categories)
    assert hr > 10 * random_hr, (hr, random_hr)
    assert result.history[-1]["hr@10"] > result.history[0]["hr@10"]


def test_planted_clusters_recovered(trained, syn):
    """Each user's top-20 items by cosine come mostly from the user's planted clusters (random: ~1/4)."""
    truth = synthetic_truth(n_users=SMALL["n_users"], n_items=SMALL["n_items"], n_clusters=SMALL["n_clusters"], seed=SMALL["seed"])
    _, _, result = trained
    f = result.factors
    scores = f.user_vectors @ f.item_vectors.T
    share = []
    for row, user in enumerate(f.user_ids):
        top = np.argsort(-scores[row])[:20]
        share.append(np.mean([truth.item_cluster[f.item_ids[i]] in truth.user_clusters[user] for i in top]))
    assert np.mean(share) > 0.8, np.mean(share)
    # Items of one cluster sit together: mean cosine within clusters far above across clusters.
    clusters = np.array([truth.item_cluster[i] for i in f.item_ids])
    sims = f.item_vectors @ f.item_vectors.T
    same = clusters[:, None] == clusters[None, :]
    assert sims[same].mean() > sims[~same].mean() + 0.3


def test_unit_item_vectors_and_deterministic(trained, syn):
    train_part, _, result = trained
    norms = np.linalg.norm(result.factors.item_vectors, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))
    again = train(train_part, dim=16, epochs=8, item_ids=list(syn.item_categories), progress=False)
    assert again.factors.item_vectors.tobytes() == result.factors.item_vectors.tobytes()
    assert again.user_raw.tobytes() == result.user_raw.tobytes()
    assert result.model_version("syn") == "ials-syn-d16-e8-s0"


def test_fold_in_equals_the_full_solve(trained):
    """A user's fold-in against fixed items equals that user's row of a full user sweep, and the online
    model's exact fold-in is the same solve."""
    train_part, _, result = trained
    pairs = ials.pair_matrix(train_part, result.factors.item_ids)
    y = result.factors.item_vectors.astype(np.float64)
    sweep = ials.solve_sweep_reference(y, pairs.csr(), alpha=10.0, reg=10.0)
    folded = fold_in_users(y, pairs, 10.0, 10.0)
    np.testing.assert_allclose(folded, sweep, rtol=1e-6, atol=1e-8)
    indptr, indices, strength, pref = pairs.csr()
    for u in (0, 17, 123):
        lo, hi = indptr[u], indptr[u + 1]
        one = online.fold_in_exact(ials.gram(y), y[indices[lo:hi]], 10.0 * strength[lo:hi], pref[lo:hi], 10.0)
        np.testing.assert_allclose(one, sweep[u], rtol=1e-9, atol=1e-12)


def test_svd_method_still_available(syn):
    result = train(syn.interactions, method="svd", dim=8, item_ids=list(syn.item_categories), progress=False)
    assert result.factors.item_vectors.shape == (len(syn.item_categories), 8)
    assert result.model_version("s") == "svd-s-d8-s0"


def test_train_command_writes_a_store_and_refuses_an_existing_one(tmp_path, capsys):
    from streamrec.cli import main

    argv = ["train", "--dataset", "synthetic", "--data-dir", str(tmp_path), "--dim", "16", "--epochs", "3", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch   3  loss" in out and "ials-synthetic-0-d16-e3-s0" in out
    with Engine(tmp_path / "lmdb", EngineConfig(dim=16, backend="numpy")) as engine:
        stats = engine.stats()
        assert stats.served_by.model_version == "ials-synthetic-0-d16-e3-s0"
        assert stats.items == 2000 and stats.users == 500
        assert engine.recommend([engine.build_query("u1", 5)])[0].strategy == "personalized"
    assert main(argv) == 1
    assert "already holds a store" in capsys.readouterr().err
