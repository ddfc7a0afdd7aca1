"""The benchmark's phases, in order; run.py owns the processes and their cleanup.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC, shared with the receiver process). A
commit time is taken when COMMIT returns on the workload's own asyncpg connection.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import model
import procs
import workload as w
from pglog import QueryLog


@dataclass
class Ctx:
    """What the phases share: the workload, the processes and what was measured so far."""

    lay: w.Layout
    tmp: Path
    conn: asyncpg.Connection
    receiver: procs.Receiver
    qlog: QueryLog
    idle_seconds: float
    export_delay: float = 1.0  # the daemon's, which also paces its LISTEN reads
    daemon: procs.Daemon | None = None
    sampler: procs.RssSampler | None = None
    commits: dict[str, float] = field(default_factory=dict)  # phase -> first commit time
    steady_commits: dict[int, float] = field(default_factory=dict)  # build ID -> commit time
    spans: dict[str, list[int]] = field(default_factory=dict)  # every phase's span IDs, rendered up front
    expected: dict[str, list[int]] = field(default_factory=dict)  # phase -> span IDs waited for
    figures: dict[str, Any] = field(default_factory=dict)
    sent: int = 0  # notifications committed while the daemon listened

    async def commit(self, sql: str, notifications: int = 0) -> float:
        await self.conn.execute(sql)
        self.sent += notifications
        return time.monotonic()

    def wait(self, phase: str, ids: list[int], *, stall: float = 40.0) -> dict[str, Any]:
        """Tell the receiver which spans a phase must produce and wait for them (or a stall)."""
        self.expected[phase] = ids
        self.receiver.expect(self.tmp / f"expect-{phase}.bin", ids)
        return self.receiver.wait_expected(stall=stall, limit=1800)


def expected_spans(lay: w.Layout) -> dict[str, list[int]]:
    """Span IDs each phase must deliver (rendered before anything is timed)."""
    out = {
        "bursts": [r.span_id for b in lay.bursts() for r in model.burst_records(lay, b)],
        "dependents": [r.span_id for r in model.dependents_records(lay)],
        "eval": model.eval_span_ids(lay, w.BURST_EVAL),
    }
    for b in [*lay.idle_sentinels(), lay.burst_sentinel, *lay.steady()]:
        out[f"build:{b}"] = [r.span_id for r in model.single_records(lay, b, lay.burst_stop)]
    return out


async def listen_baseline(dsn: str, lay: w.Layout, channels: list[str]) -> dict[str, Any]:
    """R_listen: the burst eval's notifications (replayed, same payloads) to plain asyncio + asyncpg."""
    n = w.burst_eval_notification_count(lay)
    child = procs.Child(procs.script("listen_baseline.py", dsn, str(n), ",".join(channels)))
    try:
        child.read()  # ready: LISTEN is active
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(w.replay_sql(lay))
            t_commit = time.monotonic()
        finally:
            await conn.close()
        res = await asyncio.to_thread(child.read)
    finally:
        child.stop()
    seconds = res["last"] - t_commit if res["last"] else float("nan")
    return {
        "notifications": n,
        "received": res["received"],
        "commit_to_last_s": seconds,
        "rate_per_s": res["received"] / seconds if res["received"] else 0.0,
        "cpu_us_per_notification": 1e6 * res["cpu_s"] / max(1, res["received"]),
        "imported_trio_asyncio": res["imported_trio_asyncio"],
    }


def export_baseline(
    ctx: Ctx, layout_json: str, batch: int, ids: list[int], mode: str = "sdk"
) -> dict[str, Any]:
    """R_export: the build bursts' spans, pre-built, through the exporter alone to the same receiver.

    ``mode`` "sdk" sends SDK spans through the SDK's encoder (the issue's baseline); "direct" sends
    the records through the daemon's own encoder, for comparison.
    """
    script = procs.script("export_baseline.py", ctx.receiver.endpoint, layout_json, str(batch), mode)
    child = procs.Child(script)
    try:
        ready = child.read()
        ctx.receiver.expect(ctx.tmp / "expect-export.bin", ids)
        child.send("go")
        res = child.read()
        st = ctx.receiver.wait_expected(stall=30, limit=600)
    finally:
        child.stop()
    seconds = (st["last_expected"] or res["t_end"]) - res["t_start"]
    return {
        "spans": ready["ready"],
        "received": st["got"],
        "cpu_us_per_span": 1e6 * res["cpu_s"] / max(1, ready["ready"]),
        "seconds": seconds,
        "rate_per_s": st["got"] / seconds if seconds > 0 else 0.0,
        "cpu_s": res["cpu_s"],
        "failed_batches": res["failures"],
    }


async def idle(ctx: Ctx) -> None:
    """After start-up settles: idle RSS and the daemon's CPU over ``idle_seconds``."""
    assert ctx.daemon is not None
    pid = ctx.daemon.pid
    ctx.receiver.settle(quiet=2.0)
    off = ctx.qlog.offset()
    cpu0, t0 = procs.cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(ctx.idle_seconds)
    cpu1, t1 = procs.cpu_seconds(pid), time.monotonic()
    ctx.figures["idle_cpu"] = {
        "seconds": t1 - t0,
        "cpu_s": cpu1 - cpu0,
        "percent_of_core": 100 * (cpu1 - cpu0) / (t1 - t0),
        "queries": dict(ctx.qlog.count(off)),
    }
    ctx.figures["idle_rss_kb"] = procs.memory_kb(pid)["VmRSS"]


