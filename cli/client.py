"""Client-side commands of the `streamrec` CLI: they talk to a running server through StreamrecClient.
Reading an event file (`send-events --file`, `load`) is done here, with the engine's parser, so that the
client library itself (streamrec.clients) never imports the engine or numpy."""
from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf import json_format

from streamrec.cli import env
from streamrec.clients.client import StreamrecClient, make_event
from streamrec.v1 import catalog_pb2

DEFAULT_ADDRESS = env("ADDRESS", "127.0.0.1:50051")


def _print(message, as_json: bool) -> None:
    if as_json:
        print(json_format.MessageToJson(message, preserving_proto_field_name=True))
        return
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None))


def cmd_recommend(args, client: StreamrecClient) -> None:
    response = client.recommend(args.user_id, k=args.k, include_categories=args.category or (),
                                exclude_seen=None if args.exclude_seen else False, rerank=args.rerank,
                                candidates=args.candidates, user_model=args.user_model, mmr_lambda=args.mmr_lambda,
                                max_per_category=args.max_per_category, explain=args.explain)
    if args.json:
        return _print(response, True)
    reranker, user_model = response.served_by.reranker, response.served_by.user_model
    print(f"{response.strategy} recommendations for {response.user_id} "
          f"(model {response.served_by.model_version}{f', user model {user_model}' if user_model else ''}"
          f"{f', reranked by {reranker}' if reranker else ''}, "
          f"{response.server_latency_us} us):")
    for rank, item in enumerate(response.items, 1):
        retrieval = f" (cosine {item.retrieval_score:.4f})" if reranker else ""
        print(f"{rank:4d}. {item.item_id:<20} {item.score:8.4f}{retrieval}  {', '.join(item.categories)}")
        if item.because:
            print(f"      because you liked {', '.join(f'{b.item_id} ({b.similarity:.2f})' for b in item.because)}")


def cmd_similar(args, client: StreamrecClient) -> None:
    response = client.similar_items(args.item_id, k=args.k)
    if args.json:
        return _print(response, True)
    for rank, item in enumerate(response.items, 1):
        print(f"{rank:4d}. {item.item_id:<20} {item.score:8.4f}  {', '.join(item.categories)}")


def _file_events(path: str, id_prefix: str):
    """Events from a CSV/Parquet log, with ids PREFIX<row> so that loading the file twice is a no-op."""
    from streamrec.engine.offline.datasets import load_interactions_file

    log = load_interactions_file(path)
    return [make_event(str(u), str(i), int(t), float(v), int(ts), event_id=f"{id_prefix}{n}")
            for n, (u, i, t, v, ts) in enumerate(zip(log.user_ids, log.item_ids, log.types, log.values, log.timestamps_ms))]


def _report(result) -> None:
    print(f"acked {result.batches} batch(es): {result.accepted} accepted, {result.duplicates} duplicate, "
          f"{len(result.rejections)} rejected; durable up to seq {result.durable_seq}")
    for rejection in result.rejections[:20]:
        print(f"  rejected event {rejection.event_id!r}: {rejection.field}: {rejection.reason}")


def cmd_send_events(args, client: StreamrecClient) -> None:
    if args.file:
        events = _file_events(args.file, args.id_prefix)
    elif args.user and args.item:
        events = [make_event(args.user, args.item, args.type, args.value, event_id=args.event_id)]
    else:
        raise SystemExit("send-events needs --user and --item, or --file")
    _report(client.send_events(events, batch_size=args.batch_size, timeout_s=args.timeout))


def cmd_load(args, client: StreamrecClient) -> None:
    """Import an interaction log. With --create-items, items the server does not know are created
    (embedding derived from the catalog) and their events sent again under the same ids."""
    events = _file_events(args.file, args.id_prefix)
    result = client.send_events(events, batch_size=args.batch_size, timeout_s=args.timeout)
    unknown = [r for r in result.rejections if r.field == "item_id" and r.reason.startswith("unknown item")]
    if args.create_items and unknown:
        by_id = {e.event_id: e for e in events}
        retry = [by_id[r.event_id] for r in unknown]
        new_items = sorted({e.item_id for e in retry})
        for start in range(0, len(new_items), 1000):
            client.upsert_items([catalog_pb2.Item(item_id=i) for i in new_items[start:start + 1000]])
        print(f"created {len(new_items)} unknown item(s); resending their {len(retry)} event(s)")
        second = client.send_events(retry, batch_size=args.batch_size, timeout_s=args.timeout)
        result.accepted += second.accepted
        result.duplicates += second.duplicates
        result.rejections = [r for r in result.rejections if r not in unknown] + list(second.rejections)
        result.durable_seq = max(result.durable_seq, second.durable_seq)
    _report(result)


def cmd_stats(args, client: StreamrecClient) -> None:
    _print(client.stats(), True)


def cmd_load_reranker(args, client: StreamrecClient) -> None:
    _print(client.load_reranker(args.path, unload=args.unload), True)


