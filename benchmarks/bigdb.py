"""The big-database phase: what the daemon does to a production-sized Hydra database.

``just bench --big-db`` runs only this phase; ``just bench`` runs it after the others (at
``--scale`` 1). One throwaway cluster holds two databases with the same generated history
(history.py) and the same recent rate, one small (20,000 evaluations) and one big (1,000,000
evaluations, 5,000,000 builds, 10,000,000 steps, 10,000,000 evaluation members, ANALYZEd). On
each, the same scenario runs the real daemon and the real backfill as the read-only role
``hydra_otel``:

1. **start-up**: a first start (no stored progress), until its first catch-up scan is done;
2. **catch-up after a 10-minute outage**: the daemon is stopped, its stored marks are moved 10
   minutes back (as if it had been down while Hydra recorded the history's last 10 minutes), and
   it is started again, until its scans are done and the spans exported;
3. **steady**: Hydra activity for STEADY_SECONDS (an evaluation a second with new and cached
   builds, those builds' steps and finishes, a cancelled build), catch-up scans every 5 s;
4. **backfill --since 1d**: ``python -m hydra_otel backfill --since 1d`` to the end.

Every statement of the role is captured twice: ``pg_stat_statements`` (calls and execution time
per statement, per phase) and ``auto_explain`` (the plan PostgreSQL actually ran, with the real
parameters, in the server log). Each distinct statement is also EXPLAINed as a generic plan (what
the plan cache may switch to from the sixth execution). Targets: no plan reads builds,
buildsteps, jobsetevals or jobsetevalmembers with a sequential scan, and a catch-up scan costs
the big database at most 1.5x the small one's database time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import history
import procs
from pglog import LINE_PREFIX
from plans import (
    ROLE,
    delta,
    generic_plans,
    is_scan_end,
    logged_plans,
    phase_figures,
    plan_summary,
    query_texts,
    seq_scans,
    statements,
)

from hydra_otel.adapters.progress_store import ProgressStore
from hydra_otel.core.catchup import Marks
from hydra_otel.demo.sandbox.hydrasim import HydraSim, NewBuild, notify, tx
from hydra_otel.demo.sandbox.pgcluster import SUPERUSER, PgCluster

INSTANCE = "bigdb"
BIG_EVALS = 1_000_000
SMALL_EVALS = 20_000
OUTAGE = 600
STEADY_SECONDS = 20
SCAN_INTERVAL = 5
RATIO_TARGET = 1.5
SETTINGS = {
    "log_line_prefix": LINE_PREFIX,
    "shared_preload_libraries": "pg_stat_statements",
    "shared_buffers": "256MB",
    "max_connections": "50",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
}
_START = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _START:7.1f}s] big-db: {message}", file=sys.stderr, flush=True)


def role_sql(first: bool) -> str:
    """The daemon's read-only role (cluster-wide, once) and its grants and plan logging (per database)."""
    create = f"CREATE ROLE {ROLE} LOGIN;" if first else ""
    return f"""{create}
GRANT SELECT ON ALL TABLES IN SCHEMA public TO {ROLE};
ALTER ROLE {ROLE} SET session_preload_libraries = 'auto_explain';
ALTER ROLE {ROLE} SET auto_explain.log_min_duration = 0;
ALTER ROLE {ROLE} SET auto_explain.log_format = 'json';
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
"""


# --- loading -----------------------------------------------------------------------------------------


async def load(dsn: str, h: history.History) -> dict[str, float]:
    """Load the history; seconds per step."""
    conn = await asyncpg.connect(dsn)
    seconds: dict[str, float] = {}
    try:
        for label, sql in history.load_steps(h):
            t = time.monotonic()
            await conn.execute(sql)
            seconds[label] = round(time.monotonic() - t, 1)
            say(f"  {label}: {seconds[label]:.1f} s")
    finally:
        await conn.close()
    return seconds


