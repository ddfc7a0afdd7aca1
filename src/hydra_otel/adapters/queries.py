"""Read-only queries against Hydra's tables, returning core facts.

Every statement is a module constant and a plain SELECT: hydra-otel never
writes Hydra's tables. Lookups take a batch of IDs (``= ANY($1)``) so one
query serves many events. Functions are Trio-flavoured (see adapters/db.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from hydra_otel.core.builds import BuildFacts, StepFacts
from hydra_otel.core.catchup import JobsetRow
from hydra_otel.core.evals import EvalFacts, JobsetFacts
from hydra_otel.core.stitch import JobsetCheck
from hydra_otel.core.vcs import EvalInput

log = logging.getLogger("hydra_otel.queries")


class Row(Protocol):
    """One result row, read by column name (an ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any: ...


class Fetcher(Protocol):
    """What the queries need of a database: :class:`~hydra_otel.adapters.db.Database`, or an
    in-memory fake answering the statements below (tests/tasks/fakedb.py). Trio-flavoured."""

    async def fetch(self, sql: str, *args: object) -> Sequence[Row]:
        """Rows of one read-only statement."""
        ...

    async def fetchval(self, sql: str, *args: object) -> Any:
        """The first column of the first row of one statement, or None."""
        ...


async def _fetch_each(db: Fetcher, statements: Sequence[tuple[str, Sequence[object]]]) -> list[Sequence[Row]]:
    """The rows of each statement: in one trip to the pool where the database offers it
    (:meth:`~hydra_otel.adapters.db.Database.fetch_each`), else one :meth:`Fetcher.fetch` each."""
    each = getattr(db, "fetch_each", None)
    if each is not None:
        rows: list[Sequence[Row]] = await each(statements)
        return rows
    return [await db.fetch(sql, *args) for sql, args in statements]


EVAL_FACTS_SQL = """
SELECT e.id, e.jobset_id, j.project, j.name AS jobset, e.timestamp, e.checkouttime, e.evaltime,
       e.hasnewbuilds, e.nrbuilds, e.hash, e.flake, e.nixexprinput, e.nixexprpath,
       er.errormsg, er.errortime,
       coalesce(m.new, 0) AS builds_new,
       coalesce(m.cached_finished, 0) AS builds_cached_finished,
       coalesce(m.cached_queued, 0) AS builds_cached_queued
FROM jobsetevals e
JOIN jobsets j ON j.id = e.jobset_id
LEFT JOIN evaluationerrors er ON er.id = e.evaluationerror_id
LEFT JOIN LATERAL (
    -- A cached build counts as finished if it had stopped when the evaluation was recorded:
    -- a property of the rows that does not change when the build is later restarted.
    SELECT count(*) FILTER (WHERE jm.isnew = 1) AS new,
           count(*) FILTER (WHERE jm.isnew = 0 AND b.stoptime IS NOT NULL AND b.stoptime <= e.timestamp)
               AS cached_finished,
           count(*) FILTER (WHERE jm.isnew = 0 AND (b.stoptime IS NULL OR b.stoptime > e.timestamp))
               AS cached_queued
    FROM jobsetevalmembers jm JOIN builds b ON b.id = jm.build
    WHERE jm.eval = e.id
) m ON true
WHERE e.id = ANY($1::int[])
"""

# Bounded link targets of each evaluation: new builds beyond the budget, and cached builds.
EVAL_LINKS_SQL = """
SELECT e.id,
       ARRAY(SELECT m.build FROM jobsetevalmembers m WHERE m.eval = e.id AND m.isnew = 1
             ORDER BY m.build OFFSET $2 LIMIT $3) AS own_trace,
       ARRAY(SELECT m.build FROM jobsetevalmembers m WHERE m.eval = e.id AND m.isnew = 0
             ORDER BY m.build LIMIT $3) AS cached
FROM unnest($1::int[]) AS e(id)
"""

# The evaluation that created each build (else the lowest one containing it).
OWNER_SQL = """
SELECT DISTINCT ON (m.build) m.build, m.eval FROM jobsetevalmembers m
WHERE m.build = ANY($1::int[]) ORDER BY m.build, m.isnew DESC, m.eval
"""

# Whether the role can read jobsetevalinputs: a missing table or GRANT must not stop evaluations
# (a denied SELECT is retried as transient by Database.fetch), so ask first; NULL means absent.
INPUTS_READABLE_SQL = """
SELECT coalesce(has_table_privilege(t, 'SELECT'), false) FROM to_regclass('jobsetevalinputs') AS t
"""

EVAL_INPUTS_SQL = """
SELECT i.eval, i.name, i.altnr, i.type, i.uri, i.revision
FROM jobsetevalinputs i WHERE i.eval = ANY($1::int[]) ORDER BY i.eval, i.name, i.altnr
"""

JOBSET_FACTS_SQL = """
SELECT j.id, j.project, j.name, j.errormsg, j.errortime, j.fetcherrormsg, j.starttime, j.lastcheckedtime
FROM jobsets j
WHERE j.id = ANY($1::int[])
"""

EXISTING_JOBSETS_SQL = "SELECT id FROM jobsets WHERE id = ANY($1::int[])"
ALL_JOBSETS_SQL = "SELECT id FROM jobsets"


async def all_jobsets(db: Fetcher) -> set[int]:
    """Every jobset ID in Hydra's ``jobsets`` table."""
    return {r["id"] for r in await db.fetch(ALL_JOBSETS_SQL)}


async def existing_jobsets(db: Fetcher, jobset_ids: Sequence[int]) -> set[int]:
    """Those of ``jobset_ids`` that are rows of Hydra's ``jobsets`` table."""
    if not jobset_ids:
        return set()
    return {r["id"] for r in await db.fetch(EXISTING_JOBSETS_SQL, sorted(set(jobset_ids)))}


CLOSING_JOBSETS_SQL = """
SELECT id, lastcheckedtime, errortime, starttime,
       coalesce(errormsg, '') <> '' AS has_error, coalesce(fetcherrormsg, '') <> '' AS has_fetch_error
FROM jobsets WHERE id = ANY($1::int[])
"""
CLOSING_EVALS_SQL = "SELECT id, jobset_id FROM jobsetevals WHERE id = ANY($1::int[])"


async def closing_rows(
    db: Fetcher, jobset_ids: Sequence[int], eval_ids: Sequence[int]
) -> tuple[dict[int, JobsetCheck], dict[int, int]]:
    """What vouches for evaluation notifications: the jobsets' rows, and each JobsetEval's jobset."""
    jobsets: dict[int, JobsetCheck] = {}
    if jobset_ids:
        for r in await db.fetch(CLOSING_JOBSETS_SQL, sorted(set(jobset_ids))):
            jobsets[r["id"]] = JobsetCheck(
                last_checked=r["lastcheckedtime"],
                has_error=r["has_error"],
                error_time=r["errortime"],
                has_fetch_error=r["has_fetch_error"],
                start_time=r["starttime"],
            )
    evals: dict[int, int] = {}
    if eval_ids:
        evals = {r["id"]: r["jobset_id"] for r in await db.fetch(CLOSING_EVALS_SQL, sorted(set(eval_ids)))}
    return jobsets, evals


async def eval_facts(
    db: Fetcher, eval_ids: Sequence[int], *, budget: int, max_links: int
) -> dict[int, EvalFacts]:
    """Facts of the given JobsetEvals; IDs missing from the database are absent from the result.

    Five queries whatever the number of evaluations: the rows with their counts, the
    bounded link targets, the creating evaluation of the linked cached builds, and the
    inputs (after checking they are readable: without them evaluations carry no revision).
    """
    if not eval_ids:
        return {}
    wanted = sorted(set(eval_ids))
    rows = await db.fetch(EVAL_FACTS_SQL, wanted)
    if not rows:
        return {}
    links = {r["id"]: r for r in await db.fetch(EVAL_LINKS_SQL, wanted, budget, max_links)}
    cached_ids = sorted({b for r in links.values() for b in r["cached"]})
    owners = {r["build"]: r["eval"] for r in await db.fetch(OWNER_SQL, cached_ids)} if cached_ids else {}
    inputs = await eval_inputs(db, wanted)
    out = {}
    for row in rows:
        link = links[row["id"]]
        cached = tuple((b, owners[b]) for b in link["cached"] if b in owners)
        out[row["id"]] = _eval_facts(row, tuple(link["own_trace"]), cached, inputs.get(row["id"], ()))
    return out


_inputs_warned = False


async def eval_inputs(db: Fetcher, eval_ids: Sequence[int]) -> dict[int, tuple[EvalInput, ...]]:
    """The ``jobsetevalinputs`` rows of the given evaluations; none (with one warning per process)
    when the table is absent or the role may not read it."""
    global _inputs_warned
    if not await db.fetchval(INPUTS_READABLE_SQL):
        if not _inputs_warned:
            _inputs_warned = True
            log.warning(
                "jobsetevalinputs is missing or not readable: evaluations are exported without "
                "revisions (GRANT SELECT ON jobsetevalinputs TO the daemon's role)"
            )
        return {}
    out: dict[int, list[EvalInput]] = {}
    for r in await db.fetch(EVAL_INPUTS_SQL, list(eval_ids)):
        item = EvalInput(
            name=r["name"], alt_nr=r["altnr"], type=r["type"], uri=r["uri"], revision=r["revision"]
        )
        out.setdefault(r["eval"], []).append(item)
    return {k: tuple(v) for k, v in out.items()}


def _eval_facts(
    row: Row,
    own_trace: tuple[int, ...],
    cached: tuple[tuple[int, int], ...],
    inputs: tuple[EvalInput, ...],
) -> EvalFacts:
    return EvalFacts(
        eval_id=row["id"],
        jobset_id=row["jobset_id"],
        project=row["project"],
        jobset=row["jobset"],
        timestamp=row["timestamp"],
        checkout_time=row["checkouttime"],
        eval_time=row["evaltime"],
        has_new_builds=bool(row["hasnewbuilds"]),
        nr_builds=row["nrbuilds"],
        hash=row["hash"],
        flake=row["flake"],
        nixexpr_input=row["nixexprinput"],
        nixexpr_path=row["nixexprpath"],
        error_msg=row["errormsg"],
        error_time=row["errortime"],
        builds_new=row["builds_new"],
        builds_cached_finished=row["builds_cached_finished"],
        builds_cached_queued=row["builds_cached_queued"],
        own_trace_build_ids=own_trace,
        cached_builds=cached,
        inputs=inputs,
    )


async def jobset_facts(db: Fetcher, jobset_ids: Sequence[int]) -> dict[int, JobsetFacts]:
    """The current ``jobsets`` rows of the given IDs; missing IDs are absent from the result."""
    if not jobset_ids:
        return {}
    rows = await db.fetch(JOBSET_FACTS_SQL, list(set(jobset_ids)))
    return {
        row["id"]: JobsetFacts(
            jobset_id=row["id"],
            project=row["project"],
            jobset=row["name"],
            error_msg=row["errormsg"],
            error_time=row["errortime"],
            fetch_error_msg=row["fetcherrormsg"],
            start_time=row["starttime"],
            last_checked=row["lastcheckedtime"],
        )
        for row in rows
    }


BUILD_FACTS_SQL = """
SELECT b.id, b.finished, b.timestamp, b.jobset_id, j.project, j.name AS jobset, b.job, b.nixname, b.drvpath,
       b.system, b.priority, b.globalpriority, b.starttime, b.stoptime, b.iscachedbuild, b.buildstatus,
       b.size, b.closuresize, b.releasename, o.eval_id
FROM builds b
JOIN jobsets j ON j.id = b.jobset_id
LEFT JOIN LATERAL (
    -- The evaluation that created the build, else the lowest one that contains it.
    SELECT m.eval AS eval_id FROM jobsetevalmembers m WHERE m.build = b.id ORDER BY m.isnew DESC, m.eval LIMIT 1
) o ON true
WHERE b.id = ANY($1::int[])
"""

# The first new build of each evaluation beyond the trace budget (OFFSET = budget), or NULL, and
# how many new builds the evaluation's trace holds (they share its span budget; at most $2).
BUDGET_SQL = """
SELECT e.id,
       (SELECT m.build FROM jobsetevalmembers m WHERE m.eval = e.id AND m.isnew = 1
        ORDER BY m.build OFFSET $2 LIMIT 1) AS first_beyond,
       (SELECT count(*) FROM (SELECT 1 FROM jobsetevalmembers m WHERE m.eval = e.id AND m.isnew = 1
        LIMIT $2) AS k) AS in_trace
FROM unnest($1::int[]) AS e(id)
"""

STEP_COLUMNS = """s.build, s.stepnr, s.type, s.drvpath, s.status, s.errormsg, s.starttime, s.stoptime, s.machine,
       s.system, s.propagatedfrom, s.overhead, s.timesbuilt, s.isnondeterministic"""

# Every step of the given builds.
STEPS_SQL = """
SELECT {columns}, {resolved} AS resolveddrvpath
FROM buildsteps s WHERE s.build = ANY($1::int[]) ORDER BY s.build, s.stepnr
"""

# The given (build, step) pairs plus each build's top-level steps, which decide attempts.
STEP_SUBSET_SQL = """
SELECT {columns}, {resolved} AS resolveddrvpath
FROM buildsteps s JOIN builds b ON b.id = s.build
WHERE s.build = ANY($1::int[])
  AND (s.drvpath = b.drvpath OR (s.build, s.stepnr) IN (SELECT * FROM unnest($1::int[], $2::int[])))
ORDER BY s.build, s.stepnr
"""

HAS_RESOLVED_SQL = """
SELECT EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_name = 'buildsteps' AND column_name = 'resolveddrvpath'
                 AND table_schema = ANY(current_schemas(false)))
"""


class BuildQueries:
    """Batched build and step lookups, with the per-evaluation budget cache (Trio-flavoured)."""

    def __init__(self, db: Fetcher, *, budget: int, cache_size: int = 4096) -> None:
        self._db = db
        self._budget = budget
        self._cache_size = cache_size
        self._first_beyond: dict[int, tuple[int | None, int]] = {}  # eval -> (first beyond, builds in trace)
        self._resolved: str | None = None

    async def builds(self, build_ids: Sequence[int]) -> dict[int, BuildFacts]:
        """Facts of the given builds with their trace placement; missing IDs are absent."""
        if not build_ids:
            return {}
        rows = await self._db.fetch(BUILD_FACTS_SQL, sorted(set(build_ids)))
        beyond = await self._budget_of({r["eval_id"] for r in rows if r["eval_id"] is not None})
        return {r["id"]: _build_facts(r, beyond) for r in rows}

    async def builds_and_steps(
        self, build_ids: Sequence[int], subset: Sequence[tuple[int, int]] | None = None
    ) -> tuple[dict[int, BuildFacts], dict[int, list[StepFacts]]]:
        """:meth:`builds` and :meth:`steps` of ``build_ids`` (or :meth:`step_subset` of ``subset``),
        in one trip to the pool: one asyncio crossing and one checkout serve both queries."""
        if not build_ids:
            return {}, {}
        ids = sorted(set(build_ids))
        resolved = await self._resolved_column()
        if subset is None:
            steps_sql = STEPS_SQL.format(columns=STEP_COLUMNS, resolved=resolved)
            steps_args: tuple[object, ...] = (ids,)
        else:
            steps_sql = STEP_SUBSET_SQL.format(columns=STEP_COLUMNS, resolved=resolved)
            steps_args = ([b for b, _ in subset], [n for _, n in subset])
        build_rows, step_rows = await _fetch_each(
            self._db, [(BUILD_FACTS_SQL, (ids,)), (steps_sql, steps_args)]
        )
        beyond = await self._budget_of({r["eval_id"] for r in build_rows if r["eval_id"] is not None})
        return {r["id"]: _build_facts(r, beyond) for r in build_rows}, _group_steps(step_rows)

    async def steps(self, build_ids: Sequence[int]) -> dict[int, list[StepFacts]]:
        """Every step row of the given builds, by build, in step order."""
        if not build_ids:
            return {}
        sql = STEPS_SQL.format(columns=STEP_COLUMNS, resolved=await self._resolved_column())
        return _group_steps(await self._db.fetch(sql, sorted(set(build_ids))))

    async def step_subset(self, pairs: Sequence[tuple[int, int]]) -> dict[int, list[StepFacts]]:
        """The given (build, step) rows plus their builds' top-level steps, by build."""
        if not pairs:
            return {}
        sql = STEP_SUBSET_SQL.format(columns=STEP_COLUMNS, resolved=await self._resolved_column())
        return _group_steps(await self._db.fetch(sql, [b for b, _ in pairs], [n for _, n in pairs]))

    async def _resolved_column(self) -> str:
        # Schema 87 added buildsteps.resolveddrvpath; the legacy Hydra (84/85) has no such column.
        if self._resolved is None:
            has = await self._db.fetchval(HAS_RESOLVED_SQL)
            self._resolved = "s.resolveddrvpath" if has else "NULL::text"
        return self._resolved

    async def _budget_of(self, eval_ids: set[int]) -> dict[int, tuple[int | None, int]]:
        missing = [e for e in eval_ids if e not in self._first_beyond]
        if missing:
            if len(self._first_beyond) + len(missing) > self._cache_size:
                self._first_beyond.clear()  # evaluations age out together; a re-query is cheap
            for row in await self._db.fetch(BUDGET_SQL, missing, self._budget):
                self._first_beyond[row["id"]] = (row["first_beyond"], row["in_trace"])
        return {e: self._first_beyond.get(e, (None, 1)) for e in eval_ids}


def _build_facts(row: Row, beyond: dict[int, tuple[int | None, int]]) -> BuildFacts:
    eval_id = row["eval_id"]
    first_beyond, in_trace = beyond.get(eval_id, (None, 1)) if eval_id is not None else (None, 1)
    in_eval_trace = first_beyond is None or row["id"] < first_beyond
    return BuildFacts(
        build_id=row["id"],
        finished=row["finished"] == 1,
        timestamp=row["timestamp"],
        jobset_id=row["jobset_id"],
        project=row["project"],
        jobset=row["jobset"],
        job=row["job"],
        nixname=row["nixname"],
        drvpath=row["drvpath"],
        system=row["system"],
        priority=row["priority"],
        global_priority=row["globalpriority"],
        starttime=row["starttime"],
        stoptime=row["stoptime"],
        cached=bool(row["iscachedbuild"]),
        status=row["buildstatus"],
        size=row["size"],
        closure_size=row["closuresize"],
        release_name=row["releasename"],
        eval_id=eval_id,
        in_eval_trace=in_eval_trace,
        trace_builds=max(1, in_trace) if in_eval_trace else 1,
    )


def _group_steps(rows: Sequence[Row]) -> dict[int, list[StepFacts]]:
    out: dict[int, list[StepFacts]] = {}
    for r in rows:
        out.setdefault(r["build"], []).append(
            StepFacts(
                build_id=r["build"],
                stepnr=r["stepnr"],
                type=r["type"],
                drvpath=r["drvpath"],
                status=r["status"],
                errormsg=r["errormsg"],
                starttime=r["starttime"],
                stoptime=r["stoptime"],
                machine=r["machine"] or "",
                system=r["system"],
                propagated_from=r["propagatedfrom"],
                overhead_ms=r["overhead"],
                times_built=r["timesbuilt"],
                nondeterministic=r["isnondeterministic"],
                resolved_drv_path=r["resolveddrvpath"],
            )
        )
    return out


# Catch-up scans (tasks/catchup_task.py). Each is keyed so a page can resume where the last one ended.
CATCHUP_EVALS_SQL = "SELECT id, jobset_id FROM jobsetevals WHERE id > $1 ORDER BY id LIMIT $2"
CATCHUP_BUILDS_SQL = """
SELECT id, stoptime FROM builds
WHERE finished = 1 AND stoptime >= $1 AND stoptime < $2 AND (stoptime, id) > ($3, $4)
ORDER BY stoptime, id LIMIT $5
"""
CATCHUP_STEPS_SQL = """
SELECT s.build, s.stepnr FROM buildsteps s JOIN builds b ON b.id = s.build
WHERE b.finished = 0 AND s.status IS NOT NULL AND s.starttime IS NOT NULL
  AND s.stoptime IS NOT NULL AND s.stoptime >= $1 AND s.stoptime < $2
ORDER BY s.stoptime, s.build, s.stepnr LIMIT $3
"""
CATCHUP_JOBSETS_SQL = "SELECT id, lastcheckedtime, errormsg, errortime, fetcherrormsg FROM jobsets"
# Hydra has no index on jobsetevals.timestamp: the newest evaluation recorded before the point is
# found by walking the primary key down from the newest one, which reads only the evaluations of the
# last ``$1`` seconds (the same result as max(id) over the matching rows, which reads the whole
# table; docs/performance.md). Every scan runs this for the database's clock.
CATCHUP_START_SQL = """
SELECT coalesce((SELECT e.id FROM jobsetevals e WHERE e.timestamp < extract(epoch FROM now())::int - $1
                 ORDER BY e.id DESC LIMIT 1), 0) AS eval_id,
       extract(epoch FROM now())::int AS now
"""


async def catchup_evals(db: Fetcher, after: int, limit: int) -> list[tuple[int, int]]:
    """(eval ID, jobset ID) of JobsetEvals after ``after``, in ID order."""
    return [(r["id"], r["jobset_id"]) for r in await db.fetch(CATCHUP_EVALS_SQL, after, limit)]


async def catchup_builds(
    db: Fetcher, since: int, until: int, after: tuple[int, int], limit: int
) -> list[tuple[int, int]]:
    """(build ID, stop time) of builds that finished in [since, until), after the key ``after``."""
    rows = await db.fetch(CATCHUP_BUILDS_SQL, since, until, after[0], after[1], limit)
    return [(r["id"], r["stoptime"]) for r in rows]


async def catchup_steps(db: Fetcher, since: int, until: int, limit: int) -> list[tuple[int, int]]:
    """(build ID, step number) of finished steps of still-running builds that stopped in [since, until)."""
    return [(r["build"], r["stepnr"]) for r in await db.fetch(CATCHUP_STEPS_SQL, since, until, limit)]


async def catchup_jobsets(db: Fetcher) -> list[JobsetRow]:
    """Every jobset's evaluation bookkeeping."""
    return [
        JobsetRow(
            jobset_id=r["id"],
            last_checked=r["lastcheckedtime"],
            error_msg=r["errormsg"],
            error_time=r["errortime"],
            fetch_error_msg=r["fetcherrormsg"],
        )
        for r in await db.fetch(CATCHUP_JOBSETS_SQL)
    ]


async def catchup_start(db: Fetcher, now_minus: int = 0) -> tuple[int, int]:
    """(highest eval ID recorded before ``now_minus`` seconds ago, database clock in Unix seconds)."""
    rows = await db.fetch(CATCHUP_START_SQL, now_minus)
    return rows[0]["eval_id"], rows[0]["now"]


# What runs now, as Hydra itself shows it: hydra-evaluator sets jobsets.starttime while it evaluates
# a jobset (and clears it after); busy steps name their machine (partial index on busy != 0).
ACTIVE_EVALS_SQL = "SELECT j.project, j.name FROM jobsets j WHERE j.starttime IS NOT NULL"
BUSY_MACHINES_SQL = "SELECT count(DISTINCT s.machine) FROM buildsteps s WHERE s.busy != 0"


async def live_state(db: Fetcher) -> tuple[list[str], int]:
    """(``project:jobset`` of each running evaluation, distinct machines with a busy step)."""
    rows = await db.fetch(ACTIVE_EVALS_SQL)
    busy = await db.fetchval(BUSY_MACHINES_SQL)
    return [f"{r['project']}:{r['name']}" for r in rows], int(busy or 0)
