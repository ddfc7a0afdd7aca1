"""CPU cost of the resolver's whole work on a build burst, per span, with no database.

``render_bench.py`` measures rendering alone; this measures what the resolver's trio thread does
for the same burst (benchmarks/workload.py: builds with three finished steps each), with the
burst transaction's notifications in their order (each build's three ``step_finished``, then its
``build_finished``), in batches of ``RESOLVE_BATCH`` as the live path hands them over. Each batch goes through
:meth:`~hydra_otel.tasks.resolver.Resolver.resolve` against an in-memory fetcher that answers the
build and step statements with real ``asyncpg`` records made ahead of time, so what is timed is
the row conversion (adapters/queries.py), the attempt and budget rules, rendering, the duplicate
filter and the budget count, plus the trio checkpoints of the awaits: not SQL, not the network.

Run: ``.venv/bin/python benchmarks/resolve_bench.py [--builds N] [--rounds R] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from asyncpg.protocol.protocol import _create_record

sys.path.insert(0, str(Path(__file__).resolve().parent))  # render_bench: the same burst

from render_bench import CFG, burst

from hydra_otel.adapters import queries as q
from hydra_otel.core.builds import BuildFacts, StepFacts
from hydra_otel.core.events import BuildFinished, StepFinished
from hydra_otel.core.stitch import Work
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.resolver import RESOLVE_BATCH, Resolver

BUILD_COLUMNS = [
    "id",
    "finished",
    "timestamp",
    "jobset_id",
    "project",
    "jobset",
    "job",
    "nixname",
    "drvpath",
    "system",
    "priority",
    "globalpriority",
    "starttime",
    "stoptime",
    "iscachedbuild",
    "buildstatus",
    "size",
    "closuresize",
    "releasename",
    "eval_id",
]
STEP_COLUMNS = [
    "build",
    "stepnr",
    "type",
    "drvpath",
    "status",
    "errormsg",
    "starttime",
    "stoptime",
    "machine",
    "system",
    "propagatedfrom",
    "overhead",
    "timesbuilt",
    "isnondeterministic",
    "resolveddrvpath",
]
#: The burst evaluation's trace holds its first 1,000 new builds; the later ones get their own.
IN_EVAL_TRACE = 1000


def _record(columns: list[str], values: tuple[object, ...]) -> Any:
    return _create_record({c: i for i, c in enumerate(columns)}, values)


def _build_row(b: BuildFacts) -> Any:
    return _record(
        BUILD_COLUMNS,
        (b.build_id, int(b.finished), b.timestamp, b.jobset_id, b.project, b.jobset, b.job, b.nixname,
         b.drvpath, b.system, b.priority, b.global_priority, b.starttime, b.stoptime, int(b.cached),
         b.status, b.size, b.closure_size, b.release_name, b.eval_id),
    )  # fmt: skip


def _step_row(s: StepFacts) -> Any:
    return _record(
        STEP_COLUMNS,
        (s.build_id, s.stepnr, s.type, s.drvpath, s.status, s.errormsg, s.starttime, s.stoptime,
         s.machine, s.system, s.propagated_from, s.overhead_ms, s.times_built, s.nondeterministic,
         s.resolved_drv_path),
    )  # fmt: skip


class RecordDb:
    """Answers the resolver's build and step statements from records made ahead of time."""

    def __init__(self, rows: list[tuple[BuildFacts, list[StepFacts]]], first_build: int) -> None:
        self.builds = {b.build_id: _build_row(b) for b, _ in rows}
        self.steps = {b.build_id: [_step_row(s) for s in steps] for b, steps in rows}
        self.budget = _record(
            ["id", "first_beyond", "in_trace"], (2, first_build + IN_EVAL_TRACE, IN_EVAL_TRACE)
        )

    async def fetch(self, sql: str, *args: Any) -> Sequence[Any]:
        await trio.lowlevel.checkpoint()  # as the pool's answer is awaited
        if sql == q.BUILD_FACTS_SQL:
            return [self.builds[i] for i in args[0] if i in self.builds]
        if sql == q.BUDGET_SQL:
            return [self.budget]
        if sql.startswith("\nSELECT s.build"):
            # STEPS_SQL, or STEP_SUBSET_SQL: the asked steps and each build's own, which in this burst
            # are all its steps (a build's step_finished notifications come together).
            return [r for i in sorted(set(args[0])) for r in self.steps.get(i, [])]
        raise AssertionError(f"unexpected statement: {sql}")

    async def fetchval(self, sql: str, *args: object) -> Any:
        assert sql == q.HAS_RESOLVED_SQL
        return True

    async def fetch_each(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[Sequence[Any]]:
        return [await self.fetch(sql, *args) for sql, args in statements]


def work(rows: list[tuple[BuildFacts, list[StepFacts]]]) -> list[list[Work]]:
    """The burst's work in resolver batches, in the burst transaction's order: each build's
    ``step_finished`` notifications, then its ``build_finished`` (benchmarks/workload.py)."""
    items: list[Work] = []
    for b, steps in rows:
        items += [
            StepFinished(build_id=b.build_id, step_nr=s.stepnr, log_path=f"/log/{b.build_id}-{s.stepnr}")
            for s in steps
        ]
        items.append(BuildFinished(build_id=b.build_id, dependents=()))
    return [items[i : i + RESOLVE_BATCH] for i in range(0, len(items), RESOLVE_BATCH)]


def resolve_all(resolver: Resolver, batches: list[list[Work]]) -> int:
    """Resolve every batch in one trio run; the number of spans exported. Times only the batches."""

    async def main() -> int:
        n = 0
        for batch in batches:
            n += len(await resolver.resolve(batch))
        return n

    return trio.run(main)


def one_round(builds: int, first: int) -> tuple[float, int]:
    rows = burst(builds, first=first)
    db = RecordDb(rows, first)
    resolver = Resolver.create(db, CFG, Stats())  # type: ignore[arg-type]  # RecordDb is a Fetcher
    batches = work(rows)
    t = time.perf_counter()
    n = resolve_all(resolver, batches)
    return time.perf_counter() - t, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builds", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--profile", action="store_true")
    p.add_argument(
        "--daemon-gc", action="store_true", help="the daemon's collector settings (service.tune_gc)"
    )
    a = p.parse_args()
    if a.daemon_gc:
        from hydra_otel.service import tune_gc

        tune_gc()
    # Each round resolves builds it has not seen, as a burst does (per-build caches start cold).
    results = [one_round(a.builds, 150_001 + k * a.builds) for k in range(a.rounds)]
    best, n = min(results)
    print(f"spans: {n} ({a.builds} builds), best of {a.rounds}")
    print(f"resolve: {best / n * 1e6:.2f} µs/span")
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(one_round, a.builds, 10_000_001)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
