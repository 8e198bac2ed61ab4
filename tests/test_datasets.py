from __future__ import annotations

import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from streamrec.engine.api import EventType
from streamrec.engine.offline import datasets
from streamrec.engine.offline.datasets import (
    SYNTHETIC_EPOCH_MS,
    SYNTHETIC_SPAN_MS,
    Interactions,
    load_interactions_file,
    load_ml100k,
    synthetic,
    synthetic_truth,
)

COLUMNS = ("user_ids", "item_ids", "types", "values", "timestamps_ms")


def assert_same(a: Interactions, b: Interactions) -> None:
    for col in COLUMNS:
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col), err_msg=col)


# ---------------------------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def syn():
    return synthetic()


def test_synthetic_deterministic(syn):
    again = synthetic()
    assert_same(syn.interactions, again.interactions)
    assert syn.item_categories == again.item_categories
    assert syn.item_attributes == again.item_attributes
    other = synthetic(seed=1)
    assert not np.array_equal(syn.interactions.item_ids, other.interactions.item_ids)


def test_synthetic_shape_and_order(syn):
    it = syn.interactions
    assert len(it) == 500 * 40
    assert it.types.dtype == np.uint8 and it.values.dtype == np.float32 and it.timestamps_ms.dtype == np.int64
    assert np.all(np.diff(it.timestamps_ms) >= 0)
    assert it.timestamps_ms[0] >= SYNTHETIC_EPOCH_MS and it.timestamps_ms[-1] < SYNTHETIC_EPOCH_MS + SYNTHETIC_SPAN_MS
    assert set(it.user_ids) == {f"u{u}" for u in range(500)}
    assert set(syn.item_categories) == {f"i{i}" for i in range(2000)}
    kinds = Counter(EventType(int(t)) for t in it.types)
    assert set(kinds) == set(EventType)  # a realistic mix: every type occurs
    assert kinds[EventType.VIEW] + kinds[EventType.CLICK] > len(it) / 2
    rating = it.types == EventType.RATING
    assert set(np.unique(it.values[rating])) <= {1, 2, 3, 4, 5}
    assert np.all(it.values[~rating] == 1.0)


def test_synthetic_planted_clusters(syn):
    truth = synthetic_truth()
    assert truth.item_cluster == {i: cats[0] for i, cats in syn.item_categories.items()}
    assert {len(c) for c in truth.user_clusters.values()} == {1, 2}
    it = syn.interactions
    liked = np.array([truth.item_cluster[i] in truth.user_clusters[u] for u, i in zip(it.user_ids, it.item_ids)])
    assert liked.mean() > 0.8  # random items would give ~0.15
    rating = it.types == EventType.RATING
    assert it.values[rating & liked].mean() > it.values[rating & ~liked].mean() + 1.5
    negative = np.isin(it.types, [EventType.SKIP, EventType.DISLIKE])
    assert negative.any() and not (negative & liked).any()
    # The planted truth does not depend on how many events are drawn.
    assert synthetic(events_per_user=5).item_categories == syn.item_categories


# ---------------------------------------------------------------------------------------------- ML-100K files

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "1\t10\t4\t881250949\n"
    "2\t20\t5\t881250000\n"
    "1\t30\t3\t881250949\n"
    "3\t10\t1\t881250949\n"
    "3\t99\t2\t881251000\n"
)
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tToy Story\t1995\tAnimation Children's Comedy\n"
    "20\tNo Genre\t\t\n"
    "30\tunkonwn\tunkonwn\tunknown\n"
    "40\tNever Rated\t1998\tDrama\n"
    "50\tCut Short\n"
)
USER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\ttechnician\t85711\n"


def write_ml_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("ml-100k.inter", INTER), ("ml-100k.item", ITEM), ("ml-100k.user", USER)):
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_ml100k_parsing_from_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_ML100K_DIR", str(write_ml_files(tmp_path / "ml")))
    ds = load_ml100k(cache_dir=tmp_path / "unused")
    it = ds.interactions
    assert ds.name == "ml-100k"
    # Sorted by time; the three ties at 881250949 keep file order.
    assert list(zip(it.user_ids, it.item_ids)) == [("2", "20"), ("1", "10"), ("1", "30"), ("3", "10"), ("3", "99")]
    assert it.timestamps_ms.tolist() == [881250000000, 881250949000, 881250949000, 881250949000, 881251000000]
    assert it.values.tolist() == [5, 4, 3, 1, 2]
    assert np.all(it.types == EventType.RATING)
    assert ds.item_categories["10"] == ["Animation", "Children's", "Comedy"]
    assert ds.item_categories["20"] == [] and ds.item_attributes["20"] == {"title": "No Genre", "year": ""}
    assert ds.item_categories["30"] == ["unknown"]
    assert ds.item_categories["40"] == ["Drama"]  # catalog item without ratings
    assert ds.item_attributes["50"] == {"title": "Cut Short", "year": ""} and ds.item_categories["50"] == []
    assert ds.item_categories["99"] == []  # rated but missing from the item file: still in the catalog
    assert not (tmp_path / "unused").exists()


