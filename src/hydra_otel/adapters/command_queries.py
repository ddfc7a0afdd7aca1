"""Queries of the one-shot commands: ``backfill``'s selection and ``check``'s probes.

Plain SELECTs against Hydra's tables and PostgreSQL's catalogue (columns as declared in
``tools.HYDRA_COLUMNS``), plus the NOTIFY ``check`` sends to its own private channel;
hydra-otel never writes Hydra's tables. The daemon's own queries are in adapters/queries.py.
Functions are Trio-flavoured (see adapters/db.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra_otel.adapters.db import Connection, Database

# --- backfill -------------------------------------------------------------------------------------------

JOBSET_IDS_SQL = """
SELECT j.id, j.project, j.name FROM jobsets j
JOIN unnest($1::text[], $2::text[]) AS w(project, name) ON w.project = j.project AND w.name = j.name
"""

# Hydra has no index on jobsetevals.timestamp, but hydra-eval-jobset sets it when it inserts the
# row, so IDs grow with it: every evaluation below the last one recorded a day before ``since``
# (found by walking the primary key down from the newest) was recorded before ``since``. The
# selection is then read by ID from there, never from the first evaluation (docs/performance.md).
SINCE_FLOOR = """coalesce((SELECT p.id FROM jobsetevals p WHERE p.timestamp < $1 - 86400
                           ORDER BY p.id DESC LIMIT 1), 0)"""

# The selection, in ID order, after the key ``$3`` (from the floor while ``$3`` is 0); ``$4`` NULL
# means every jobset.
SELECT_EVALS_SQL = f"""
SELECT e.id, e.jobset_id FROM jobsetevals e
WHERE e.timestamp >= $1 AND e.timestamp < $2
  AND e.id > CASE WHEN $3 > 0 THEN $3 ELSE {SINCE_FLOOR} END
  AND ($4::int[] IS NULL OR e.jobset_id = ANY($4::int[]))
ORDER BY e.id LIMIT $5
"""

COUNT_EVALS_SQL = f"""
SELECT count(*) AS total, count(*) FILTER (WHERE e.id > $3) AS remaining FROM jobsetevals e
WHERE e.timestamp >= $1 AND e.timestamp < $2 AND ($4::int[] IS NULL OR e.jobset_id = ANY($4::int[]))
  AND e.id > {SINCE_FLOOR}
"""

# Finished builds the given evaluations created, in ID order, after the key ``$2``.
CREATED_BUILDS_SQL = """
SELECT DISTINCT m.build FROM jobsetevalmembers m JOIN builds b ON b.id = m.build
WHERE m.eval = ANY($1::int[]) AND m.isnew = 1 AND b.finished = 1 AND m.build > $2
ORDER BY m.build LIMIT $3
"""


async def jobset_ids(database: Database, names: Sequence[tuple[str, str]]) -> dict[str, int]:
    """The IDs of the jobsets ``(project, name)`` that exist, keyed ``project:name``."""
    rows = await database.fetch(JOBSET_IDS_SQL, [p for p, _ in names], [j for _, j in names])
    return {f"{r['project']}:{r['name']}": r["id"] for r in rows}


async def count_evals(
    database: Database, since: int, until: int, after: int, jobsets: list[int] | None
) -> tuple[int, int]:
    """How many evaluations of ``[since, until)`` (of ``jobsets``; None: all) exist, and how many after ``after``."""
    rows = await database.fetch(COUNT_EVALS_SQL, since, until, after, jobsets)
    return rows[0]["total"], rows[0]["remaining"]


async def eval_page(
    database: Database, since: int, until: int, after: int, jobsets: list[int] | None, limit: int
) -> list[tuple[int, int]]:
    """The next ``limit`` evaluations of the selection after ID ``after``: ``(id, jobset_id)``, in ID order."""
    rows = await database.fetch(SELECT_EVALS_SQL, since, until, after, jobsets, limit)
    return [(r["id"], r["jobset_id"]) for r in rows]


async def created_builds(database: Database, eval_ids: list[int], after: int, limit: int) -> list[int]:
    """The next ``limit`` finished builds ``eval_ids`` created, after build ID ``after``, in ID order."""
    rows = await database.fetch(CREATED_BUILDS_SQL, eval_ids, after, limit)
    return [r["build"] for r in rows]


# --- check ----------------------------------------------------------------------------------------------

# pg_catalog rather than information_schema: the latter hides columns the role has no privilege
# on, which would report a missing GRANT as a missing column. pg_table_is_visible resolves names
# through the search_path exactly as the daemon's unqualified queries do.
COLUMNS_SQL = """
SELECT c.relname AS table_name, a.attname AS column_name
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND pg_catalog.pg_table_is_visible(c.oid)
"""

# Table-level SELECT, or (for column-level grants) SELECT on every column the daemon reads.
PRIVILEGES_SQL = """
SELECT p.t AS table_name,
       has_table_privilege(p.t, 'SELECT') OR bool_and(has_column_privilege(p.t, p.c, 'SELECT')) AS readable
FROM unnest($1::text[], $2::text[]) AS p(t, c)
GROUP BY p.t
"""


async def ping(database: Database) -> None:
    """One round trip (connects the pool's first connection)."""
    await database.fetchval("SELECT 1")


async def table_columns(database: Database, tables: Sequence[str]) -> list[tuple[str, str]]:
    """``(table, column)`` of every column of ``tables`` that the search path shows."""
    rows = await database.fetch(COLUMNS_SQL, list(tables))
    return [(r["table_name"], r["column_name"]) for r in rows]


async def schema_version(database: Database) -> int | None:
    """Hydra's schema version (``schemaversion``; None: the table is empty)."""
    version: int | None = await database.fetchval("SELECT max(version) FROM schemaversion")
    return version


async def readable_tables(database: Database, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    """For each table of ``(table, column)`` pairs: whether the role may read it (or all those columns)."""
    rows = await database.fetch(PRIVILEGES_SQL, [t for t, _ in pairs], [c for _, c in pairs])
    return [(r["table_name"], r["readable"]) for r in rows]


async def notify(conn: Connection, channel: str, payload: str) -> None:
    """NOTIFY ``channel`` (a plain identifier) with ``payload`` (no quote in it)."""
    await conn.execute(f"NOTIFY {channel}, '{payload}'")
