"""Read-only queries against Hydra's tables, returning core facts.

Every statement is a module constant and a plain SELECT: hydra-otel never
writes Hydra's tables. Lookups take a batch of IDs (``= ANY($1)``) so one
query serves many events. Functions are Trio-flavoured (see adapters/db.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from hydra_otel.adapters.db import Database
from hydra_otel.core.evals import EvalFacts, JobsetFacts

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

JOBSET_FACTS_SQL = """
SELECT j.id, j.project, j.name, j.errormsg, j.errortime, j.fetcherrormsg, j.starttime
FROM jobsets j
WHERE j.id = ANY($1::int[])
"""


async def eval_facts(db: Database, eval_ids: Sequence[int]) -> dict[int, EvalFacts]:
    """Facts of the given JobsetEvals; IDs missing from the database are absent from the result."""
    if not eval_ids:
        return {}
    rows = await db.fetch(EVAL_FACTS_SQL, list(set(eval_ids)))
    return {row["id"]: _eval_facts(row) for row in rows}


def _eval_facts(row: asyncpg.Record) -> EvalFacts:
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
    )


async def jobset_facts(db: Database, jobset_ids: Sequence[int]) -> dict[int, JobsetFacts]:
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
        )
        for row in rows
    }
