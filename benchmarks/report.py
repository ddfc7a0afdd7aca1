"""Measurements -> figures -> targets (PASS/FAIL), the printed table, and the JSON file."""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bench
import workload as w


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    value: str
    goal: str
    ok: bool


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def log_summary(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The daemon's warnings and errors, by message."""
    bad = [e for e in lines if e.get("level") in ("warning", "error", "critical", "raw")]
    return {"lines": len(lines), "warnings_and_errors": dict(Counter(str(e.get("message")) for e in bad))}


def summarize(
    settings: dict[str, Any],
    ctx: bench.Ctx,
    baselines: dict[str, dict[str, Any]],
    end: dict[str, Any],
    arrivals: dict[int, float],
) -> dict[str, Any]:
    """Every figure, from what the phases recorded and when each span arrived; targets included."""
    stopped, final, totals = end["stopped"], end["final"], end["totals"]
    lay, f, spans, commits = ctx.lay, ctx.figures, ctx.spans, ctx.commits
    stats = {k: v for k, v in stopped.items() if k not in ("time", "level", "logger", "message")}
    received = sum(stats.get("events", {}).values()) + sum(stats.get("payload_errors", {}).values())

    def last(key: str) -> float:
        return max((arrivals[s] for s in spans[key] if s in arrivals), default=float("nan"))

    def build_latency(b: int, committed: float) -> float:
        return arrivals.get(spans[f"build:{b}"][0], float("nan")) - committed

    idle_lat = [build_latency(b, commits[f"build:{b}"]) for b in lay.idle_sentinels()]
    idle_med = median(idle_lat)
    n_eval = w.burst_eval_notification_count(lay)
    raw = build_latency(lay.burst_sentinel, commits["eval"])
    est = max(raw - idle_med, 1e-3)
    missing = max(0, ctx.sent - received)
    n_spans = len(spans["bursts"])
    export_s = last("bursts") - commits["bursts"]
    every = {s for ids in spans.values() for s in ids}
    missing_by_phase: Counter[str] = Counter()
    for key, ids in spans.items():
        phase = "single builds (sentinels, steady)" if key.startswith("build:") else key
        missing_by_phase[phase] += sum(1 for s in ids if s not in arrivals)
    lat = [build_latency(b, t) for b, t in ctx.steady_commits.items()]
    lat_ok = [x for x in lat if x == x]
    bq, events = f["bursts_queries"], f["bursts_events"]
    r: dict[str, Any] = {
        "scale": settings["scale"],
        "sizes": asdict(lay.sizes),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "config": {**settings, "daemon_exit_code": end["code"]},
        "daemon_log": log_summary(end["lines"]),
        "baselines": baselines,
        "daemon": {
            "receive": {
                "notifications": n_eval,
                "commit_to_sentinel_s": raw,
                "idle_sentinel_latency_s": idle_med,
                "estimated_receive_s": est,
                # Valid only if nothing was dropped: else the sentinel may have come through a catch-up.
                "valid": missing == 0,
                "rate_per_s": n_eval / est if missing == 0 else None,
                "raw_rate_per_s": n_eval / raw,
                "cpu_s": f["eval"]["cpu_s"],
                "cpu_us_per_notification": 1e6 * f["eval"]["cpu_s"] / n_eval,
            },
            "export": {
                "spans": n_spans,
                "seconds": export_s,
                "rate_per_s": n_spans / export_s,
                "cpu_s": f["bursts_cpu_s"],
                "cpu_us_per_span": 1e6 * f["bursts_cpu_s"] / n_spans,
                "cpu_share_by_thread": f["bursts_cpu_threads"],
            },
            "bursts": {
                "eval": {
                    "commit_to_last_span_s": last("eval") - commits["eval"],
                    "queries": f["eval"]["queries"],
                },
                "builds": {
                    "commit_to_last_span_s": export_s,
                    "committing_s": f.get("bursts_committing_s"),
                },
                "dependents": {"commit_to_last_span_s": last("dependents") - commits["dependents"]},
            },
            "lost": {
                "spans_expected": len(every),
                "spans_missing": len(every - arrivals.keys()),
                "spans_missing_by_phase": {k: v for k, v in missing_by_phase.items() if v},
                "spans_received": totals["spans"],
                "span_duplicates": totals["duplicates"],
                "notifications_sent": ctx.sent,
                "notifications_received": received,
                "notifications_missing": missing,
                "resyncs": stats.get("resyncs", {}),
                "spans_dropped": stats.get("spans_dropped"),
            },
            "memory": {
                "idle_rss_mb": f["idle_rss_kb"] / 1024,
                "peak_eval_burst_mb": f["eval"]["peak_kb"] / 1024,
                "peak_run_mb": max(final["VmHWM"], f["peak_before_eval_kb"]) / 1024,
                "vmhwm_reset_worked": f["hwm_reset"],
            },
            "queries": {
                "bursts": {
                    "events": events,
                    "enrichment": bq.get("enrichment", 0),
                    "per_1000_events": 1000 * bq.get("enrichment", 0) / events,
                    "by_kind": bq,
                },
                "steady": f["steady_queries"],
                "run": dict(ctx.qlog.count(0)),
            },
            "latency": {
                "events": len(lat),
                "missing": len(lat) - len(lat_ok),
                "offered_rate_per_s": f["steady_rate_per_s"],
                "p50_s": percentile(lat_ok, 50) if lat_ok else float("nan"),
                "p99_s": percentile(lat_ok, 99) if lat_ok else float("nan"),
                "max_s": max(lat_ok, default=float("nan")),
                "idle_single_build_s": idle_lat,
                "cpu_percent_of_core": f["steady_cpu_percent"],
                "cpu_share_by_thread": f["steady_cpu_threads"],
            },
            "idle_cpu": f["idle_cpu"],
            "stats": stats,
        },
    }
    r["targets"] = [asdict(t) for t in targets(r)]
    return r


def targets(r: dict[str, Any]) -> list[Target]:
    """The issue's targets, evaluated on the results."""
    d, b = r["daemon"], r["baselines"]
    recv, listen = d["receive"], b["R_listen"]
    ratio_recv = (recv["rate_per_s"] or 0.0) / listen["rate_per_s"] if listen["rate_per_s"] else 0.0
    recv_value = (
        f"{recv['rate_per_s']:,.0f}/s = {ratio_recv:.2f}x"
        if recv["valid"]
        else f"n/a: {d['lost']['notifications_missing']:,} dropped"
    )
    exp, export = d["export"], b["R_export"]
    ratio_exp = exp["rate_per_s"] / export["rate_per_s"] if export["rate_per_s"] else 0.0
    lost = d["lost"]
    n_lost = lost["spans_missing"] + lost["notifications_missing"]
    mem = d["memory"]
    growth = mem["peak_eval_burst_mb"] - mem["idle_rss_mb"]
    q = d["queries"]["bursts"]
    lat = d["latency"]
    limit = r["config"]["export_delay_s"] + 1.0
    cpu = d["idle_cpu"]["percent_of_core"]
    return [
        Target(
            "receive rate vs R_listen",
            recv_value,
            ">= 0.50x",
            ratio_recv >= 0.5,
        ),
        Target(
            "spans/s vs R_export",
            f"{exp['rate_per_s']:,.0f}/s = {ratio_exp:.2f}x",
            ">= 0.70x",
            ratio_exp >= 0.7,
        ),
        Target(
            "lost (spans + notifications)",
            f"{lost['spans_missing']} + {lost['notifications_missing']}",
            "0",
            n_lost == 0,
        ),
        Target(
            "peak RSS growth, eval burst",
            f"+{growth:.0f} MB (idle {mem['idle_rss_mb']:.0f} MB)",
            "<= +250 MB",
            growth <= 250,
        ),
        Target(
            "enrichment queries / 1k events",
            f"{q['per_1000_events']:.1f} ({q['enrichment']} for {q['events']:,})",
            "<= 10",
            q["per_1000_events"] <= 10,
        ),
        Target(
            "p99 commit-to-receiver latency",
            f"{lat['p99_s']:.2f} s (p50 {lat['p50_s']:.2f} s)",
            f"<= {limit:.1f} s",
            lat["p99_s"] <= limit,
        ),
        Target("idle CPU", f"{cpu:.2f}% of a core", "< 1%", cpu < 1.0),
        *_issue17_targets(r),
    ]


def _issue17_targets(r: dict[str, Any]) -> list[Target]:
    """Steady CPU, throughput against the daemon's own export path, and the burst times."""
    d, b = r["daemon"], r["baselines"]
    steady = d["latency"]
    cpu = steady["cpu_percent_of_core"]
    us = 1e4 * cpu / steady["offered_rate_per_s"] if steady["offered_rate_per_s"] else float("nan")
    direct = b["R_export_direct"]["rate_per_s"]
    ratio = d["export"]["rate_per_s"] / direct if direct else 0.0
    builds = d["bursts"]["builds"]["commit_to_last_span_s"]
    evals = d["bursts"]["eval"]["commit_to_last_span_s"]
    return [
        Target(
            f"CPU at {steady['offered_rate_per_s']:.0f} events/s",
            f"{cpu:.1f}% of a core ({us:.0f} µs/event)",
            "<= 2%",
            cpu <= 2.0,
        ),
        Target(
            "spans/s vs R_export direct",
            f"{d['export']['rate_per_s']:,.0f}/s = {ratio:.2f}x",
            ">= 0.50x",
            ratio >= 0.5,
        ),
        Target("build bursts commit -> last span", f"{builds:.2f} s", "<= 4.0 s", builds <= 4.0),
        Target("eval burst commit -> last span", f"{evals:.2f} s", "<= 2.0 s", evals <= 2.0),
    ]


def _shares(shares: dict[str, float]) -> str:
    """Thread shares as "Trio thread 70%, worker threads 25%, ...": the main thread is the Trio thread
    (with the read pacer's watch thread, which has no name of its own: procs.cpu_by_thread),
    trio's worker threads (export in thread mode, state dir writes) are summed."""
    named: dict[str, float] = {}
    for k, v in shares.items():
        label = "Trio thread" if k == "python" else "worker threads" if k.startswith("Trio thread") else k
        named[label] = named.get(label, 0.0) + v
    top = sorted(named.items(), key=lambda kv: -kv[1])[:4]
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in top) or "n/a"


