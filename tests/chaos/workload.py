"""A seeded, mixed Hydra workload for the chaos run, and what it must leave in the receiver.

:class:`Workload` plays Hydra's actions through :class:`Driver` (one asyncpg connection of
Hydra's own, so every NOTIFY is real) with times near the real clock: evaluations added (with
new and cached builds), cached and failed evaluation attempts, builds succeeding (some with a
dependency step or a substitution), failing with dependents, timing out, cancelled from the web
UI, and restarted after their own step failed. It records each build's attempts as it plays
them (status, stop time and step numbers), which the final check compares with the database and
the receiver (:mod:`tests.chaos.check`).

Restarts are only of builds whose own step ended the attempt (failed or timed out): a restart
after a dependency failure or a cancel is hydra-otel's documented attempt-numbering limit
(docs/spans.md, Attempts), not something a chaos run can check.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import asyncpg
import trio
from trio_asyncio import aio_as_trio

from hydra_otel.demo.sandbox.hydrasim import HydraSim, NewBuild, store_path

JOBSETS = ("trunk", "staging", "small")


@dataclass
class Driver:
    """Hydra's connection. ``gate`` is held around each action, and by a PostgreSQL restart."""

    dsn: str
    conn: asyncpg.Connection | None = None
    gate: trio.Lock = field(default_factory=trio.Lock)

    async def connect(self) -> None:
        """(Re)connect, e.g. after the server restarted (the caller holds ``gate``)."""
        if self.conn is not None:
            self.conn.terminate()
        self.conn = await aio_as_trio(asyncpg.connect)(self.dsn)

    async def run(self, *statements: str) -> None:
        """Execute each statement (or transaction script) in order, under ``gate``."""
        async with self.gate:
            for sql in statements:
                assert self.conn is not None
                await aio_as_trio(self.conn.execute)(sql)

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """Rows, under ``gate``."""
        async with self.gate:
            assert self.conn is not None
            rows: list[asyncpg.Record] = await aio_as_trio(self.conn.fetch)(sql, *args)
            return rows

    async def close(self) -> None:
        """Close the connection, whatever state it is in."""
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None


@dataclass
class Attempt:
    """One finished attempt of a build, as Hydra wrote it."""

    status: int
    stop: int
    steps: list[int] = field(default_factory=list)
    #: trio.current_time() when it was played (for reports)
    played_at: float = 0.0


@dataclass
class Build:
    """What the workload knows about one build."""

    build_id: int
    eval_id: int
    queued: bool = True
    next_step: int = 1
    last_stop: int = 0
    #: finished attempts, in order
    attempts: list[Attempt] = field(default_factory=list)
    #: steps of the attempt in progress
    current_steps: list[int] = field(default_factory=list)
    #: may be restarted: its own step ended the last attempt with a failure
    restartable: bool = False
    #: may be an evaluation's cached build: succeeded, never restarted
    reusable: bool = False


def now() -> int:
    """The wall clock in Unix seconds (the sandbox server runs on this machine)."""
    return int(time.time())


async def until(second: int) -> None:
    """Sleep until the wall clock has reached Unix second ``second``."""
    delay = second - time.time()
    if delay > 0:
        await trio.sleep(delay)