async def sizes(conn: asyncpg.Connection) -> dict[str, Any]:
    rows = await conn.fetch(
        "SELECT relname, n_live_tup, pg_total_relation_size(relid) AS bytes FROM pg_stat_user_tables "
        "WHERE relname = ANY($1::text[])",
        list(history.BIG_TABLES),
    )
    out: dict[str, Any] = {r["relname"]: {"rows": r["n_live_tup"], "mb": r["bytes"] >> 20} for r in rows}
    out["database_mb"] = (await conn.fetchval("SELECT pg_database_size(current_database())")) >> 20
    return out


async def index_names(conn: asyncpg.Connection) -> dict[str, list[str]]:
    rows = await conn.fetch(
        "SELECT tablename, indexname FROM pg_indexes WHERE tablename = ANY($1::text[]) ORDER BY 1, 2",
        list(history.BIG_TABLES),
    )
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["tablename"], []).append(r["indexname"])
    return out


# --- waiting -----------------------------------------------------------------------------------------


async def wait_scans(
    conn: asyncpg.Connection, before: dict[str, tuple[int, float]], n: int, limit: float
) -> None:
    """Until ``n`` catch-up scans ended since ``before`` (pg_stat_statements counts them)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        d = delta(await statements(conn), before)
        if sum(c for q, (c, _) in d.items() if is_scan_end(q)) >= n:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"fewer than {n} catch-up scans in {limit:g} s")


# --- the scenario --------------------------------------------------------------------------------------


def daemon_env(dsn: str, endpoint: str, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "HYDRA_", "PG"))}
    env.update(
        HYDRA_OTEL_DATABASE_URL=dsn,
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        HYDRA_OTEL_STATE_DIR=str(state),
        HYDRA_OTEL_INSTANCE=INSTANCE,
        HYDRA_OTEL_CATCHUP_INTERVAL=str(SCAN_INTERVAL),
        HYDRA_OTEL_LOG_LEVEL="info",
    )
    return env


def rewind_marks(state: Path, h: history.History) -> None:
    """Move the stored marks OUTAGE seconds before the history's end (the daemon is stopped)."""
    store = ProgressStore(state, instance=INSTANCE)
    try:
        marks = store.load()
        assert marks is not None, "the start-up phase stored no marks"
        point = h.t_end - OUTAGE
        eval_id = (point - h.t_start - 1) // history.EVAL_EVERY  # the last evaluation before the point
        store.save(Marks(eval_id=eval_id, stop_time=point, jobsets=dict.fromkeys(marks.jobsets, point)))
    finally:
        store.close()


