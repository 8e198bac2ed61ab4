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


def simulate(args) -> dict:
    truth = synthetic_truth(args.users, args.items, args.clusters, args.seed)
    data = synthetic(args.users, args.items, args.clusters, args.history, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    config = EngineConfig(dim=32, sync=False, backend="numpy", checkpoint_interval_s=3600,
                          checkpoint_every_records=10**9)
    arms = {"relevance": {}, "diverse": {"mmr_lambda": args.mmr_lambda}}
    per_round = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # arm -> round -> [impressions, clicks]
    shown_items = defaultdict(lambda: defaultdict(set))  # arm -> round -> items shown
    clusters_per_list = defaultdict(list)
    expected_ctr = defaultdict(list)
    users = [f"u{u}" for u in range(args.users)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="streamrec-feedback-") as tmp:
        with Engine(Path(tmp) / "lmdb", config) as engine:
            seed_engine(engine, data, args.seed)
            engine.create_experiment("sim-diversity", [Arm(name, 1.0, options) for name, options in arms.items()],
                                     "relevance order against MMR diversity")
            clock = int(time.time() * 1000)
            for round_ in range(args.rounds):
                for user in rng.permutation(users)[: int(len(users) * args.active)]:
                    answer = engine.recommend([engine.build_query(str(user), args.k, rerank=False)])[0]
                    liked_clusters = set(truth.user_clusters[str(user)])
                    item_clusters = [truth.item_cluster[i] for i in answer.item_ids]
                    liked = np.array([c in liked_clusters for c in item_clusters])
                    p_click = click_probability(liked)
                    expected_ctr[answer.arm].append(float(p_click.sum()))
                    shown_items[answer.arm][round_].update(answer.item_ids)
                    clusters_per_list[answer.arm].append(len(set(item_clusters)))
                    per_round[answer.arm][round_][0] += 1
                    events = []
                    for rank, item in enumerate(answer.item_ids):
                        if rng.random() >= p_click[rank]:
                            continue
                        clock += 1
                        events.append(Event(f"{user}-{clock}-c", str(user), item, EventType.CLICK, 1.0, clock,
                                            answer.recommendation_id))
                        if rng.random() < (P_BUY_IN if liked[rank] else P_BUY_OUT):
                            events.append(Event(f"{user}-{clock}-p", str(user), item, EventType.PURCHASE, 1.0, clock,
                                                answer.recommendation_id))
                    per_round[answer.arm][round_][1] += sum(e.type == EventType.CLICK for e in events)
                    if events:
                        engine.ingest(events)
            engine.impressions.flush()
            report = engine.experiment_report("sim-diversity")
            log_info = {k: v for k, v in engine.impressions_info().items() if k != "arms"}
    result = {"args": vars(args), "seconds": round(time.perf_counter() - started, 1), "impression_log": log_info,
              "arms": {}}
    for arm in arms:
        live = report["arms"][arm]
        result["arms"][arm] = {
            **live, "options": arms[arm],
            "expected_ctr": float(np.mean(expected_ctr[arm])) / args.k if expected_ctr[arm] else 0.0,  # per impression item
            "expected_clicks_per_list": float(np.mean(expected_ctr[arm])) if expected_ctr[arm] else 0.0,
            # catalog coverage of one round's lists (all rounds together approach the whole catalog, since seen
            # items are excluded), averaged over rounds, and of every round together
            "coverage": float(np.mean([len(shown_items[arm][r]) / args.items for r in range(args.rounds)])),
            "coverage_all_rounds": len(set().union(*shown_items[arm].values())) / args.items,
            "clusters_per_list": float(np.mean(clusters_per_list[arm])) if clusters_per_list[arm] else 0.0,
            "ctr_by_round": [per_round[arm][r][1] / max(per_round[arm][r][0], 1) for r in range(args.rounds)],
        }
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, row in result["arms"].items():
        left.plot(range(1, len(row["ctr_by_round"]) + 1), row["ctr_by_round"], marker="o", label=arm)
    left.set_xlabel("round")
    left.set_ylabel("clicks per list")
    left.set_title("clicks per answer, by round")
    left.legend()
    arms = list(result["arms"])
    ctr = [result["arms"][a]["ctr"] for a in arms]
    err = [[c - result["arms"][a]["ctr_low"] for c, a in zip(ctr, arms)],
           [result["arms"][a]["ctr_high"] - c for c, a in zip(ctr, arms)]]
    right.bar(arms, ctr, yerr=err, capsize=6, color=["#4c72b0", "#dd8452"])
    for i, a in enumerate(arms):
        right.text(i, ctr[i] / 2, f"coverage {result['arms'][a]['coverage']:.2f}\n"
                   f"{result['arms'][a]['clusters_per_list']:.1f} clusters/list", ha="center", color="white")
    right.set_title("live CTR: share of lists clicked (95% CI)")
    fig.suptitle(f"feedback_sim: {result['args']['users']} users, {result['args']['rounds']} rounds, k={result['args']['k']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    result = simulate(args)
    print(f"{'arm':<10} {'impressions':>11} {'clicks':>7} {'CTR: lists clicked (95% CI)':>30} {'purchases':>9} "
          f"{'expected clicks/list':>20} {'coverage/round':>14} {'clusters/list':>13}")
    for arm, r in result["arms"].items():
        print(f"{arm:<10} {r['impressions']:>11} {r['clicks']:>7} {r['ctr']:>10.4f} [{r['ctr_low']:.4f}, {r['ctr_high']:.4f}] "
              f"{r['purchases']:>9} {r['expected_clicks_per_list']:>20.4f} {r['coverage']:>14.3f} {r['clusters_per_list']:>13.2f}")
    a, b = result["arms"]["relevance"], result["arms"]["diverse"]
    print(f"live winner by CTR: {'relevance' if a['ctr'] > b['ctr'] else 'diverse'} "
          f"(intervals {'do not ' if a['ctr_low'] > b['ctr_high'] or b['ctr_low'] > a['ctr_high'] else ''}overlap); "
          f"expected by the click model: {'relevance' if a['expected_clicks_per_list'] > b['expected_clicks_per_list'] else 'diverse'}")
    print(f"impression log: {result['impression_log']}")
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
