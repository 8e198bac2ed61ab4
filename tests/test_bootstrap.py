from __future__ import annotations

import numpy as np
import pytest

from streamrec.engine.api import EventType
from streamrec.engine.offline import svd as bootstrap
from streamrec.engine.offline.datasets import Interactions, build_interactions, load_ml100k, synthetic, synthetic_truth
from streamrec.engine.offline.svd import Factors, confidence_matrix, factorize
from streamrec.engine.signals import event_confidences, is_positive


def subset(it: Interactions, mask: np.ndarray) -> Interactions:
    return Interactions(it.user_ids[mask], it.item_ids[mask], it.types[mask], it.values[mask], it.timestamps_ms[mask])


def leave_last_out(it: Interactions) -> tuple[Interactions, dict[str, str]]:
    """Hold out each user's latest positive event on an item the user touched only that once."""
    pair_count: dict[tuple[str, str], int] = {}
    for pair in zip(it.user_ids, it.item_ids):
        pair_count[pair] = pair_count.get(pair, 0) + 1
    held: dict[str, int] = {}
    for i in range(len(it) - 1, -1, -1):  # the log is sorted by time: walk back from the end
        u, item = it.user_ids[i], it.item_ids[i]
        if u not in held and pair_count[(u, item)] == 1 and is_positive(int(it.types[i]), float(it.values[i])):
            held[u] = i
    keep = np.ones(len(it), dtype=bool)
    keep[list(held.values())] = False
    return subset(it, keep), {u: str(it.item_ids[i]) for u, i in held.items()}


def hit_rate(f: Factors, train: Interactions, held: dict[str, str], k: int) -> tuple[float, float]:
    """(HR@k of the held-out item by cosine among unseen items, the same for a random ranking)."""
    user_row = {u: j for j, u in enumerate(f.user_ids)}
    item_col = {x: j for j, x in enumerate(f.item_ids)}
    seen: dict[str, list[int]] = {}
    for u, x in zip(train.user_ids, train.item_ids):
        seen.setdefault(u, []).append(item_col[x])
    scores = f.user_vectors @ f.item_vectors.T  # unit rows: this is the cosine
    hits = random = 0.0
    for u, x in held.items():
        s = scores[user_row[u]].copy()
        s[seen[u]] = -np.inf
        hits += item_col[x] in np.argpartition(-s, k)[:k]
        random += k / (len(f.item_ids) - len(set(seen[u])))
    return hits / len(held), random / len(held)


def check_unit_rows(x: np.ndarray, dim: int) -> None:
    assert x.dtype == np.float32 and x.shape[1] == dim and np.isfinite(x).all()
    norms = np.linalg.norm(x, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))


@pytest.fixture(scope="module")
def syn():
    return synthetic()


@pytest.fixture(scope="module")
def syn_factors(syn):
    return factorize(syn.interactions, item_ids=list(syn.item_categories) + ["never-seen"])


@pytest.fixture(scope="module")
def syn_split(syn):
    train, held = leave_last_out(syn.interactions)
    return train, held, factorize(train, item_ids=list(syn.item_categories))


def test_synthetic_held_out_hit_rate(syn_split):
    train, held, f = syn_split
    assert len(held) > 450
    hr, random = hit_rate(f, train, held, k=20)
    assert hr >= 5 * random, (hr, random)


def test_synthetic_planted_clusters_recovered(syn_factors):
    truth = synthetic_truth()
    f = syn_factors
    cluster = np.array([truth.item_cluster.get(x, "none") for x in f.item_ids])
    # Items: the nearest other item (cosine) is mostly in the same cluster (random: 10%).
    sims = f.item_vectors @ f.item_vectors.T
    np.fill_diagonal(sims, -2.0)
    assert np.mean(cluster[sims.argmax(axis=1)] == cluster) > 0.5
    # Users: the top-20 items are mostly from the preferred clusters (random: ~15%).
    top = np.argsort(-(f.user_vectors @ f.item_vectors.T), axis=1)[:, :20]
    in_pref = [np.isin(cluster[row], truth.user_clusters[u]).mean() for u, row in zip(f.user_ids, top)]
    assert np.mean(in_pref) > 0.8


