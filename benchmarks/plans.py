"""Statements and plans of the daemon's role, for the big-database phase (bigdb.py).

``pg_stat_statements`` gives calls and execution time per statement; ``auto_explain`` (set on the
role, JSON format) writes the plan each execution really ran, with its real parameters, to the
server log; ``generic_plans`` EXPLAINs each statement as the generic plan the plan cache may
switch to from the sixth execution of a prepared statement.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import asyncpg
import history
from pglog import classify

ROLE = "hydra_otel"


def normalized(sql: str) -> str:
    return " ".join(sql.split())


def is_scan_end(sql: str) -> bool:
    """CATCHUP_JOBSETS_SQL: the last query of every catch-up scan (and of a first start's marks)."""
    return normalized(sql).startswith(
        "SELECT id, lastcheckedtime, errormsg, errortime, fetcherrormsg FROM jobsets"
    )


# --- statement statistics ----------------------------------------------------------------------------


async def statements(conn: asyncpg.Connection) -> dict[str, tuple[int, float]]:
    """The role's statements in this database: text -> (calls, total execution ms)."""
    rows = await conn.fetch(
        "SELECT s.query, s.calls, s.total_exec_time FROM pg_stat_statements s "
        "JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid "
        "WHERE r.rolname = $1 AND d.datname = current_database()",
        ROLE,
    )
    out: dict[str, tuple[int, float]] = {}
    for r in rows:
        calls, ms = out.get(r["query"], (0, 0.0))
        out[r["query"]] = (calls + r["calls"], ms + r["total_exec_time"])
    return out


def delta(
    after: dict[str, tuple[int, float]], before: dict[str, tuple[int, float]]
) -> dict[str, tuple[int, float]]:
    out = {}
    for q, (calls, ms) in after.items():
        c0, m0 = before.get(q, (0, 0.0))
        if calls > c0:
            out[q] = (calls - c0, ms - m0)
    return out


def phase_figures(d: dict[str, tuple[int, float]]) -> dict[str, Any]:
    """Calls and database time of a phase, and of its catch-up scans."""
    scans = sum(c for q, (c, _) in d.items() if is_scan_end(q))
    catchup_ms = sum(ms for q, (_, ms) in d.items() if classify(q) == "catchup")
    return {
        "statements": sum(c for c, _ in d.values()),
        "db_ms": round(sum(ms for _, ms in d.values()), 2),
        "scans": scans,
        "catchup_ms": round(catchup_ms, 3),
        "catchup_ms_per_scan": round(catchup_ms / scans, 3) if scans else None,
    }


# --- plans ---------------------------------------------------------------------------------------------

_PLAN = re.compile(r"LOG:  duration: ([\d.]+) ms  plan:\n", re.M)
_ENTRY = re.compile(r"^@@ \S+ \S+ \S+ \[\d+\] ", re.M)


def logged_plans(log: Path, start: int, end: int) -> list[tuple[float, dict[str, Any]]]:
    """auto_explain's (duration in ms, JSON plan) between two byte offsets of the server log."""
    with log.open("rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8", "replace")
    plans = []
    for entry in _ENTRY.split(text):
        m = _PLAN.search(entry)
        if m:
            try:
                plans.append((float(m.group(1)), json.loads(entry[m.end() :])))
            except ValueError:
                continue
    return plans


def nodes(plan: dict[str, Any]) -> list[str]:
    """``Node Type on table [using index]`` of every scan of a big table in a plan."""
    out = []
    table = plan.get("Relation Name")
    children = plan.get("Plans", ())
    if table in history.BIG_TABLES:
        # A bitmap heap scan names its indexes in its Bitmap Index Scan children.
        index = plan.get("Index Name") or ", ".join(c["Index Name"] for c in children if "Index Name" in c)
        out.append(f"{plan['Node Type']} on {table}{f' using {index}' if index else ''}")
    for child in children:
        out += nodes(child)
    return out


def plan_summary(plans: list[tuple[float, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per statement (first 90 characters): executions, total and slowest ms, the scans of big tables."""
    out: dict[str, dict[str, Any]] = {}
    for ms, p in plans:
        key = normalized(p.get("Query Text", ""))[:90]
        s = out.setdefault(key, {"runs": 0, "scans": set(), "total_ms": 0.0, "max_ms": 0.0})
        s["runs"] += 1
        s["scans"].update(nodes(p["Plan"]))
        s["total_ms"] = round(s["total_ms"] + ms, 3)
        s["max_ms"] = max(s["max_ms"], ms)
    return {k: {**v, "scans": sorted(v["scans"])} for k, v in out.items() if v["scans"]}


def query_texts(plans: list[tuple[float, dict[str, Any]]]) -> set[str]:
    """The distinct statements as sent (with their constants, unlike pg_stat_statements' texts)."""
    return {p["Query Text"] for _, p in plans if p.get("Query Text")}


async def generic_plans(dsn: str, texts: set[str]) -> dict[str, list[str]]:
    """The generic plan's scans of big tables, for each statement (as sent) that reads one.

    On a connection of its own without asyncpg's statement cache, so ``DEALLOCATE ALL`` after
    each statement (also one that failed to prepare) removes nothing asyncpg relies on.
    """
    out: dict[str, list[str]] = {}
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        for sql in sorted(texts):
            if not any(t in sql for t in history.BIG_TABLES):
                continue
            n = max((int(x) for x in re.findall(r"\$(\d+)", sql)), default=0)
            key = normalized(sql)[:90]
            try:
                await conn.execute(f"PREPARE g AS {sql}")
                await conn.execute("SET plan_cache_mode = force_generic_plan")
                args = f"({', '.join(['NULL'] * n)})" if n else ""
                raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE g{args}")
                out[key] = nodes(json.loads(raw)[0]["Plan"])
            except asyncpg.PostgresError as exc:
                out[key] = [f"not explained: {exc}"]
            finally:
                await conn.execute("DEALLOCATE ALL; RESET plan_cache_mode")
    finally:
        await conn.close()
    return out


def seq_scans(summary: dict[str, dict[str, Any]] | dict[str, list[str]]) -> list[str]:
    found = []
    for key, v in summary.items():
        scans = v["scans"] if isinstance(v, dict) else v
        found += [f"{key}: {s}" for s in scans if s.startswith("Seq Scan")]
    return found
