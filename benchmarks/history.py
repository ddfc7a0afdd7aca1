"""A Hydra history of any size, generated with set-based SQL (``generate_series``, ``INSERT … SELECT``).

Used by the big-database phase (bigdb.py) and, small, by tests/integration/test_explain.py. The rows
follow Hydra's shape closely enough for the planner's statistics to be realistic:

* one evaluation every ``EVAL_EVERY`` seconds up to ``t_end`` (IDs grow with time, as in Hydra,
  where ``hydra-eval-jobset`` sets ``timestamp`` when it inserts the row), spread over ``jobsets``;
* ``BUILDS_PER_EVAL`` new builds per evaluation (``jobsetevalmembers.isnew = 1``) and
  ``CACHED_PER_EVAL`` builds of earlier evaluations (``isnew = 0``);
* ``STEPS_PER_BUILD`` steps per build: a dependency, then the top-level derivation (the step whose
  ``drvpath`` is the build's); a build or step that would stop after ``t_end`` is still running
  (``finished = 0``; its top-level step is busy with no status and no stop time);
* every fiftieth build fails (status 1, and its top-level step).

The recent rate is the same whatever the size (the size only changes how far history goes back),
so a catch-up of the last minutes finds the same rows in a small and in a big database.

Loading drops the indexes of the four big tables (keeping their definitions), disables
triggers and foreign-key checks for the session (``session_replication_role = replica``: no
NOTIFY either), inserts, re-creates exactly the indexes it dropped and runs ANALYZE.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Seconds between two evaluations (hydra.nixos.org: a few thousand a day).
EVAL_EVERY = 30
BUILDS_PER_EVAL = 5
CACHED_PER_EVAL = 5
STEPS_PER_BUILD = 2
#: The tables whose sequential scan the daemon must never cause.
BIG_TABLES = ("builds", "buildsteps", "jobsetevals", "jobsetevalmembers")


@dataclass(frozen=True, slots=True)
class History:
    """Sizes and the end of a generated history (times are Unix seconds)."""

    evals: int
    t_end: int
    jobsets: int = 200

    @property
    def builds(self) -> int:
        return self.evals * BUILDS_PER_EVAL

    @property
    def steps(self) -> int:
        return self.builds * STEPS_PER_BUILD

    @property
    def members(self) -> int:
        return self.builds + self.evals * CACHED_PER_EVAL

    @property
    def t_start(self) -> int:
        return self.t_end - self.evals * EVAL_EVERY


_TABLES = ", ".join(f"'{t}'" for t in BIG_TABLES)

#: Saves, then drops, every index of the big tables that no constraint owns (keys stay).
DROP_INDEXES_SQL = f"""
CREATE TEMP TABLE saved_indexes AS
SELECT i.indexname, i.indexdef FROM pg_indexes i
WHERE i.schemaname = 'public' AND i.tablename IN ({_TABLES})
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname);
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT indexname FROM saved_indexes LOOP EXECUTE format('DROP INDEX %I', r.indexname); END LOOP;
END $$;
"""

#: Re-creates exactly the indexes DROP_INDEXES_SQL dropped, from their saved definitions.
CREATE_INDEXES_SQL = """
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT indexdef FROM saved_indexes LOOP EXECUTE r.indexdef; END LOOP;
END $$;
DROP TABLE saved_indexes;
"""


def jobsets_sql(h: History) -> str:
    """Projects and jobsets (small tables: no index games)."""
    return f"""