def test_ml100k_env_dir_missing_file(tmp_path, monkeypatch):
    folder = write_ml_files(tmp_path / "ml")
    (folder / "ml-100k.item").unlink()
    monkeypatch.setenv("STREAMREC_ML100K_DIR", str(folder))
    with pytest.raises(FileNotFoundError, match="ml-100k.item"):
        load_ml100k()


def fake_pip(calls: list, returncode: int = 0):
    """Stands in for `pip download`: writes a wheel-like zip holding the ml-100k files and an extra member."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[:3] == [sys.executable, "-m", "pip"] and "recbole==1.2.1" in cmd and "--no-deps" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        if returncode == 0:
            with zipfile.ZipFile(dest / "recbole-1.2.1-py3-none-any.whl", "w") as zf:
                for name, text in (("ml-100k.inter", INTER), ("ml-100k.item", ITEM), ("ml-100k.user", USER)):
                    zf.writestr(f"recbole/dataset_example/ml-100k/{name}", text)
                zf.writestr("recbole/dataset_example/ml-100k/ml-100k.kg", "big\n")
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: no network" if returncode else "")

    return run


def test_ml100k_download_extracts_only_needed_files(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMREC_ML100K_DIR", raising=False)
    calls: list = []
    monkeypatch.setattr(datasets.subprocess, "run", fake_pip(calls))
    ds = load_ml100k(cache_dir=tmp_path)
    assert len(ds.interactions) == 5 and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "ml-100k").iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    wheel_dir = Path(calls[0][calls[0].index("-d") + 1])
    assert not wheel_dir.exists()  # the wheel is deleted
    load_ml100k(cache_dir=tmp_path)
    assert len(calls) == 1  # cached


def test_ml100k_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMREC_ML100K_DIR", raising=False)
    monkeypatch.setenv("STREAMREC_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(datasets.subprocess, "run", fake_pip([]))
    load_ml100k()
    assert (tmp_path / "c" / "ml-100k" / "ml-100k.inter").is_file()


def test_ml100k_download_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMREC_ML100K_DIR", raising=False)
    monkeypatch.setattr(datasets.subprocess, "run", fake_pip([], returncode=1))
    with pytest.raises(RuntimeError, match="no network") as err:
        load_ml100k(cache_dir=tmp_path)
    assert "STREAMREC_ML100K_DIR" in str(err.value) and "pip download" in str(err.value)


def test_real_ml100k():
    """Downloads the recbole wheel from PyPI on first use (cached in $STREAMREC_CACHE or ~/.cache/streamrec)."""
    ds = load_ml100k()
    it = ds.interactions
    assert len(it) == 100_000
    assert len(set(it.user_ids)) == 943 and len(set(it.item_ids)) == 1682 and len(ds.item_categories) == 1682
    assert Counter(it.values.tolist()) == {1: 6110, 2: 11370, 3: 27145, 4: 34174, 5: 21201}
    assert np.all(np.diff(it.timestamps_ms) >= 0)
    assert it.timestamps_ms[0] == 874724710000 and it.timestamps_ms[-1] == 893286638000
    genres = Counter(g for cats in ds.item_categories.values() for g in cats)
    assert len(genres) == 19 and genres["unknown"] == 2 and genres["Drama"] == 725
    assert all(ds.item_categories.values())  # every movie has at least one genre
    assert ds.item_categories["1"] == ["Animation", "Children's", "Comedy"]
    assert ds.item_attributes["1"] == {"title": "Toy Story", "year": "1995"}


# ---------------------------------------------------------------------------------------------- CSV / Parquet


def write(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_types_by_name_and_number(tmp_path):
    path = write(tmp_path, "user_id,item_id,type,value,timestamp\n"
                           "u1,a,purchase,,1700000000000\n"
                           "u1,b,PURCHASE,2,1700000000001\n"
                           "u2,a,4,,1700000000002\n"
                           "u2,c,add-to-cart,,1700000000003\n"
                           "u3,c,rating,4.5,1700000000004\n"
                           "u3,a,,,1700000000005\n")
    it = load_interactions_file(path)
    assert it.types.tolist() == [EventType.PURCHASE, EventType.PURCHASE, EventType.PURCHASE,
                                 EventType.ADD_TO_CART, EventType.RATING, EventType.CLICK]
    assert it.values.tolist() == [1.0, 2.0, 1.0, 1.0, 4.5, 1.0]
    assert it.timestamps_ms.tolist() == list(range(1700000000000, 1700000000006))
    assert it.user_ids.tolist() == ["u1", "u1", "u2", "u2", "u3", "u3"]


def test_csv_seconds_vs_ms_and_sorting(tmp_path):
    secs = load_interactions_file(write(tmp_path, "user_id,item_id,timestamp\nu1,a,1700000005\nu2,b,1700000001\n"
                                                  "u3,c,1700000005\n"))
    assert secs.timestamps_ms.tolist() == [1700000001000, 1700000005000, 1700000005000]
    assert secs.user_ids.tolist() == ["u2", "u1", "u3"]  # stable: the tie keeps file order
    ms = load_interactions_file(write(tmp_path, "user_id,item_id,timestamp\nu1,a,1700000005000\nu2,b,5\n", "ms.csv"))
    assert ms.timestamps_ms.tolist() == [5, 1700000005000]  # one value >= 1e11: all are milliseconds
    plain = load_interactions_file(write(tmp_path, "User_ID, item_id\nu1,a\nu2,b\n", "plain.csv"))
    assert plain.timestamps_ms.tolist() == [0, 1] and np.all(plain.types == EventType.CLICK)


def test_tsv(tmp_path):
    it = load_interactions_file(write(tmp_path, "user_id\titem_id\ttype\nu1\ta\tview\n", "log.tsv"))
    assert it.types.tolist() == [EventType.VIEW]


@pytest.mark.parametrize("bad", ["buy", "9", "0"])
def test_csv_bad_type_names_the_row(tmp_path, bad):
    path = write(tmp_path, f"user_id,item_id,type\nu1,a,view\nu2,b,{bad}\n")
    with pytest.raises(ValueError, match=rf"row 2 \(line 3\).*'{bad}'"):
        load_interactions_file(path)


def test_csv_other_errors(tmp_path):
    with pytest.raises(ValueError, match="user_id"):
        load_interactions_file(write(tmp_path, "user,item_id\nu1,a\n"))
    with pytest.raises(ValueError, match="row 1.*timestamp 'soon'"):
        load_interactions_file(write(tmp_path, "user_id,item_id,timestamp\nu1,a,soon\n", "t.csv"))
    with pytest.raises(ValueError, match="row 2.*rating needs a value"):
        load_interactions_file(write(tmp_path, "user_id,item_id,type,value\nu1,a,rating,4\nu1,b,rating,\n", "r.csv"))
    with pytest.raises(ValueError, match="duplicate"):
        load_interactions_file(write(tmp_path, "user_id,item_id,item_id\nu1,a,b\n", "d.csv"))


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_interactions_file(tmp_path / "log.parquet")


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"user_id": ["u1", "u2"], "item_id": [1, 2], "type": [4, 2], "timestamp": [20, 10]})
    pq.write_table(table, tmp_path / "log.parquet")
    it = load_interactions_file(tmp_path / "log.parquet")
    assert it.user_ids.tolist() == ["u2", "u1"] and it.item_ids.tolist() == ["2", "1"]
    assert it.types.tolist() == [EventType.CLICK, EventType.PURCHASE]
    assert it.timestamps_ms.tolist() == [10_000, 20_000]
    # A real timestamp column is read as epoch milliseconds.
    stamps = pa.array([1_700_000_000_123_456, None], type=pa.timestamp("us", tz="UTC"))
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "item_id": ["a", "b"], "timestamp": stamps}),
                   tmp_path / "ts.parquet")
    with pytest.raises(ValueError, match="row 2.*timestamp None"):
        load_interactions_file(tmp_path / "ts.parquet")
    pq.write_table(pa.table({"user_id": ["u1"], "item_id": ["a"], "timestamp": stamps[:1]}), tmp_path / "ts.parquet")
    assert load_interactions_file(tmp_path / "ts.parquet").timestamps_ms.tolist() == [1_700_000_000_123]
