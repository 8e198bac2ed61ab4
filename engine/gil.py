"""Background work that lets latency-bound threads in. CPython hands the GIL to a waiting thread only after the
holder has run for the switch interval (5 ms), and a group commit waits for it several times (after its fsync,
after the update kernel...), so a checkpoint building records on its own thread stretched commits on one core
(benchmarks/RESULTS.md, "Figures behind design choices"). Releasing the GIL every few hundred records gives the same effect to the checkpoint thread alone."""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

_T = TypeVar("_T")


def yielding(items: Iterable[_T], every: int = 256) -> Iterator[_T]:
    """The items, with the GIL released (time.sleep(0)) after every `every` of them."""
    for count, item in enumerate(items, 1):
        if count % every == 0:
            time.sleep(0)
        yield item
