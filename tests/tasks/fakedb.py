"""An in-memory Hydra database answering the statements the catch-up and resolver tasks run.

It implements :class:`hydra_otel.adapters.queries.Fetcher` for exactly the statements of
adapters/queries.py that tests/tasks/ exercise, with the same filtering, ordering and
paging as the SQL, over plain dictionaries. A statement it does not know fails the test
(AssertionError), so a task that starts asking something new is noticed here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from hydra_otel.adapters import queries as q
from hydra_otel.errors import DbUnavailable

Row = dict[str, Any]


@dataclass
class FakeDb:
    """Hydra's tables as lists of rows; ``now`` is the database clock (Unix seconds)."""

    now: int = 1_700_000_000
    jobsetevals: list[Row] = field(default_factory=list)
    builds: list[Row] = field(default_factory=list)
    buildsteps: list[Row] = field(default_factory=list)
    jobsets: list[Row] = field(default_factory=list)
    #: While True every statement raises DbUnavailable (the server is down).
    down: bool = False
    #: Every statement answered or refused, with its arguments, in order.
    log: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)
    #: Every statement with the trio time it was run at.
    timed: list[tuple[str, float]] = field(default_factory=list)
    #: Set by :meth:`follow`: the trio time at which the database clock read ``now``.
    _base: float | None = None

    def follow(self, t0: float) -> None:
        """Let the database clock advance with trio's (virtual) clock from ``t0`` on."""
        self._base = t0

    def clock(self) -> int:
        """The database clock in whole Unix seconds."""
        if self._base is None:
            return self.now
        return self.now + int(trio.current_time() - self._base)

    def add_eval(self, eval_id: int, jobset_id: int, timestamp: int) -> None:
        self.jobsetevals.append({"id": eval_id, "jobset_id": jobset_id, "timestamp": timestamp})

    def add_build(self, build_id: int, stoptime: int | None, *, finished: bool = True, **row: Any) -> None:
        self.builds.append({"id": build_id, "stoptime": stoptime, "finished": int(finished), **row})

    def add_step(self, build_id: int, stepnr: int, stoptime: int | None, *, status: int | None = 0) -> None:
        self.buildsteps.append(
            {
                "build": build_id,
                "stepnr": stepnr,
                "status": status,
                "starttime": stoptime,
                "stoptime": stoptime,
            }
        )

    def add_jobset(self, jobset_id: int, last_checked: int | None, **row: Any) -> None:
        defaults = {"errormsg": None, "errortime": None, "fetcherrormsg": None, "starttime": None}
        self.jobsets.append(
            {
                "id": jobset_id,
                "project": "p",
                "name": f"j{jobset_id}",
                "lastcheckedtime": last_checked,
                **defaults,
                **row,
            }
        )

    def statements(self, sql: str) -> int:
        """How many times ``sql`` was run."""
        return sum(1 for s, _ in self.log if s == sql)

    async def fetch(self, sql: str, *args: object) -> Sequence[Row]:
        self.log.append((sql, args))
        self.timed.append((sql, trio.current_time()))
        if self.down:
            raise DbUnavailable("database query failed: ConnectionRefusedError")
        answer = self._answers().get(sql)
        assert answer is not None, f"the fake database does not know this statement: {sql}"
        return answer(*args)

    async def fetchval(self, sql: str, *args: object) -> Any:
        rows = await self.fetch(sql, *args)
        return next(iter(rows[0].values())) if rows else None

    def _answers(self) -> dict[str, Callable[..., list[Row]]]:
        return {
            q.CATCHUP_START_SQL: self._start,
            q.CATCHUP_EVALS_SQL: self._evals,
            q.CATCHUP_BUILDS_SQL: self._builds,
            q.CATCHUP_STEPS_SQL: self._steps,
            q.CATCHUP_JOBSETS_SQL: lambda: [dict(j) for j in self.jobsets],
            q.JOBSET_FACTS_SQL: lambda ids: [dict(j) for j in self.jobsets if j["id"] in ids],
            q.HAS_RESOLVED_SQL: lambda: [{"exists": False}],
            q.BUILD_FACTS_SQL: self._build_facts,
            q.STEPS_SQL.format(columns=q.STEP_COLUMNS, resolved="NULL::text"): self._build_steps,
        }

    def _build_facts(self, ids: list[int]) -> list[Row]:
        """The resolver's build rows: ``hello`` in jobset 1, queued an hour before ``now``, in no evaluation."""
        defaults = {
            "timestamp": self.now - 3600, "jobset_id": 1, "project": "p", "jobset": "j1", "job": "hello",
            "nixname": "hello", "drvpath": "/nix/store/x-hello.drv", "system": "x86_64-linux",
            "priority": 100, "globalpriority": 0, "starttime": None, "iscachedbuild": 0,
            "buildstatus": 0, "size": None, "closuresize": None, "releasename": None, "eval_id": None,
        }  # fmt: skip
        return [{**defaults, **b} for b in self.builds if b["id"] in ids]

    def _build_steps(self, ids: list[int]) -> list[Row]:
        defaults = {
            "type": 0, "drvpath": "/nix/store/x-hello.drv", "errormsg": None, "machine": "m",
            "system": "x86_64-linux", "propagatedfrom": None, "overhead": None, "timesbuilt": 1,
            "isnondeterministic": False, "resolveddrvpath": None,
        }  # fmt: skip
        rows = [{**defaults, **s} for s in self.buildsteps if s["build"] in ids]
        return sorted(rows, key=lambda s: (s["build"], s["stepnr"]))

    def _start(self, now_minus: int) -> list[Row]:
        now = self.clock()
        before = [e["id"] for e in self.jobsetevals if e["timestamp"] < now - now_minus]
        return [{"eval_id": max(before, default=0), "now": now}]

    def _evals(self, after: int, limit: int) -> list[Row]:
        rows = sorted((e for e in self.jobsetevals if e["id"] > after), key=lambda e: e["id"])
        return rows[:limit]

    def _builds(self, since: int, until: int, after_stop: int, after_id: int, limit: int) -> list[Row]:
        rows = [
            b
            for b in self.builds
            if b["finished"] == 1
            and b["stoptime"] is not None
            and since <= b["stoptime"] < until
            and (b["stoptime"], b["id"]) > (after_stop, after_id)
        ]
        return sorted(rows, key=lambda b: (b["stoptime"], b["id"]))[:limit]

    def _steps(self, since: int, until: int, limit: int) -> list[Row]:
        running = {b["id"] for b in self.builds if b["finished"] == 0}
        rows = [
            s
            for s in self.buildsteps
            if s["build"] in running
            and s["status"] is not None
            and s["starttime"] is not None
            and s["stoptime"] is not None
            and since <= s["stoptime"] < until
        ]
        return sorted(rows, key=lambda s: (s["stoptime"], s["build"], s["stepnr"]))[:limit]
