"""Diversity against accuracy (issue 20): the ML-100K prequential replay through the engine (as `streamrec evaluate`
runs it: seed on the first 80% by time, replay the rest test-then-learn), once per diversity setting, each from a
byte copy of the same seeded store. Beside HR@10 and NDCG@10 it reports, over the answers the replay asked for:

  intra-list diversity  mean over answers of the mean pairwise (1 - cosine) of the answered items' live vectors
  genre diversity       mean over answers of the mean pairwise (1 - Jaccard) of their genre sets: a view that
                        does not come from the model's own vectors, which MMR optimises against
  coverage              distinct items answered at least once / catalog items
  max share per genre   mean over answers of the largest share of the list held by one genre
  mean list length      the category cap is a hard limit: with multi-genre films an answer can end short of k

    python benchmarks/diversity.py                 # full replay, 12 settings: a few minutes on 2 cores
    python benchmarks/diversity.py --limit 5000    # the first 5000 replay events only

Writes benchmarks/results/diversity-tradeoff-ml100k.json and benchmarks/plots/diversity-tradeoff-ml100k.png
(matplotlib: the `bench` extra).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from streamrec.cli.evaluate import _seed_store
from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.offline import datasets
from streamrec.engine.offline import evaluation as ev

HERE = Path(__file__).resolve().parent
SETTINGS = ([dict(mmr_lambda=lam) for lam in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)]
            + [dict(max_per_category=cap) for cap in (1, 2, 3)]
            + [dict(mmr_lambda=0.3, max_per_category=2), dict(mmr_lambda=0.5, max_per_category=2)])


class DiverseStreamrec(ev.StreamrecEngine):
    """StreamrecEngine that asks with diversity options and measures each answer as it is given (the live
    vectors of that moment)."""

    def __init__(self, engine, options: dict, genres: dict[str, set[str]]):
        super().__init__(engine, name=label(options))
        self.options, self.genres = options, genres
        self.cosine_diversity: list[float] = []
        self.genre_diversity: list[float] = []
        self.top_genre_share: list[float] = []
        self.answered: set[str] = set()
        self.shortfall = 0  # answers with fewer than k items (the category cap is a hard limit)
        self.lengths: list[int] = []

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        self.flush()
        answer = self.engine.recommend([self.engine.build_query(user_id, k, **self.options)])[0]
        ids = list(answer.item_ids)
        self.strategies[answer.strategy] = self.strategies.get(answer.strategy, 0) + 1
        self.shortfall += len(ids) < k
        self.lengths.append(len(ids))
        self.answered.update(ids)
        if len(ids) > 1:
            items = self.engine.state.items
            vectors = items.vectors[[items.row_of(i) for i in ids]].astype(np.float64)
            cosine = vectors @ vectors.T
            upper = np.triu_indices(len(ids), 1)
            self.cosine_diversity.append(float(np.mean(1.0 - cosine[upper])))
            sets = [self.genres.get(i, set()) for i in ids]
            self.genre_diversity.append(float(np.mean([1.0 - len(a & b) / max(len(a | b), 1)
                                                       for a, b in combinations(sets, 2)])))
            counts: dict[str, int] = {}
            for genres in sets:
                for g in genres:
                    counts[g] = counts.get(g, 0) + 1
            self.top_genre_share.append(max(counts.values(), default=0) / len(ids))
        return ids


def label(options: dict) -> str:
    parts = [f"lambda {options['mmr_lambda']:g}"] if options.get("mmr_lambda") is not None else []
    if options.get("max_per_category"):
        parts.append(f"cap {options['max_per_category']}")
    return ", ".join(parts) or "plain"


LATENCY_SETTINGS = {"plain": {}, "lambda 0.3": dict(mmr_lambda=0.3), "cap 2": dict(max_per_category=2),
                    "explain": dict(explain=True), "lambda 0.3, cap 2, explain": dict(mmr_lambda=0.3, max_per_category=2,
                                                                                       explain=True)}


def latency(engine, users: list[str], k: int, rounds: int) -> dict:
    """In-process Engine.recommend, one query per call (no gRPC), settings interleaved so that load from other
    processes on the machine falls on all of them alike: median and p99 microseconds."""
    times: dict[str, list[float]] = {name: [] for name in LATENCY_SETTINGS}
    for n in range(rounds):
        user = users[n % len(users)]
        for name, options in LATENCY_SETTINGS.items():
            query = engine.build_query(user, k, **options)
            started = time.perf_counter()
            engine.recommend([query])
            times[name].append((time.perf_counter() - started) * 1e6)
    return {name: {"median_us": round(float(np.median(t)), 1), "p99_us": round(float(np.percentile(t, 99)), 1)}
            for name, t in times.items()}


def run(args) -> dict:
    started = time.perf_counter()
    dataset = datasets.load("ml-100k", args.seed)
    catalog = ev.Catalog.of(dataset)
    train, test = ev.time_split(dataset, 0.8)
    events = ev.replay_events(test)[: args.limit]
    history = train.interactions
    genres = {item: set(categories) for item, categories in dataset.item_categories.items()}
    # No impression log: it costs every setting the same and is measured on its own (issue 20, impressions).
    config = EngineConfig(dim=args.dim, backend="numpy", sync=False, impressions=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamrec-diversity-") as tmp:
        _seed_store(train, Path(tmp) / "seeded", config, args.seed)
        with Engine(Path(tmp) / "seeded" / "lmdb", config) as engine:
            users = sorted(set(history.user_ids))
            latency(engine, users, args.k, 200)  # warm-up
            cost = latency(engine, users, args.k, args.latency_rounds)
        for name, figures in cost.items():
            print(f"latency {name:<28} median {figures['median_us']:7.1f} us  p99 {figures['p99_us']:7.1f} us", flush=True)
        for options in SETTINGS:
            folder = Path(tmp) / "run"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(Path(tmp) / "seeded", folder)
            with Engine(folder / "lmdb", config) as engine:
                model = DiverseStreamrec(engine, options, genres)
                result = ev.prequential_replay(events, model, args.k, catalog=catalog, history=history)
            row = {
                "setting": label(options), "mmr_lambda": options.get("mmr_lambda", 0.0),
                "max_per_category": options.get("max_per_category", 0),
                f"hr@{args.k}": round(result.hr, 4), f"ndcg@{args.k}": round(result.ndcg, 4),
                "intra_list_diversity": round(float(np.mean(model.cosine_diversity)), 4),
                "genre_diversity": round(float(np.mean(model.genre_diversity)), 4),
                "coverage": round(len(model.answered) / len(catalog), 4),
                "items_answered": len(model.answered),
                "max_genre_share": round(float(np.mean(model.top_genre_share)), 4),
                "mean_list_length": round(float(np.mean(model.lengths)), 2), "short_answers": model.shortfall, "evaluated": result.events, "seconds": round(result.seconds, 1),
            }
            rows.append(row)
            print(f"{row['setting']:<22} HR@{args.k} {row[f'hr@{args.k}']:.4f}  NDCG@{args.k} {row[f'ndcg@{args.k}']:.4f}  "
                  f"ILD {row['intra_list_diversity']:.3f}  genre div {row['genre_diversity']:.3f}  "
                  f"coverage {row['coverage']:.3f}  max genre share {row['max_genre_share']:.3f}  "
                  f"length {row['mean_list_length']:.2f}  "
                  f"({row['evaluated']} evaluated, {row['seconds']} s)", flush=True)
    return {"dataset": "ml-100k", "protocol": "prequential replay through the Engine API, retrieval order "
            "(no reranker), seeded on the first 80% by time", "k": args.k, "dim": args.dim, "seed": args.seed,
            "replay_events": len(events), "limit": args.limit, "catalog_items": len(catalog),
            "pool": "max(4k, 50) retrieved candidates", "seconds": round(time.perf_counter() - started, 1),
            "latency_in_process": {"rounds": args.latency_rounds, "note": "Engine.recommend, one query per call, "
                                   "the seeded state before the replay, numpy backend", **cost},
            "results": rows}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["k"]
    rows = report["results"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric, title in ((axes[0], "intra_list_diversity", "intra-list diversity (mean pairwise 1 - cosine)"),
                              (axes[1], "coverage", "catalog coverage (distinct items answered / catalog)")):
        for subset, style, name in (([r for r in rows if not r["max_per_category"]], "o-", "MMR lambda"),
                                    ([r for r in rows if r["max_per_category"] and not r["mmr_lambda"]], "s--",
                                     "category cap"),
                                    ([r for r in rows if r["max_per_category"] and r["mmr_lambda"]], "^", "both")):
            if not subset:
                continue
            ax.plot([r[metric] for r in subset], [r[f"ndcg@{k}"] for r in subset], style, label=name)
            for r in subset:
                ax.annotate(r["setting"].replace("lambda ", "λ"), (r[metric], r[f"ndcg@{k}"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(title)
        ax.set_ylabel(f"NDCG@{k}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    limit = f", first {report['limit']} replay events" if report["limit"] else ""
    fig.suptitle(f"Diversity against accuracy: ML-100K prequential replay through the engine{limit}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N replay events")
    parser.add_argument("--latency-rounds", type=int, default=3000, help="single-query calls per setting")
    parser.add_argument("--json", default=str(HERE / "results" / "diversity-tradeoff-ml100k.json"))
    parser.add_argument("--plot", default=str(HERE / "plots" / "diversity-tradeoff-ml100k.png"))
    args = parser.parse_args()
    report = run(args)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    plot(report, Path(args.plot))
    print(f"wrote {args.json} and {args.plot} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
