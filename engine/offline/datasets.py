"""Interaction data sets: MovieLens-100K, a synthetic set with planted clusters, and user-supplied files.

Every loader returns an `Interactions` log sorted by timestamp with a stable sort, so equal timestamps keep
their input order and the result is deterministic.
"""
from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from streamrec.engine.api import Event, EventType

log = logging.getLogger(__name__)


@dataclass
class Interactions:
    """A columnar interaction log, sorted by timestamp (stable)."""

    user_ids: np.ndarray  # object array of str
    item_ids: np.ndarray  # object array of str
    types: np.ndarray  # uint8 EventType values
    values: np.ndarray  # float32
    timestamps_ms: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.user_ids)

    def events(self, id_prefix: str):
        """Yield Event objects with deterministic ids (prefix + position), for seeding the log."""
        for i in range(len(self)):
            yield Event(
                f"{id_prefix}{i}",
                str(self.user_ids[i]),
                str(self.item_ids[i]),
                EventType(int(self.types[i])),
                float(self.values[i]),
                int(self.timestamps_ms[i]),
            )


@dataclass
class Dataset:
    name: str
    interactions: Interactions
    item_categories: dict[str, list[str]]  # every item of the catalog, even without interactions
    item_attributes: dict[str, dict[str, str]]

# --------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------


def build_interactions(
    user_ids: Sequence[str],
    item_ids: Sequence[str],
    types: Sequence[int] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    timestamps_ms: Sequence[int] | np.ndarray,
) -> Interactions:
    """Columns in any order -> Interactions sorted by time (stable: ties keep input order)."""
    ts = np.asarray(timestamps_ms, dtype=np.int64)
    order = np.argsort(ts, kind="stable")
    users = np.empty(len(ts), dtype=object)
    users[:] = list(user_ids)  # slice assignment keeps str elements even if they look like sequences
    items = np.empty(len(ts), dtype=object)
    items[:] = list(item_ids)
    return Interactions(
        user_ids=users[order],
        item_ids=items[order],
        types=np.asarray(types, dtype=np.uint8)[order],
        values=np.asarray(values, dtype=np.float32)[order],
        timestamps_ms=ts[order],
    )


