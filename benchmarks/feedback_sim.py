"""The feedback loop closed end to end on simulated users (issue 20).

Synthetic users with planted tastes (engine/offline/datasets.py `synthetic` / `synthetic_truth`: each user likes
1-2 of the item clusters) ask for recommendations through the Engine API; they click each shown item with a known
probability (P_IN for an item of a liked cluster, P_OUT otherwise, times the position bias 1 / log2(1 + rank)) and
buy a clicked item with P_BUY_IN / P_BUY_OUT. Their clicks and purchases go back as events that name the answer's
recommendation_id, so the engine learns from them online and attributes them to the answer's experiment arm.

An A/B experiment runs throughout: arm `relevance` (the served order) against arm `diverse` (MMR diversity,
--mmr-lambda). The report compares the arms by their live counts (CTR and conversion with Wilson intervals, read
from the engine's experiment report, not from the simulator), with the CTR the click model expects for each arm's
lists beside them, and the diversity the arms served (catalog coverage, distinct clusters per list).

    python benchmarks/feedback_sim.py --json benchmarks/results/feedback-sim.json --plot benchmarks/plots/feedback-sim.png
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from streamrec.engine import Arm, Engine, EngineConfig, Event, EventType
from streamrec.engine.offline.datasets import synthetic, synthetic_truth
from streamrec.engine.offline.seeding import seed_engine

P_IN, P_OUT = 0.30, 0.03  # click probability at rank 1 for a liked / not liked cluster
P_BUY_IN, P_BUY_OUT = 0.25, 0.02  # purchase probability after a click


def click_probability(liked: np.ndarray) -> np.ndarray:
    """Per shown position (rank 1..k): P(click) under the planted tastes and the position bias."""
    ranks = np.arange(1, len(liked) + 1)
    return np.where(liked, P_IN, P_OUT) / np.log2(1 + ranks)


class World:
    """The planted tastes and the simulated users' answers to what they are shown."""

    def __init__(self, args):
        self.args = args
        self.truth = synthetic_truth(args.users, args.items, args.clusters, args.seed)
        self.rng = np.random.default_rng(args.seed + 1)
        self.users = [f"u{u}" for u in range(args.users)]
        self.clock = int(time.time() * 1000)

    def rounds(self, engine: Engine, rounds: int) -> dict:
        """`rounds` rounds of every active user asking once and answering; per arm what was shown and clicked."""
        args, rng = self.args, self.rng
        stats = defaultdict(lambda: {"expected": [], "clusters": [], "shown": defaultdict(set),
                                     "by_round": defaultdict(lambda: [0, 0])})
        for round_ in range(rounds):
            for user in rng.permutation(self.users)[: int(len(self.users) * args.active)]:
                answer = engine.recommend([engine.build_query(str(user), args.k)])[0]
                liked_clusters = set(self.truth.user_clusters[str(user)])
                item_clusters = [self.truth.item_cluster[i] for i in answer.item_ids]
                liked = np.array([c in liked_clusters for c in item_clusters], bool)
                p_click = click_probability(liked)
                arm = stats[answer.arm]
                arm["expected"].append(float(p_click.sum()))
                arm["shown"][round_].update(answer.item_ids)
                arm["clusters"].append(len(set(item_clusters)))
                arm["by_round"][round_][0] += 1
                events = []
                for rank, item in enumerate(answer.item_ids):
                    if rng.random() >= p_click[rank]:
                        continue
                    self.clock += 1
                    events.append(Event(f"{user}-{self.clock}-c", str(user), item, EventType.CLICK, 1.0, self.clock,
                                        answer.recommendation_id))
                    if rng.random() < (P_BUY_IN if liked[rank] else P_BUY_OUT):
                        events.append(Event(f"{user}-{self.clock}-p", str(user), item, EventType.PURCHASE, 1.0,
                                            self.clock, answer.recommendation_id))
                arm["by_round"][round_][1] += sum(e.type == EventType.CLICK for e in events)
                if events:
                    engine.ingest(events)
        return stats


def experiment_result(engine: Engine, name: str, options: dict, stats: dict, args, rounds: int) -> dict:
    """The arms' live outcomes from the engine's own report, with what the click model expected beside."""
    engine.impressions.flush()
    report = engine.experiment_report(name)
    out = {}
    for arm, arm_options in options.items():
        s = stats[arm]
        out[arm] = {
            **report["arms"][arm], "options": arm_options,
            "expected_clicks_per_list": float(np.mean(s["expected"])) if s["expected"] else 0.0,
            # catalog coverage of one round's lists (all rounds together approach the whole catalog, since seen
            # items are excluded), averaged over rounds, and of every round together
            "coverage": float(np.mean([len(s["shown"][r]) / args.items for r in range(rounds)])),
            "coverage_all_rounds": len(set().union(*s["shown"].values())) / args.items if s["shown"] else 0.0,
            "clusters_per_list": float(np.mean(s["clusters"])) if s["clusters"] else 0.0,
            "ctr_by_round": [s["by_round"][r][1] / max(s["by_round"][r][0], 1) for r in range(rounds)],
        }
    return out


