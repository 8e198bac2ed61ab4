"""`streamrec evaluate` (and benchmarks/quality.py, which runs the same code): the prequential comparison
of issue 4 in one run. The protocol and the models live in streamrec.engine.offline.evaluation; this module builds
the models, runs them on the same replay, prints the table, writes JSON and the rolling-HR plot, and with
--served replays streamrec once more through a real `streamrec serve` subprocess (events on the
bidirectional stream, acks awaited before the next Recommend) and checks it gives the same numbers.

Peers: frozen ones (implicit ALS/BPR, the bootstrap, ALS refit every N events) and, since issue 19, fair online
ones (streamrec.engine.offline.peers: iALS fold-in of the whole history, EASE, item-kNN, recent-window
popularity), each tuned on the training part only. streamrec online is compared with every other model on the
same evaluated events by a paired bootstrap of the NDCG@k and HR@k differences (resampling events, and
resampling users, since one user's events are not independent) and McNemar's test on hits
(streamrec.engine.offline.significance).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamrec.engine.api import Event
from streamrec.engine.offline import evaluation as ev
from streamrec.engine.offline import datasets, peers, significance
from streamrec.engine.offline.datasets import Dataset

MODELS = ("popularity", "recent-pop", "bootstrap", "online", "als", "bpr", "als-refit", "ials-foldin", "ease",
          "itemknn")
# The fair online peers (issue 19): every replay event learned, the user's whole history used at every step.
ONLINE_PEERS = ("ials-foldin", "ease", "itemknn", "recent-pop")
NAMES = {
    "popularity": "popularity",
    "recent-pop": "recent popularity (online)",
    "bootstrap": "streamrec bootstrap (frozen)",
    "online": "streamrec online",
    "als": "implicit ALS (frozen)",
    "bpr": "implicit BPR (frozen)",
    "ials-foldin": "iALS fold-in (online)",
    "ease": "EASE (online history)",
    "itemknn": "item-kNN (online history)",
}
SERVED_NAME = "streamrec online (served)"


def add_arguments(parser: argparse.ArgumentParser, json_default: str | None = None,
                  plot_default: str | None = None) -> None:
    parser.add_argument("--dataset", choices=["ml-100k", "synthetic"], default="ml-100k")
    parser.add_argument("--train-fraction", type=float, default=0.8, help="first share of events (time order) to train on")
    parser.add_argument("-k", type=int, default=10, help="HR@k and NDCG@k")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--dim", type=int, default=64, help="engine embedding dimension")
    parser.add_argument("--backend", default="numpy",
                        help="engine top-k backend; all return the same answers, numpy has no thread overhead on small catalogs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refit-every", type=int, default=1000, help="replay events between implicit ALS refits")
    parser.add_argument("--no-tune", dest="tune", action="store_false",
                        help="skip the grid search of the implicit peers; use the documented defaults")
    parser.add_argument("--threads", type=int, default=1, help="threads for implicit (and its BLAS)")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N replay events (smoke runs)")
    parser.add_argument("--served", action="store_true",
                        help="also replay streamrec through a real gRPC server; exit 1 unless it equals the engine run")
    parser.add_argument("--json", default=json_default, help="write the records here")
    parser.add_argument("--plot", default=plot_default, help="write a PNG of rolling HR@k over the replay here")
    parser.add_argument("--window", type=int, default=1000, help="rolling window of the plot, in evaluated events")
    parser.add_argument("--resamples", type=int, default=10_000,
                        help="paired bootstrap resamples for the significance of streamrec online vs each model")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="prequential HR@10/NDCG@10 of streamrec vs baselines, frozen and online peers")
    add_arguments(parser)


@dataclass
class Report:
    dataset: str
    results: list[ev.ReplayResult] = field(default_factory=list)
    served: ev.ReplayResult | None = None
    tuning: dict = field(default_factory=dict)
    setup_seconds: float = 0.0
    significance: dict = field(default_factory=dict)  # model name -> significance.compare(online, model)

    def get(self, name: str) -> ev.ReplayResult | None:
        return next((r for r in self.results if r.model == name), None)

    @property
    def served_matches(self) -> bool | None:
        online = self.get(NAMES["online"])
        if self.served is None or online is None:
            return None
        return bool(np.array_equal(online.hits, self.served.hits) and np.array_equal(online.gains, self.served.gains))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _seed_store(train: Dataset, folder: Path, config, seed: int) -> None:
    from streamrec.engine import Engine
    from streamrec.engine.offline.seeding import seed_engine

    with Engine(folder / "lmdb", config) as engine:
        seed_engine(engine, train, seed)


class ServedStreamrec:
    """streamrec through a running server: queued events go out on the StreamEvents bidirectional stream,
    and their ack is awaited before the Recommend call that follows."""

    def __init__(self, client, name: str = SERVED_NAME):
        self.client, self.name = client, name
        self.pending = []
        self.strategies: dict[str, int] = {}
        self.acked_batches = 0

    def learn(self, event: Event) -> None:
        from streamrec.clients.client import make_event

        self.pending.append(make_event(event.user_id, event.item_id, int(event.type), event.value,
                                       event.timestamp_ms, event_id=event.event_id))

    def flush(self) -> None:
        if not self.pending:
            return
        result = self.client.send_events(self.pending, batch_size=1000)  # returns once every batch is acked
        if result.rejections or result.accepted + result.duplicates != len(self.pending):
            raise RuntimeError(f"the server did not accept the replay events: {list(result.rejections)[:3]}")
        self.acked_batches += result.batches
        self.pending = []

    def recommend(self, user_id: str, k: int, exclude_rows: np.ndarray) -> list[str]:
        self.flush()
        # Retrieval order, like the engine-API run it must equal (a server with a model would otherwise rerank).
        response = self.client.recommend(user_id, k=k, rerank=False)
        self.strategies[response.strategy] = self.strategies.get(response.strategy, 0) + 1
        return [item.item_id for item in response.items]

    def finish(self) -> None:
        self.flush()

    def details(self) -> dict:
        return {"strategies": dict(self.strategies), "acked_batches": self.acked_batches}


def evaluate(args, dataset: Dataset | None = None) -> Report:
    """Build every requested model on the same split and replay each; see the module docstring.
    `dataset` overrides --dataset (tests pass a small one)."""
    from streamrec.engine.config import EngineConfig
    from streamrec.engine import Engine

    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    needs_implicit = [m for m in wanted if m in ("als", "bpr", "als-refit", "ials-foldin")]
    if needs_implicit and (reason := ev.implicit_available()):
        _say(f"skipping {', '.join(needs_implicit)}: {reason}")
        wanted = [m for m in wanted if m not in needs_implicit]

    started = time.perf_counter()
    dataset = dataset or datasets.load(args.dataset, args.seed)
    catalog = ev.Catalog.of(dataset)
    train, test = ev.time_split(dataset, args.train_fraction)
    events = ev.replay_events(test)[: args.limit]
    history = train.interactions
    report = Report(dataset.name)
    _say(f"{dataset.name}: {len(history)} training events, replaying {len(events)} "
         f"({len(set(test.user_ids) - set(history.user_ids))} users new in the replay), catalog {len(catalog)}")

    def replay(model) -> ev.ReplayResult:
        result = ev.prequential_replay(events, model, args.k, catalog=catalog, history=history)
        _say(f"  {result.model:<32} HR@{args.k} {result.hr:.4f}  NDCG@{args.k} {result.ndcg:.4f}  "
             f"({result.events} evaluated, {result.seconds:.1f} s)")
        return result

    config = EngineConfig(dim=args.dim, backend=args.backend, sync=False)
    with tempfile.TemporaryDirectory(prefix="streamrec-eval-") as tmp:
        needs_engine = {"bootstrap", "online"} & set(wanted) or args.served
        if needs_engine:
            t0 = time.perf_counter()
            _seed_store(train, Path(tmp) / "engine", config, args.seed)
            _say(f"seeded the engine with the training part in {time.perf_counter() - t0:.1f} s")
            if args.served:  # the server starts from a byte copy of the same seeded store
                shutil.copytree(Path(tmp) / "engine", Path(tmp) / "served")
        report.setup_seconds = time.perf_counter() - started

        if "popularity" in wanted:
            report.results.append(replay(ev.Popularity(catalog, history)))
        if needs_engine:
            with Engine(Path(tmp) / "engine" / "lmdb", config) as engine:
                if "bootstrap" in wanted:  # first: it never ingests, so the online run starts from the same state
                    report.results.append(replay(ev.FrozenEngine(engine, catalog, history, NAMES["bootstrap"])))
                if "online" in wanted or args.served:
                    report.results.append(replay(ev.StreamrecEngine(engine, NAMES["online"])))
        if args.served:
            report.served = replay_served(Path(tmp) / "served", events, catalog, history, args)

        for kind in ("als", "bpr"):
            if kind in wanted or (kind == "als" and "als-refit" in wanted):
                params = ev.ALS_DEFAULT if kind == "als" else ev.BPR_DEFAULT
                if args.tune:
                    t0 = time.perf_counter()
                    grid = ev.ALS_GRID if kind == "als" else ev.BPR_GRID
                    params, trials = ev.tune_implicit(kind, train, catalog, grid, args.k, args.seed, args.threads)
                    report.tuning[kind] = {"chosen": params, "seconds": round(time.perf_counter() - t0, 1),
                                           "trials": trials}
                    _say(f"tuned implicit {kind.upper()} on the last 10% of the training part "
                         f"({len(grid)} settings, {time.perf_counter() - t0:.0f} s): {params}")
                report.tuning.setdefault(kind, {"chosen": params})
                if kind in wanted:
                    report.results.append(replay(ev.implicit_model(
                        kind, train, catalog, params, args.seed, args.threads, NAMES[kind],
                        {"tuned": bool(args.tune)})))
        if "als-refit" in wanted:
            report.results.append(replay(ev.ImplicitALSRefit(
                train, catalog, report.tuning["als"]["chosen"], args.refit_every, args.seed, args.threads)))
        run_online_peers(report, [m for m in ONLINE_PEERS if m in wanted], train, catalog, args, replay)
    report.significance = paired_tests(report, events, args.k, args.resamples, args.seed)
    return report


def run_online_peers(report: Report, keys: list[str], train: Dataset, catalog: ev.Catalog, args, replay) -> None:
    """Tune each fair online peer on the training part (unless --no-tune), build it on the whole training part
    and replay it like the others."""
    build = peers.builders(catalog, args.seed, args.threads)
    for key in keys:
        params, info = peers.DEFAULTS[key], {"tuned": bool(args.tune)}
        if args.tune:
            t0 = time.perf_counter()
            params, trials = peers.tune_peer(build[key], peers.GRIDS[key], train, catalog, args.k)
            info.update(tuning_seconds=round(time.perf_counter() - t0, 1), tuning_trials=trials)
            _say(f"tuned {NAMES[key]} on the last 10% of the training part ({len(trials)} settings, "
                 f"{time.perf_counter() - t0:.0f} s): {params}")
        report.tuning[key] = {"chosen": params, **{k: v for k, v in info.items() if k != "tuning_trials"}}
        model = build[key](train, params)
        model.name = NAMES[key]
        result = replay(model)
        result.details.update(info)
        report.results.append(result)


def paired_tests(report: Report, events: list[Event], k: int, resamples: int, seed: int) -> dict:
    """streamrec online against every other model on the same evaluated events (see significance.py),
    resampling events and, since one user's events are not independent, resampling users."""
    online = report.get(NAMES["online"])
    if online is None or resamples <= 0:
        return {}
    _, users = np.unique([events[p].user_id for p in online.positions], return_inverse=True)
    tests = {}
    for other in report.results:
        if other is online:
            continue
        if not np.array_equal(other.positions, online.positions):  # the pairing needs the very same events
            raise RuntimeError(f"{other.model} was evaluated on other events than {online.model}")
        tests[other.model] = significance.compare(online.hits, online.gains, other.hits, other.gains, k,
                                                  resamples, seed, users.ravel())
    return tests