def cmd_health(args, client: StreamrecClient) -> None:
    print(client.health(args.service))


def cmd_loadtest(args, client: StreamrecClient) -> None:
    from streamrec.clients import loadtest

    if loadtest.run(args):
        raise SystemExit(1)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Auth and TLS: secrets come from files or the environment, never the command line."""
    parser.add_argument("--token-file", default=env("TOKEN_FILE", None),
                        help="file holding the bearer token (or env STREAMREC_TOKEN with the token itself)")
    parser.add_argument("--tls", action="store_true", default=bool(env("TLS", None)),
                        help="connect with TLS (system roots unless --root-cert)")
    parser.add_argument("--root-cert", default=env("ROOT_CERT", None), help="PEM of the CA that signed the server")
    parser.add_argument("--client-cert", default=env("CLIENT_CERT", None), help="mTLS: client certificate (PEM)")
    parser.add_argument("--client-key", default=env("CLIENT_KEY", None), help="mTLS: client key (PEM)")


def connection_options(args) -> dict:
    if not hasattr(args, "token_file"):  # commands with their own connection flags (loadtest)
        return {}
    token = env("TOKEN", None)
    if args.token_file:
        token = open(args.token_file).read().strip()
    return {
        "token": token or None,
        "tls": args.tls or bool(args.root_cert or args.client_cert),
        "root_certificates": args.root_cert, "certificate_chain": args.client_cert, "private_key": args.client_key,
    }


def register(subparsers) -> None:
    def add(name: str, handler, help: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help)
        parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port (env STREAMREC_ADDRESS)")
        parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
        add_connection_arguments(parser)
        parser.set_defaults(client_handler=handler)
        return parser

    p = add("recommend", cmd_recommend, "recommendations for a user")
    p.add_argument("user_id")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--category", action="append", help="only items in this category (repeatable)")
    p.add_argument("--include-seen", dest="exclude_seen", action="store_false", help="allow items the user already saw")
    p.add_argument("--no-rerank", dest="rerank", action="store_const", const=False, default=None,
                   help="retrieval order only (skip the reranking model)")
    p.add_argument("--rerank", dest="rerank", action="store_const", const=True, help="ask for reranking")
    p.add_argument("--candidates", type=int, default=0, help="retrieved candidates to rerank (default: the server's)")
    p.add_argument("--user-model", choices=["ials", "sequence"], default="",
                   help="the user model whose query retrieves (default: the server's)")
    p.add_argument("--mmr-lambda", type=float, default=0.0,
                   help="diversity: 0 (off) .. 1, weight of dissimilarity to the items already picked (MMR)")
    p.add_argument("--max-per-category", type=int, default=0, help="diversity: at most N items per category (0: off)")
    p.add_argument("--explain", action="store_true", help="name the liked items behind each recommendation")
    p.add_argument("--json", action="store_true")

    p = add("similar", cmd_similar, "items most similar to an item")
    p.add_argument("item_id")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true")

    p = add("send-events", cmd_send_events, "send one event, or a CSV/Parquet log, over the event stream")
    p.add_argument("--user")
    p.add_argument("--item")
    p.add_argument("--type", default="view", help="view, click, add_to_cart, purchase, rating, skip, dislike")
    p.add_argument("--value", type=float, default=0.0)
    p.add_argument("--event-id", default=None, help="idempotency key (default: random)")
    p.add_argument("--file", help="CSV/Parquet with user_id,item_id[,type,value,timestamp]")
    p.add_argument("--id-prefix", default="load-", help="event ids for --file rows are PREFIX<row>: re-sending is a no-op")
    p.add_argument("--batch-size", type=int, default=500)

    p = add("load", cmd_load, "import a CSV/Parquet interaction log (user_id,item_id[,type,value,timestamp])")
    p.add_argument("file")
    p.add_argument("--create-items", action="store_true", help="create items the server does not know yet")
    p.add_argument("--id-prefix", default="load-", help="event ids are PREFIX<row>: loading twice is a no-op")
    p.add_argument("--batch-size", type=int, default=500)

    add("stats", cmd_stats, "server statistics")
    p = add("load-reranker", cmd_load_reranker, "swap the server's reranking model (validated first; admin)")
    p.add_argument("path", nargs="?", default="", help="ONNX file on the server (default: re-read the current one)")
    p.add_argument("--unload", action="store_true", help="serve retrieval only")
    p = add("health", cmd_health, "health status (SERVING / NOT_SERVING)")
    p.add_argument("--service", default="")

    from streamrec.clients import loadtest

    p = subparsers.add_parser("loadtest", help="load-test a running server (python -m streamrec.clients.loadtest -h)",
                              description=loadtest.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loadtest.add_arguments(p)  # its own --address and --timeout (a per-request deadline)
    p.set_defaults(client_handler=cmd_loadtest)


def run(args) -> int:
    with StreamrecClient(args.address, timeout_s=args.timeout, **connection_options(args)) as client:
        try:
            args.client_handler(args, client)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0