class Scenario:
    """One database: start-up, outage catch-up, steady, backfill; per-phase statement figures."""

    def __init__(self, name: str, dsn: str, h: history.History, tmp: Path, receiver: procs.Receiver) -> None:
        self.name, self.dsn, self.h, self.receiver = name, dsn, h, receiver
        self.daemon_dsn = dsn.replace(f"{SUPERUSER}@", f"{ROLE}@", 1)
        self.state = tmp / f"state-{name}"
        self.env = daemon_env(self.daemon_dsn, receiver.endpoint, self.state)
        self.daemon: procs.Daemon | None = None
        self.phases: dict[str, Any] = {}

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon.wait_for("stopped", 10)
            self.daemon = None

    async def phase(self, conn: asyncpg.Connection, name: str, body: Callable[[], Any]) -> None:
        before, t = await statements(conn), time.monotonic()
        await body()
        figures = phase_figures(delta(await statements(conn), before))
        figures["seconds"] = round(time.monotonic() - t, 1)
        self.phases[name] = figures
        say(f"{self.name} {name}: {figures}")

    async def run(self) -> dict[str, Any]:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("SELECT pg_stat_statements_reset()")
            await self.phase(conn, "start-up", lambda: self.start(conn, scans=1))
            self.stop_daemon()
            rewind_marks(self.state, self.h)
            await self.phase(conn, "catch-up", lambda: self.start(conn, scans=2))
            await self.phase(conn, "steady", lambda: self.steady(conn))
            self.stop_daemon()
            await self.phase(conn, "backfill", self.backfill)
        finally:
            self.stop_daemon()
            await conn.close()
        return self.phases

    async def start(self, conn: asyncpg.Connection, scans: int) -> None:
        before = await statements(conn)
        self.daemon = procs.Daemon(self.env)
        await asyncio.to_thread(self.daemon.wait_for, "ready", 120)
        await wait_scans(conn, before, scans, 120)
        await asyncio.to_thread(self.receiver.settle, 1.5, 120)

    async def steady(self, conn: asyncpg.Connection) -> None:
        """One tick a second: an evaluation (new and cached builds), the previous one's builds finish."""
        sim = HydraSim(next_eval=self.h.evals + 1, next_build=self.h.builds + 1, next_error=1)
        previous: list[int] = []
        for tick in range(STEADY_SECONDS):
            now = int(time.time())
            jobset = 1 + tick % self.h.jobsets
            cached = [(self.h.builds - 1000 - 37 * k, True) for k in range(5)]
            _, new, sql = sim.eval_added(
                jobset, f"{tick}.1", eval_start=now - 30, timestamp=now, checkout_time=2, eval_time=20,
                new_builds=[NewBuild(job=f"steady-{tick}-{k}") for k in range(5)], cached_builds=cached,
            )  # fmt: skip
            for b in previous:
                sql += [
                    sim.step_started(b, 1, now=now - 1, machine="ssh://builder1"),
                    sim.step_finished(b, 1, now=now),
                ]
                sql.append(sim.build_finished(b, start=now - 1, stop=now))
            if tick == STEADY_SECONDS // 2:
                sql.append(tx(f"UPDATE builds SET finished = 1, buildstatus = 4, stoptime = {now}, starttime = {now} "
                              f"WHERE id = {new[0]};", notify("builds_cancelled")))  # fmt: skip
            for statement in sql:
                await conn.execute(statement)
            previous = new[1:] if tick == STEADY_SECONDS // 2 else new
            await asyncio.sleep(max(0.0, now + 1 - time.time()))
        await asyncio.to_thread(self.receiver.settle, 1.5, 120)

    async def backfill(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hydra_otel", "backfill", "--since", str(self.h.t_end - 86_400),
            env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 1200)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"backfill exited {proc.returncode}: {out.decode()[-2000:]}")
        self.phases["backfill_output"] = out.decode().strip().splitlines()[-1:]


# --- the phase -----------------------------------------------------------------------------------------


async def one_database(
    cluster: PgCluster, name: str, h: history.History, tmp: Path, receiver: procs.Receiver, first: bool
) -> dict[str, Any]:
    dsn = cluster.createdb(name, 87)
    cluster.psql(name, role_sql(first))
    say(
        f"{name}: loading {h.evals:,} evaluations, {h.builds:,} builds, {h.steps:,} steps, {h.members:,} members"
    )
    t = time.monotonic()
    load_seconds = await load(dsn, h)
    loading = round(time.monotonic() - t, 1)
    conn = await asyncpg.connect(dsn)
    try:
        size = await sizes(conn)
        indexes = await index_names(conn)
        say(f"{name}: loaded in {loading:.0f} s: {size}")
        log_start = cluster.log_file.stat().st_size
        phases = await Scenario(name, dsn, h, tmp, receiver).run()
        logged = logged_plans(cluster.log_file, log_start, cluster.log_file.stat().st_size)
        ran = plan_summary(logged)
        generic = await generic_plans(dsn, query_texts(logged))
    finally:
        await conn.close()
    cluster.dropdb(name)
    return {
        "history": {"evals": h.evals, "builds": h.builds, "steps": h.steps, "members": h.members},
        "loading_s": loading, "loading_steps_s": load_seconds, "size": size, "indexes": indexes,
        "phases": phases, "plans_run": ran, "plans_generic": generic,
    }  # fmt: skip