async def idle_sentinels(ctx: Ctx) -> None:
    """One build at a time while idle: the pipeline's latency with nothing else to do."""
    for b in ctx.lay.idle_sentinels():
        stop = max(int(time.time()), ctx.lay.burst_stop)
        ctx.commits[f"build:{b}"] = await ctx.commit(w.single_sql(ctx.lay, b, stop), 2)
        ctx.wait(f"build:{b}", ctx.spans[f"build:{b}"], stall=20)
        # Longer than the export delay: the next one must not land in the read pause this one
        # began (the LISTEN connection collects a trickle for up to that delay), or it would
        # measure the pause, which the burst sentinel does not wait for.
        await asyncio.sleep(ctx.export_delay + 0.3)


async def eval_burst(ctx: Ctx) -> None:
    """Eval 2: 80,000 build_queued + 150,000 cached_build_* + eval_added in one commit; then a sentinel."""
    assert ctx.daemon is not None
    assert ctx.sampler is not None
    pid, lay = ctx.daemon.pid, ctx.lay
    ctx.figures["peak_before_eval_kb"] = procs.memory_kb(pid)["VmHWM"]
    ctx.figures["hwm_reset"] = procs.reset_peak(pid)
    ctx.sampler.mark()
    off, cpu0 = ctx.qlog.offset(), procs.cpu_seconds(pid)
    await ctx.commit(w.eval_started_sql(lay), 1)
    first, body = w.burst_eval_sql(lay)
    await ctx.commit(first)
    ctx.commits["eval"] = await ctx.commit(body, w.burst_eval_notification_count(lay))
    sentinel = f"build:{lay.burst_sentinel}"
    stop = max(int(time.time()), lay.burst_stop)
    ctx.commits[sentinel] = await ctx.commit(w.single_sql(lay, lay.burst_sentinel, stop), 2)
    await ctx.commit(w.evaluator_exits_sql())
    ctx.wait("eval", ctx.spans["eval"])
    ctx.wait(sentinel, ctx.spans[sentinel])
    cpu1 = procs.cpu_seconds(pid)
    mem = procs.memory_kb(pid)
    peak = mem["VmHWM"] if ctx.figures["hwm_reset"] else 0
    ctx.figures["eval"] = {
        "cpu_s": cpu1 - cpu0,
        "peak_kb": max(peak, ctx.sampler.max_kb),
        "queries": dict(ctx.qlog.count(off)),
    }


async def build_bursts(ctx: Ctx) -> None:
    """20,000 builds finishing with 3 steps each, committed in bursts back to back; then the dependents."""
    assert ctx.daemon is not None
    lay, pid = ctx.lay, ctx.daemon.pid
    off, cpu0, threads0 = ctx.qlog.offset(), procs.cpu_seconds(pid), procs.cpu_by_thread(pid)
    for i, builds in enumerate(lay.bursts()):
        t = await ctx.commit(w.burst_sql(lay, builds), 4 * len(builds))
        if i == 0:
            ctx.commits["bursts"] = t
    # How long the workload itself took to commit the bursts: the floor under "commit -> last span".
    ctx.figures["bursts_committing_s"] = t - ctx.commits["bursts"]
    ctx.wait("bursts", ctx.spans["bursts"])
    ctx.figures["bursts_cpu_s"] = procs.cpu_seconds(pid) - cpu0
    ctx.figures["bursts_cpu_threads"] = procs.thread_shares(threads0, procs.cpu_by_thread(pid))
    sql, n = w.dependents_sql(lay)
    ctx.commits["dependents"] = await ctx.commit(sql, n)
    ctx.wait("dependents", ctx.spans["dependents"])
    await asyncio.sleep(0.5)  # let the last queries reach the log
    ctx.figures["bursts_queries"] = dict(ctx.qlog.count(off))
    ctx.figures["bursts_events"] = 4 * lay.sizes.finishing + lay.sizes.dependents + 2


async def steady(ctx: Ctx) -> None:
    """Builds finishing one per event at ``rate`` per second; commit time recorded per build."""
    lay = ctx.lay
    assert ctx.daemon is not None
    off, cpu0 = ctx.qlog.offset(), procs.cpu_seconds(ctx.daemon.pid)
    threads0 = procs.cpu_by_thread(ctx.daemon.pid)
    start = time.monotonic()
    for i, b in enumerate(lay.steady()):
        delay = start + i / lay.sizes.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        stop = max(int(time.time()), lay.burst_stop)
        ctx.steady_commits[b] = await ctx.commit(w.single_sql(lay, b, stop), 2)
    ctx.figures["steady_rate_per_s"] = len(lay.steady()) / (time.monotonic() - start)
    # CPU while the events come in: what a busy Hydra (which commits each build on its own) costs.
    ctx.figures["steady_cpu_percent"] = (
        100 * (procs.cpu_seconds(ctx.daemon.pid) - cpu0) / (time.monotonic() - start)
    )
    ctx.figures["steady_cpu_threads"] = procs.thread_shares(threads0, procs.cpu_by_thread(ctx.daemon.pid))
    ctx.wait("steady", [s for b in lay.steady() for s in ctx.spans[f"build:{b}"]])
    await asyncio.sleep(0.5)
    ctx.figures["steady_queries"] = dict(ctx.qlog.count(off))
