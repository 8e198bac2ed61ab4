"""`streamrec experiment create|stop|list|report`: A/B experiments on a running server (admin).

    streamrec experiment create homepage --arm control:1 --arm no-rerank:1:rerank=false
    streamrec experiment create towers --arm ials:1:user_model=ials --arm sequence:1:user_model=sequence
    streamrec experiment report homepage [--plot homepage.png]
    streamrec experiment stop homepage

An arm is NAME:WEIGHT[:OPTION=VALUE,...]; the options are the request options the arm sets: rerank
(true/false), candidates, user_model (ials/sequence), mmr_lambda, max_per_category, explain.
"""
from __future__ import annotations

import argparse
import json
import sys

from google.protobuf import json_format

from streamrec.cli.client import DEFAULT_ADDRESS, add_connection_arguments

_TYPES = {"rerank": "bool", "explain": "bool", "candidates": "int", "max_per_category": "int", "mmr_lambda": "float",
          "user_model": "str"}


def parse_arm(text: str) -> tuple[str, float, dict]:
    """NAME:WEIGHT[:OPTION=VALUE,...] -> (name, weight, options); argparse reports a ValueError's message."""
    parts = text.split(":", 2)
    if len(parts) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: an arm is NAME:WEIGHT[:OPTION=VALUE,...]")
    try:
        weight = float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight {parts[1]!r} is not a number") from None
    options = {}
    for pair in filter(None, (parts[2].split(",") if len(parts) == 3 else [])):
        key, _, value = pair.partition("=")
        kind = _TYPES.get(key)
        if kind is None:
            raise argparse.ArgumentTypeError(f"{text!r}: unknown option {key!r} (options: {', '.join(_TYPES)})")
        if kind == "bool":
            if value.lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"{text!r}: {key} is true or false, not {value!r}")
            options[key] = value.lower() == "true"
        else:
            try:
                options[key] = {"int": int, "float": float, "str": str}[kind](value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r}: {key}={value!r} is not a{'n' if kind == 'int' else ''} {kind}") from None
    return parts[0], weight, options


def _print_report(experiment, out=None) -> None:
    out = out or sys.stdout
    state = "running" if experiment.running else "stopped"
    print(f"experiment {experiment.name} ({state}){': ' + experiment.description if experiment.description else ''}",
          file=out)
    print(f"{'arm':<16} {'weight':>6} {'impressions':>11} {'clicks':>7} {'CTR (95% CI)':>26} {'purchases':>9} "
          f"{'conversion (95% CI)':>26}", file=out)
    results = {r.arm: r for r in experiment.results}
    for arm in experiment.arms:
        r = results.get(arm.name)
        if r is None:
            print(f"{arm.name:<16} {arm.weight:>6g}", file=out)
            continue
        print(f"{arm.name:<16} {arm.weight:>6g} {r.impressions:>11} {r.clicks:>7} "
              f"{r.ctr:>8.4f} [{r.ctr_low:.4f}, {r.ctr_high:.4f}] {r.purchases:>9} "
              f"{r.conversion:>8.4f} [{r.conversion_low:.4f}, {r.conversion_high:.4f}]", file=out)


def plot_report(experiment, path: str) -> None:
    """CTR and conversion per arm with their 95% intervals, as a PNG (matplotlib: the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in experiment.results]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (label, rate, low, high) in zip(axes, (("CTR", "ctr", "ctr_low", "ctr_high"),
                                                  ("conversion", "conversion", "conversion_low", "conversion_high"))):
        values = [getattr(r, rate) for r in results]
        errors = [[v - getattr(r, low) for v, r in zip(values, results)], [getattr(r, high) - v for v, r in zip(values, results)]]
        ax.bar([r.arm for r in results], values, yerr=errors, capsize=6, color="#4c72b0")
        ax.set_title(f"{label} per arm (95% Wilson interval)")
        ax.set_ylabel(label)
    fig.suptitle(f"experiment {experiment.name}: " + ", ".join(f"{r.arm} {r.impressions} impressions" for r in results))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import grpc

    from streamrec.cli.client import connection_options
    from streamrec.clients.client import StreamrecClient

    with StreamrecClient(args.address, timeout_s=args.timeout, **connection_options(args)) as client:
        try:
            if args.action == "create":
                experiment = client.create_experiment(args.name, args.arm, args.description)
            elif args.action == "stop":
                experiment = client.stop_experiment(args.name)
            elif args.action == "report":
                experiment = client.get_experiment(args.name)
            else:
                for experiment in client.list_experiments():
                    print(f"{experiment.name:<24} {'running' if experiment.running else 'stopped':<8} "
                          + ", ".join(f"{a.name} ({a.weight:g})" for a in experiment.arms))
                return 0
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(experiment, preserving_proto_field_name=True), indent=1))
    else:
        _print_report(experiment)
    if getattr(args, "plot", None):
        plot_report(experiment, args.plot)
        print(f"wrote {args.plot}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("experiment", help="A/B experiments: create, stop, list, report (admin)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    for name, help in (("create", "start an experiment"), ("stop", "stop one (its outcomes stay)"),
                       ("list", "every experiment"), ("report", "an experiment's arms and live outcomes")):
        p = actions.add_parser(name, help=help)
        p.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port (env STREAMREC_ADDRESS)")
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--json", action="store_true")
        add_connection_arguments(p)
        if name != "list":
            p.add_argument("name")
        if name == "create":
            p.add_argument("--arm", type=parse_arm, action="append", required=True,
                           help="NAME:WEIGHT[:OPTION=VALUE,...] (at least two)")
            p.add_argument("--description", default="")
        if name == "report":
            p.add_argument("--plot", default=None, metavar="PNG", help="CTR and conversion per arm with intervals")