async def run_phase(scale: float, tmp: Path) -> dict[str, Any]:
    now = int(time.time())
    big = history.History(evals=max(SMALL_EVALS, round(BIG_EVALS * scale)), t_end=now)
    cluster = PgCluster(settings=SETTINGS)
    receiver = procs.Receiver()
    try:
        small_r = await one_database(
            cluster, "hydra_small", history.History(SMALL_EVALS, now), tmp, receiver, True
        )
        big_r = await one_database(
            cluster, "hydra_big", history.History(big.evals, int(time.time())), tmp, receiver, False
        )
    finally:
        receiver.stop()
        cluster.stop()
    return verdicts({"small": small_r, "big": big_r})


def verdicts(r: dict[str, Any]) -> dict[str, Any]:
    big, small = r["big"], r["small"]
    found = seq_scans(big["plans_run"]) + [f"(generic) {s}" for s in seq_scans(big["plans_generic"])]
    b, s = (
        big["phases"]["catch-up"]["catchup_ms_per_scan"],
        small["phases"]["catch-up"]["catchup_ms_per_scan"],
    )
    ratio = b / s if b and s else float("nan")
    r["targets"] = {
        "no_seq_scan": {"found": found, "small_found": seq_scans(small["plans_run"]), "pass": not found},
        "catchup_ratio": {"big_ms": b, "small_ms": s, "ratio": round(ratio, 2), "goal": RATIO_TARGET,
                          "pass": ratio <= RATIO_TARGET},
    }  # fmt: skip
    return r


def table(r: dict[str, Any]) -> str:
    big, small, t = r["big"], r["small"], r["targets"]
    lines = [
        "",
        "big database: "
        + ", ".join(f"{k} {v:,}" for k, v in big["history"].items())
        + f"; loaded in {big['loading_s']:.0f} s ({big['size']['database_mb']:,} MB)",
        f"{'phase':<10} {'small: stmts  db ms  scans  ms/scan':>38} {'big: stmts  db ms  scans  ms/scan':>38}",
    ]
    for name in ("start-up", "catch-up", "steady", "backfill"):
        cells = []
        for side in (small, big):
            p = side["phases"][name]
            cells.append(
                f"{p['statements']:>6} {p['db_ms']:>9.1f} {p['scans']:>5} {p['catchup_ms_per_scan'] or 0:>9.3f}"
            )
        lines.append(f"{name:<10} {cells[0]:>38} {cells[1]:>38}")
    lines.append("plans run on the big database (auto_explain), scans of big tables:")
    for key, v in sorted(big["plans_run"].items()):
        lines.append(
            f"  {v['runs']:>5}x {v['total_ms'] / v['runs']:>7.2f} ms avg {v['max_ms']:>8.2f} max  {key[:56]:<56}"
            f"  {'; '.join(v['scans'])}"
        )
    generic = big["plans_generic"]
    failed = [k for k, v in generic.items() if any(s.startswith("not explained") for s in v)]
    lines.append(
        f"generic plans of the same {len(generic)} statements: EXPLAINed {len(generic) - len(failed)}"
    )
    lines += [f"  not explained: {k[:80]}: {generic[k][0][:100]}" for k in failed]
    seq, ratio = t["no_seq_scan"], t["catchup_ratio"]
    lines += [
        f"no sequential scan of {', '.join(history.BIG_TABLES)}: "
        + ("PASS" if seq["pass"] else "FAIL: " + "; ".join(seq["found"])),
        f"catch-up scan database time big/small: {ratio['big_ms']} / {ratio['small_ms']} ms = {ratio['ratio']}x "
        f"(goal <= {RATIO_TARGET}x): {'PASS' if ratio['pass'] else 'FAIL'}",
    ]
    return "\n".join(lines)


def main(scale: float = 1.0, out: Path | None = None) -> dict[str, Any]:
    """Run the phase in a temporary directory (removed at the end); print and return the figures."""
    tmp = Path(tempfile.mkdtemp(prefix="hydra-otel-bigdb-"))
    try:
        results = asyncio.run(run_phase(scale, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(results), flush=True)
    if out is not None:
        out.write_text(json.dumps(results, indent=2, default=list))
    return results


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
