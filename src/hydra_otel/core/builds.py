"""Build and step spans: pure functions from ``builds`` / ``buildsteps`` rows.

Theory of operation.

*Placement.* A build belongs to the evaluation that created it (its
``jobsetevalmembers`` row with ``isnew = 1``, else the lowest eval containing
it). Its span is a child of that evaluation's root span, unless the
evaluation created more than ``max_builds_per_trace`` builds: then only the
first ``max_builds_per_trace`` builds by ID stay in the evaluation's trace,
and each later one is the root of a trace of its own, linked to the
evaluation (and the evaluation links to a bounded number of them). The rule
depends only on IDs, so every process places a build the same way.

*Attempts.* A restarted build finishes again; each finish is a new build span
in the same trace. Hydra stores no attempt number, so it is derived from the
step rows: an attempt ends with the step that built the build's own
derivation (not substituted, not propagated, with a final status: aborted
steps are retried within the attempt), and step numbers keep increasing
across restarts. A step's attempt is the number of such ending steps with a
lower step number; a build finish's attempt is the number that stopped
before the build did. Both use one rule (:func:`_ends_attempt`) and are
functions of the rows, so a re-delivered ``build_finished`` renders
byte-identical spans. Hydra overwrites the build row at each finish, so
earlier attempts are rebuilt from their ending steps (:func:`earlier_attempt`)
whenever a build is rendered: every step row has its parent, with the same
IDs live, after a restart or in a backfill.

*Times.* A build span runs from queueing (``builds.timestamp``; for a later
attempt, the first step of that attempt) to ``builds.stoptime``; its ``queued``
child covers the wait until the attempt's first step started. Steps use their
own start and stop times; steps Hydra wrote without times (propagated
failures, unsupported systems) are placed at the build's stop time.
"""

from __future__ import annotations

import bisect
import functools
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from hydra_otel.core import budget, ids
from hydra_otel.core import semconv as sc
from hydra_otel.core.evals import RenderConfig
from hydra_otel.core.spans import (
    Attributes,
    AttrValue,
    Kind,
    SpanLink,
    SpanRecord,
    Status,
    present,
    seconds_ns,
    truncate,
)
from hydra_otel.core.status import status_info

#: Enum members are read through a descriptor in Python 3.11 (several times a plain global):
#: the per-span code reads them from here.
_INTERNAL, _ERROR = Kind.INTERNAL, Status.ERROR

_STORE_NAME = re.compile(r"^(?:.*/)?[0-9a-z]{32}-(?P<name>.+?)(?:\.drv)?$")


class BuildFacts(NamedTuple):
    """One ``builds`` row with its jobset, owning evaluation and trace placement.

    Facts are named tuples, as spans are (core/spans.py): one is made for every row a batch
    reads, and a tuple is built in C. Change one with ``facts._replace(...)``.
    """

    build_id: int
    finished: bool
    timestamp: int
    jobset_id: int
    project: str
    jobset: str
    job: str
    nixname: str | None
    drvpath: str
    system: str
    priority: int
    global_priority: int
    starttime: int | None
    stoptime: int | None
    cached: bool
    status: int | None
    size: int | None
    closure_size: int | None
    release_name: str | None
    eval_id: int | None  # the evaluation that created the build (None: no membership row)
    in_eval_trace: bool  # False: beyond the evaluation's trace budget
    trace_builds: int = 1  # builds sharing the trace: they split its span budget (core/budget.py)


class StepFacts(NamedTuple):
    """One ``buildsteps`` row."""

    build_id: int
    stepnr: int
    type: int
    drvpath: str | None
    status: int | None
    errormsg: str | None
    starttime: int | None
    stoptime: int | None
    machine: str
    system: str | None
    propagated_from: int | None
    overhead_ms: int | None
    times_built: int | None
    nondeterministic: bool | None
    resolved_drv_path: str | None


_HASH_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")


