"""No statement of the daemon, the backfill or the tools makes PostgreSQL read a big Hydra table whole.

Every module-level ``*_SQL`` constant of the package is EXPLAINed (so a new query is covered as
soon as it exists) against a database holding a generated history (benchmarks/history.py:
20,000 evaluations, 100,000 builds, about 200,000 steps and 200,000 evaluation members) with
Hydra's indexes and fresh statistics (ANALYZE), so the planner weighs a sequential scan against
the indexes as it would on a real Hydra. No plan may hold a ``Seq Scan`` of builds, buildsteps,
jobsetevals or jobsetevalmembers:

* the custom plan, with realistic arguments from ``ARGUMENTS`` (the values the daemon passes at
  that point of the history; a statement without an entry there fails the test, so its author
  chooses them), which is what PostgreSQL runs for the first five executions of a statement;
* the generic plan (``plan_cache_mode = force_generic_plan``), which PostgreSQL may switch to
  from the sixth execution of a prepared statement on (asyncpg prepares every statement).

The benchmark's big-database phase (``just bench --big-db``) checks the plans the daemon really
ran on a production-sized database; this test keeps the check in CI at a size that loads in
seconds.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import pkgutil
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest
from trio_asyncio import aio_as_trio

import hydra_otel
from hydra_otel.adapters import queries

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _history_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_history", _BENCHMARKS / "history.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


history = _history_module()

#: Packages whose SQL is a fake Hydra's, not the daemon's.
_NOT_THE_DAEMON = ("hydra_otel.demo",)  # the demo and its sandbox play a fake Hydra
#: Template fields of statements completed at run time (BuildQueries.steps / step_subset).
_TEMPLATE_FIELDS = {"columns": queries.STEP_COLUMNS, "resolved": "s.resolveddrvpath"}


def daemon_statements() -> dict[str, str]:
    """Every ``*_SQL`` string constant of the package (``module.NAME`` -> SQL), templates filled in."""
    out: dict[str, str] = {}
    for info in pkgutil.walk_packages(hydra_otel.__path__, "hydra_otel."):
        if info.name.startswith(_NOT_THE_DAEMON) or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                name.endswith("_SQL")
                and isinstance(value, str)
                and getattr(module, "__name__", "") == info.name
            ):
                sql = value.format(**_TEMPLATE_FIELDS) if "{" in value else value
                out.setdefault(sql, f"{info.name.rsplit('.', 1)[-1]}.{name}")
    return {name: sql for sql, name in out.items()}


H = history.History(evals=20_000, t_end=int(time.time()))
LAST_EVAL, LAST_BUILD = H.evals, H.builds
RECENT_EVALS = list(range(LAST_EVAL - 4, LAST_EVAL + 1))
RECENT_BUILDS = list(range(LAST_BUILD - 300, LAST_BUILD + 1, 30))
DAY = 86_400

#: Realistic arguments of each statement (module.NAME -> argument tuples), as the daemon passes them.
ARGUMENTS: dict[str, list[tuple[Any, ...]]] = {
    "queries.EVAL_FACTS_SQL": [(RECENT_EVALS,)],
    "queries.EVAL_LINKS_SQL": [(RECENT_EVALS, 10_000, 100)],
    "queries.OWNER_SQL": [(RECENT_BUILDS,)],
    "queries.INPUTS_READABLE_SQL": [()],
    "queries.EVAL_INPUTS_SQL": [(RECENT_EVALS,)],
    "queries.JOBSET_FACTS_SQL": [([1, 2, 3],)],
    "queries.EXISTING_JOBSETS_SQL": [([1, 2, 3],)],
    "queries.ALL_JOBSETS_SQL": [()],
    "queries.CLOSING_JOBSETS_SQL": [([1, 2, 3],)],
    "queries.CLOSING_EVALS_SQL": [(RECENT_EVALS,)],
    "queries.BUILD_FACTS_SQL": [(RECENT_BUILDS,)],
    "queries.BUDGET_SQL": [(RECENT_EVALS, 10_000)],
    "queries.STEPS_SQL": [(RECENT_BUILDS,)],
    "queries.STEP_SUBSET_SQL": [(RECENT_BUILDS, [2] * len(RECENT_BUILDS))],
    "queries.HAS_RESOLVED_SQL": [()],
    "queries.CATCHUP_EVALS_SQL": [(LAST_EVAL - 30, 1000)],
    "queries.CATCHUP_BUILDS_SQL": [(H.t_end - 720, H.t_end - 2, 0, 0, 1000)],
    "queries.CATCHUP_STEPS_SQL": [(H.t_end - 720, H.t_end - 2, 10_000)],
    "queries.CATCHUP_JOBSETS_SQL": [()],
    # The clock of every scan, and a first start 10 minutes back (a standby's takeover window).
    "queries.CATCHUP_START_SQL": [(0,), (600,)],
    "queries.ACTIVE_EVALS_SQL": [()],
    "queries.BUSY_MACHINES_SQL": [()],
    "command_queries.JOBSET_IDS_SQL": [(["project1"], ["jobset1"])],
    # backfill --since 1d: the first page, a later page, and the count (all jobsets, then one).
    "command_queries.SELECT_EVALS_SQL": [
        (H.t_end - DAY, H.t_end, 0, None, 100),
        (H.t_end - DAY, H.t_end, LAST_EVAL - 2000, None, 100),
        (H.t_end - DAY, H.t_end, 0, [1], 100),
    ],
    "command_queries.COUNT_EVALS_SQL": [(H.t_end - DAY, H.t_end, 0, None), (H.t_end - DAY, H.t_end, 0, [1])],
    "command_queries.CREATED_BUILDS_SQL": [(RECENT_EVALS, 0, 1000)],
    "command_queries.COLUMNS_SQL": [(["builds", "buildsteps"],)],
    "command_queries.PRIVILEGES_SQL": [(["builds", "buildsteps"], ["id", "build"])],
}


def seq_scans(plan: dict[str, Any]) -> Iterator[str]:
    """The big tables a plan (EXPLAIN's JSON) reads with a sequential scan."""
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") in history.BIG_TABLES:
        yield plan["Relation Name"]
    for child in plan.get("Plans", ()):
        yield from seq_scans(child)


def parameter_count(sql: str) -> int:
    return max((int(n) for n in re.findall(r"\$(\d+)", sql)), default=0)


@pytest.fixture
async def loaded(aio_loop: asyncio.AbstractEventLoop, hydra_db: str) -> Any:
    """A connection to a database holding the generated history, analysed."""
    conn = await aio_as_trio(asyncpg.connect)(hydra_db)
    try:
        await aio_as_trio(conn.execute)(history.load_script(H))
        yield conn
    finally:
        await aio_as_trio(conn.close)()


def test_every_statement_has_arguments() -> None:
    """Each daemon statement has realistic arguments here, and none is listed that no longer exists."""
    names = set(daemon_statements())
    assert names - ARGUMENTS.keys() == set(), "add realistic arguments to ARGUMENTS"
    assert ARGUMENTS.keys() - names == set(), "remove statements that no longer exist from ARGUMENTS"


async def test_no_sequential_scan_of_big_tables(loaded: asyncpg.Connection) -> None:
    """Neither the custom nor the generic plan of any statement reads a big Hydra table sequentially."""
    found: list[str] = []
    for name, sql in sorted(daemon_statements().items()):
        for args in ARGUMENTS.get(name, []):
            raw = await aio_as_trio(loaded.fetchval)(f"EXPLAIN (FORMAT JSON) {sql}", *args)
            found += [f"{name} {args!r}: Seq Scan on {t}" for t in seq_scans(json.loads(raw)[0]["Plan"])]
        found += [f"{name} (generic plan): Seq Scan on {t}" for t in await _generic_seq_scans(loaded, sql)]
    assert found == [], "\n".join(found)


async def _generic_seq_scans(conn: asyncpg.Connection, sql: str) -> list[str]:
    await aio_as_trio(conn.execute)(f"PREPARE generic AS {sql}")
    try:
        await aio_as_trio(conn.execute)("SET plan_cache_mode = force_generic_plan")
        nulls = ", ".join(["NULL"] * parameter_count(sql))
        raw = await aio_as_trio(conn.fetchval)(
            f"EXPLAIN (FORMAT JSON) EXECUTE generic{f'({nulls})' if nulls else ''}"
        )
        return list(seq_scans(json.loads(raw)[0]["Plan"]))
    finally:
        await aio_as_trio(conn.execute)("DEALLOCATE generic; RESET plan_cache_mode")


async def test_the_history_is_what_the_plans_assume(loaded: asyncpg.Connection) -> None:
    """The generated history is ANALYZEd and reaches far enough back for a one-day backfill to be selective."""
    rows = await aio_as_trio(loaded.fetch)(
        "SELECT relname, n_live_tup > 0 AND last_analyze IS NOT NULL AS ready FROM pg_stat_user_tables "
        "WHERE relname = ANY($1::text[])",
        list(history.BIG_TABLES),
    )
    assert {r["relname"]: r["ready"] for r in rows} == dict.fromkeys(history.BIG_TABLES, True)
    assert H.t_end - H.t_start > 5 * DAY
