"""Paired significance tests for the prequential comparison (issue 19).

Every model of one `streamrec evaluate` run is scored on the same evaluated events, so two models' per-event
metrics pair up and their difference can be tested event by event (much tighter than comparing two means):

  paired_bootstrap  mean difference of a per-event metric (NDCG@k, or HR@k as 0/1), percentile 95% CI from
                    resampling events with replacement, and the two-sided bootstrap p-value (twice the share of
                    resampled differences on the other side of 0, so p < 0.05 exactly when the 95% CI excludes 0,
                    up to the +1 correction)
  mcnemar           exact McNemar test on hits: only events where one model hits and the other misses count;
                    under the null each such event goes either way with probability 1/2 (two-sided binomial)

Events of one user are not independent (the ML-100K replay is ~300 users' sessions, up to ~270 evaluated events
each), so resampling events gives intervals that are too narrow. `paired_bootstrap(..., groups=user codes)`
resamples whole users instead (the cluster bootstrap; the estimate stays the mean over events), the
conservative figure; `compare` reports both when it is given the users.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class PairedResult:
    metric: str
    events: int
    mean_a: float
    mean_b: float
    difference: float  # mean_a - mean_b
    ci_low: float
    ci_high: float
    p_value: float  # never below 2 / (resamples + 1): the bootstrap cannot resolve smaller ones
    method: str
    resamples: int

    def record(self) -> dict:
        return asdict(self)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, metric: str = "metric", resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95, chunk: int = 500, groups: np.ndarray | None = None) -> PairedResult:
    """Paired bootstrap of mean(a - b) over events (see the module docstring). groups: one code per event
    (0..G-1, e.g. the user); when given, whole groups are resampled and each resample's estimate is its summed
    difference over its event count."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two equal-length, non-empty 1-d arrays, got {a.shape} and {b.shape}")
    diff = a - b
    if groups is None:  # every event its own group: the same computation, one event per unit
        sums, counts = diff, np.ones(len(diff))
    else:
        codes = np.asarray(groups, np.int64)
        if codes.shape != diff.shape:
            raise ValueError(f"groups has shape {codes.shape}, the metrics {diff.shape}")
        sums, counts = np.bincount(codes, weights=diff), np.bincount(codes).astype(np.float64)
        sums, counts = sums[counts > 0], counts[counts > 0]
    units = len(sums)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, np.float64)
    for start in range(0, resamples, chunk):  # chunks bound the index matrix's memory (chunk x units)
        stop = min(start + chunk, resamples)
        picked = rng.integers(0, units, (stop - start, units))
        means[start:stop] = sums[picked].sum(axis=1) / counts[picked].sum(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    other_side = min(int(np.sum(means <= 0.0)), int(np.sum(means >= 0.0)))
    p_value = min(1.0, 2.0 * (other_side + 1) / (resamples + 1))
    unit = "events" if groups is None else f"{units} users"
    return PairedResult(metric, len(diff), float(a.mean()), float(b.mean()), float(diff.mean()), float(low),
                        float(high), p_value, f"paired bootstrap over {unit}, {resamples} resamples", resamples)


def mcnemar(hits_a: np.ndarray, hits_b: np.ndarray) -> dict:
    """Exact McNemar test: (a hit, b miss) and (a miss, b hit) counts and the two-sided binomial p-value."""
    from scipy.stats import binomtest

    hits_a, hits_b = np.asarray(hits_a, bool), np.asarray(hits_b, bool)
    if hits_a.shape != hits_b.shape:
        raise ValueError(f"hit arrays differ in shape: {hits_a.shape} vs {hits_b.shape}")
    only_a = int(np.sum(hits_a & ~hits_b))
    only_b = int(np.sum(~hits_a & hits_b))
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p_value": min(p_value, 1.0), "method": "exact McNemar (binomial)"}


def compare(a_hits: np.ndarray, a_gains: np.ndarray, b_hits: np.ndarray, b_gains: np.ndarray, k: int,
            resamples: int = 10_000, seed: int = 0, users: np.ndarray | None = None) -> dict:
    """Model a against model b on the same events: bootstrap of the NDCG@k and HR@k differences resampling
    events (and, given each event's user code, resampling users: the "..._by_user" entries), McNemar on hits."""
    out = {f"ndcg@{k}": paired_bootstrap(a_gains, b_gains, f"ndcg@{k}", resamples, seed).record(),
           f"hr@{k}": paired_bootstrap(a_hits, b_hits, f"hr@{k}", resamples, seed).record(),
           f"mcnemar_hr@{k}": mcnemar(a_hits, b_hits)}
    if users is not None:
        out[f"ndcg@{k}_by_user"] = paired_bootstrap(a_gains, b_gains, f"ndcg@{k}", resamples, seed,
                                                    groups=users).record()
        out[f"hr@{k}_by_user"] = paired_bootstrap(a_hits, b_hits, f"hr@{k}", resamples, seed, groups=users).record()
    return out