@functools.lru_cache(maxsize=16384)  # a step's path recurs: its span renders alone, then with its build
def derivation_name(path: str | None) -> str:
    """``/nix/store/<hash>-hello-2.12.drv`` -> ``hello-2.12``."""
    if not path:
        return "unknown"
    # The usual store path, read with string methods: matching _STORE_NAME costs five times as much,
    # and a burst's paths are all new. Anything else (no hash in the last component, a newline,
    # which `.` and `$` treat apart) goes to the pattern, which defines the result.
    base = path.rpartition("/")[2]
    if len(base) > 33 and base[32] == "-" and _HASH_CHARS.issuperset(base[:32]) and "\n" not in path:
        name = base[33:]
        return name[:-4] if name.endswith(".drv") and len(name) > 4 else name
    m = _STORE_NAME.match(path)
    return m.group("name") if m else path.rsplit("/", 1)[-1]


#: Step statuses after which the queue runner goes on within the same attempt: aborted steps are
#: retried (transient failures, a queue-runner restart), and 13 means the derivation was resolved
#: to a content-addressed one that is then built under another path. A cancelled step (4) is not
#: retried: the queue runner kills a step once every build needing it is gone, so a cancelled step
#: of the build's own derivation is the build being cancelled, which ends the attempt.
_CONTINUING = frozenset({3, 13})


def _ends_attempt(b: BuildFacts, s: StepFacts) -> bool:
    """Is ``s`` the step that ended an attempt: the build's own derivation, built (not substituted
    or propagated), with a final status and a stop time? Both attempt functions use this one rule."""
    return (
        s.type == 0
        and s.drvpath == b.drvpath
        and not s.propagated_from
        and s.status is not None
        and s.status not in _CONTINUING
        and s.stoptime is not None
    )


def step_attempt(b: BuildFacts, steps: Sequence[StepFacts], stepnr: int) -> int:
    """The attempt a step belongs to: attempt-ending steps with a lower step number."""
    return sum(1 for s in steps if _ends_attempt(b, s) and s.stepnr < stepnr)


def _steps_of_attempt(b: BuildFacts, steps: Sequence[StepFacts], attempt: int) -> list[StepFacts]:
    """The steps :func:`step_attempt` puts in ``attempt``, found in O(n log n), not O(n²): a build
    can have thousands of steps (a new platform's bootstrap)."""
    ends = sorted(s.stepnr for s in steps if _ends_attempt(b, s))
    return [s for s in steps if bisect.bisect_left(ends, s.stepnr) == attempt]


def build_attempt(b: BuildFacts, steps: Sequence[StepFacts]) -> int:
    """The attempt a build finish belongs to: attempt-ending steps that stopped before the build."""
    return attempt_at(b, steps, b.stoptime if b.stoptime is not None else 0)


def attempt_at(b: BuildFacts, steps: Sequence[StepFacts], when: int) -> int:
    """The attempt of ``b`` that finished at ``when``: attempt-ending steps that stopped before then.

    A dependent's ``caused_by`` link uses this with the dependent's stop time (Hydra gives the
    dependents of a failure that failure's stop time), so the link names the attempt that failed,
    however often the cause was restarted since.
    """
    return sum(1 for s in steps if _ends_attempt(b, s) and s.stoptime is not None and s.stoptime < when)


def step_needs_build(b: BuildFacts, steps: Sequence[StepFacts], attempt: int) -> bool:
    """Should a finished step of ``attempt`` be rendered with its whole build (all attempts)?

    Yes when the attempt has ended and its build span may never have been exported: an earlier
    attempt (Hydra overwrote the row since; only a rendering of the whole build rebuilds it),
    or the last finish of a build restarted since (``finished = 0``: catch-up scans of finished
    builds skip it, so after downtime nothing else would render it). Otherwise the build span
    comes with the build's finish, live or from a catch-up scan.
    """
    if b.stoptime is None:
        return False
    latest = build_attempt(b, steps)
    return attempt < latest or (attempt == latest and not b.finished)


def _previous_attempt_end(b: BuildFacts, ends: Sequence[StepFacts], attempt: int) -> int:
    """When attempt ``attempt - 1`` ended (its ending step's stop time), else the queue time.

    ``ends`` is :func:`_ending_steps` (each has a stop time).
    """
    stop = ends[attempt - 1].stoptime if 0 < attempt <= len(ends) else None
    return stop if stop is not None else b.timestamp


