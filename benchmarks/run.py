"""hydra-otel at nixpkgs scale: ``just bench`` (or ``python benchmarks/run.py --scale 0.02``).

Starts a throwaway PostgreSQL with Hydra's schema and an OTLP receiver process, measures the
baselines (R_listen, R_export), then runs the real ``python -m hydra_otel run`` through the
workload (workload.py) and prints the figures with PASS/FAIL per target (docs/performance.md).
Everything it starts is stopped at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg
import bench
import bigdb
import procs
import profiling
import report
import workload as w
from model import CFG
from pglog import LINE_PREFIX, QueryLog, role_sql

from hydra_otel.core.events import DATA_CHANNELS, TRIGGER_CHANNELS
from hydra_otel.demo.sandbox.pgcluster import SUPERUSER, PgCluster

ROLE = "hydra_otel"  # the daemon's read-only role; its statements are logged (pglog.py)
BATCH = 512  # the daemon's default export batch size, used by R_export too
_START = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="factor on every workload size (0.02: smoke)")
    p.add_argument("--out", type=Path, default=Path("bench-results.json"), help="JSON results file")
    p.add_argument(
        "--keep", action="store_true", help="keep the PostgreSQL cluster (and temp dir) for debugging"
    )
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle window for idle CPU (default 10)")
    p.add_argument("--export-delay", type=float, default=1.0, help="the daemon's HYDRA_OTEL_EXPORT_DELAY")
    p.add_argument("--queue-size", type=int, help="the daemon's HYDRA_OTEL_QUEUE_SIZE (default: its own)")
    p.add_argument(
        "--export-worker",
        choices=("thread", "process"),
        help="the daemon's HYDRA_OTEL_EXPORT_WORKER (default: its own)",
    )
    p.add_argument(
        "--hog",
        action="store_true",
        help="run everything (baselines included) with a CPU hog: a busy process taking one core",
    )
    p.add_argument(
        "--hog-pass",
        action="store_true",
        help="after the run, run it all again with a CPU hog and print its targets too (just bench)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="PATH",
        help="record the daemon with py-spy: PATH-eval.txt, PATH-bursts.txt, PATH-steady.txt (raw stacks)",
    )
    p.add_argument(
        "--big-db",
        action="store_true",
        help="run only the production-sized database phase (bigdb.py; sizes times --scale)",
    )
    p.add_argument("--skip-big-db", action="store_true", help="leave out the big-database phase")
    return p.parse_args(argv)


class Resources:
    """Everything started, stopped in reverse order by ``close()`` whatever happened."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.tmp = Path(tempfile.mkdtemp(prefix="hydra-otel-bench-"))
        self.cluster: PgCluster | None = None
        self.receiver: procs.Receiver | None = None
        self.daemon: procs.Daemon | None = None
        self.sampler: procs.RssSampler | None = None
        self.spy: profiling.PySpy | None = None
        self.hog: procs.Child | None = None

    def close(self) -> None:
        for stop in (
            self.hog and self.hog.stop,
            self.spy and self.spy.stop,
            self.sampler and self.sampler.close,
            self.daemon and self.daemon.stop,
            self.receiver and self.receiver.stop,
        ):
            if stop:
                try:
                    stop()
                except Exception as exc:  # noqa: BLE001 - keep stopping the others
                    say(f"cleanup: {exc!r}")
        if self.cluster is not None:
            if self.keep:
                atexit.unregister(self.cluster.stop)
                say(f"kept: {self.cluster!r} dsn={self.cluster.dsn('hydra')} temp={self.tmp}")
                say(f"stop it with: pg_ctl stop -D {self.cluster.data_dir} (as the postgres user when root)")
            else:
                self.cluster.stop()
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def daemon_env(res: Resources, dsn: str, args: argparse.Namespace) -> dict[str, str]:
    assert res.receiver is not None
    state = res.tmp / "state"
    state.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "HYDRA_", "PG"))}
    env.update(
        HYDRA_OTEL_DATABASE_URL=dsn,
        OTEL_EXPORTER_OTLP_ENDPOINT=res.receiver.endpoint,
        HYDRA_OTEL_STATE_DIR=str(state),
        HYDRA_OTEL_EXPORT_DELAY=str(args.export_delay),
        HYDRA_OTEL_EXPORT_BATCH_SIZE=str(BATCH),
        HYDRA_OTEL_INSTANCE=CFG.instance,
        HYDRA_OTEL_HYDRA_URL=CFG.hydra_url,
        HYDRA_OTEL_MAX_BUILDS_PER_TRACE=str(CFG.max_builds_per_trace),
        HYDRA_OTEL_MAX_LINKS=str(CFG.max_links),
        HYDRA_OTEL_ERROR_TEXT_LIMIT=str(CFG.error_text_limit),
        HYDRA_OTEL_LOG_LEVEL="info",
    )
    if args.queue_size:
        env["HYDRA_OTEL_QUEUE_SIZE"] = str(args.queue_size)
    if args.export_worker:
        env["HYDRA_OTEL_EXPORT_WORKER"] = args.export_worker
    return env


PROFILES: dict[str, Any] = {}