def replay_served(folder: Path, events: list[Event], catalog: ev.Catalog, history, args) -> ev.ReplayResult:
    from streamrec.clients.client import StreamrecClient
    from streamrec.cli.process import ServerProcess

    server = ServerProcess(folder, dataset="none", dim=args.dim,
                           extra_args=("--backend", args.backend, "--no-sync")).start()
    try:
        with StreamrecClient(server.address, timeout_s=60.0) as client:
            result = ev.prequential_replay(events, ServedStreamrec(client), args.k, catalog=catalog, history=history)
        _say(f"  {result.model:<32} HR@{args.k} {result.hr:.4f}  NDCG@{args.k} {result.ndcg:.4f}  "
             f"({result.events} evaluated, {result.seconds:.1f} s, through {server.address})")
        return result
    finally:
        try:
            server.terminate()
        except Exception:  # noqa: BLE001 - a server that will not stop is killed
            server.kill()


# --- output ------------------------------------------------------------------------------------------------

def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def format_table(report: Report, k: int) -> str:
    als, boot = report.get(NAMES["als"]), report.get(NAMES["bootstrap"])
    rows = report.results + ([report.served] if report.served else [])
    head = (f"{'model':<32} {'HR@' + str(k):>7} {'NDCG@' + str(k):>8} {'HR/ALS':>7} {'NDCG/ALS':>9} "
            f"{'HR/boot':>8} {'NDCG/boot':>10} {'events':>7} {'seconds':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.model:<32} {r.hr:>7.4f} {r.ndcg:>8.4f} {_ratio(r.hr, als and als.hr):>7} "
            f"{_ratio(r.ndcg, als and als.ndcg):>9} {_ratio(r.hr, boot and boot.hr):>8} "
            f"{_ratio(r.ndcg, boot and boot.ndcg):>10} {r.events:>7} {r.seconds:>8.1f}")
    return "\n".join(lines)