def step_in_budget(cfg: RenderConfig, b: BuildFacts, steps: Sequence[StepFacts], s: StepFacts) -> bool:
    """Whether step ``s`` fits its build's share of the trace budget (see core/budget.py).

    ``steps`` must hold the build's attempt-ending steps below ``s`` (as both queries give).
    """
    ends = sorted(t.stepnr for t in steps if _ends_attempt(b, t) and t.stepnr < s.stepnr)
    position = s.stepnr - (ends[-1] if ends else 0)
    share = budget.build_share(cfg.max_spans_per_trace, b.trace_builds, own_trace=placement(cfg, b).own_trace)
    return budget.step_kept(budget.step_limit(share), position, ends_attempt=_ends_attempt(b, s))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a build's spans go: trace key, the build span's parent, and whether it is its own trace."""

    trace: ids.TraceKey
    parent: int | None
    own_trace: bool


def placement(cfg: RenderConfig, b: BuildFacts) -> Placement:
    """The trace of build ``b`` (see the module docstring)."""
    return _placement(cfg.instance, b.eval_id if b.in_eval_trace else None, b.build_id)


@functools.lru_cache(maxsize=8192)  # every span of a build needs it: derived once per build
def _placement(instance: str, eval_id: int | None, build_id: int) -> Placement:
    if eval_id is not None:
        key = ids.eval_trace(instance, eval_id)
        return Placement(key, ids.root_span_id(key), False)
    return Placement(ids.build_trace(instance, build_id), None, True)


def build_span_id(cfg: RenderConfig, b: BuildFacts, attempt: int) -> tuple[int, int]:
    """(trace ID, span ID) of attempt ``attempt`` of build ``b``."""
    _, tid, span = _parent(cfg, b, attempt)
    return tid, span


_Parent = tuple[Placement, int, int]


def _parent(cfg: RenderConfig, b: BuildFacts, attempt: int) -> _Parent:
    # Each step of a build renders alone at its step_finished, then again with the build: the
    # build's IDs are derived once, keyed by all they depend on (plain values, hashed in C).
    return _parent_ids(cfg.instance, b.eval_id if b.in_eval_trace else None, b.build_id, attempt)


@functools.lru_cache(maxsize=8192)
def _parent_ids(instance: str, eval_id: int | None, build_id: int, attempt: int) -> _Parent:
    where = _placement(instance, eval_id, build_id)
    return where, ids.trace_id(where.trace), ids.span_id(where.trace, "build", build_id, attempt)


@dataclass(frozen=True, slots=True)
class Cause:
    """The build whose failure finished this one (from ``buildsteps.propagatedfrom``), as a link target."""

    build_id: int
    trace_id: int
    span_id: int


def build_spans(
    cfg: RenderConfig, b: BuildFacts, steps: Sequence[StepFacts], cause: Cause | None = None
) -> list[SpanRecord]:
    """The spans of every finished attempt of a build: the latest first, then the earlier ones.

    The latest finished attempt comes from the build row. A build restarted since
    (``finished = 0``) still holds its last finish's status and times, so that attempt is
    rendered as it was: a restart right after ``build_finished`` does not lose it. Hydra
    overwrote the row at each later finish, so earlier attempts are rebuilt from the step
    that ended each (:func:`earlier_attempt`); every step row thus has its build span.
    """
    if b.stoptime is None:
        raise ValueError(f"build {b.build_id} has no recorded finish")
    # The attempt-ending steps, found once: every attempt rule below needs them, and only them.
    ends = _ending_steps(b, steps)
    latest = sum(1 for s in ends if s.stoptime is not None and s.stoptime < b.stoptime)  # build_attempt
    by_attempt = _split_attempts(ends, steps)
    out = _attempt_spans(cfg, b, ends, by_attempt.get(latest, []), latest, cause)
    for attempt in range(latest):
        facts = earlier_attempt(b, ends[attempt])
        out += _attempt_spans(cfg, facts, ends, by_attempt.get(attempt, []), attempt, None)
    return out


def earlier_attempt(b: BuildFacts, ending: StepFacts) -> BuildFacts:
    """The build row as it was when the attempt ended by step ``ending`` finished it.

    Hydra's queue runner gives a build whose own step ended it that step's status and times
    (``update_build_after_failure``), leaves ``iscachedbuild`` 0 (a restart resets it too)
    and sets sizes and the release name only on success. So a failed attempt rebuilt here
    equals its rendering from the row when it was the latest: the same IDs and the same
    bytes, whichever process renders it. A succeeded one lacks its sizes, and a build that
    failed with output (status 6, its step 0) is shown as succeeded.
    """
    return b._replace(
        finished=True,
        starttime=ending.starttime,
        stoptime=ending.stoptime,
        cached=False,
        status=ending.status,
        size=None,
        closure_size=None,
        release_name=None,
    )


def _ending_steps(b: BuildFacts, steps: Sequence[StepFacts]) -> list[StepFacts]:
    """The attempt-ending steps in step order: the n-th ended attempt n."""
    return sorted((s for s in steps if _ends_attempt(b, s)), key=lambda s: s.stepnr)


def _split_attempts(ends: Sequence[StepFacts], steps: Sequence[StepFacts]) -> dict[int, list[StepFacts]]:
    """Steps by attempt (as :func:`step_attempt` counts), each in step order; O(n log n).

    ``ends`` is :func:`_ending_steps` of the build.
    """
    numbers = [s.stepnr for s in ends]
    out: dict[int, list[StepFacts]] = {}
    for s in sorted(steps, key=_STEPNR):
        out.setdefault(bisect.bisect_left(numbers, s.stepnr), []).append(s)
    return out


_STEPNR = operator.attrgetter("stepnr")  # a sort key in C, not a lambda called per step


def _attempt_spans(
    cfg: RenderConfig,
    b: BuildFacts,
    ends: Sequence[StepFacts],
    mine: Sequence[StepFacts],
    attempt: int,
    cause: Cause | None,
) -> list[SpanRecord]:
    """Build span, ``queued`` and steps of one attempt, finished as row ``b`` says.

    ``ends`` is :func:`_ending_steps` of the build; ``mine`` the attempt's steps in step order.
    """
    assert b.stoptime is not None
    kept = _kept_steps(cfg, b, ends, mine)
    starts = [s.starttime for s in mine if s.starttime is not None]
    if attempt == 0:
        start = b.timestamp
    else:  # a restart: the attempt began with its first step (or, with none, when the last one ended)
        start = min(starts) if starts else _previous_attempt_end(b, ends, attempt)
    end = max(b.stoptime, start)
    where, tid, span = _parent(cfg, b, attempt)
    info = status_info(b.status)
    root = SpanRecord(
        trace_id=tid,
        span_id=span,
        parent_span_id=where.parent,
        name=f"build {b.job}",
        kind=Kind.INTERNAL,
        start_ns=seconds_ns(start),
        end_ns=seconds_ns(end),
        attributes=_build_attributes(cfg, b, attempt, where.own_trace, len(mine) - len(kept)),
        status=info.span_status,
        status_message=info.name if info.span_status is Status.ERROR else "",
        links=_build_links(cfg, b, where, cause),
    )
    out = [root]
    first_step = min((t for t in starts if t >= start), default=None)
    if first_step is not None and first_step > start:  # a zero-length wait is noise, not a span
        out.append(_queued_span(where, b, attempt, tid, span, start, first_step))
    parent = (where, tid, span)
    out.extend(step_span(cfg, b, s, attempt, parent=parent) for s in kept)
    return out


def _kept_steps(
    cfg: RenderConfig, b: BuildFacts, ends: Sequence[StepFacts], mine: Sequence[StepFacts]
) -> list[StepFacts]:
    """The steps of ``mine`` (one attempt, in step order) within the build's share:
    :func:`step_in_budget`, in O(n). ``ends`` is :func:`_ending_steps` of the build."""
    if not mine:
        return []
    share = budget.build_share(cfg.max_spans_per_trace, b.trace_builds, own_trace=placement(cfg, b).own_trace)
    limit = budget.step_limit(share)
    first, last = mine[0].stepnr, mine[-1].stepnr
    previous_end = max((t.stepnr for t in ends if t.stepnr < first), default=0)
    if budget.step_kept(limit, last - previous_end, ends_attempt=False):
        return list(mine)  # even the last step fits by its place, so every step does (the usual build)
    own = {t.stepnr for t in ends}  # step numbers are unique within a build
    return [s for s in mine if budget.step_kept(limit, s.stepnr - previous_end, ends_attempt=s.stepnr in own)]


def _queued_span(
    where: Placement, b: BuildFacts, attempt: int, tid: int, parent: int, start: int, end: int
) -> SpanRecord:
    return SpanRecord(
        trace_id=tid,
        span_id=ids.span_id(where.trace, "queued", b.build_id, attempt),
        parent_span_id=parent,
        name="queued",
        kind=Kind.INTERNAL,
        start_ns=seconds_ns(start),
        end_ns=seconds_ns(end),
        attributes=((sc.HYDRA_SPAN_TYPE, "queued"), (sc.HYDRA_BUILD_ID, b.build_id)),
    )


def _build_attributes(
    cfg: RenderConfig, b: BuildFacts, attempt: int, own_trace: bool, omitted: int = 0
) -> Attributes:
    info = status_info(b.status)
    return present(
        [
            (sc.HYDRA_SPAN_TYPE, "build"),
            (sc.CICD_PIPELINE_NAME, f"{b.project}:{b.jobset}"),
            (sc.CICD_PIPELINE_TASK_NAME, b.job),
            (sc.CICD_PIPELINE_TASK_RUN_ID, str(b.build_id)),
            (sc.CICD_PIPELINE_TASK_RUN_URL_FULL, f"{cfg.hydra_url}/build/{b.build_id}"),
            (sc.CICD_PIPELINE_TASK_RUN_RESULT, info.result),
            (sc.ERROR_TYPE, info.error_type),
            (sc.HYDRA_PROJECT, b.project),
            (sc.HYDRA_JOBSET, b.jobset),
            (sc.HYDRA_EVAL_ID, b.eval_id),
            (sc.HYDRA_BUILD_ID, b.build_id),
            (sc.HYDRA_BUILD_JOB, b.job),
            (sc.HYDRA_BUILD_SYSTEM, b.system),
            (sc.HYDRA_BUILD_NIXNAME, b.nixname),
            (sc.HYDRA_BUILD_DRV_PATH, b.drvpath),
            (sc.HYDRA_BUILD_STATUS, b.status),
            (sc.HYDRA_BUILD_STATUS_NAME, info.name),
            (sc.HYDRA_BUILD_CACHED, b.cached),
            (sc.HYDRA_BUILD_PRIORITY, b.priority),
            (sc.HYDRA_BUILD_GLOBAL_PRIORITY, b.global_priority),
            (sc.HYDRA_BUILD_SIZE, b.size),
            (sc.HYDRA_BUILD_CLOSURE_SIZE, b.closure_size),
            (sc.HYDRA_BUILD_RELEASE_NAME, b.release_name),
            (sc.HYDRA_BUILD_ATTEMPT, attempt),
            (sc.HYDRA_BUILD_OWN_TRACE, own_trace or None),
            (sc.HYDRA_BUILD_STEPS_OMITTED, omitted or None),
        ]
    )


def _build_links(
    cfg: RenderConfig, b: BuildFacts, where: Placement, cause: Cause | None
) -> tuple[SpanLink, ...]:
    links: list[SpanLink] = []
    if where.own_trace and b.eval_id is not None:
        key = ids.eval_trace(cfg.instance, b.eval_id)
        links.append(
            SpanLink(
                trace_id=ids.trace_id(key),
                span_id=ids.root_span_id(key),
                attributes=((sc.HYDRA_LINK_TYPE, "evaluation"),),
            )
        )
    if cause is not None:
        links.append(
            SpanLink(
                trace_id=cause.trace_id,
                span_id=cause.span_id,
                attributes=((sc.HYDRA_LINK_TYPE, "caused_by"), (sc.HYDRA_BUILD_ID, cause.build_id)),
            )
        )
    return tuple(links)


def propagated_from(b: BuildFacts, steps: Sequence[StepFacts]) -> int | None:
    """The build whose failure was propagated to ``b``'s latest attempt, if any."""
    if not any(s.propagated_from for s in steps):
        return None  # the usual build, told without working out its attempts
    for s in _steps_of_attempt(b, steps, build_attempt(b, steps)):
        if s.propagated_from:
            return s.propagated_from
    return None


