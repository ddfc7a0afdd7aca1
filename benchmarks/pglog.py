"""Counting the daemon's queries server-side, from PostgreSQL's log.

The daemon connects as its own read-only role, for which the benchmark sets
``log_statement = 'all'`` (``ALTER ROLE``), so the server logs every statement the
daemon's connections run, and nothing else's. Entries are told apart by
``log_line_prefix`` (``LINE_PREFIX``); each statement is classified by its text
against the SQL of ``hydra_otel/adapters/queries.py`` (matched by signature, so this
module need not import the daemon's asyncio adapter).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

#: Server setting: every log entry starts with this marker, then time and PID.
LINE_PREFIX = "@@ %m [%p] "

_ENTRY = re.compile(r"^@@ \S+ \S+ \S+ \[\d+\] (?:LOG|ERROR|STATEMENT|DETAIL|WARNING|FATAL):  ")
_STATEMENT = re.compile(r"LOG:  (?:statement|execute [^:]*): (.*)$")

# (category, substring of the whitespace-normalised statement); first match wins.
_SIGNATURES: tuple[tuple[str, str], ...] = (
    ("pool_reset", "pg_advisory_unlock_all"),  # asyncpg's Pool resets a connection on release
    ("pool_reset", "RESET ALL"),
    ("listen", "LISTEN "),
    ("introspection", "typeinfo_tree"),  # asyncpg: types of a new prepared statement
    ("introspection", "set_config('jit'"),
    ("lock", "pg_try_advisory_lock"),
    ("catchup", "FROM jobsetevals WHERE id > $1"),
    ("catchup", "WHERE finished = 1 AND stoptime >= $1"),
    ("catchup", "WHERE b.finished = 0 AND s.status IS NOT NULL"),
    ("catchup", "SELECT id, lastcheckedtime, errormsg"),
    ("catchup", ") AS eval_id, extract(epoch FROM now())"),  # CATCHUP_START_SQL
    ("enrichment", "FROM builds b JOIN jobsets j"),  # BUILD_FACTS_SQL
    ("enrichment", "AS first_beyond"),  # BUDGET_SQL
    ("enrichment", "FROM buildsteps s"),  # STEPS_SQL, STEP_SUBSET_SQL
    ("enrichment", "FROM jobsetevals e JOIN jobsets j"),  # EVAL_FACTS_SQL
    ("enrichment", "AS own_trace"),  # EVAL_LINKS_SQL
    ("enrichment", "SELECT DISTINCT ON (m.build)"),  # OWNER_SQL
    ("enrichment", "FROM jobsets j WHERE j.id = ANY"),  # JOBSET_FACTS_SQL
    ("enrichment", "information_schema.columns"),  # HAS_RESOLVED_SQL
)


def role_sql(role: str) -> str:
    """A read-only role for the daemon whose every statement the server logs (to count queries)."""
    return f"""
CREATE ROLE {role} LOGIN;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};
ALTER ROLE {role} SET log_statement = 'all';
ALTER ROLE {role} SET log_parameter_max_length = 0;
"""


def classify(statement: str) -> str:
    """The category of one statement (``other`` if unknown)."""
    text = " ".join(statement.split())
    if text in ("SELECT 1", "SELECT 1;"):
        return "health"
    for category, needle in _SIGNATURES:
        if needle in text:
            return category
    return "other"


class QueryLog:
    """The server log, read in slices between byte offsets."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def offset(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def statements(self, start: int, end: int | None = None) -> list[str]:
        """Statements logged between two offsets."""
        with self.path.open("rb") as f:
            f.seek(start)
            raw = f.read() if end is None else f.read(max(0, end - start))
        out: list[str] = []
        current: list[str] | None = None
        for line in raw.decode("utf-8", "replace").splitlines():
            if line.startswith("@@ ") and _ENTRY.match(line):
                if current is not None:
                    out.append("\n".join(current))
                m = _STATEMENT.search(line)
                current = [m.group(1)] if m else None
            elif current is not None:
                current.append(line)
        if current is not None:
            out.append("\n".join(current))
        return out

    def count(self, start: int, end: int | None = None) -> Counter[str]:
        """Statements by category between two offsets."""
        return Counter(classify(s) for s in self.statements(start, end))
