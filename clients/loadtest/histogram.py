"""Latency histograms of the load tester: fixed log-spaced buckets (HDR-like), so memory stays bounded
whatever the run length and the histograms of several processes merge exactly."""
from __future__ import annotations

import math

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


class Histogram:
    """Latencies in log-spaced buckets: bucket i covers [min_s * growth**i, min_s * growth**(i+1)).
    A percentile is read as its bucket's geometric middle (clamped to the observed min/max), so the
    relative error is below (growth - 1) / 2. Memory is fixed; two histograms merge by adding counts."""

    def __init__(self, growth: float = 1.01, min_s: float = 1e-6, max_s: float = 3600.0):
        self.growth, self.min_s, self.max_s = growth, min_s, max_s
        self._scale = 1.0 / math.log(growth)
        self.size = int(math.ceil(math.log(max_s / min_s) * self._scale)) + 1
        self.counts = [0] * self.size
        self.total = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0

    def index(self, seconds: float) -> int:
        if seconds <= self.min_s:
            return 0
        return min(self.size - 1, int(math.log(seconds / self.min_s) * self._scale))

    def record(self, seconds: float) -> None:
        self.counts[self.index(seconds)] += 1
        self.total += 1
        self.sum += seconds
        if seconds < self.min:
            self.min = seconds
        if seconds > self.max:
            self.max = seconds

    def bucket_bounds(self, index: int) -> tuple[float, float]:
        return self.min_s * self.growth ** index, self.min_s * self.growth ** (index + 1)

    def percentile(self, q: float) -> float:
        if not self.total:
            return math.nan
        rank = max(1, math.ceil(q / 100.0 * self.total))
        if rank >= self.total:
            return self.max  # the extremes are known exactly
        if rank == 1:
            return self.min
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                low, high = self.bucket_bounds(index)
                return min(self.max, max(self.min, math.sqrt(low * high)))
        return self.max

    def merge(self, other: "Histogram") -> "Histogram":
        if (other.growth, other.min_s, other.size) != (self.growth, self.min_s, self.size):
            raise ValueError("histograms with different buckets")
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def to_dict(self) -> dict:
        return {"growth": self.growth, "min_s": self.min_s, "max_s": self.max_s, "total": self.total, "sum": self.sum,
                "min": self.min if self.total else None, "max": self.max,
                "counts": {i: c for i, c in enumerate(self.counts) if c}}

    @classmethod
    def from_dict(cls, data: dict) -> "Histogram":
        histogram = cls(data["growth"], data["min_s"], data["max_s"])
        for index, count in data["counts"].items():
            histogram.counts[int(index)] = count
        histogram.total, histogram.sum, histogram.max = data["total"], data["sum"], data["max"]
        histogram.min = math.inf if data["min"] is None else data["min"]
        return histogram

    def summary_ms(self) -> dict | None:
        if not self.total:
            return None
        summary = {"count": self.total, "mean": 1e3 * self.sum / self.total, "min": 1e3 * self.min}
        summary.update({name: 1e3 * self.percentile(q) for name, q in PERCENTILES})
        summary["max"] = 1e3 * self.max
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}


def _coarse() -> Histogram:
    return Histogram(growth=1.1)  # per-second timeline: ~200 buckets, 5% resolution


class Recorder:
    """What one process measured: per-operation histograms, errors by status code, a per-second timeline."""

    def __init__(self) -> None:
        self.latency = Histogram()
        self.error_latency = Histogram()  # how fast failures come back (e.g. RESOURCE_EXHAUSTED under overload)
        self.by_op: dict[str, Histogram] = {}
        self.ops: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.ack_lag = Histogram()
        self.schedule_lag = Histogram()
        self.timeline: dict[int, dict] = {}
        self.events = {"messages": 0, "sent": 0, "accepted": 0, "duplicates": 0, "rejected": 0}
        self.issued = 0
        self.last_send_s = 0.0  # when the last measured request went out, since the window start
        self.last_done_s = 0.0  # when the last measured request finished
        self.slot_waits = 0  # open loop: sends that waited for a --max-inflight slot

    def _second(self, second: int) -> dict:
        slot = self.timeline.get(second)
        if slot is None:
            slot = self.timeline[second] = {"ok": 0, "errors": 0, "latency": _coarse()}
        return slot

    def record(self, op: str, t_rel: float, latency_s: float, code: str) -> None:
        self.ops[op] = self.ops.get(op, 0) + 1
        slot = self._second(int(t_rel))
        if code == "OK":
            self.latency.record(latency_s)
            histogram = self.by_op.get(op)
            if histogram is None:
                histogram = self.by_op[op] = Histogram()
            histogram.record(latency_s)
            slot["ok"] += 1
            slot["latency"].record(latency_s)
        else:
            self.errors[code] = self.errors.get(code, 0) + 1
            self.error_latency.record(latency_s)
            slot["errors"] += 1

    @property
    def ok(self) -> int:
        return self.latency.total

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        return {
            "latency": self.latency.to_dict(), "error_latency": self.error_latency.to_dict(), "by_op": {k: v.to_dict() for k, v in self.by_op.items()},
            "ops": self.ops, "errors": self.errors, "ack_lag": self.ack_lag.to_dict(),
            "schedule_lag": self.schedule_lag.to_dict(), "events": self.events, "issued": self.issued,
            "last_send_s": self.last_send_s, "last_done_s": self.last_done_s, "slot_waits": self.slot_waits,
            "timeline": {s: {"ok": v["ok"], "errors": v["errors"], "latency": v["latency"].to_dict()} for s, v in self.timeline.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Recorder":
        recorder = cls()
        recorder.latency = Histogram.from_dict(data["latency"])
        recorder.error_latency = Histogram.from_dict(data["error_latency"])
        recorder.by_op = {k: Histogram.from_dict(v) for k, v in data["by_op"].items()}
        recorder.ops, recorder.errors, recorder.events = dict(data["ops"]), dict(data["errors"]), dict(data["events"])
        recorder.ack_lag, recorder.schedule_lag = Histogram.from_dict(data["ack_lag"]), Histogram.from_dict(data["schedule_lag"])
        recorder.issued, recorder.last_send_s, recorder.last_done_s = data["issued"], data["last_send_s"], data["last_done_s"]
        recorder.slot_waits = data["slot_waits"]
        recorder.timeline = {int(s): {"ok": v["ok"], "errors": v["errors"], "latency": Histogram.from_dict(v["latency"])}
                             for s, v in data["timeline"].items()}
        return recorder

    def merge(self, other: "Recorder") -> "Recorder":
        self.latency.merge(other.latency)
        self.error_latency.merge(other.error_latency)
        for op, histogram in other.by_op.items():
            self.by_op.setdefault(op, Histogram()).merge(histogram)
        for mine, theirs in ((self.ops, other.ops), (self.errors, other.errors), (self.events, other.events)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        self.ack_lag.merge(other.ack_lag)
        self.schedule_lag.merge(other.schedule_lag)
        self.issued += other.issued
        self.last_send_s = max(self.last_send_s, other.last_send_s)
        self.last_done_s = max(self.last_done_s, other.last_done_s)
        self.slot_waits += other.slot_waits
        for second, slot in other.timeline.items():
            mine = self._second(second)
            mine["ok"] += slot["ok"]
            mine["errors"] += slot["errors"]
            mine["latency"].merge(slot["latency"])
        return self