def format_segments(report: Report, k: int) -> str:
    """The same results split by whether the user had events in the training part."""
    lines = [f"{'model':<32} {'users from training':>30}   {'users new in the replay':>30}",
             f"{'':<32} {'events':>8} {'HR@' + str(k):>10} {'NDCG@' + str(k):>10}   "
             f"{'events':>8} {'HR@' + str(k):>10} {'NDCG@' + str(k):>10}"]
    for r in report.results + ([report.served] if report.served else []):
        (n0, h0, g0), (n1, h1, g1) = r.segment(False), r.segment(True)
        lines.append(f"{r.model:<32} {n0:>8} {h0:>10.4f} {g0:>10.4f}   {n1:>8} {h1:>10.4f} {g1:>10.4f}")
    return "\n".join(lines)


def _p(test: dict) -> str:
    """A bootstrap p-value; at its floor (no resample on the other side of 0) shown as an upper bound."""
    floor = 2.0 / (test["resamples"] + 1)
    return f"<{floor:.4f}" if test["p_value"] <= floor * (1 + 1e-9) else f"{test['p_value']:.4f}"


def format_significance(report: Report, k: int) -> str:
    """Paired tests of streamrec online against each model, the fair online peers first: resampling events
    (with McNemar on hits), then resampling users (wider, and the honest one when events cluster by user)."""
    if not report.significance:
        return ""
    online_peers = {NAMES[key] for key in ONLINE_PEERS}
    tests = sorted(report.significance.items(), key=lambda item: item[0] not in online_peers)
    blocks = []
    for suffix, extra in (("", True), ("_by_user", False)):
        first = tests[0][1].get(f"ndcg@{k}{suffix}")
        if first is None:
            continue
        head = (f"{'streamrec online minus':<34} {'dHR@' + str(k) + ' [95% CI]':>27} {'p':>7}  "
                f"{'dNDCG@' + str(k) + ' [95% CI]':>27} {'p':>7}")
        head += f"  {'McNemar p':>9} {'hits +/-':>11}" if extra else ""
        lines = [f"paired over the same {first['events']} evaluated events: {first['method']}"
                 + ("; McNemar exact on hits" if extra else ""), head, "-" * len(head)]
        for model, test in tests:
            hr, ndcg = test[f"hr@{k}{suffix}"], test[f"ndcg@{k}{suffix}"]
            line = (f"{model:<34} {hr['difference']:>+8.4f} [{hr['ci_low']:+.4f}, {hr['ci_high']:+.4f}] "
                    f"{_p(hr):>7}  {ndcg['difference']:>+8.4f} [{ndcg['ci_low']:+.4f}, "
                    f"{ndcg['ci_high']:+.4f}] {_p(ndcg):>7}")
            if extra:
                mc = test[f"mcnemar_hr@{k}"]
                line += f"  {mc['p_value']:>9.1e} {str(mc['only_a']) + '/' + str(mc['only_b']):>11}"
            lines.append(line)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def target_notes(report: Report) -> list[str]:
    online, als = report.get(NAMES["online"]), report.get(NAMES["als"])
    boot, pop = report.get(NAMES["bootstrap"]), report.get(NAMES["popularity"])
    notes = []
    if online and als and als.hr and als.ndcg:
        ok = online.hr >= 1.15 * als.hr and online.ndcg >= 1.15 * als.ndcg
        notes.append(f"online >= 1.15x frozen implicit ALS: {'met' if ok else 'NOT met'} "
                     f"({online.hr / als.hr:.2f}x HR, {online.ndcg / als.ndcg:.2f}x NDCG)")
    if online and boot and boot.hr and boot.ndcg:
        ok = online.hr >= 1.1 * boot.hr and online.ndcg >= 1.1 * boot.ndcg
        notes.append(f"online >= 1.1x frozen bootstrap: {'met' if ok else 'NOT met'} "
                     f"({online.hr / boot.hr:.2f}x HR, {online.ndcg / boot.ndcg:.2f}x NDCG)")
    if online and pop and pop.hr and pop.ndcg:
        notes.append(f"online vs popularity: {online.hr / pop.hr:.2f}x HR, {online.ndcg / pop.ndcg:.2f}x NDCG")
    fair = [r for r in report.results if r.model in {NAMES[key] for key in ONLINE_PEERS} and r.ndcg]
    if online and fair:
        best = max(fair, key=lambda r: r.ndcg)
        tests = report.significance.get(best.model, {})
        test = tests.get(f"ndcg@{online.k}_by_user") or tests.get(f"ndcg@{online.k}")
        verdict = (f", NDCG difference {test['difference']:+.4f} [{test['ci_low']:+.4f}, {test['ci_high']:+.4f}], "
                   f"p {_p(test)} ({test['method'].split(',')[0]})" if test else "")
        notes.append(f"online vs the best fair online peer ({best.model}): {online.hr / best.hr:.2f}x HR, "
                     f"{online.ndcg / best.ndcg:.2f}x NDCG{verdict}")
    for r in report.results:
        if "fallback_steps" in r.details:
            notes.append(f"{r.model}: {r.details['fallback_steps']} of {r.events} evaluated events were for users "
                         f"without a vector -> online popularity")
    return notes