def test_unit_norm_exact_dims_and_catalog_order(syn, syn_factors):
    f = syn_factors
    assert f.item_ids == list(syn.item_categories) + ["never-seen"] and len(f.user_ids) == 500
    assert f.user_ids == list(dict.fromkeys(syn.interactions.user_ids.tolist()))  # first appearance
    check_unit_rows(f.user_vectors, 64)
    check_unit_rows(f.item_vectors, 64)
    assert not f.item_vectors[-1].any()  # no interactions: zero vector
    assert f.singular_values.shape == (64,) and np.all(np.diff(f.singular_values) <= 0)


def test_deterministic(syn, syn_factors):
    again = factorize(syn.interactions, item_ids=list(syn.item_categories) + ["never-seen"])
    np.testing.assert_array_equal(again.user_vectors, syn_factors.user_vectors)
    np.testing.assert_array_equal(again.item_vectors, syn_factors.item_vectors)


def test_randomized_path_matches_dense(syn, syn_split, monkeypatch):
    train, held, dense = syn_split
    monkeypatch.setattr(bootstrap, "DENSE_MAX_ENTRIES", 0)
    rand = factorize(train, seed=1, item_ids=dense.item_ids)
    np.testing.assert_array_equal(rand.item_vectors, factorize(train, seed=1, item_ids=dense.item_ids).item_vectors)
    np.testing.assert_allclose(rand.singular_values[:10], dense.singular_values[:10], rtol=1e-3)
    check_unit_rows(rand.user_vectors, 64)
    check_unit_rows(rand.item_vectors, 64)
    hr, random = hit_rate(rand, train, held, k=20)
    assert hr >= 5 * random, (hr, random)


def test_dim_beyond_rank_is_zero_padded():
    it = build_interactions(["a", "a", "b", "c"], ["x", "y", "y", "z"], [EventType.PURCHASE] * 4, [1.0] * 4,
                            [1, 2, 3, 4])
    f = factorize(it, dim=16)
    assert f.user_vectors.shape == (3, 16) and f.item_vectors.shape == (3, 16)
    check_unit_rows(f.user_vectors, 16)
    check_unit_rows(f.item_vectors, 16)
    assert np.count_nonzero(f.singular_values) == 3 and not f.item_vectors[:, 3:].any()
    assert f.item_ids == ["x", "y", "z"]


def test_confidences():
    types = np.array([EventType.VIEW, EventType.PURCHASE, EventType.RATING, EventType.RATING, EventType.DISLIKE])
    values = np.array([1, 1, 1, 5, 1])
    np.testing.assert_allclose(event_confidences(types, values), [0.25, 1.0, 0.5, 1.5, -1.0])
    # u1 viewed then disliked x (net negative: dropped); u2 only skipped: a user with a zero vector.
    it = build_interactions(["u1", "u1", "u1", "u2", "u3"], ["x", "x", "y", "y", "y"],
                            [EventType.VIEW, EventType.DISLIKE, EventType.CLICK, EventType.SKIP, EventType.RATING],
                            [1, 1, 1, 1, 2], [1, 2, 3, 4, 5])
    users, items, rows, cols, vals = confidence_matrix(it)
    assert users == ["u1", "u2", "u3"] and items == ["x", "y"]
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (2, 1)]  # u1-y, u3-y (a rating of 2 still counts)
    np.testing.assert_allclose(vals, np.log1p([0.5, 0.75]))
    f = factorize(it, dim=4)
    assert not f.user_vectors[1].any() and not f.item_vectors[0].any()


def test_item_ids_argument_validation():
    it = build_interactions(["u1", "u1"], ["x", "gone"], [EventType.CLICK] * 2, [1.0] * 2, [1, 2])
    f = factorize(it, dim=2, item_ids=["x", "y"])
    assert f.item_ids == ["x", "y"] and f.item_vectors[0].any() and not f.item_vectors[1].any()
    with pytest.raises(ValueError, match="duplicates"):
        factorize(it, item_ids=["x", "x"])
    empty = factorize(build_interactions([], [], [], [], []), dim=8, item_ids=["a"])
    assert empty.user_vectors.shape == (0, 8) and empty.item_vectors.shape == (1, 8) and not empty.item_vectors.any()


def test_ml100k_held_out_hit_rate():
    """Real MovieLens-100K (downloaded once, then cached): each user's last liked movie is held out."""
    ds = load_ml100k()
    train, held = leave_last_out(ds.interactions)
    assert len(held) > 900
    f = factorize(train, item_ids=list(ds.item_categories))
    hr, random = hit_rate(f, train, held, k=10)
    assert hr >= 10 * random and hr > 0.1, (hr, random)
