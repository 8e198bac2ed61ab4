"""Were the online settings tuned on the test replay? Re-check them on the training period only: seed on the first
60% of ML-100K (by time), replay 60-80% test-then-learn; the last 20% (the reported replay) is never touched.

    python benchmarks/online_validation.py     # ~3 minutes on 2 cores
"""
import dataclasses
import tempfile
from pathlib import Path

from streamrec.engine.config import EngineConfig
from streamrec.engine.engine import Engine
from streamrec.engine.offline import datasets
from streamrec.engine.offline import evaluation as ev
from streamrec.engine.offline.seeding import seed_engine

full = datasets.load_ml100k()
train80, _ = ev.time_split(full, 0.8)
seed60, replay = ev.time_split(train80, 0.75)
catalog = ev.Catalog.of(full)
events = ev.replay_events(replay)
history = seed60.interactions
base = EngineConfig(dim=64, backend="numpy", sync=False)
grid = [dict()] + [dict(online_history=h) for h in (10, 50)] + [dict(item_lr=l) for l in (0.0, 0.01)] + \
       [dict(online_cg_steps=c) for c in (1, 3)] + [dict(item_lr_new=0.0)]
pop = ev.prequential_replay(events, ev.Popularity(catalog, history), 10, catalog=catalog, history=history)
print(f"popularity HR@10 {pop.hr:.4f} NDCG@10 {pop.ndcg:.4f} ({pop.events} evaluated)", flush=True)
for change in grid:
    config = dataclasses.replace(base, **change)
    with tempfile.TemporaryDirectory() as tmp:
        with Engine(Path(tmp) / "lmdb", config) as engine:
            seed_engine(engine, seed60, 0)
            frozen = ev.prequential_replay(events, ev.FrozenEngine(engine, catalog, history, "frozen"), 10, catalog=catalog, history=history) if not change else None
            r = ev.prequential_replay(events, ev.StreamrecEngine(engine, "online"), 10, catalog=catalog, history=history)
    if frozen:
        print(f"frozen bootstrap HR@10 {frozen.hr:.4f} NDCG@10 {frozen.ndcg:.4f}", flush=True)
    print(f"online {change or 'defaults'}: HR@10 {r.hr:.4f} NDCG@10 {r.ndcg:.4f} ({r.events} evaluated)", flush=True)
