"""The load tester: short runs against the live server, and its histogram arithmetic."""
from __future__ import annotations

import json
import math
import random

import pytest

from streamrec.clients import loadtest
from streamrec.cli import main as streamrec_main
from streamrec.clients.loadtest.histogram import Histogram, Recorder
from streamrec.clients.loadtest.runner import ZipfSampler

REPORT_FIELDS = {"scenario", "mode", "processes", "duration_s", "warmup_s", "requests", "ok", "errors", "errors_by_code",
                 "throughput_rps", "achieved_rate_rps", "latency_ms", "latency_by_op_ms", "event_ack_lag_ms", "events",
                 "timeline", "latency_histogram", "target_rate_rps", "concurrency"}
SUMMARY_FIELDS = {"count", "mean", "min", "p50", "p90", "p99", "p99.9", "max"}


def run(tmp_path, capsys, *argv) -> dict:
    path = tmp_path / "report.json"
    assert loadtest.main([*argv, "--json", str(path), "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "throughput" in out and "latency, ms" in out
    return json.loads(path.read_text())


def test_closed_loop_mixed_smoke(server, tmp_path, capsys):
    report = run(tmp_path, capsys, "--address", server.address, "--scenario", "mixed", "--mix", "0.7", "--concurrency", "4",
                 "--streams", "2", "--duration", "2", "--warmup", "0.5", "--events-per-message", "5")
    assert REPORT_FIELDS <= set(report)
    assert (report["scenario"], report["mode"], report["dataset"], report["processes"]) == ("mixed", "closed", "synthetic", 1)
    assert report["throughput_rps"] > 0 and report["errors"] == 0 and report["errors_by_code"] == {}
    assert report["ok"] == report["requests"] == sum(report["requests_by_op"].values())
    assert set(report["latency_by_op_ms"]) == {"recommend", "events"}
    assert SUMMARY_FIELDS <= set(report["latency_ms"]) and SUMMARY_FIELDS <= set(report["event_ack_lag_ms"])
    summary = report["latency_ms"]
    assert 0 < summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["p99.9"] <= summary["max"]
    events = report["events"]
    assert events["sent"] == 5 * events["messages"] == events["accepted"] and events["rejected"] == 0
    assert sum(point["ok"] for point in report["timeline"]) == report["ok"]
    assert sum(report["latency_histogram"]["counts"]) == report["ok"]


def test_open_loop_holds_the_target_rate(server, tmp_path, capsys):
    report = run(tmp_path, capsys, "--address", server.address, "--scenario", "recommend", "--rate", "40",
                 "--duration", "2", "--warmup", "0.5", "--dataset", "synthetic", "--zipf", "0.9")
    assert report["mode"] == "open" and report["target_rate_rps"] == 40
    assert report["requests"] == 80 and report["errors"] == 0
    assert report["achieved_rate_rps"] == pytest.approx(40, rel=0.1)
    assert report["throughput_rps"] == pytest.approx(40, rel=0.15)
    assert SUMMARY_FIELDS <= set(report["latency_ms"]) and report["latency_ms"]["p50"] > 0
    assert report["schedule_lag_ms"]["count"] == 80 and report["event_ack_lag_ms"] is None


def test_streamrec_loadtest_command_with_two_processes(server, tmp_path, capsys):
    """`streamrec loadtest`, the stream scenario, and latency merged from two client processes."""
    path = tmp_path / "two.json"
    assert streamrec_main(["loadtest", "--address", server.address, "--scenario", "stream", "--processes", "2",
                           "--concurrency", "4", "--streams", "1", "--duration", "1", "--warmup", "0.3",
                           "--progress", "none", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["processes"] == 2 and report["errors"] == 0 and report["ok"] > 0
    assert report["latency_ms"]["count"] == report["ok"]


def test_an_unreachable_server_is_an_error(capsys):
    assert loadtest.main(["--address", "127.0.0.1:1", "--connect-timeout", "0.5", "--progress", "none"]) == 1
    assert "cannot reach 127.0.0.1:1" in capsys.readouterr().err


def test_histogram_percentiles_and_merge():
    rng = random.Random(1)
    values = [rng.lognormvariate(-6, 1.0) for _ in range(20000)]
    first, second, everything = Histogram(), Histogram(), Histogram()
    for n, value in enumerate(values):
        (first if n % 2 else second).record(value)
        everything.record(value)
    merged = Histogram.from_dict(json.loads(json.dumps(first.to_dict()))).merge(second)
    assert merged.counts == everything.counts and merged.total == 20000
    ordered = sorted(values)
    for q in (50, 90, 99, 99.9):
        exact = ordered[math.ceil(q / 100 * len(ordered)) - 1]
        assert merged.percentile(q) == pytest.approx(exact, rel=0.01)
    assert merged.percentile(100) == max(values) and merged.summary_ms()["max"] == pytest.approx(1e3 * max(values), rel=1e-3)
    assert Histogram().summary_ms() is None


def test_recorder_round_trip_and_zipf():
    recorder = Recorder()
    recorder.record("recommend", 0.2, 0.004, "OK")
    recorder.record("events", 1.5, 0.010, "OK")
    recorder.record("events", 1.7, 0.0, "UNAVAILABLE")
    merged = Recorder().merge(Recorder.from_dict(json.loads(json.dumps(recorder.to_dict()))))
    assert (merged.ok, merged.errors, merged.ops) == (2, {"UNAVAILABLE": 1}, {"recommend": 1, "events": 2})
    assert sorted(merged.timeline) == [0, 1] and merged.timeline[1]["errors"] == 1

    import numpy as np
    ids = [f"u{n}" for n in range(100)]
    sampler = ZipfSampler(ids, 1.1, 0, np.random.default_rng(3))
    draws = [sampler() for _ in range(20000)]
    counts = sorted((draws.count(i) for i in set(draws)), reverse=True)
    assert counts[0] > 5 * counts[9] and set(draws) <= set(ids)  # rank 1 vs rank 10: 10**1.1 ~ 12.6x
    assert ZipfSampler(ids, 1.1, 0, np.random.default_rng(4)).ids == sampler.ids  # the same ids are hot everywhere


def test_plot_or_a_clear_message(tmp_path):
    report = {"latency_histogram": {"bucket_low_ms": [1.0, 2.0], "bucket_high_ms": [1.01, 2.02], "counts": [3, 1]},
              "latency_ms": {"p50": 1.0, "p99": 2.0, "p99.9": 2.0}, "scenario": "recommend", "mode": "closed",
              "timeline": [{"t": 0, "ok": 4, "errors": 0, "p50_ms": 1.0, "p99_ms": 2.0}], "target_rate_rps": None}
    path = tmp_path / "plot.png"
    problem = loadtest.write_plot(report, str(path))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert problem and "matplotlib" in problem
        return
    assert problem is None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
