"""The benchmark's Hydra: sizes, the ID layout and the SQL of each phase.

Every phase is bulk SQL run on a connection of its own (not the daemon's), with
``pg_notify`` inside the same transaction as the rows it announces, in the order
Hydra's programs send them (see ``hydra_otel.demo.sandbox.hydrasim`` and
docs/notifications.md). Payloads always differ: PostgreSQL folds identical
(channel, payload) pairs within one transaction.

ID layout (``Layout``), all in jobset 1 (``nixpkgs:trunk``):

* history eval 1: builds ``1..H`` (every tenth still queued), loaded before the
  daemon starts, without notifications; they are the cached builds of eval 2;
* eval 2 (the burst): new builds ``H+1..H+N``;
* of those, the first ``B`` finish in bursts with 3 steps each, the next one
  fails with ``D`` dependents, the next ``S`` finish one per event at the
  steady rate, and the last one is the sentinel committed right after eval 2;
* three queued history builds finish alone before the burst (idle sentinels).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from hydra_otel.demo.sandbox.hydrasim import lit, notify

JOBSET = 1
HISTORY_EVAL = 1
BURST_EVAL = 2
#: Hydra's Rust queue runner keeps each build_finished payload at or under this many bytes.
MAX_PAYLOAD = 7000
MACHINE = "builder1"
SYSTEM = "x86_64-linux"


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much of each phase; ``scaled`` applies the ``--scale`` factor."""

    history: int = 150_000  # cached_build_* notifications of the burst eval
    new_builds: int = 80_000  # build_queued notifications of the burst eval
    finishing: int = 20_000  # builds finishing with 3 steps, in bursts
    per_burst: int = 2_000  # builds per burst transaction
    dependents: int = 5_000  # dependents of the one failed build
    steady: int = 3_000  # events at the steady rate (30 s at 100/s)
    rate: float = 100.0  # steady events per second

    @classmethod
    def scaled(cls, scale: float) -> Sizes:
        """Every size times ``scale``, with floors that keep each phase meaningful."""
        d = cls()
        history = max(1_500, round(d.history * scale / 10) * 10)
        finishing = max(20, round(d.finishing * scale))
        dependents = max(5, round(d.dependents * scale))
        steady = max(100, round(d.steady * scale))
        new = max(round(d.new_builds * scale), finishing + dependents + steady + 2)
        return cls(
            history=history,
            new_builds=new,
            finishing=finishing,
            per_burst=max(10, min(d.per_burst, finishing // 10)),
            dependents=dependents,
            steady=steady,
        )


@dataclass(frozen=True, slots=True)
class Layout:
    """Build IDs and times of the workload (times are integer Unix seconds, as Hydra stores them)."""

    sizes: Sizes
    t0: int  # when the burst eval is recorded
    correlation_id: str = "4112.262815283.16494"

    @property
    def t_hist(self) -> int:
        return self.t0 - 7200

    @property
    def step_start(self) -> int:
        """Every step of the workload starts here (after every build was queued)."""
        return self.t0 + 1

    @property
    def burst_stop(self) -> int:
        return self.t0 + 2

    def new_range(self) -> range:
        h = self.sizes.history
        return range(h + 1, h + self.sizes.new_builds + 1)

    def finishing(self) -> range:
        first = self.sizes.history + 1
        return range(first, first + self.sizes.finishing)

    def bursts(self) -> list[range]:
        r, n = self.finishing(), self.sizes.per_burst
        return [range(lo, min(lo + n, r.stop)) for lo in range(r.start, r.stop, n)]

    @property
    def failed(self) -> int:
        return self.finishing().stop

    def dependents(self) -> range:
        return range(self.failed + 1, self.failed + 1 + self.sizes.dependents)

    def steady(self) -> range:
        first = self.dependents().stop
        return range(first, first + self.sizes.steady)

    @property
    def burst_sentinel(self) -> int:
        return self.new_range()[-1]

    def idle_sentinels(self) -> list[int]:
        h = self.sizes.history
        return [h - 10 * k for k in range(3)]  # queued history builds (ID divisible by 10)

    def eval_of(self, build_id: int) -> int:
        return HISTORY_EVAL if build_id <= self.sizes.history else BURST_EVAL

    def in_eval_trace(self, build_id: int, budget: int) -> bool:
        """Placement as the daemon's BUDGET_SQL decides it: the first ``budget`` new builds by ID."""
        first = 1 if build_id <= self.sizes.history else self.sizes.history + 1
        return build_id < first + budget


def job(build_id: int) -> str:
    return f"pkg{build_id}.{SYSTEM}"


def nixname(build_id: int) -> str:
    return f"pkg{build_id}-1.0"


def drvpath(build_id: int) -> str:
    return f"/nix/store/{hashlib.md5(str(build_id).encode()).hexdigest()}-pkg{build_id}-1.0.drv"


def dep_drvpath(build_id: int, stepnr: int) -> str:
    digest = hashlib.md5(f"{build_id}-{stepnr}".encode()).hexdigest()
    return f"/nix/store/{digest}-dep{stepnr}-of-pkg{build_id}.drv"


def log_path(build_id: int, stepnr: int) -> str:
    return f"/nix/var/log/nix/drvs/{build_id}-{stepnr}.drv.bz2"


# SQL twins of the functions above (md5() is PostgreSQL's hex MD5, as hashlib's hexdigest).
_JOB = f"'pkg' || i || '.{SYSTEM}'"
_NIXNAME = "'pkg' || i || '-1.0'"
_DRV = "'/nix/store/' || md5(i::text) || '-pkg' || i || '-1.0.drv'"
_TAB = "E'\\t'"


def setup_sql(lay: Layout) -> str:
    """Project, jobset and the history evaluation (no listener yet: loaded before anything starts)."""
    h, t = lay.sizes.history, lay.t_hist
    fin = "i % 10 <> 0"
    return f"""
INSERT INTO projects (name, displayname, owner) VALUES ('nixpkgs', 'Nixpkgs', 'admin');
INSERT INTO jobsets (id, name, project, nixexprinput, nixexprpath, type, emailoverride)
  VALUES ({JOBSET}, 'trunk', 'nixpkgs', 'src', 'release.nix', 0, '');
INSERT INTO evaluationerrors (id, errormsg, errortime) VALUES ({HISTORY_EVAL}, '', {t - 100});
INSERT INTO jobsetevals (id, jobset_id, evaluationerror_id, timestamp, checkouttime, evaltime, hasnewbuilds,
  nrbuilds, hash, nixexprinput, nixexprpath)
  VALUES ({HISTORY_EVAL}, {JOBSET}, {HISTORY_EVAL}, {t}, 5, 100, 1, {h}, '{"1" * 64}', 'src', 'release.nix');
INSERT INTO builds (id, finished, timestamp, jobset_id, job, nixname, drvpath, system, priority, iscurrent,
  starttime, stoptime, iscachedbuild, buildstatus, size, closuresize)
SELECT i, CASE WHEN {fin} THEN 1 ELSE 0 END, {t}, {JOBSET}, {_JOB}, {_NIXNAME}, {_DRV}, '{SYSTEM}', 100, 1,
  CASE WHEN {fin} THEN {t + 10} END, CASE WHEN {fin} THEN {t + 60} END, CASE WHEN {fin} THEN 0 END,
  CASE WHEN {fin} THEN 0 END, CASE WHEN {fin} THEN 4096 END, CASE WHEN {fin} THEN 65536 END
FROM generate_series(1, {h}) i;
INSERT INTO jobsetevalmembers (eval, build, isnew) SELECT {HISTORY_EVAL}, i, 1 FROM generate_series(1, {h}) i;
UPDATE jobsets SET lastcheckedtime = {t}, errormsg = '', errortime = {t - 100} WHERE id = {JOBSET};
ANALYZE;
"""


def eval_started_sql(lay: Layout) -> str:
    """hydra-evaluator marks the jobset busy; hydra-eval-jobset sends eval_started (no transaction)."""
    return f"UPDATE jobsets SET starttime = {lay.t0 - 105} WHERE id = {JOBSET};\n" + notify(
        "eval_started", lay.correlation_id, JOBSET
    )


def _burst_eval_notifies(lay: Layout) -> list[str]:
    new, h = lay.new_range(), lay.sizes.history
    cached = "CASE WHEN i % 10 = 0 THEN 'cached_build_queued' ELSE 'cached_build_finished' END"
    return [
        f"SELECT count(pg_notify('build_queued', i::text)) FROM generate_series({new.start}, {new[-1]}) i;",
        f"SELECT count(pg_notify({cached}, '{BURST_EVAL}' || {_TAB} || i)) FROM generate_series(1, {h}) i;",
    ]


def burst_eval_notification_count(lay: Layout) -> int:
    """Notifications the burst eval's transaction delivers at its commit."""
    return lay.sizes.new_builds + lay.sizes.history + 1


def burst_eval_sql(lay: Layout) -> list[str]:
    """hydra-eval-jobset's two transactions for eval 2 (the error row, then everything else)."""
    e, t, s, new, h = BURST_EVAL, lay.t0, lay.sizes, lay.new_range(), lay.sizes.history
    body = f"""BEGIN;
INSERT INTO jobsetevals (id, jobset_id, evaluationerror_id, timestamp, checkouttime, evaltime, hasnewbuilds,
  nrbuilds, hash, nixexprinput, nixexprpath) VALUES ({e}, {JOBSET}, {e}, {t}, 5, 0, 0, 0, '{"2" * 64}', 'src', 'release.nix');
INSERT INTO builds (id, finished, timestamp, jobset_id, job, nixname, drvpath, system, priority, iscurrent)
SELECT i, 0, {t}, {JOBSET}, {_JOB}, {_NIXNAME}, {_DRV}, '{SYSTEM}', 100, 1 FROM generate_series({new.start}, {new[-1]}) i;
{chr(10).join(_burst_eval_notifies(lay))}
UPDATE jobsetevals SET hasnewbuilds = 1, nrbuilds = {s.new_builds + h} WHERE id = {e};
{notify("eval_added", lay.correlation_id, JOBSET, e)}
INSERT INTO jobsetevalmembers (eval, build, isnew)
  SELECT {e}, i, 1 FROM generate_series({new.start}, {new[-1]}) i
  UNION ALL SELECT {e}, i, 0 FROM generate_series(1, {h}) i;
UPDATE jobsets SET lastcheckedtime = {t}, forceeval = NULL WHERE id = {JOBSET};
UPDATE evaluationerrors SET errormsg = '' WHERE id = {e};
UPDATE jobsets SET errormsg = '', errortime = {t - 100}, fetcherrormsg = NULL WHERE id = {JOBSET};
UPDATE jobsetevals SET evaltime = 100 WHERE id = {e};
COMMIT;"""
    first = f"INSERT INTO evaluationerrors (id, errormsg, errortime) VALUES ({e}, '', {t - 100});"
    return [first, body]


def evaluator_exits_sql() -> str:
    return f"UPDATE jobsets SET starttime = NULL WHERE id = {JOBSET};"


def replay_sql(lay: Layout) -> str:
    """The burst eval's notifications alone, same channels and payloads, in one transaction (R_listen)."""
    lines = [
        "BEGIN;",
        *_burst_eval_notifies(lay),
        notify("eval_added", lay.correlation_id, JOBSET, BURST_EVAL),
    ]
    return "\n".join([*lines, "COMMIT;"])


def burst_sql(lay: Layout, builds: range) -> str:
    """Builds finishing with 3 steps each: finished step rows, step_finished x3 then build_finished per build."""
    lo, hi, t1, tb = builds.start, builds[-1], lay.step_start, lay.burst_stop
    k = "(k / 4)"
    payload = (
        f"CASE WHEN k % 4 = 3 THEN ({lo} + {k})::text ELSE ({lo} + {k}) || {_TAB} || (k % 4 + 1) || {_TAB} || "
        f"'/nix/var/log/nix/drvs/' || ({lo} + {k}) || '-' || (k % 4 + 1) || '.drv.bz2' END"
    )
    return f"""BEGIN;
INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, starttime, stoptime, machine, system,
  overhead, timesbuilt, isnondeterministic)
SELECT b.id, n, 0, CASE WHEN n = 3 THEN b.drvpath
    ELSE '/nix/store/' || md5(b.id || '-' || n) || '-dep' || n || '-of-pkg' || b.id || '.drv' END,
  0, 0, {t1}, {tb}, '{MACHINE}', '{SYSTEM}', 1200, 1, false
FROM builds b CROSS JOIN generate_series(1, 3) n WHERE b.id BETWEEN {lo} AND {hi};
UPDATE builds SET finished = 1, buildstatus = 0, starttime = {t1}, stoptime = {tb}, iscachedbuild = 0,
  size = 4096, closuresize = 65536, notificationpendingsince = {tb} WHERE id BETWEEN {lo} AND {hi};
SELECT count(pg_notify(CASE WHEN k % 4 = 3 THEN 'build_finished' ELSE 'step_finished' END, {payload}))
FROM generate_series(0, {4 * len(builds) - 1}) k;
COMMIT;"""


def finished_chunks(build_id: int, dependents: list[int]) -> list[str]:
    """build_finished payloads as the Rust queue runner's ``notify_build_finished`` splits them."""
    head = str(build_id)
    out, payload = [], head
    for dep in map(str, dependents):
        if len(payload) + 1 + len(dep) > MAX_PAYLOAD:
            out.append(payload)
            payload = head
        payload += "\t" + dep
    out.append(payload)
    return out


def dependents_sql(lay: Layout) -> tuple[str, int]:
    """One failed build and its dependents (propagated steps, status 2), then build_finished in chunks.

    Returns the transaction and the number of notifications it sends.
    """
    f, deps, t1, tf = lay.failed, lay.dependents(), lay.step_start, lay.burst_stop
    chunks = finished_chunks(f, [f, *deps])  # the failed build usually lists itself too
    sql = f"""BEGIN;
INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, errormsg, starttime, stoptime, machine, system,
  overhead, timesbuilt, isnondeterministic)
SELECT id, 1, 0, drvpath, 0, 1, 'builder for ''' || drvpath || ''' failed with exit code 1', {t1}, {tf},
  '{MACHINE}', '{SYSTEM}', 1200, 1, false FROM builds WHERE id = {f};
{notify("step_finished", f, 1, log_path(f, 1))}
UPDATE builds SET finished = 1, buildstatus = 1, starttime = {t1}, stoptime = {tf}, iscachedbuild = 0,
  notificationpendingsince = {tf} WHERE id = {f};
INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, machine, system, propagatedfrom)
SELECT d, 1, 0, (SELECT drvpath FROM builds WHERE id = {f}), 0, 1, '', '{SYSTEM}', {f}
FROM generate_series({deps.start}, {deps[-1]}) d;
UPDATE builds SET finished = 1, buildstatus = 2, starttime = {tf}, stoptime = {tf}, iscachedbuild = 0,
  notificationpendingsince = {tf} WHERE id BETWEEN {deps.start} AND {deps[-1]};
{chr(10).join(f"SELECT pg_notify('build_finished', {lit(c)});" for c in chunks)}
COMMIT;"""
    return sql, 1 + len(chunks)


def single_sql(lay: Layout, build_id: int, stop: int) -> str:
    """One build finishing with one step (the steady events and the sentinels): 2 notifications."""
    return f"""BEGIN;
INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, starttime, stoptime, machine, system,
  overhead, timesbuilt, isnondeterministic)
SELECT id, 1, 0, drvpath, 0, 0, {lay.step_start}, {stop}, '{MACHINE}', '{SYSTEM}', 1200, 1, false
FROM builds WHERE id = {build_id};
{notify("step_finished", build_id, 1, log_path(build_id, 1))}
UPDATE builds SET finished = 1, buildstatus = 0, starttime = {lay.step_start}, stoptime = {stop},
  iscachedbuild = 0, size = 4096, closuresize = 65536, notificationpendingsince = {stop} WHERE id = {build_id};
{notify("build_finished", build_id)}
COMMIT;"""
