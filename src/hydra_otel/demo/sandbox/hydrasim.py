"""A scripted Hydra: the SQL and NOTIFYs Hydra's programs issue, in Hydra's order.

Used by the tests, the benchmarks and the demo to play a Hydra workload
against a sandbox database. It only *builds SQL text* (one string per
transaction, wrapped in BEGIN/COMMIT where Hydra uses a transaction), so the
caller chooses how to run it: any connection other than hydra-otel's own,
which makes every NOTIFY a real one, delivered at commit like Hydra's.

The statement order follows hydra-eval-jobset (evaluator) and hydra-evaluator
(which sets ``jobsets.starttime`` around each run and records crashes); times
are explicit integer Unix seconds so tests can assert exact span times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def lit(value: str | int | None) -> str:
    """An SQL literal (standard_conforming_strings is on in every supported PostgreSQL)."""
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def notify(channel: str, *fields: str | int) -> str:
    """``pg_notify`` with tab-separated fields, as Hydra sends them."""
    return f"SELECT pg_notify({lit(channel)}, {lit(chr(9).join(str(f) for f in fields))});"


def tx(*statements: str) -> str:
    """One transaction: NOTIFYs inside it are delivered at COMMIT, in order."""
    return "\n".join(("BEGIN;", *statements, "COMMIT;"))


@dataclass(frozen=True, slots=True, kw_only=True)
class NewBuild:
    """A build an evaluation creates."""

    job: str
    system: str = "x86_64-linux"
    nixname: str | None = None
    drvpath: str | None = None
    priority: int = 100


@dataclass(slots=True)
class HydraSim:
    """Allocates IDs like Hydra's sequences and renders each Hydra action as SQL."""

    next_jobset: int = 1
    next_eval: int = 1
    next_error: int = 1
    next_build: int = 1
    jobset_names: dict[int, tuple[str, str]] = field(default_factory=dict)
    drvpaths: dict[int, str] = field(default_factory=dict)

    def create_project(self, name: str, displayname: str | None = None) -> str:
        """A project row (what the web UI inserts)."""
        return (
            "INSERT INTO projects (name, displayname, owner) VALUES "
            f"({lit(name)}, {lit(displayname or name)}, 'admin');"
        )

    def create_jobset(self, project: str, name: str, *, flake: str | None = None) -> tuple[int, str]:
        """A jobset row; returns its ID and the SQL."""
        jid = self.next_jobset
        self.next_jobset += 1
        self.jobset_names[jid] = (project, name)
        if flake is None:
            kind, inputs = 0, f"{lit('src')}, {lit('release.nix')}, NULL"
        else:
            kind, inputs = 1, f"NULL, NULL, {lit(flake)}"
        sql = (
            "INSERT INTO jobsets (id, name, project, nixexprinput, nixexprpath, flake, type, emailoverride) "
            f"VALUES ({jid}, {lit(name)}, {lit(project)}, {inputs}, {kind}, '');"
        )
        return jid, sql

    # hydra-evaluator and hydra-eval-jobset, in the order they act.

    def evaluator_starts(self, jobset_id: int, correlation_id: str, now: int) -> list[str]:
        """hydra-evaluator marks the jobset busy; hydra-eval-jobset sends eval_started (no transaction)."""
        return [
            f"UPDATE jobsets SET starttime = {now} WHERE id = {jobset_id};",
            notify("eval_started", correlation_id, jobset_id),
        ]

    def evaluator_exits(self, jobset_id: int) -> str:
        """hydra-evaluator clears the busy mark after the child exits."""
        return f"UPDATE jobsets SET starttime = NULL WHERE id = {jobset_id};"

    def evaluator_dies(
        self, jobset_id: int, now: int, message: str = "evaluation failed with exit code 1"
    ) -> str:
        """hydra-evaluator records a crashed child (no eval_failed is sent)."""
        return tx(
            f"UPDATE jobsets SET errormsg = {lit(message)}, lastcheckedtime = {now}, errortime = {now}, "
            f"fetcherrormsg = NULL, starttime = NULL WHERE id = {jobset_id};"
        )

    def eval_fetch_failed(self, jobset_id: int, correlation_id: str, now: int, error: str) -> str:
        """Fetching inputs failed: only fetcherrormsg changes, then eval_failed."""
        return tx(
            f"UPDATE jobsets SET lastcheckedtime = {now}, fetcherrormsg = {lit(error)} WHERE id = {jobset_id};",
            notify("eval_failed", correlation_id, jobset_id),
        )

    def eval_check_failed(self, jobset_id: int, correlation_id: str, now: int, error: str) -> str:
        """hydra-eval-jobset died with an error: errormsg/errortime are set, then eval_failed."""
        return tx(
            f"UPDATE jobsets SET lastcheckedtime = {now}, errormsg = {lit(error)}, errortime = {now}, "
            f"fetcherrormsg = NULL WHERE id = {jobset_id};",
            notify("eval_failed", correlation_id, jobset_id),
        )

    def eval_cached(self, jobset_id: int, correlation_id: str, previous_eval_id: int, now: int) -> str:
        """Inputs unchanged since ``previous_eval_id``: no JobsetEval row, eval_cached."""
        return tx(
            f"UPDATE jobsets SET lastcheckedtime = {now}, fetcherrormsg = NULL WHERE id = {jobset_id};",
            notify("eval_cached", correlation_id, jobset_id, previous_eval_id),
        )

    def eval_added(
        self,
        jobset_id: int,
        correlation_id: str,
        *,
        eval_start: int,
        timestamp: int,
        checkout_time: int,
        eval_time: int,
        new_builds: Sequence[NewBuild] = (),
        cached_builds: Sequence[tuple[int, bool]] = (),
        job_errors: str = "",
        input_hash: str = "0" * 64,
        inputs: Sequence[tuple[str, str, str | None, str | None]] = (),
        flake: str | None = None,
    ) -> tuple[int, list[int], list[str]]:
        """A finished evaluation: returns (eval ID, new build IDs, SQL statements to run in order).

        ``cached_builds`` are (older build ID, finished?) pairs the evaluation contains.
        ``inputs`` are (name, type, uri, revision) rows of ``jobsetevalinputs``; with ``flake``
        (a locked flake reference) the evaluation has no nixexpr input, as in Hydra.
        The first statement (the evaluation-error row) is its own transaction, as in Hydra.
        """
        eid, err = self.next_eval, self.next_error
        self.next_eval += 1
        self.next_error += 1
        ids = list(range(self.next_build, self.next_build + len(new_builds)))
        self.next_build += len(new_builds)
        changed = bool(new_builds) or bool(cached_builds)
        body = [
            f"INSERT INTO jobsetevals (id, jobset_id, evaluationerror_id, timestamp, checkouttime, evaltime, "
            f"hasnewbuilds, nrbuilds, hash, flake, nixexprinput, nixexprpath) VALUES ({eid}, {jobset_id}, "
            f"{err}, {timestamp}, {checkout_time}, 0, 0, 0, {lit(input_hash)}, {lit(flake)}, "
            f"{lit(None if flake else 'src')}, {lit(None if flake else 'release.nix')});",
        ]
        for bid, b in zip(ids, new_builds, strict=True):
            drv = b.drvpath or store_path(f"{b.nixname or b.job}.drv", bid)
            self.drvpaths[bid] = drv
            body.append(
                "INSERT INTO builds (id, finished, timestamp, jobset_id, job, nixname, drvpath, system, priority, "
                f"iscurrent) VALUES ({bid}, 0, {timestamp}, {jobset_id}, {lit(b.job)}, "
                f"{lit(b.nixname or b.job)}, {lit(drv)}, {lit(b.system)}, {b.priority}, 1);"
            )
            body.append(notify("build_queued", bid))
        for bid, finished in cached_builds:
            body.append(notify("cached_build_finished" if finished else "cached_build_queued", eid, bid))
        nrbuilds = len(new_builds) + len(cached_builds) if changed else "NULL"
        body.append(
            f"UPDATE jobsetevals SET hasnewbuilds = {int(changed)}, nrbuilds = {nrbuilds} WHERE id = {eid};"
        )
        body.append(notify("eval_added", correlation_id, jobset_id, eid))
        members = [f"({eid}, {bid}, 1)" for bid in ids] + [f"({eid}, {bid}, 0)" for bid, _ in cached_builds]
        if changed:
            body.append(f"INSERT INTO jobsetevalmembers (eval, build, isnew) VALUES {', '.join(members)};")
        # hydra-eval-jobset writes the inputs after the members, in the same transaction.
        body += [
            "INSERT INTO jobsetevalinputs (eval, name, altnr, type, uri, revision) VALUES "
            f"({eid}, {lit(name)}, 0, {lit(kind)}, {lit(uri)}, {lit(rev)});"
            for name, kind, uri, rev in inputs
        ]
        body += [
            f"UPDATE jobsets SET lastcheckedtime = {timestamp}, forceeval = NULL WHERE id = {jobset_id};",
            f"UPDATE evaluationerrors SET errormsg = {lit(job_errors)} WHERE id = {err};",
            f"UPDATE jobsets SET errormsg = {lit(job_errors)}, errortime = {eval_start}, fetcherrormsg = NULL "
            f"WHERE id = {jobset_id};",
            f"UPDATE jobsetevals SET evaltime = {eval_time} WHERE id = {eid};",
        ]
        first = f"INSERT INTO evaluationerrors (id, errormsg, errortime) VALUES ({err}, '', {eval_start});"
        return eid, ids, [first, tx(*body)]

    # The queue runner (both generations write the same rows; see docs/notifications.md).

    def step_started(
        self,
        build_id: int,
        stepnr: int,
        *,
        now: int,
        machine: str = "",
        drvpath: str | None = None,
        system: str = "x86_64-linux",
    ) -> str:
        """A build step becomes busy: the row is inserted, then step_started."""
        drv = drvpath or self.drvpaths[build_id]
        return tx(
            "INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, starttime, machine, system) VALUES "
            f"({build_id}, {stepnr}, 0, {lit(drv)}, 1, {now}, {lit(machine)}, {lit(system)});",
            notify("step_started", build_id, stepnr),
        )

    def step_finished(
        self,
        build_id: int,
        stepnr: int,
        *,
        now: int,
        status: int = 0,
        error: str | None = None,
        log_path: str = "",
        overhead_ms: int = 1200,
        times_built: int = 1,
    ) -> str:
        """The final step row is written, then step_finished (the build is usually not finished yet)."""
        return tx(
            f"UPDATE buildsteps SET busy = 0, status = {status}, errormsg = {lit(error)}, stoptime = {now}, "
            f"overhead = {overhead_ms}, timesbuilt = {times_built}, isnondeterministic = false "
            f"WHERE build = {build_id} AND stepnr = {stepnr};",
            notify("step_finished", build_id, stepnr, log_path),
        )

    def substituted_step(
        self, build_id: int, stepnr: int, *, start: int, stop: int, drvpath: str | None = None
    ) -> str:
        """A substitution step: inserted already finished, with no notification."""
        drv = drvpath or self.drvpaths[build_id]
        return tx(
            "INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, starttime, stoptime, machine, "
            f"system) VALUES ({build_id}, {stepnr}, 1, {lit(drv)}, 0, 0, {start}, {stop}, '', 'x86_64-linux');"
        )

    def build_finished(
        self,
        build_id: int,
        *,
        start: int,
        stop: int,
        status: int = 0,
        cached: bool = False,
        same_drv: Sequence[int] = (),
        size: int = 4096,
        closure_size: int = 65536,
    ) -> str:
        """The build is marked finished (plus builds sharing its derivation), then build_finished.

        Sizes are written only for a build with outputs (status 0 or 6), as the queue runner's
        ``update_build`` does; its failure path leaves them as they were.
        """
        sizes = f"size = {size}, closuresize = {closure_size}, " if status in (0, 6) else ""
        rows = [
            f"UPDATE builds SET finished = 1, buildstatus = {status}, starttime = {start}, stoptime = {stop}, "
            f"iscachedbuild = {int(cached)}, {sizes}notificationpendingsince = {stop} WHERE id = {build_id};"
        ]
        rows += [
            f"UPDATE builds SET finished = 1, buildstatus = {status}, starttime = {start}, stoptime = {stop}, "
            f"iscachedbuild = 1, notificationpendingsince = {stop} WHERE id = {other};"
            for other in same_drv
        ]
        return tx(*rows, notify("build_finished", build_id, *same_drv))

    def build_failed_with_dependents(
        self,
        build_id: int,
        *,
        start: int,
        stop: int,
        dependents: Sequence[tuple[int, int]],
        status: int = 1,
    ) -> str:
        """A failed build: each dependent (build ID, next step number) gets a propagated step with no times,
        and status 2 (dependency failed) when the failure is a plain failure; the payload repeats the ID."""
        dep_status = 2 if status == 1 else status
        drv = self.drvpaths[build_id]
        rows = [
            f"UPDATE builds SET finished = 1, buildstatus = {status}, starttime = {start}, stoptime = {stop}, "
            f"iscachedbuild = 0, notificationpendingsince = {stop} WHERE id = {build_id};"
        ]
        for dep, stepnr in dependents:
            rows.append(
                "INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, machine, system, "
                f"propagatedfrom) VALUES ({dep}, {stepnr}, 0, {lit(drv)}, 0, {status}, '', 'x86_64-linux', {build_id});"
            )
            rows.append(
                f"UPDATE builds SET finished = 1, buildstatus = {dep_status}, starttime = {stop}, stoptime = {stop}, "
                f"iscachedbuild = 0, notificationpendingsince = {stop} WHERE id = {dep};"
            )
        deps = [d for d, _ in dependents]
        return tx(*rows, notify("build_finished", build_id, build_id, *deps))

    def restart(self, build_id: int) -> str:
        """The web UI's restart: only ``finished`` flips back (builds_restarted fires)."""
        return f"UPDATE builds SET finished = 0 WHERE id = {build_id};"

    def cancel(self, build_id: int, now: int) -> str:
        """The web UI's cancel: finished with status 4, no build_finished (builds_cancelled fires)."""
        return (
            f"UPDATE builds SET finished = 1, buildstatus = 4, starttime = {now}, stoptime = {now} "
            f"WHERE id = {build_id} AND finished = 0;"
        )


def store_path(name: str, seed: int) -> str:
    """A plausible, deterministic store path (32-character hash part from ``seed``)."""
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's base-32 digits
    digits, n = [], seed * 2654435761 + 12345
    for _ in range(32):
        n, r = divmod(n * 31 + 7, 32)
        digits.append(alphabet[r])
    return f"/nix/store/{''.join(digits)}-{name}"