@dataclass
class Workload:
    """Plays random Hydra actions from ``rng``; ``builds`` and ``evals`` record what was played."""

    driver: Driver
    rng: random.Random
    sim: HydraSim = field(default_factory=HydraSim)
    builds: dict[int, Build] = field(default_factory=dict)
    evals: list[int] = field(default_factory=list)
    last_eval: dict[int, int] = field(default_factory=dict)
    actions: int = 0
    _corr: int = 0

    async def setup(self) -> None:
        """The project and its jobsets."""
        await self.driver.run(self.sim.create_project("nixpkgs"))
        for name in JOBSETS:
            await self.driver.run(self.sim.create_jobset("nixpkgs", name)[1])

    async def step(self) -> str:
        """Play one random action; returns its name."""
        queued = [b for b in self.builds.values() if b.queued]
        restartable = [b for b in self.builds.values() if b.restartable]
        choices: list[tuple[str, float]] = [("evaluation", 3.0 if len(queued) < 12 else 0.5)]
        if self.last_eval:
            choices.append(("cached_eval", 0.7))
        choices.append(("failed_eval", 0.7))
        if queued:
            choices += [("succeed", 5.0), ("time_out", 1.0), ("cancel", 0.7), ("substitute", 0.8)]
        if len(queued) >= 2:
            choices.append(("fail_with_dependents", 1.2))
        if restartable:
            choices.append(("restart", 1.5))
        name = self.rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]
        await getattr(self, name)()
        self.actions += 1
        return name

    async def finish_all(self) -> None:
        """Finish every build still queued (successfully), so that every build has a finish to check."""
        for b in [b for b in self.builds.values() if b.queued]:
            await self._finish(b, 0)

    def _correlation(self) -> str:
        self._corr += 1
        return f"{time.monotonic():.9f}.{self._corr}"

    def _pick(self, builds: list[Build]) -> Build:
        return builds[self.rng.randrange(len(builds))]

    def _queued(self) -> list[Build]:
        """Queued builds, preferring those whose last step stopped before this second (no wait)."""
        queued = [b for b in self.builds.values() if b.queued]
        return [b for b in queued if b.last_stop < now()] or queued

    # --- the evaluator ---------------------------------------------------------------------------

    async def evaluation(self) -> None:
        jobset = self.rng.randrange(1, len(JOBSETS) + 1)
        corr, t = self._correlation(), now()
        reusable = [b.build_id for b in self.builds.values() if b.reusable]
        cached = self.rng.sample(reusable, min(len(reusable), self.rng.randrange(3)))
        jobs = self.rng.randrange(1, 6)
        eval_id, new, sql = self.sim.eval_added(
            jobset,
            corr,
            eval_start=t - 3,
            timestamp=t,
            checkout_time=1,
            eval_time=2,
            new_builds=[NewBuild(job=f"job{self.sim.next_build + i}") for i in range(jobs)],
            cached_builds=[(b, True) for b in cached],
        )
        await self.driver.run(*self.sim.evaluator_starts(jobset, corr, t - 4))
        await self.driver.run(*sql, self.sim.evaluator_exits(jobset))
        self.evals.append(eval_id)
        self.last_eval[jobset] = eval_id
        for b in new:
            self.builds[b] = Build(build_id=b, eval_id=eval_id, last_stop=t - 1)

    async def cached_eval(self) -> None:
        jobset = self.rng.choice(sorted(self.last_eval))
        corr, t = self._correlation(), now()
        await self.driver.run(*self.sim.evaluator_starts(jobset, corr, t - 1))
        await self.driver.run(self.sim.eval_cached(jobset, corr, self.last_eval[jobset], t))
        await self.driver.run(self.sim.evaluator_exits(jobset))

    async def failed_eval(self) -> None:
        jobset = self.rng.randrange(1, len(JOBSETS) + 1)
        corr, t = self._correlation(), now()
        await self.driver.run(*self.sim.evaluator_starts(jobset, corr, t - 1))
        if self.rng.random() < 0.5:
            await self.driver.run(self.sim.eval_fetch_failed(jobset, corr, t, "cannot fetch 'src'"))
        else:
            await self.driver.run(self.sim.eval_check_failed(jobset, corr, t, "error: undefined variable"))
        await self.driver.run(self.sim.evaluator_exits(jobset))

    # --- the queue runner and the web UI ---------------------------------------------------------

    async def _times(self, b: Build, length: int) -> tuple[int, int]:
        """A step of ``length`` seconds ending now, after everything the build did before.

        Hydra's stop times are when a step stopped, never in the future: when the build's last
        step stopped too recently for a new one of at least a second, wait until it can have.
        """
        start = max(now() - length, b.last_stop + 1)
        stop = max(now(), start + 1)
        await until(stop)
        b.last_stop = stop
        return start, stop

    def _new_step(self, b: Build) -> int:
        nr = b.next_step
        b.next_step += 1
        b.current_steps.append(nr)
        return nr

    async def _dependency_step(self, b: Build) -> None:
        nr = self._new_step(b)
        start, stop = await self._times(b, 2)
        drv = store_path(f"dep-{b.build_id}-{nr}.drv", b.build_id * 100 + nr)
        await self.driver.run(
            self.sim.step_started(b.build_id, nr, now=start, machine="ssh://builder-1", drvpath=drv),
            self.sim.step_finished(b.build_id, nr, now=stop),
        )

    async def _finish(self, b: Build, status: int) -> None:
        """The build's own step ends with ``status`` and the build finishes with it."""
        if self.rng.random() < 0.3:
            await self._dependency_step(b)
        nr = self._new_step(b)
        start, stop = await self._times(b, self.rng.randrange(1, 4))
        error = None if status == 0 else ("timed out" if status == 7 else "builder failed")
        machine = self.rng.choice(["ssh://builder-1", "ssh://builder-2", ""])
        await self.driver.run(
            self.sim.step_started(b.build_id, nr, now=start, machine=machine),
            self.sim.step_finished(b.build_id, nr, now=stop, status=status, error=error),
            self.sim.build_finished(b.build_id, start=start, stop=stop, status=status),
        )
        self._finished(b, status, stop)
        b.restartable = status != 0
        b.reusable = status == 0 and len(b.attempts) == 1

    def _finished(self, b: Build, status: int, stop: int) -> None:
        b.attempts.append(
            Attempt(status=status, stop=stop, steps=b.current_steps, played_at=trio.current_time())
        )
        b.current_steps = []
        b.queued = False

    async def succeed(self) -> None:
        await self._finish(self._pick(self._queued()), 0)

    async def time_out(self) -> None:
        await self._finish(self._pick(self._queued()), 7)

    async def substitute(self) -> None:
        b = self._pick(self._queued())
        nr = self._new_step(b)
        start, stop = await self._times(b, 1)
        drv = store_path(f"subst-{b.build_id}-{nr}.drv", b.build_id * 100 + nr)
        await self.driver.run(self.sim.substituted_step(b.build_id, nr, start=start, stop=stop, drvpath=drv))

    async def cancel(self) -> None:
        b = self._pick(self._queued())
        t = max(now(), b.last_stop + 1)
        await until(t)
        b.last_stop = t
        await self.driver.run(self.sim.cancel(b.build_id, t))
        self._finished(b, 4, t)

    async def fail_with_dependents(self) -> None:
        queued = self._queued()
        if len(queued) < 2:
            queued = [b for b in self.builds.values() if b.queued]
        self.rng.shuffle(queued)
        bad, dependents = queued[0], queued[1 : 1 + self.rng.randrange(1, 3)]
        nr = self._new_step(bad)
        start, stop = await self._times(bad, 2)
        for d in dependents:  # Hydra gives them the failure's stop time, after what they did before
            stop = max(stop, d.last_stop + 1)
        await until(stop)
        bad.last_stop = stop
        deps = [(d.build_id, self._new_step(d)) for d in dependents]
        await self.driver.run(
            self.sim.step_started(bad.build_id, nr, now=start),
            self.sim.step_finished(bad.build_id, nr, now=stop, status=1, error="builder failed"),
            self.sim.build_failed_with_dependents(bad.build_id, start=start, stop=stop, dependents=deps),
        )
        self._finished(bad, 1, stop)
        bad.restartable = True
        for d in dependents:
            d.last_stop = stop
            self._finished(d, 2, stop)

    async def restart(self) -> None:
        b = self._pick([b for b in self.builds.values() if b.restartable])
        await self.driver.run(self.sim.restart(b.build_id))
        b.queued, b.restartable, b.reusable = True, False, False