def step_span(
    cfg: RenderConfig, b: BuildFacts, s: StepFacts, attempt: int, *, parent: _Parent | None = None
) -> SpanRecord:
    """The span of one step, a child of attempt ``attempt`` of its build.

    ``parent`` is the build span's (placement, trace ID, span ID) when the caller has it already
    (rendering a whole build): deriving IDs is the costly part of rendering.
    """
    _, tid, parent_id = parent if parent is not None else _parent(cfg, b, attempt)
    fallback = b.stoptime if b.stoptime is not None else (s.stoptime or s.starttime or b.timestamp)
    start = s.starttime if s.starttime is not None else (s.stoptime if s.stoptime is not None else fallback)
    end = max(s.stoptime if s.stoptime is not None else start, start)
    info = status_info(s.status)
    status = info.span_status
    kind = "substitute" if s.type == 1 else "step"  # not "build": that names the build span
    # Hydra knows a machine only by its URI from the machines file: it is both its ID and its name.
    worker = s.machine or "localhost"
    pairs: list[tuple[str, AttrValue | None]] = [
        (sc.HYDRA_SPAN_TYPE, "step"),
        (sc.CICD_WORKER_ID, worker),
        (sc.CICD_WORKER_NAME, worker),
        (sc.CICD_PIPELINE_TASK_RUN_RESULT, info.result),
        (sc.ERROR_TYPE, info.error_type),
        (sc.HYDRA_BUILD_ID, b.build_id),
        (sc.HYDRA_STEP_NR, s.stepnr),
        (sc.HYDRA_STEP_TYPE, "substitution" if s.type == 1 else "build"),
        (sc.HYDRA_BUILD_SYSTEM, s.system),
        (sc.HYDRA_BUILD_DRV_PATH, s.drvpath),
        (sc.HYDRA_STEP_STATUS, s.status),
        (sc.HYDRA_STEP_STATUS_NAME, info.name),
        (sc.HYDRA_STEP_ERROR, None if not s.errormsg else truncate(s.errormsg, cfg.error_text_limit)),
        (sc.HYDRA_STEP_PROPAGATED_FROM, s.propagated_from or None),
        (sc.HYDRA_STEP_OVERHEAD_MS, s.overhead_ms),
        (sc.HYDRA_STEP_TIMES_BUILT, s.times_built),
        (sc.HYDRA_STEP_NONDETERMINISTIC, s.nondeterministic),
        (sc.HYDRA_STEP_RESOLVED_DRV_PATH, s.resolved_drv_path),
        (sc.HYDRA_STEP_LOG_URL, f"{cfg.hydra_url}/build/{b.build_id}/nixlog/{s.stepnr}"),
    ]
    return SpanRecord(
        trace_id=tid,
        span_id=_step_id(cfg.instance, b.eval_id if b.in_eval_trace else None, b.build_id, s.stepnr),
        parent_span_id=parent_id,
        name=f"{kind} {derivation_name(s.drvpath)}",
        kind=_INTERNAL,
        start_ns=start * 1_000_000_000,  # seconds_ns, inline: a call per field shows at this rate
        end_ns=end * 1_000_000_000,
        attributes=present(pairs),
        status=status,
        status_message=_step_status_message(s, info.name) if status is _ERROR else "",
    )


@functools.lru_cache(maxsize=16384)  # a step renders alone at step_finished, then with its build
def _step_id(instance: str, eval_id: int | None, build_id: int, stepnr: int) -> int:
    return ids.span_id(_placement(instance, eval_id, build_id).trace, "step", build_id, stepnr)


def _step_status_message(s: StepFacts, status_name: str) -> str:
    return (s.errormsg or status_name).split("\n", 1)[0][:256]
