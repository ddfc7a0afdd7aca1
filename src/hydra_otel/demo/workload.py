"""The scripted Hydra workload ``hydra-otel demo`` plays: a list of labelled steps.

Theory of operation: each :class:`Step` is one thing Hydra does (an evaluator starting, an
evaluation being added, a build finishing, a user restarting a build). Its ``play`` function renders
the SQL Hydra would run, through :class:`~hydra_otel.demo.sandbox.hydrasim.HydraSim`, on a :class:`Script`
that carries the simulated IDs and the timeline. Row times are integer Unix seconds ``base + offset``:
the timeline starts ``Workload.starts_before`` seconds before the demo runs, so the traces look like
a run that just happened. What Hydra does not store (when an evaluator started, crashed or was
superseded) the daemon times with its own clock as it receives the notifications, so those spans
carry the time the demo plays them; ``pause`` spaces such steps out in real time.

Each step also says how many spans it should make the daemon export (``spans``), so the demo and its
test know how many to wait for. The counts follow docs/spans.md: an added evaluation is its root,
``checkout``, ``evaluate`` and ``evaluator run``; a build is the build span, a ``queued`` span when it
waited for its first step, and one span per step of the attempt; an evaluation attempt that left no
JobsetEval row (cached, failed, crashed, abandoned) is one root span.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from hydra_otel.demo.sandbox.hydrasim import HydraSim, NewBuild, store_path

#: Hydra's ``buildsteps.machine`` values of the two simulated build machines.
BUILDER_1: Final = "ssh://builder-1"
BUILDER_2: Final = "ssh://builder-2"


@dataclass(slots=True)
class Script:
    """The state a workload's steps share: the simulated Hydra, the timeline and the IDs it handed out.

    Args:
        base: the Unix second the scripted timeline starts at.
    """

    base: int
    sim: HydraSim = field(default_factory=HydraSim)
    jobsets: dict[str, int] = field(default_factory=dict)
    evals: dict[str, int] = field(default_factory=dict)
    builds: dict[str, int] = field(default_factory=dict)
    correlations: dict[str, str] = field(default_factory=dict)

    def at(self, offset: int) -> int:
        """The Unix second ``offset`` seconds into the timeline."""
        return self.base + offset

    def correlation(self, attempt: str) -> str:
        """The correlation ID of evaluator run ``attempt``, shaped like Hydra's (monotonic time.pid)."""
        if attempt not in self.correlations:
            n = len(self.correlations)
            self.correlations[attempt] = f"{4112 + 97 * n}.{262815283 + 7919 * n:09d}.{16494 + 11 * n}"
        return self.correlations[attempt]


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One scripted Hydra action.

    Attributes:
        label: the progress line the demo prints.
        play: renders the action's SQL, one string per transaction, in Hydra's order.
        spans: how many spans the daemon should export because of it.
        pause: real seconds to wait before playing it (scaled by the demo's speed), so that spans the
            daemon times live (an evaluator run, a failed or cached attempt) last a little.
        min_pause: real seconds to wait before playing it at any speed: Hydra records an evaluator's
            crash in whole seconds, and the daemon can only tell it from the evaluator's start, or
            from the next start's, when they are more than a second apart.
    """

    label: str
    play: Callable[[Script], Sequence[str]]
    spans: int = 0
    pause: float = 0.0
    min_pause: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """A whole scripted run and what it should produce.

    Attributes:
        steps: the actions, in order.
        traces: how many traces the daemon should export.
        abandon_after: the daemon's ``--eval-abandon-after`` (an evaluation left open is abandoned).
        starts_before: how many seconds before the demo the scripted timeline starts.
    """

    steps: tuple[Step, ...]
    traces: int
    abandon_after: float
    starts_before: int

    @property
    def spans(self) -> int:
        """How many spans the daemon should export in all."""
        return sum(step.spans for step in self.steps)

    def script(self, now: int | None = None) -> Script:
        """A fresh script whose timeline starts ``starts_before`` seconds before ``now`` (default: now)."""
        return Script(base=(int(time.time()) if now is None else now) - self.starts_before)


# --- actions ------------------------------------------------------------------------------------------


def wall_clock() -> int:
    """The current Unix second, for rows about moments the daemon times live (an evaluator's crash)."""
    return int(time.time())


def create_projects(s: Script, projects: dict[str, tuple[str, ...]]) -> list[str]:
    """Projects and their jobsets, as an administrator creates them in the web UI."""
    sql = []
    for project, jobsets in projects.items():
        sql.append(s.sim.create_project(project))
        for jobset in jobsets:
            s.jobsets[f"{project}:{jobset}"], statement = s.sim.create_jobset(project, jobset)
            sql.append(statement)
    return sql


def evaluator_starts(s: Script, jobset: str, attempt: str, at: int | None) -> list[str]:
    """hydra-evaluator starts hydra-eval-jobset; ``at`` None means now (a live-timed attempt)."""
    now = wall_clock() if at is None else s.at(at)
    return s.sim.evaluator_starts(s.jobsets[jobset], s.correlation(attempt), now)


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """An evaluation that adds a JobsetEval row: its timing (offsets) and the builds it contains."""

    jobset: str
    attempt: str
    start: int
    checkout: int
    duration: int
    new: tuple[NewBuild, ...] = ()
    cached: tuple[tuple[str, bool], ...] = ()  # (job of an earlier build, finished?)


def eval_added(s: Script, e: Evaluation) -> list[str]:
    """hydra-eval-jobset checks out the inputs, evaluates, and adds the evaluation and its builds."""
    eval_start = e.start + e.checkout
    eval_id, build_ids, sql = s.sim.eval_added(
        s.jobsets[e.jobset],
        s.correlation(e.attempt),
        eval_start=s.at(eval_start),
        timestamp=s.at(eval_start + e.duration),
        checkout_time=e.checkout,
        eval_time=e.duration,
        new_builds=e.new,
        cached_builds=[(s.builds[job], finished) for job, finished in e.cached],
    )
    s.evals[e.attempt] = eval_id
    s.builds.update(zip((b.job for b in e.new), build_ids, strict=True))
    return [*sql, s.sim.evaluator_exits(s.jobsets[e.jobset])]


def step(
    s: Script,
    job: str,
    nr: int,
    machine: str,
    span: tuple[int, int],
    *,
    status: int = 0,
    error: str | None = None,
    drv: str | None = None,
) -> list[str]:
    """The queue runner runs step ``nr`` of ``job`` on ``machine`` from ``span[0]`` to ``span[1]``.

    ``drv`` names the derivation when the step builds a dependency rather than the job itself.
    """
    b = s.builds[job]
    drvpath = None if drv is None else store_path(f"{drv}.drv", 1000 * b + nr)
    log_path = _log_path(drvpath or s.sim.drvpaths[b])
    return [
        s.sim.step_started(b, nr, now=s.at(span[0]), machine=machine, drvpath=drvpath),
        s.sim.step_finished(b, nr, now=s.at(span[1]), status=status, error=error, log_path=log_path),
    ]


def _log_path(drvpath: str) -> str:
    name = drvpath.removeprefix("/nix/store/")
    return f"/var/lib/hydra/build-logs/{name[:2]}/{name[2:]}"


def build_done(s: Script, job: str, span: tuple[int, int], status: int = 0) -> list[str]:
    """The queue runner marks the build finished (its times are its top-level step's)."""
    return [s.sim.build_finished(s.builds[job], start=s.at(span[0]), stop=s.at(span[1]), status=status)]


def built(s: Script, job: str, nr: int, machine: str, span: tuple[int, int], status: int = 0) -> list[str]:
    """Step ``nr`` builds ``job`` itself, then the build is finished with that step's status."""
    error = None if status == 0 else f"builder for '{s.sim.drvpaths[s.builds[job]]}' failed with exit code 1"
    return [*step(s, job, nr, machine, span, status=status, error=error), *build_done(s, job, span, status)]


def failed_with_dependents(
    s: Script, job: str, machine: str, span: tuple[int, int], dependents: Sequence[str]
) -> list[str]:
    """``job``'s only step fails; every queued build that needs it fails as "dependency failed"."""
    b = s.builds[job]
    error = f"builder for '{s.sim.drvpaths[b]}' failed with exit code 2"
    deps = [(s.builds[d], 1) for d in dependents]
    return [
        *step(s, job, 1, machine, span, status=1, error=error),
        s.sim.build_failed_with_dependents(b, start=s.at(span[0]), stop=s.at(span[1]), dependents=deps),
    ]


def substituted(s: Script, job: str, nr: int, drv: str, span: tuple[int, int]) -> list[str]:
    """A dependency of ``job`` is downloaded from a binary cache (Hydra sends no notification)."""
    drvpath = store_path(f"{drv}.drv", 1000 * s.builds[job] + nr)
    b = s.builds[job]
    return [s.sim.substituted_step(b, nr, start=s.at(span[0]), stop=s.at(span[1]), drvpath=drvpath)]


def restart(s: Script, job: str) -> list[str]:
    """A user presses "Restart" on the build's page."""
    return [s.sim.restart(s.builds[job])]


def fetch_failed(s: Script, jobset: str, attempt: str, error: str) -> list[str]:
    """hydra-eval-jobset cannot fetch an input and gives up (now)."""
    jobset_id = s.jobsets[jobset]
    failed = s.sim.eval_fetch_failed(jobset_id, s.correlation(attempt), wall_clock(), error)
    return [failed, s.sim.evaluator_exits(jobset_id)]


def eval_cached(s: Script, jobset: str, attempt: str, previous: str) -> list[str]:
    """hydra-eval-jobset finds the inputs unchanged since evaluation ``previous`` (now)."""
    jobset_id, cid = s.jobsets[jobset], s.correlation(attempt)
    cached = s.sim.eval_cached(jobset_id, cid, s.evals[previous], wall_clock())
    return [cached, s.sim.evaluator_exits(jobset_id)]


def evaluator_dies(s: Script, jobset: str, message: str) -> list[str]:
    """hydra-eval-jobset is killed; hydra-evaluator records it (Hydra sends no notification)."""
    return [s.sim.evaluator_dies(s.jobsets[jobset], wall_clock(), message)]


# --- the workloads ------------------------------------------------------------------------------------

PROJECTS: Final = {"nixpkgs": ("trunk", "staging"), "hydra": ("master",)}
_FETCH_ERROR: Final = (
    "error: unable to download 'https://github.com/NixOS/nixpkgs/archive/staging.tar.gz': "
    "Could not resolve host: github.com (6)"
)
_CRASH: Final = "evaluation failed with exit code 137"
_STAGING: Final = "nixpkgs:staging"


def _setup() -> Step:
    return Step(
        label="projects nixpkgs (jobsets trunk, staging) and hydra (jobset master) created",
        play=lambda s: create_projects(s, PROJECTS),
    )


def _evaluation(e: Evaluation, *, pause: float) -> list[Step]:
    """Started, then added: the trace's root, checkout, evaluate and evaluator run spans."""
    summary = f"{len(e.new)} new builds"
    if e.cached:
        summary += f", {len(e.cached)} already built or queued by earlier evaluations"
    return [
        Step(
            label=f"eval {e.jobset} started", play=lambda s: evaluator_starts(s, e.jobset, e.attempt, e.start)
        ),
        Step(
            label=f"eval {e.jobset} added: {summary}", play=lambda s: eval_added(s, e), spans=4, pause=pause
        ),
    ]


def _attempts(*, pause: float, abandon_after: float) -> list[Step]:
    """Evaluation attempts that leave no JobsetEval row: one root span each, timed live by the daemon."""
    return [
        Step(label=f"eval {_STAGING} started", play=lambda s: evaluator_starts(s, _STAGING, "fetch", None)),
        Step(
            label=f"eval {_STAGING} failed: cannot fetch its input",
            play=lambda s: fetch_failed(s, _STAGING, "fetch", _FETCH_ERROR),
            spans=1,
            pause=pause,
        ),
        Step(
            label="eval nixpkgs:trunk started",
            play=lambda s: evaluator_starts(s, "nixpkgs:trunk", "again", None),
        ),
        Step(
            label="eval nixpkgs:trunk cached: inputs unchanged since the last evaluation",
            play=lambda s: eval_cached(s, "nixpkgs:trunk", "again", "trunk"),
            spans=1,
            pause=pause / 2,
        ),
        Step(label=f"eval {_STAGING} started", play=lambda s: evaluator_starts(s, _STAGING, "crash", None)),
        Step(
            label=f"eval {_STAGING}: evaluator killed (exit code 137), Hydra sends no notification",
            play=lambda s: evaluator_dies(s, _STAGING, _CRASH),
            pause=pause,
            min_pause=1.0,
        ),
        Step(
            label=f"eval {_STAGING} started again, which ends the killed one",
            play=lambda s: evaluator_starts(s, _STAGING, "hang", None),
            spans=1,
            pause=pause / 2,
            min_pause=1.0,
        ),
        Step(
            label=f"eval {_STAGING} hangs: abandoned after {abandon_after:g}s without a closing notification",
            play=lambda s: [],
            spans=1,
        ),
    ]


_TRUNK: Final = Evaluation(
    jobset="nixpkgs:trunk",
    attempt="trunk",
    start=0,
    checkout=25,
    duration=145,
    new=(
        NewBuild(job="hello", nixname="hello-2.12.1"),
        NewBuild(job="openssl", nixname="openssl-3.0.15"),
        NewBuild(job="curl", nixname="curl-8.11.1"),
        NewBuild(job="git", nixname="git-2.47.1"),
        NewBuild(job="python3", nixname="python3-3.12.8"),
    ),
)
_HYDRA: Final = Evaluation(
    jobset="hydra:master",
    attempt="hydra",
    start=320,
    checkout=10,
    duration=38,
    new=(NewBuild(job="hydra", nixname="hydra-0.1.20250101"), NewBuild(job="manual", nixname="hydra-manual")),
    cached=(("hello", True), ("python3", False)),
)


def _python3(s: Script) -> list[str]:
    return [
        *substituted(s, "python3", 1, "sqlite-3.46.1", (200, 212)),
        *step(s, "python3", 2, BUILDER_2, (215, 240), drv="expat-2.6.4"),
        *built(s, "python3", 3, BUILDER_1, (260, 560)),
    ]


def _full() -> Workload:
    abandon_after = 5.0
    steps = (
        _setup(),
        *_evaluation(_TRUNK, pause=1.5),
        Step(
            label="build hello: built on builder-1",
            play=lambda s: built(s, "hello", 1, BUILDER_1, (190, 250)),
            spans=3,
        ),
        Step(
            label="build openssl: failed on builder-2, so curl and git failed too (dependency failed)",
            play=lambda s: failed_with_dependents(s, "openssl", BUILDER_2, (195, 470), ["curl", "git"]),
            spans=3 + 2 * 2,
        ),
        *_evaluation(_HYDRA, pause=1.0),
        Step(
            label="build manual: built on builder-2",
            play=lambda s: built(s, "manual", 1, BUILDER_2, (380, 420)),
            spans=3,
        ),
        Step(
            label="build python3: sqlite substituted, expat built on builder-2, python3 on builder-1",
            play=_python3,
            spans=5,
        ),
        Step(
            label="build hydra: tests failed on builder-2",
            play=lambda s: built(s, "hydra", 1, BUILDER_2, (425, 700), status=1),
            spans=3,
        ),
        Step(label="build hydra restarted from the web UI", play=lambda s: restart(s, "hydra")),
        Step(
            label="build hydra: second attempt built on builder-1",
            play=lambda s: built(s, "hydra", 2, BUILDER_1, (760, 1040)),
            spans=2,
        ),
        *_attempts(pause=1.2, abandon_after=abandon_after),
    )
    return Workload(steps=steps, traces=6, abandon_after=abandon_after, starts_before=18 * 60)


def _short() -> Workload:
    # Longer than the killed evaluation stays open (two minimum pauses), shorter than the full one's.
    abandon_after = 3.0
    trunk = Evaluation(
        jobset="nixpkgs:trunk", attempt="trunk", start=0, checkout=25, duration=145, new=_TRUNK.new[:3]
    )
    steps = (
        _setup(),
        *_evaluation(trunk, pause=0.5),
        Step(
            label="build hello: tests failed on builder-1",
            play=lambda s: built(s, "hello", 1, BUILDER_1, (190, 250), status=1),
            spans=3,
        ),
        Step(
            label="build openssl: failed on builder-2, so curl failed too (dependency failed)",
            play=lambda s: failed_with_dependents(s, "openssl", BUILDER_2, (195, 470), ["curl"]),
            spans=3 + 2,
        ),
        Step(label="build hello restarted from the web UI", play=lambda s: restart(s, "hello")),
        Step(
            label="build hello: second attempt built on builder-2",
            play=lambda s: built(s, "hello", 2, BUILDER_2, (480, 540)),
            spans=2,
        ),
        *_attempts(pause=0.5, abandon_after=abandon_after),
    )
    return Workload(steps=steps, traces=5, abandon_after=abandon_after, starts_before=10 * 60)


#: Two projects, three jobsets, seven builds: every kind of evaluation and build outcome.
FULL: Final = _full()

#: Fewer builds, the same kinds of traces, for CI (the demo plays it without pauses).
SHORT: Final = _short()
