"""Prequential quality benchmark (issue 4): streamrec online vs its frozen bootstrap, popularity and the
`implicit` peers (ALS, BPR, ALS refit every N events), all on the same time-ordered replay.

    python benchmarks/quality.py                                   # ML-100K, all models, JSON + PNG
    python benchmarks/quality.py --served                          # + the replay through a real gRPC server
    python benchmarks/quality.py --dataset synthetic --no-tune     # quick run

Protocol (engine/evaluation.py): train on the first 80% of events in time order; replay the last 20% in
time order, test-then-learn: before each positive event on an unseen item, ask for the user's top-10 among
the items they have not seen and record HR@10 / NDCG@10 of the held item, then apply the event.
The same code runs as `streamrec evaluate` (cli/evaluate.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from streamrec.cli.evaluate import main

OUT = Path(__file__).resolve().parent / "out"

if __name__ == "__main__":
    sys.exit(main(json_default=str(OUT / "quality.json"), plot_default=str(OUT / "quality.png")))
