"""A replica's apply loop in a process of its own (LMDB refuses a second open of one environment in a process),
driven step by step from a test over stdin/stdout:

    python tests/replica_probe.py STORE_DIR DIM [MAP_BYTES [SEQUENCE_MODEL]]
    catchup          -> {"applied_seq": ..., "reloads": ..., "reranker": version or null, "users": n}
    snapshot PATH    -> the state_snapshot pickled to PATH; "ok"
    quit
"""
from __future__ import annotations

import json
import pickle
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from state_snapshot import state_snapshot  # noqa: E402

from streamrec.engine.config import EngineConfig  # noqa: E402
from streamrec.engine.replica.follower import LogFollower  # noqa: E402
from streamrec.engine.rerank.reranker import Reranker  # noqa: E402
from streamrec.engine.state.state import State  # noqa: E402
from streamrec.engine.store.store import Store  # noqa: E402


def main() -> None:
    path, dim = Path(sys.argv[1]), int(sys.argv[2])
    map_bytes = int(sys.argv[3]) if len(sys.argv) > 3 else 64 << 20
    config = EngineConfig(dim=dim, sequence_model_path=sys.argv[4] if len(sys.argv) > 4 else None, sequence_update="event")
    store = Store(path, readonly=True, initial_map_size=map_bytes)
    state = State(config)
    follower = LogFollower(store, state, threading.RLock(), Reranker(dim, provider="cpu"), config, lambda: "none")
    follower.load()
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "catchup":
            while follower.catch_up():
                pass
            model = follower.reranker.model
            print(json.dumps({"applied_seq": state.applied_seq, "reloads": follower.reloads,
                              "reranker": model.version if model else None, "users": len(state.users)}), flush=True)
        elif command == "snapshot":
            Path(argument).write_bytes(pickle.dumps(state_snapshot(state)))
            print("ok", flush=True)
        elif command == "quit":
            break
    store.close()


if __name__ == "__main__":
    main()
