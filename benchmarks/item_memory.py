"""python benchmarks/item_memory.py [--items 100000] [--json PATH]

Bytes of Python heap per item in the in-memory catalog (ItemCatalog: vector, counters, id, categories,
attributes), measured with tracemalloc at d = 64 and 128: the figure behind "what catalog size needs the items
sharded" (RESULTS.md, "Replicas on Ray"). The vector's own share is printed beside it."""
from __future__ import annotations

import argparse
import json
import tracemalloc

import numpy as np

from streamrec.engine.state.catalog import ItemCatalog


def bytes_per_item(dim: int, n: int) -> float:
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    tracemalloc.start()
    catalog = ItemCatalog(dim, 14 * 86_400_000.0)
    for i in range(n):  # short ids, one category, one attribute: a typical catalog row
        catalog.upsert(f"item-{i:07d}", [f"c{i % 50}"], {"title": f"title {i}"}, vectors[i])
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return used / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rows = []
    print(f"{'d':>4} {'bytes/item':>11} {'vector fp32':>12} {'vector fp16':>12}")
    for dim in (64, 128):
        measured = bytes_per_item(dim, args.items)
        rows.append({"dim": dim, "items": args.items, "bytes_per_item": round(measured, 1),
                     "vector_fp32": 4 * dim, "vector_fp16": 2 * dim})
        print(f"{dim:>4} {measured:>11.0f} {4 * dim:>12} {2 * dim:>12}")
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