def write_json(report: Report, path: str, k: int) -> None:
    rows = report.results + ([report.served] if report.served else [])
    records = [{**r.record(), "dataset": report.dataset} for r in rows]
    for record in records:  # paired tests against streamrec online, Δ = online - this model
        if record["model"] in report.significance:
            record["vs_streamrec_online"] = report.significance[record["model"]]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(records, indent=2, default=float) + "\n")


def write_plot(report: Report, path: str, k: int, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for r in report.results:
        if r.events:
            start = window - 1 if r.events >= 2 * window else 0  # only full windows when there are enough
            style = "--" if "frozen" in r.model else "-"  # frozen peers dashed, online models solid
            ax.plot(r.positions[start:], r.rolling_hr(window)[start:], style, label=f"{r.model} ({r.hr:.3f})",
                    linewidth=1.2)
    ax.set_xlabel("replay event (time order)")
    ax.set_ylabel(f"HR@{k}, rolling mean over {window} evaluated events")
    ax.set_title(f"Prequential HR@{k} on {report.dataset}: test-then-learn replay of the last events")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args, dataset: Dataset | None = None) -> int:
    logging.getLogger("streamrec").setLevel(logging.WARNING)
    started = time.perf_counter()
    report = evaluate(args, dataset)
    print(format_table(report, args.k))
    print()
    print(format_segments(report, args.k))
    print()
    if report.significance:
        print(format_significance(report, args.k))
        print()
    for note in target_notes(report):
        print("  " + note)
    if args.json:
        write_json(report, args.json, args.k)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot, args.k, args.window)
        print(f"wrote {args.plot}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if report.served is not None:
        online = report.get(NAMES["online"])
        print(f"served path: HR@{args.k} {report.served.hr:.6f} NDCG@{args.k} {report.served.ndcg:.6f}; "
              f"engine API: HR@{args.k} {online.hr:.6f} NDCG@{args.k} {online.ndcg:.6f} -> "
              f"{'identical' if report.served_matches else 'DIFFERENT'}")
        if not report.served_matches:
            return 1
    return 0


def main(argv: list[str] | None = None, json_default: str | None = None, plot_default: str | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, json_default, plot_default)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