INSERT INTO projects (name, displayname, owner)
SELECT 'project' || p, 'Project ' || p, 'alice' FROM generate_series(1, {max(1, h.jobsets // 10)}) p;
INSERT INTO jobsets (id, name, project, nixexprinput, nixexprpath, emailoverride, errormsg, errortime,
                     lastcheckedtime)
SELECT j, 'jobset' || j, 'project' || (1 + (j - 1) / 10), 'src', 'release.nix', '', '', {h.t_end} - 60,
       {h.t_end} - 60
FROM generate_series(1, {h.jobsets}) j;
SELECT setval('jobsets_id_seq', {h.jobsets});
"""


def evals_sql(h: History) -> str:
    """The JobsetEvals, one every EVAL_EVERY seconds, the last at ``t_end``."""
    n = BUILDS_PER_EVAL + CACHED_PER_EVAL
    return f"""
INSERT INTO jobsetevals (id, jobset_id, timestamp, checkouttime, evaltime, hasnewbuilds, hash,
                         nrbuilds, nrsucceeded, nixexprinput, nixexprpath)
SELECT e, 1 + (e::bigint * 7919) % {h.jobsets}, {h.t_start} + e * {EVAL_EVERY}, 5 + e % 20, 30 + e % 300, 1,
       md5(e::text), {n}, {n}, 'src', 'release.nix'
FROM generate_series(1, {h.evals}) e;
SELECT setval('jobsetevals_id_seq', {h.evals});
"""


def _build_times(b: str) -> tuple[str, str, str]:
    """SQL expressions (queued, start, stop) of build ``b``: queued with its evaluation."""
    queued = f"({{t_start}} + (({b} - 1) / {BUILDS_PER_EVAL} + 1) * {EVAL_EVERY})"
    start = f"({queued} + {b} % 600)"
    stop = f"({start} + 1 + ({b} * 7) % 1800)"
    return queued, start, stop


def builds_sql(h: History) -> str:
    """The builds; those that would stop after ``t_end`` are still queued or running."""
    queued, start, stop = (x.format(t_start=h.t_start) for x in _build_times("b"))
    done = f"({stop} <= {h.t_end})"
    return f"""
INSERT INTO builds (id, finished, timestamp, jobset_id, job, nixname, drvpath, system, iscurrent,
                    priority, globalpriority, starttime, stoptime, iscachedbuild, buildstatus, size,
                    closuresize, releasename)
SELECT b, CASE WHEN {done} THEN 1 ELSE 0 END, {queued},
       1 + (((b - 1) / {BUILDS_PER_EVAL} + 1)::bigint * 7919) % {h.jobsets},
       'job' || (b % 20000), 'pkg-' || (b % 20000) || '-1.0',
       '/nix/store/' || md5(b::text) || '-pkg-' || (b % 20000) || '-1.0.drv',
       CASE b % 4 WHEN 0 THEN 'aarch64-linux' ELSE 'x86_64-linux' END,
       CASE WHEN b > {h.builds} - 20000 THEN 1 ELSE 0 END, 100, 0,
       CASE WHEN {done} THEN {start} END, CASE WHEN {done} THEN {stop} END,
       CASE WHEN {done} THEN 0 END,
       CASE WHEN NOT {done} THEN NULL WHEN b % 50 = 0 THEN 1 ELSE 0 END,
       CASE WHEN {done} THEN 1000 + b % 100000 END, CASE WHEN {done} THEN 100000 + b % 1000000 END, NULL
FROM generate_series(1, {h.builds}) b;
SELECT setval('builds_id_seq', {h.builds});
"""


def steps_sql(h: History) -> str:
    """Two steps per build: a dependency (first half of its time) and the top-level derivation."""
    _, start, stop = (x.format(t_start=h.t_start) for x in _build_times("s.b"))
    mid = f"({start} + ({stop} - {start}) / 2)"
    s_start = f"(CASE s.nr WHEN 1 THEN {start} ELSE {mid} END)"
    s_stop = f"(CASE s.nr WHEN 1 THEN {mid} ELSE {stop} END)"
    done = f"({s_stop} <= {h.t_end})"
    return f"""
INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, starttime, stoptime, machine,
                        system, overhead, timesbuilt, isnondeterministic)
SELECT s.b, s.nr, 0,
       CASE s.nr WHEN 1 THEN '/nix/store/' || md5('dep' || s.b) || '-dep-' || (s.b % 20000) || '.drv'
                 ELSE '/nix/store/' || md5(s.b::text) || '-pkg-' || (s.b % 20000) || '-1.0.drv' END,
       CASE WHEN {done} THEN 0 ELSE 30 END,
       CASE WHEN NOT {done} THEN NULL WHEN s.nr = 2 AND s.b % 50 = 0 THEN 1 ELSE 0 END,
       {s_start}, CASE WHEN {done} THEN {s_stop} END,
       'ssh://builder' || (s.b % 40), CASE s.b % 4 WHEN 0 THEN 'aarch64-linux' ELSE 'x86_64-linux' END,
       CASE WHEN {done} THEN 50 + s.b % 500 END, CASE WHEN {done} THEN 1 END,
       CASE WHEN {done} THEN false END
FROM (SELECT b, nr FROM generate_series(1, {h.builds}) b, generate_series(1, {STEPS_PER_BUILD}) nr) s
WHERE {s_start} <= {h.t_end};
"""


def members_sql(h: History) -> str:
    """Each evaluation's new builds, then the builds it shares with earlier evaluations."""
    return f"""
INSERT INTO jobsetevalmembers (eval, build, isnew)
SELECT (b - 1) / {BUILDS_PER_EVAL} + 1, b, 1 FROM generate_series(1, {h.builds}) b;
INSERT INTO jobsetevalmembers (eval, build, isnew)
SELECT e, (e - 1) * {BUILDS_PER_EVAL} - k * 37, 0
FROM generate_series(1, {h.evals}) e, generate_series(1, {CACHED_PER_EVAL}) k
WHERE (e - 1) * {BUILDS_PER_EVAL} - k * 37 > 0;
"""


def load_steps(h: History) -> list[tuple[str, str]]:
    """(label, SQL) in loading order, each run on one superuser session in turn."""
    return [
        ("set-up", "SET session_replication_role = replica; SET maintenance_work_mem = '512MB';"),
        ("drop indexes", DROP_INDEXES_SQL),
        ("jobsets", jobsets_sql(h)),
        ("jobsetevals", evals_sql(h)),
        ("builds", builds_sql(h)),
        ("buildsteps", steps_sql(h)),
        ("jobsetevalmembers", members_sql(h)),
        ("indexes", CREATE_INDEXES_SQL),
        ("analyze", "RESET session_replication_role; ANALYZE;"),
    ]


def load_script(h: History) -> str:
    """Every loading step as one script (for ``psql`` or one ``execute``)."""
    return "\n".join(sql for _, sql in load_steps(h))