async def profiled(args: argparse.Namespace, res: Resources, name: str, phase: Awaitable[None]) -> None:
    """Run a phase, with py-spy recording the daemon into ``<profile>-<name>.txt`` if asked to."""
    exe = profiling.find_py_spy() if args.profile else None
    if args.profile and res.daemon is not None and exe:
        out = args.profile.with_name(f"{args.profile.stem}-{name}.txt")
        res.spy = profiling.PySpy(exe, res.daemon.pid, out)
        await phase
        messages = res.spy.stop()
        res.spy = None
        PROFILES[name] = profiling.summarize(out) if out.exists() else messages
    else:
        if args.profile:
            PROFILES[name] = "py-spy not found: .venv/bin/pip install py-spy"
        await phase


async def run(args: argparse.Namespace, res: Resources) -> dict[str, Any]:
    lay = w.Layout(w.Sizes.scaled(args.scale), int(time.time()))
    say(f"sizes: {asdict(lay.sizes)}")
    if args.hog:
        # A busy process: the machine has one core fewer to spare, as on a loaded Hydra server.
        res.hog = procs.Child([sys.executable, "-c", "while True: pass"])
        say(f"CPU hog running (pid {res.hog.pid})")
    res.cluster = PgCluster(
        settings={"log_line_prefix": LINE_PREFIX, "shared_buffers": "128MB", "max_connections": "50"}
    )
    say(f"PostgreSQL sandbox in {res.cluster.data_dir.parent}")
    dsn = res.cluster.createdb("hydra", 87)
    res.cluster.psql("hydra", role_sql(ROLE))
    conn = await asyncpg.connect(dsn)
    try:
        say("loading the history evaluation")
        await conn.execute(w.setup_sql(lay))
        res.receiver = procs.Receiver()
        say("rendering the expected spans")
        ctx = bench.Ctx(
            lay,
            res.tmp,
            conn,
            res.receiver,
            QueryLog(res.cluster.log_file),
            args.idle_seconds,
            args.export_delay,
        )
        ctx.spans = bench.expected_spans(lay)
        say("R_listen: asyncio + asyncpg receiving the burst evaluation's notifications")
        listen = await bench.listen_baseline(dsn, lay, [*DATA_CHANNELS, *TRIGGER_CHANNELS])
        say(f"R_listen: {listen['rate_per_s']:,.0f}/s; R_export: the exporter alone")
        layout_json = json.dumps({"sizes": asdict(lay.sizes), "t0": lay.t0})
        export = bench.export_baseline(ctx, layout_json, BATCH, ctx.spans["bursts"])
        say(f"R_export: {export['rate_per_s']:,.0f} spans/s; the daemon's own encoder alone, for comparison")
        res.receiver.ask("reset")
        direct = bench.export_baseline(ctx, layout_json, BATCH, ctx.spans["bursts"], mode="direct")
        say(f"R_export direct: {direct['rate_per_s']:,.0f} spans/s; starting the daemon")
        res.receiver.ask("reset")
        daemon_dsn = dsn.replace(f"{SUPERUSER}@", f"{ROLE}@", 1)
        res.daemon = ctx.daemon = procs.Daemon(daemon_env(res, daemon_dsn, args))
        res.daemon.wait_for("ready", 60)
        res.sampler = ctx.sampler = procs.RssSampler(res.daemon.pid)
        say(f"daemon ready (pid {res.daemon.pid}); idle for {args.idle_seconds:g}s")
        await bench.idle(ctx)
        await bench.idle_sentinels(ctx)
        say("eval burst")
        await profiled(args, res, "eval", bench.eval_burst(ctx))
        say("build bursts and dependents")
        await profiled(args, res, "bursts", bench.build_bursts(ctx))
        say(f"steady {lay.sizes.rate:g} events/s")
        await profiled(args, res, "steady", bench.steady(ctx))
    finally:
        await conn.close()
    final = procs.memory_kb(res.daemon.pid)
    res.sampler.close()
    say("stopping the daemon")
    code = res.daemon.stop()
    stopped = res.daemon.wait_for("stopped", 5)
    arrivals = res.receiver.arrivals(res.tmp / "arrivals.bin")
    totals = res.receiver.ask("stats")
    end = {"stopped": stopped, "code": code, "final": final, "totals": totals, "lines": res.daemon.lines}
    baselines = {"R_listen": listen, "R_export": export, "R_export_direct": direct}
    settings = {
        "scale": args.scale,
        "cpu_hog": args.hog,
        "export_delay_s": args.export_delay,
        "export_batch": BATCH,
        "queue_size": args.queue_size or "default (100000)",
        "export_worker": args.export_worker or "default (thread)",
    }
    r = report.summarize(settings, ctx, baselines, end, arrivals)
    if PROFILES:
        r["profile"] = PROFILES
    return r


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if args.big_db:
        try:
            bigdb.main(args.scale, args.out)
        except KeyboardInterrupt:
            return 130
        return 0
    passes = [args] if not args.hog_pass else [args, argparse.Namespace(**{**vars(args), "hog": True})]
    runs: list[dict[str, Any]] = []
    for pass_args in passes:
        res = Resources(args.keep)
        try:
            runs.append(asyncio.run(run(pass_args, res)))
        except KeyboardInterrupt:
            say("interrupted: stopping everything")
            return 130
        finally:
            res.close()
    results = runs[0]
    if len(runs) > 1:
        results["hog"] = runs[1]
    print(report.table(results), flush=True)
    report.write(args.out, results)
    if args.scale >= 1 and not args.skip_big_db:  # minutes and ~10 GB: not in smoke runs
        try:
            results["big_db"] = bigdb.main(1.0)
        except KeyboardInterrupt:
            return 130
        report.write(args.out, results)
    print(f"\nresults written to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