def default_cache_dir() -> Path:
    """$STREAMREC_CACHE, else ~/.cache/streamrec."""
    env = os.environ.get("STREAMREC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamrec"


# --------------------------------------------------------------------------------------------------------
# MovieLens-100K (the atomic files shipped inside the recbole wheel)
# --------------------------------------------------------------------------------------------------------

ML100K_WHEEL_SPEC = "recbole==1.2.1"
ML100K_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
ML100K_REQUIRED = ("ml-100k.inter", "ml-100k.item")  # .user (demographics) is not used

_MANUAL_FETCH = (
    "Fetch it by hand: `python -m pip download --no-deps recbole==1.2.1 -d /tmp/rb`, then extract "
    "recbole/dataset_example/ml-100k/ml-100k.{{inter,item,user}} from the wheel (a zip file) into {dest}, "
    "or set STREAMREC_ML100K_DIR to a folder holding those files."
)


def load_ml100k(cache_dir: Path | None = None) -> Dataset:
    """MovieLens-100K: 100,000 ratings (1..5) of 1682 movies by 943 users, as RATING events.

    Files come from $STREAMREC_ML100K_DIR if set, else from `<cache_dir>/ml-100k/` (cache_dir defaults to
    $STREAMREC_CACHE or ~/.cache/streamrec), downloading the recbole wheel from PyPI on first use.
    """
    env_dir = os.environ.get("STREAMREC_ML100K_DIR")
    if env_dir:
        folder = Path(env_dir).expanduser()
        missing = [f for f in ML100K_REQUIRED if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"STREAMREC_ML100K_DIR={folder} lacks {', '.join(missing)}")
    else:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        folder = folder / "ml-100k"
        if not all((folder / f).is_file() for f in ML100K_REQUIRED):
            _download_ml100k(folder)
    return parse_ml100k(folder)


def _download_ml100k(dest: Path) -> None:
    """pip-download the recbole wheel into a temp dir, extract the three ml-100k files, drop the wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading MovieLens-100K (%s wheel) into %s", ML100K_WHEEL_SPEC, dest)
    with tempfile.TemporaryDirectory(prefix="streamrec-ml100k-") as tmpdir:  # removing it deletes the wheel
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", ML100K_WHEEL_SPEC, "-d", tmpdir]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"pip download of {ML100K_WHEEL_SPEC} failed: {exc}. "
                               + _MANUAL_FETCH.format(dest=dest)) from exc
        wheels = sorted(Path(tmpdir).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise RuntimeError(f"pip download of {ML100K_WHEEL_SPEC} failed (exit {proc.returncode}): {detail}\n"
                               + _MANUAL_FETCH.format(dest=dest))
        _extract_ml100k(wheels[0], dest)


def _extract_ml100k(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for name in ML100K_FILES:
            try:
                data = zf.read(ML100K_MEMBER_DIR + name)
            except KeyError as exc:
                raise RuntimeError(f"{wheel.name} has no {ML100K_MEMBER_DIR + name}. "
                                   + _MANUAL_FETCH.format(dest=dest)) from exc
            _write_atomic(dest / name, data)


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder then rename, so a reader (or a concurrent download) never sees a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is plain shared data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_atomic_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """A RecBole atomic file: tab-separated, header of `name:type`. Returns (names, rows padded to the header)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # the original GroupLens files are Latin-1
        text = raw.decode("latin-1")
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{path} is empty")
    names = [h.split(":", 1)[0].strip() for h in lines[0].split("\t")]
    rows = []
    for line in lines[1:]:
        if not line.strip():
            continue
        cells = line.split("\t")
        cells += [""] * (len(names) - len(cells))  # trailing empty fields may be cut off
        rows.append(cells)
    return names, rows


def _column(names: list[str], wanted: str, path: Path) -> int:
    try:
        return names.index(wanted)
    except ValueError:
        raise ValueError(f"{path}: no column {wanted!r} in header {names}") from None


def parse_ml100k(folder: Path) -> Dataset:
    """Parse ml-100k.inter and ml-100k.item from `folder` (no download)."""
    folder = Path(folder)
    inter_path, item_path = folder / "ml-100k.inter", folder / "ml-100k.item"

    names, rows = _read_atomic_table(inter_path)
    cu, ci, cr, ct = (_column(names, n, inter_path) for n in ("user_id", "item_id", "rating", "timestamp"))
    ratings = np.array([float(r[cr]) for r in rows], dtype=np.float32)
    seconds = np.array([float(r[ct]) for r in rows], dtype=np.float64)
    interactions = build_interactions(
        [r[cu] for r in rows],
        [r[ci] for r in rows],
        np.full(len(rows), EventType.RATING, dtype=np.uint8),
        ratings,
        np.rint(seconds * 1000.0).astype(np.int64),
    )

    names, rows = _read_atomic_table(item_path)
    ci = _column(names, "item_id", item_path)
    ctitle, cyear, cclass = (names.index(n) if n in names else None for n in ("movie_title", "release_year", "class"))
    categories: dict[str, list[str]] = {}
    attributes: dict[str, dict[str, str]] = {}
    for r in rows:
        item = r[ci]
        categories[item] = r[cclass].split() if cclass is not None else []  # genres are space-separated
        attributes[item] = {
            "title": r[ctitle] if ctitle is not None else "",
            "year": r[cyear] if cyear is not None else "",
        }
    # Keep the "every item of the catalog" promise even if the item file misses some rated items.
    for item in dict.fromkeys(interactions.item_ids.tolist()):
        if item not in categories:
            categories[item] = []
            attributes[item] = {"title": "", "year": ""}
    return Dataset("ml-100k", interactions, categories, attributes)


# --------------------------------------------------------------------------------------------------------
# Synthetic data with planted clusters
# --------------------------------------------------------------------------------------------------------

SYNTHETIC_EPOCH_MS = 1_700_000_000_000
SYNTHETIC_SPAN_MS = 30 * 24 * 3600 * 1000
IN_CLUSTER_SHARE = 0.85

# Event-type mixes: engaged behaviour on preferred clusters, browsing with some rejections elsewhere.
_IN_TYPES = np.array([EventType.VIEW, EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE, EventType.RATING])
_IN_P = np.array([0.45, 0.28, 0.07, 0.08, 0.12])
_OUT_TYPES = np.array([EventType.VIEW, EventType.CLICK, EventType.RATING, EventType.SKIP, EventType.DISLIKE])
_OUT_P = np.array([0.50, 0.15, 0.10, 0.19, 0.06])


@dataclass
class SyntheticTruth:
    """The planted structure behind `synthetic(...)` with the same arguments."""

    user_clusters: dict[str, list[str]]  # user id -> preferred categories ("c3", ...)
    item_cluster: dict[str, str]  # item id -> its category


def _plant(rng: np.random.Generator, n_users: int, n_items: int, n_clusters: int):
    """Cluster of each item (balanced), 1-2 preferred clusters per user, and a skewed item popularity."""
    if n_clusters < 2 or n_items < n_clusters or n_users < 1:
        raise ValueError("need n_clusters >= 2, n_items >= n_clusters, n_users >= 1")
    item_cluster = rng.permutation(np.arange(n_items) % n_clusters)
    n_pref = rng.integers(1, 3, size=n_users)
    pref = np.stack([rng.choice(n_clusters, size=2, replace=False) for _ in range(n_users)])
    popularity = rng.lognormal(0.0, 1.0, size=n_items)  # long tail inside each cluster
    return item_cluster, n_pref, pref, popularity


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Separate streams so the planted truth does not depend on events_per_user.
    plant, events = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(plant), np.random.default_rng(events)


def synthetic_truth(n_users: int = 500, n_items: int = 2000, n_clusters: int = 10, seed: int = 0) -> SyntheticTruth:
    item_cluster, n_pref, pref, _ = _plant(_rngs(seed)[0], n_users, n_items, n_clusters)
    return SyntheticTruth(
        user_clusters={f"u{u}": [f"c{c}" for c in pref[u, : n_pref[u]]] for u in range(n_users)},
        item_cluster={f"i{i}": f"c{c}" for i, c in enumerate(item_cluster)},
    )


def synthetic(
    n_users: int = 500, n_items: int = 2000, n_clusters: int = 10, events_per_user: int = 40, seed: int = 0
) -> Dataset:
    """Users with 1-2 preferred clusters; 85% of their events hit those clusters (see `synthetic_truth`)."""
    rng_plant, rng = _rngs(seed)
    item_cluster, n_pref, pref, popularity = _plant(rng_plant, n_users, n_items, n_clusters)
    shape = (n_users, events_per_user)

    # Which preferred cluster each event uses (column 0 or 1, only 0 for single-cluster users).
    slot = (rng.random(shape) * n_pref[:, None]).astype(np.int64)
    cluster = np.take_along_axis(pref, slot, axis=1)
    in_cluster = rng.random(shape) < IN_CLUSTER_SHARE

    items = rng.integers(0, n_items, size=shape)  # the random part: any item
    u01 = rng.random(shape)
    for c in range(n_clusters):  # in-cluster draws follow popularity within the cluster
        members = np.flatnonzero(item_cluster == c)
        cdf = np.cumsum(popularity[members])
        cdf /= cdf[-1]
        mask = in_cluster & (cluster == c)
        items[mask] = members[np.minimum(np.searchsorted(cdf, u01[mask], side="right"), len(members) - 1)]

    liked = (item_cluster[items] == pref[:, :1]) | ((item_cluster[items] == pref[:, 1:]) & (n_pref[:, None] == 2))
    types = np.where(liked, rng.choice(_IN_TYPES, size=shape, p=_IN_P), rng.choice(_OUT_TYPES, size=shape, p=_OUT_P))
    ratings = np.where(liked, rng.choice([3, 4, 5], size=shape, p=[0.1, 0.4, 0.5]),
                       rng.choice([1, 2, 3], size=shape, p=[0.35, 0.4, 0.25]))
    values = np.where(types == EventType.RATING, ratings, 1.0)

    # Each user's events spread over the 30 days, in generation order.
    times = SYNTHETIC_EPOCH_MS + np.sort(rng.integers(0, SYNTHETIC_SPAN_MS, size=shape), axis=1)

    user_col = np.repeat([f"u{u}" for u in range(n_users)], events_per_user).tolist()
    item_names = np.array([f"i{i}" for i in range(n_items)], dtype=object)
    interactions = build_interactions(
        user_col, item_names[items.ravel()].tolist(), types.ravel(), values.ravel(), times.ravel()
    )
    categories = {f"i{i}": [f"c{c}"] for i, c in enumerate(item_cluster)}
    attributes = {f"i{i}": {"title": f"item {i}"} for i in range(n_items)}
    return Dataset(f"synthetic-{seed}", interactions, categories, attributes)


# --------------------------------------------------------------------------------------------------------
# User files for `streamrec load`
# --------------------------------------------------------------------------------------------------------

def load(name: str, seed: int = 0) -> Dataset:
    """A dataset by name: ml-100k (from the recbole wheel, see load_ml100k) or synthetic (planted clusters)."""
    if name == "ml-100k":
        return load_ml100k()
    if name == "synthetic":
        return synthetic(seed=seed)
    raise ValueError(f"unknown dataset '{name}' (choose ml-100k, synthetic or none)")


DEFAULT_FILE_TYPE = EventType.CLICK  # a log without a type column: each row is a plain, moderate interaction
SECONDS_THRESHOLD = 1e11  # all timestamps below this are read as seconds (1e11 ms is 1973, 1e11 s is year 5138)


def dataset_from_file(path: str | Path) -> Dataset:
    """A Dataset of an interaction log file (load_interactions_file): its items, in order of first appearance,
    are the catalog, with no categories or attributes."""
    interactions = load_interactions_file(path)
    items = dict.fromkeys(str(i) for i in interactions.item_ids)
    return Dataset(Path(path).stem, interactions, {i: [] for i in items}, {i: {} for i in items})


def load_interactions_file(path: str | Path) -> Interactions:
    """Read a CSV (.tsv: tab-separated) or Parquet interaction log.

    Columns (header names, case-insensitive): user_id, item_id required; optional
      type       EventType name ("purchase", "PURCHASE", "add_to_cart") or number (1..7); default CLICK
      value      float; default 1.0 (the rating for RATING events, required for them)
      timestamp  epoch milliseconds, or epoch seconds if EVERY value is < 1e11; without the column the
                 row index is used (0, 1, 2, ... ms) so file order is kept.
    Raises ValueError naming the row (1-based data row, header excluded) for a bad cell.
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        columns = _read_parquet_columns(path)
        where = lambda i: f"{path}: row {i + 1}"  # noqa: E731
    else:
        columns, lines = _read_csv_columns(path)
        where = lambda i: f"{path}: row {i + 1} (line {lines[i]})"  # noqa: E731
    return _columns_to_interactions(columns, where, str(path))


def _read_csv_columns(path: Path) -> tuple[dict[str, list[Any]], list[int]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from spreadsheet exports
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty")
        names = [h.strip().lower() for h in header]
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: duplicate column names in header {header}")
        columns: dict[str, list[Any]] = {n: [] for n in names}
        lines = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                raise ValueError(f"{path}: row {len(lines) + 1} (line {reader.line_num}) has {len(row)} "
                                 f"fields, the header has {len(names)}")
            for n, cell in zip(names, row):
                columns[n].append(cell.strip())
            lines.append(reader.line_num)
    return columns, lines


def _read_parquet_columns(path: Path) -> dict[str, list[Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"reading {path} needs pyarrow: `pip install pyarrow` "
                          "(or `pip install streamrec[parquet]`)") from exc
    import pyarrow as pa

    table = pq.read_table(path)
    columns = {}
    for field in table.schema:
        col = table.column(field.name)
        if pa.types.is_timestamp(field.type):  # a real timestamp type: epoch ms, whatever its unit or zone
            col = col.cast(pa.timestamp("ms", tz=field.type.tz), safe=False).cast(pa.int64())  # truncate sub-ms
        columns[field.name.strip().lower()] = col.to_pylist()
    return columns


def _parse_type(raw: Any) -> int:
    if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
        return int(EventType(int(raw)))
    text = str(raw).strip()
    if text.lstrip("+-").isdigit():
        return int(EventType(int(text)))
    return int(EventType[text.upper().replace("-", "_").replace(" ", "_")])


def _columns_to_interactions(columns: dict[str, list[Any]], where, source: str) -> Interactions:
    for required in ("user_id", "item_id"):
        if required not in columns:
            raise ValueError(f"{source}: no {required!r} column (found {sorted(columns)})")
    n = len(columns["user_id"])
    users, items = [], []
    for i, (u, it) in enumerate(zip(columns["user_id"], columns["item_id"])):
        if u is None or it is None or str(u) == "" or str(it) == "":
            raise ValueError(f"{where(i)}: empty user_id or item_id")
        users.append(str(u))
        items.append(str(it))

    types = np.full(n, DEFAULT_FILE_TYPE, dtype=np.uint8)
    for i, raw in enumerate(columns.get("type", [])):
        if raw is None or raw == "":
            continue
        try:
            types[i] = _parse_type(raw)
        except (KeyError, ValueError):
            names = ", ".join(t.name for t in EventType)
            raise ValueError(f"{where(i)}: unknown event type {raw!r} (expected one of {names} "
                             f"or 1..{max(EventType)})") from None

    values = np.ones(n, dtype=np.float64)
    raw_values = columns.get("value", [None] * n)
    for i, raw in enumerate(raw_values):
        if raw is not None and raw != "":
            values[i] = _to_float(raw, where(i), "value")
        elif types[i] == EventType.RATING:  # a default of 1.0 would silently read as a 1-star rating
            raise ValueError(f"{where(i)}: a rating needs a value")

    if "timestamp" in columns:
        ts = np.array([_to_float(raw, where(i), "timestamp") for i, raw in enumerate(columns["timestamp"])])
        if n and np.all(ts < SECONDS_THRESHOLD):
            ts = ts * 1000.0
        timestamps = np.rint(ts).astype(np.int64)
    else:
        timestamps = np.arange(n, dtype=np.int64)
    return build_interactions(users, items, types, values, timestamps)


def _to_float(raw: Any, where: str, column: str) -> float:
    try:
        x = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: bad {column} {raw!r}") from None
    if not np.isfinite(x):
        raise ValueError(f"{where}: bad {column} {raw!r}")
    return x
