"""Kill the real server with SIGKILL mid-stream: every acknowledged event must survive, once."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from streamrec.clients.client import StreamrecClient, make_event
from streamrec.cli.process import ServerProcess
from streamrec.v1 import events_pb2


def stream_until_killed(address: str, acked: list[str], stop: threading.Event, prefix: str) -> None:
    """Stream batches of 20 events; record ids whose ack arrived, until the connection drops."""
    sent: dict[str, list[str]] = {}

    def batches():
        number = 0
        while not stop.is_set():
            events = [make_event(f"crash-u{(number * 20 + j) % 37}", f"i{(number * 7 + j) % 2000}", "click",
                                 event_id=f"{prefix}-{number}-{j}") for j in range(20)]
            sent[str(number)] = [e.event_id for e in events]
            yield events_pb2.EventBatch(batch_id=str(number), events=events)
            number += 1

    with StreamrecClient(address) as client:
        try:
            for ack in client.events.StreamEvents(batches(), timeout=60):
                assert ack.accepted == 20 and not ack.rejections
                acked.extend(sent[ack.batch_id])
        except grpc.RpcError:
            pass  # the server died


@pytest.mark.parametrize("trial", range(2))
def test_sigkill_mid_stream_loses_no_acked_event(tmp_path, trial):
    server = ServerProcess(tmp_path / "data").start()
    acked: list[list[str]] = [[], []]
    stop = threading.Event()
    writers = [threading.Thread(target=stream_until_killed, args=(server.address, acked[n], stop, f"t{trial}w{n}"))
               for n in range(2)]
    for w in writers:
        w.start()
    deadline = time.monotonic() + 20
    while sum(map(len, acked)) < 400 * (trial + 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()
    stop.set()
    for w in writers:
        w.join(10)
    all_acked = acked[0] + acked[1]
    assert len(all_acked) >= 400, "the load never got going"

    server.start()  # same data dir: recovery replays the log after the last checkpoint
    with StreamrecClient(server.address) as client:
        # Every acked event is durable: resending it is recognised as a duplicate, never applied twice.
        resend = client.send_events((make_event("x", "i1", "click", event_id=e) for e in all_acked), batch_size=500)
        assert resend.duplicates == len(all_acked) and resend.accepted == 0
        seen_counts = sum(client.get_user(f"crash-u{u}").event_count for u in range(37))
        assert seen_counts >= len(all_acked)  # acked ones, plus any committed whose ack was cut off
        assert client.health() == "SERVING"
    assert server.terminate() == 0