def table(r: dict[str, Any]) -> str:
    """The figures and the PASS/FAIL table, as text."""
    d, b = r["daemon"], r["baselines"]
    recv, bursts = d["receive"], d["bursts"]
    recv_rate = f"{recv['rate_per_s']:,.0f}" if recv["valid"] else "n/a"
    lines = [
        f"hydra-otel benchmark: scale {r['scale']} ({r['sizes']['new_builds']:,} new builds, "
        f"{r['sizes']['history']:,} cached, {r['sizes']['finishing']:,} finishing, "
        f"{r['sizes']['dependents']:,} dependents, {r['sizes']['steady']:,} steady events)",
        "",
        f"  R_listen (asyncio+asyncpg)    {b['R_listen']['rate_per_s']:>12,.0f} notifications/s"
        f"  ({b['R_listen']['cpu_us_per_notification']:.1f} µs CPU each)",
        f"  daemon receive (estimated)    {recv_rate:>12} notifications/s"
        f"  (raw e2e {recv['raw_rate_per_s']:,.0f}/s; {recv['cpu_us_per_notification']:.1f} µs CPU each)",
        f"  R_export (exporter alone)     {b['R_export']['rate_per_s']:>12,.0f} spans/s"
        f"  ({b['R_export']['cpu_us_per_span']:.0f} µs CPU each)",
        f"  R_export direct (own encoder) {b['R_export_direct']['rate_per_s']:>12,.0f} spans/s"
        f"  ({b['R_export_direct']['cpu_us_per_span']:.0f} µs CPU each; daemon at "
        f"{d['export']['rate_per_s'] / max(1.0, b['R_export_direct']['rate_per_s']):.2f}x of it; target below)",
        f"  daemon export, build bursts   {d['export']['rate_per_s']:>12,.0f} spans/s"
        f"  ({d['export']['spans']:,} spans; {d['export']['cpu_us_per_span']:.0f} µs CPU each)",
        f"  CPU by thread, build bursts        {_shares(d['export']['cpu_share_by_thread'])}",
        f"  eval burst commit -> last span     {bursts['eval']['commit_to_last_span_s']:>8.2f} s",
        f"  build bursts commit -> last span   {bursts['builds']['commit_to_last_span_s']:>8.2f} s"
        f"  (the workload committed them in {bursts['builds']['committing_s'] or 0:.2f} s)",
        f"  dependents commit -> last span     {bursts['dependents']['commit_to_last_span_s']:>8.2f} s",
        f"  peak RSS (whole run)               {d['memory']['peak_run_mb']:>8.0f} MB",
        f"  latency at {d['latency']['offered_rate_per_s']:.0f} events/s      "
        f"p50 {d['latency']['p50_s']:.2f} s, p99 {d['latency']['p99_s']:.2f} s, max {d['latency']['max_s']:.2f} s; "
        f"CPU {d['latency']['cpu_percent_of_core']:.1f}% of a core",
        f"  CPU by thread, steady              {_shares(d['latency']['cpu_share_by_thread'])}",
        f"  lost: {d['lost']['notifications_missing']:,} of {d['lost']['notifications_sent']:,} notifications, "
        f"{d['lost']['spans_missing']:,} of {d['lost']['spans_expected']:,} spans; resyncs {d['lost']['resyncs']}",
        f"  queries by kind (whole run)        {d['queries']['run']}",
        "",
        f"  {'target':<34} {'measured':<38} {'goal':<12} result",
    ]
    for t in r["targets"]:
        lines.append(f"  {t['name']:<34} {t['value']:<38} {t['goal']:<12} {'PASS' if t['ok'] else 'FAIL'}")
    if "hog" in r:
        h = r["hog"]
        lines += [
            "",
            "  the same run again with a CPU hog (a busy process) on the machine, every ratio against",
            "  baselines measured under the same hog:",
            f"  {'target':<34} {'measured':<38} {'goal':<12} result",
        ]
        for t in h["targets"]:
            lines.append(
                f"  {'hog: ' + t['name']:<38} {t['value']:<38} {t['goal']:<12} {'PASS' if t['ok'] else 'FAIL'}"
            )
    return "\n".join(lines)


def write(path: Path, r: dict[str, Any]) -> None:
    path.write_text(json.dumps(r, indent=2, sort_keys=False) + "\n")
