"""Client-side commands of the `streamrec` CLI: they talk to a running server through StreamrecClient."""
from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf import json_format

from .client import StreamrecClient, make_event

DEFAULT_ADDRESS = os.environ.get("STREAMREC_ADDRESS", "127.0.0.1:50051")


def _print(message, as_json: bool) -> None:
    if as_json:
        print(json_format.MessageToJson(message, preserving_proto_field_name=True))
        return
    print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None))


def cmd_recommend(args, client: StreamrecClient) -> None:
    response = client.recommend(args.user_id, k=args.k, include_categories=args.category or (),
                                exclude_seen=None if args.exclude_seen else False)
    if args.json:
        return _print(response, True)
    print(f"{response.strategy} recommendations for {response.user_id} "
          f"(model {response.served_by.model_version}, {response.server_latency_us} us):")
    for rank, item in enumerate(response.items, 1):
        print(f"{rank:4d}. {item.item_id:<20} {item.score:8.4f}  {', '.join(item.categories)}")


def cmd_similar(args, client: StreamrecClient) -> None:
    response = client.similar_items(args.item_id, k=args.k)
    if args.json:
        return _print(response, True)
    for rank, item in enumerate(response.items, 1):
        print(f"{rank:4d}. {item.item_id:<20} {item.score:8.4f}  {', '.join(item.categories)}")


def cmd_send_events(args, client: StreamrecClient) -> None:
    if args.file:
        from streamrec.engine.datasets import load_interactions_file

        log = load_interactions_file(args.file)
        events = (make_event(u, i, int(t), float(v), int(ts), event_id=f"{args.id_prefix}{n}")
                  for n, (u, i, t, v, ts) in enumerate(zip(log.user_ids, log.item_ids, log.types, log.values, log.timestamps_ms)))
    else:
        if not (args.user and args.item):
            raise SystemExit("send-events needs --user and --item, or --file")
        events = iter([make_event(args.user, args.item, args.type, args.value, event_id=args.event_id)])
    result = client.send_events(events, batch_size=args.batch_size, timeout_s=args.timeout)
    print(f"acked {result.batches} batch(es): {result.accepted} accepted, {result.duplicates} duplicate, "
          f"{len(result.rejections)} rejected; durable up to seq {result.durable_seq}")
    for rejection in result.rejections[:20]:
        print(f"  rejected event {rejection.event_id!r}: {rejection.field}: {rejection.reason}")


def cmd_stats(args, client: StreamrecClient) -> None:
    _print(client.stats(), True)


def cmd_health(args, client: StreamrecClient) -> None:
    print(client.health(args.service))


def register(subparsers) -> None:
    def add(name: str, handler, help: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help)
        parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port (env STREAMREC_ADDRESS)")
        parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
        parser.set_defaults(client_handler=handler)
        return parser

    p = add("recommend", cmd_recommend, "recommendations for a user")
    p.add_argument("user_id")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--category", action="append", help="only items in this category (repeatable)")
    p.add_argument("--include-seen", dest="exclude_seen", action="store_false", help="allow items the user already saw")
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

    add("stats", cmd_stats, "server statistics")
    p = add("health", cmd_health, "health status (SERVING / NOT_SERVING)")
    p.add_argument("--service", default="")


def run(args) -> int:
    with StreamrecClient(args.address, timeout_s=args.timeout) as client:
        try:
            args.client_handler(args, client)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0
