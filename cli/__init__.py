"""The `streamrec` command: `serve` runs the server; `token` edits its tokens file; `train`, `train-reranker`
and `evaluate` work offline; the other commands are clients of a running server."""
from __future__ import annotations

import argparse
import logging
import os


def env(name: str, default):
    """STREAMREC_<name> from the environment, else `default` (flags default to these; a flag overrides)."""
    return os.environ.get(f"STREAMREC_{name}", default)


# The subcommand modules are imported when the parser is built, not with this package: they import `env`
# from here, and `python -m streamrec.cli.evaluate` must not find its module already imported.

def build_parser() -> argparse.ArgumentParser:
    from streamrec.cli import client, deploy, evaluate, experiment, rerank, serve, token, train, train_sequence

    parser = argparse.ArgumentParser(prog="streamrec", description="Real-time recommendation engine over gRPC.")
    parser.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    serve.register(sub)
    deploy.register(sub)
    token.register(sub)
    client.register(sub)
    evaluate.register(sub)
    rerank.register(sub)
    train.register(sub)
    train_sequence.register(sub)
    experiment.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from streamrec.cli import client, deploy, evaluate, experiment, rerank, serve, token, train, train_sequence

    args = build_parser().parse_args(argv)
    process = os.environ.get("STREAMREC_PROCESS_NAME")  # set by `serve --replicas N` for each of its processes
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s {process + ' ' if process else ''}%(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve.run(args)
    if args.command == "evaluate":
        return evaluate.run(args)
    if args.command == "train":
        return train.run(args)
    if args.command == "train-reranker":
        return rerank.run(args)
    if args.command == "token":
        return token.run(args)
    if args.command == "deploy-ray":
        return deploy.run(args)
    if args.command == "train-sequence":
        return train_sequence.run(args)
    if args.command == "experiment":
        return experiment.run(args)
    return client.run(args)
