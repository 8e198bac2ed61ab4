"""The load tester's report: the JSON-ready dict, the text table, the PNG plot."""
from __future__ import annotations

from streamrec.clients.loadtest.histogram import Recorder


def build_report(args, recorder: Recorder, dataset: str, users: int, items: int, wall_s: float) -> dict:
    duration = args.duration
    send_span = max(duration, recorder.last_send_s)  # sends that fell behind took longer than the window
    done_span = max(duration, recorder.last_done_s)  # answers that came after the window's end
    timeline = []
    for second in sorted(recorder.timeline):
        slot = recorder.timeline[second]
        latency = slot["latency"]
        timeline.append({"t": second, "ok": slot["ok"], "errors": slot["errors"],
                         "p50_ms": round(1e3 * latency.percentile(50), 4) if latency.total else None,
                         "p99_ms": round(1e3 * latency.percentile(99), 4) if latency.total else None})
    buckets = [(i, c) for i, c in enumerate(recorder.latency.counts) if c]
    events = dict(recorder.events)
    events["events_per_s"] = round(events["sent"] / duration, 2)
    requests = recorder.ok + recorder.error_count
    return {
        "scenario": args.scenario, "mode": "open" if args.rate else "closed", "address": args.address,
        "processes": args.processes, "concurrency": None if args.rate else args.concurrency,
        "streams_per_process": args.streams if args.scenario != "recommend" else None,
        "target_rate_rps": args.rate, "duration_s": duration, "warmup_s": args.warmup, "wall_s": round(wall_s, 3),
        "dataset": dataset, "users": users, "items": items, "zipf": args.zipf, "k": args.k, "rerank": args.rerank,
        "mix": args.mix if args.scenario == "mixed" else None,
        "events_per_message": args.events_per_message if args.scenario in ("events", "mixed") else None,
        "requests": requests, "ok": recorder.ok, "errors": recorder.error_count,
        "errors_by_code": dict(sorted(recorder.errors.items())),
        "error_rate": round(recorder.error_count / requests, 6) if requests else 0.0,
        "requests_by_op": dict(sorted(recorder.ops.items())),
        "throughput_rps": round(recorder.ok / done_span, 2),
        "achieved_rate_rps": round(recorder.issued / send_span, 2),
        "latency_ms": recorder.latency.summary_ms(),
        "error_latency_ms": recorder.error_latency.summary_ms(),
        "latency_by_op_ms": {op: h.summary_ms() for op, h in sorted(recorder.by_op.items())},
        "event_ack_lag_ms": recorder.ack_lag.summary_ms(),
        "schedule_lag_ms": recorder.schedule_lag.summary_ms(),
        "inflight_limit_waits": recorder.slot_waits if args.rate else None,
        "events": events,
        "timeline": timeline,
        "latency_histogram": {
            "bucket_low_ms": [round(1e3 * recorder.latency.bucket_bounds(i)[0], 6) for i, _ in buckets],
            "bucket_high_ms": [round(1e3 * recorder.latency.bucket_bounds(i)[1], 6) for i, _ in buckets],
            "counts": [c for _, c in buckets],
        },
    }


def format_report(report: dict) -> str:
    def line(name: str, summary: dict | None) -> str:
        if not summary:
            return f"  {name:<14} -"
        return (f"  {name:<14} p50 {summary['p50']:8.2f}  p90 {summary['p90']:8.2f}  p99 {summary['p99']:8.2f}  "
                f"p99.9 {summary['p99.9']:8.2f}  max {summary['max']:8.2f}  (n={summary['count']})")

    mode = f"open loop at {report['target_rate_rps']:g} req/s" if report["mode"] == "open" else \
        f"closed loop, concurrency {report['concurrency']}"
    out = [f"scenario {report['scenario']} against {report['address']}: {mode}, {report['processes']} process(es), "
           f"{report['duration_s']:g} s measured after {report['warmup_s']:g} s warm-up "
           f"({report['dataset']} ids: {report['users']} users, {report['items']} items, zipf {report['zipf']:g})",
           f"requests {report['requests']}  ok {report['ok']}  errors {report['errors']}"
           + (f" {report['errors_by_code']}" if report["errors"] else ""),
           f"throughput {report['throughput_rps']:,.1f} req/s (achieved send rate {report['achieved_rate_rps']:,.1f} req/s)",
           "latency, ms:", line("all", report["latency_ms"])]
    if len(report["latency_by_op_ms"]) > 1:
        out += [line(op, summary) for op, summary in report["latency_by_op_ms"].items()]
    if report["event_ack_lag_ms"]:
        out.append(line("event ack lag", report["event_ack_lag_ms"]))
        e = report["events"]
        out.append(f"events: {e['sent']} sent in {e['messages']} messages ({e['events_per_s']:,.0f}/s), "
                   f"{e['accepted']} accepted, {e['duplicates']} duplicate, {e['rejected']} rejected")
    if report["inflight_limit_waits"]:
        out.append(f"note: {report['inflight_limit_waits']} send(s) waited for a free --max-inflight slot: the server "
                   f"did not keep up with the rate (their wait is part of the latency above)")
    elif report["schedule_lag_ms"] and report["schedule_lag_ms"]["p99"] > 10.0:
        out.append(f"note: sends ran up to {report['schedule_lag_ms']['max']:.0f} ms behind schedule (p99 "
                   f"{report['schedule_lag_ms']['p99']:.1f} ms; counted in the latencies): the client process is CPU-bound "
                   f"or starved; try more --processes")
    return "\n".join(out)


def write_plot(report: dict, path: str) -> str | None:
    """PNG with the latency histogram and latency / throughput over time; returns an error message instead."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "--plot needs matplotlib (pip install matplotlib); the report was still written"
    fig, (hist_ax, lat_ax, thr_ax) = plt.subplots(3, 1, figsize=(10, 11))
    h = report["latency_histogram"]
    if h["counts"]:
        widths = [hi - lo for lo, hi in zip(h["bucket_low_ms"], h["bucket_high_ms"])]
        hist_ax.bar(h["bucket_low_ms"], h["counts"], width=widths, align="edge")
        hist_ax.set_xscale("log")
        hist_ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    if report["latency_ms"]:
        for name in ("p50", "p99", "p99.9"):
            hist_ax.axvline(report["latency_ms"][name], linestyle="--", linewidth=1, color="gray")
            hist_ax.text(report["latency_ms"][name], hist_ax.get_ylim()[1] * 0.9, f" {name}", fontsize=8)
    hist_ax.set(title=f"{report['scenario']} ({report['mode']} loop): latency histogram", xlabel="latency (ms)", ylabel="requests")
    t = [p["t"] for p in report["timeline"]]
    lat_ax.plot(t, [p["p50_ms"] for p in report["timeline"]], label="p50")
    lat_ax.plot(t, [p["p99_ms"] for p in report["timeline"]], label="p99")
    lat_ax.set(title="latency over time", xlabel="second of the measured window", ylabel="ms")
    lat_ax.legend()
    thr_ax.plot(t, [p["ok"] for p in report["timeline"]], label="ok/s")
    thr_ax.plot(t, [p["errors"] for p in report["timeline"]], label="errors/s")
    if report["target_rate_rps"]:
        thr_ax.axhline(report["target_rate_rps"], linestyle="--", color="gray", label="target")
    thr_ax.set(title="throughput over time", xlabel="second of the measured window", ylabel="requests/s")
    thr_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