def simulate(args) -> dict:
    world = World(args)
    data = synthetic(args.users, args.items, args.clusters, args.history, args.seed)
    config = EngineConfig(dim=32, sync=False, backend="numpy", checkpoint_interval_s=3600,
                          checkpoint_every_records=10**9, impression_features=1.0 if args.reranker_from_log else 0.0)
    diversity = {"relevance": {}, "diverse": {"mmr_lambda": args.mmr_lambda}}
    started = time.perf_counter()
    result = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="streamrec-feedback-") as tmp:
        store = Path(tmp) / "data" / "lmdb"
        with Engine(store, config) as engine:
            seed_engine(engine, data, args.seed)
            engine.create_experiment("sim-diversity", [Arm(n, 1.0, o) for n, o in diversity.items()],
                                     "relevance order against MMR diversity")
            stats = world.rounds(engine, args.rounds)
            result["diversity"] = experiment_result(engine, "sim-diversity", diversity, stats, args, args.rounds)
            engine.stop_experiment("sim-diversity")
            result["impression_log"] = {k: v for k, v in engine.impressions_info().items() if k != "arms"}
        if args.reranker_from_log:
            # Phase 2: a reranker trained on the log phase 1 wrote (the engine is closed: one process may not
            # open an LMDB environment twice), then served against retrieval order on an A/B test.
            from streamrec.engine.offline.rerank_from_log import train_reranker_from_log
            from streamrec.engine.offline.rerank_training import TrainConfig

            model = Path(tmp) / "reranker.onnx"
            trained = train_reranker_from_log(store.parent, model, TrainConfig(dim=32, seed=args.seed, epochs=12))
            result["reranker"] = {"version": trained["version"], "impressions": trained["training"]["impressions"],
                                  "held_out_tail": trained["lift"]["held_out_tail"]}
            rerank = {"retrieval": {"rerank": False}, "reranked": {"rerank": True}}
            with Engine(store, replace(config, reranker_path=str(model), rerank_candidates=args.candidates)) as engine:
                engine.create_experiment("sim-rerank", [Arm(n, 1.0, o) for n, o in rerank.items()],
                                         "retrieval order against the reranker trained on the log")
                stats = world.rounds(engine, args.rerank_rounds)
                result["rerank"] = experiment_result(engine, "sim-rerank", rerank, stats, args, args.rerank_rounds)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


EXPERIMENTS = (("diversity", "relevance vs MMR diversity"), ("rerank", "retrieval order vs reranker trained on the log"))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(key, title) for key, title in EXPERIMENTS if key in result]
    fig, axes = plt.subplots(len(shown), 2, figsize=(10, 3.8 * len(shown)), squeeze=False)
    for (key, title), (left, right) in zip(shown, axes):
        arms = result[key]
        for arm, row in arms.items():
            left.plot(range(1, len(row["ctr_by_round"]) + 1), row["ctr_by_round"], marker="o", label=arm)
        left.set_xlabel("round")
        left.set_ylabel("clicks per list")
        left.set_title(f"{title}: clicks per answer")
        left.legend()
        names = list(arms)
        ctr = [arms[a]["ctr"] for a in names]
        err = [[c - arms[a]["ctr_low"] for c, a in zip(ctr, names)], [arms[a]["ctr_high"] - c for c, a in zip(ctr, names)]]
        right.bar(names, ctr, yerr=err, capsize=6, color=["#4c72b0", "#dd8452"])
        for i, a in enumerate(names):
            right.text(i, ctr[i] / 2, f"coverage {arms[a]['coverage']:.2f}\n{arms[a]['clusters_per_list']:.1f} clusters/list",
                       ha="center", color="white")
        right.set_title("live CTR: share of lists clicked (95% CI)")
    fig.suptitle(f"feedback_sim: {result['args']['users']} users, k={result['args']['k']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_experiment(title: str, arms: dict) -> None:
    print(f"\n{title}")
    print(f"{'arm':<10} {'impressions':>11} {'clicks':>7} {'CTR: lists clicked (95% CI)':>30} {'purchases':>9} "
          f"{'expected clicks/list':>20} {'coverage/round':>14} {'clusters/list':>13}")
    for arm, r in arms.items():
        print(f"{arm:<10} {r['impressions']:>11} {r['clicks']:>7} {r['ctr']:>10.4f} [{r['ctr_low']:.4f}, {r['ctr_high']:.4f}] "
              f"{r['purchases']:>9} {r['expected_clicks_per_list']:>20.4f} {r['coverage']:>14.3f} {r['clusters_per_list']:>13.2f}")
    (a, ra), (b, rb) = arms.items()
    apart = ra["ctr_low"] > rb["ctr_high"] or rb["ctr_low"] > ra["ctr_high"]
    print(f"live winner by CTR: {a if ra['ctr'] > rb['ctr'] else b} (intervals {'do not ' if apart else ''}overlap); "
          f"the click model expects: {a if ra['expected_clicks_per_list'] > rb['expected_clicks_per_list'] else b}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--history", type=int, default=10, help="seeded events per user")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--active", type=float, default=1.0, help="share of users asking each round")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--mmr-lambda", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reranker-from-log", action="store_true",
                        help="phase 2 (needs torch): train a reranker on phase 1's impression log and A/B it against "
                             "retrieval order")
    parser.add_argument("--rerank-rounds", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=50, help="retrieved candidates the reranker reorders")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    result = simulate(args)
    for key, title in EXPERIMENTS:
        if key in result:
            print_experiment(title, result[key])
    if "reranker" in result:
        print(f"reranker trained on the log: {result['reranker']}")
    print(f"impression log after phase 1: {result['impression_log']}")
    print(f"{result['seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
