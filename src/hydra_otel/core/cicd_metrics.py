"""CI/CD metrics derived from the spans hydra-otel exports.

Theory of operation. Metrics are a second view of the same :class:`SpanRecord`
values the exporter sends, so they never disagree with the traces. Each record
has a *role*, read from its attributes (:func:`span_role`):

* **pipeline run**: an evaluation root (a SERVER span without parent that has
  ``cicd.pipeline.name``): one ``cicd.pipeline.run.duration`` sample, and one
  error increment when it failed;
* **build**: one ``hydra.build.duration`` sample, and one error increment when
  the build failed (a compile or test failure is an error of the pipeline run,
  as the convention says);
* **queued**: one ``hydra.build.queue_wait`` sample;
* **step**: one ``hydra.step.duration`` sample (propagated failures are
  records, not runs, and are left out).

Spans with no role (``checkout``, ``evaluate``, ``evaluator run``) give nothing.

*Errors.* A pipeline-run or build span counts one error exactly when its span
status is ERROR (result ``failure``, ``error`` or ``timeout``, see
core/status.py), so a span-metrics error count over those spans equals the sum
of the two error counters. Failures of Hydra itself (an evaluator that died, an
aborted build: :data:`~hydra_otel.core.status.SYSTEM_ERROR_COMPONENTS`) go to
``cicd.system.errors``, by component; every other one to
``cicd.pipeline.run.errors``. Cancelled and obsolete builds count in neither.

*Live state.* ``cicd.pipeline.run.active`` and ``cicd.worker.count`` say what
is running now, which no span tells: they are read from Hydra's own markers,
polled (:func:`live_observations`): ``jobsets.starttime``, which
hydra-evaluator sets while it evaluates a jobset and clears after, and the
distinct ``buildsteps.machine`` of busy steps, as Hydra's machine status page
counts them. Only the ``busy`` worker state is known from the database.

*Cardinality.* Every instrument declares the only attribute keys it may carry
(:attr:`Instrument.attributes`) and observations are built through that list,
so build IDs, evaluation IDs, job names, derivation paths and URLs can never
reach a metric: each has one value per run or per job, and nixpkgs has
~100,000 jobs. What is left is bounded by the deployment: jobsets x systems x
results x workers.

*At-least-once input.* The same span can be exported twice (a re-delivered
``build_finished``, a catch-up overlap). :class:`MetricDeriver` remembers the
(trace ID, span ID) of the spans it counted in a bounded LRU and counts each
span once; a restarted build's new attempt has new IDs and counts again, as it
should.

*Context from the parent.* ``queued`` spans carry only the build ID, and step
spans carry no pipeline name. Both come right after their build span when a
build is rendered, so the deriver remembers (pipeline, system) of recent build
spans and fills them in. A step exported live, before its build finished, has
no build span yet: it is counted without ``cicd.pipeline.name`` unless the
step span itself carries it (see docs/metrics-and-logs.md).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from hydra_otel.core import semconv as sc
from hydra_otel.core.spans import Attributes, AttrValue, Kind, SpanRecord
from hydra_otel.core.status import ERROR_RESULTS, SYSTEM_ERROR_COMPONENTS

#: Histogram bucket boundaries in seconds: from a second (substitutions, cached evaluations) to eight
#: hours (a large build or a full nixpkgs evaluation with its inserts).
DURATION_BUCKETS: Final = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
)

CICD_PIPELINE_RUN_STATE = sc.CICD_PIPELINE_RUN_STATE
RUN_STATE_EXECUTING = sc.STATE_EXECUTING
#: ``error.type`` when a failed span names none (the conventions' fallback value).
ERROR_TYPE_OTHER = "_OTHER"

PIPELINE_RUN_DURATION = "cicd.pipeline.run.duration"
PIPELINE_RUN_ERRORS = "cicd.pipeline.run.errors"
SYSTEM_ERRORS = "cicd.system.errors"
PIPELINE_RUN_ACTIVE = "cicd.pipeline.run.active"
WORKER_COUNT = "cicd.worker.count"
BUILD_DURATION = "hydra.build.duration"
BUILD_QUEUE_WAIT = "hydra.build.queue_wait"
STEP_DURATION = "hydra.step.duration"

#: Results that count as errors (cancelled and obsolete builds do not).
_ERROR_RESULTS = ERROR_RESULTS


class InstrumentKind(enum.Enum):
    """The OpenTelemetry instrument an observation feeds."""

    HISTOGRAM = "histogram"
    COUNTER = "counter"
    #: An asynchronous up-down counter: its current value is observed (polled), not added to.
    OBSERVED_UP_DOWN_COUNTER = "observed_up_down_counter"


@dataclass(frozen=True, slots=True, kw_only=True)
class Instrument:
    """One metric: its name, instrument, unit, and the only attribute keys it may carry."""

    name: str
    kind: InstrumentKind
    unit: str
    description: str
    attributes: tuple[str, ...]


def _error_counter(name: str, description: str, *, by: str) -> Instrument:
    # The two error counters differ only in what they count errors of (a jobset or a part of
    # Hydra); a failure feeds exactly one of them (see _error below).
    return Instrument(
        name=name,
        kind=InstrumentKind.COUNTER,
        unit="{error}",
        description=description,
        attributes=(by, sc.ERROR_TYPE),
    )


INSTRUMENTS: Final[Mapping[str, Instrument]] = {
    i.name: i
    for i in (
        Instrument(
            name=PIPELINE_RUN_DURATION,
            kind=InstrumentKind.HISTOGRAM,
            unit="s",
            description="Duration of a jobset evaluation (checkout and evaluation), by jobset, state and result.",
            attributes=(
                sc.CICD_PIPELINE_NAME,
                CICD_PIPELINE_RUN_STATE,
                sc.CICD_PIPELINE_RESULT,
                sc.ERROR_TYPE,
                # True on a check that found its inputs unchanged (eval_cached): short runs that
                # would otherwise blur the distribution of real evaluations.
                sc.HYDRA_EVAL_INPUTS_UNCHANGED,
            ),
        ),
        _error_counter(
            PIPELINE_RUN_ERRORS,
            "Failed evaluations and failed builds, by jobset and error type.",
            by=sc.CICD_PIPELINE_NAME,
        ),
        _error_counter(
            SYSTEM_ERRORS,
            "Failures of Hydra itself (evaluator deaths, aborted builds), by component and error type.",
            by=sc.CICD_SYSTEM_COMPONENT,
        ),
        Instrument(
            name=PIPELINE_RUN_ACTIVE,
            kind=InstrumentKind.OBSERVED_UP_DOWN_COUNTER,
            unit="{run}",
            description="Evaluations running now (jobsets.starttime set by hydra-evaluator), by jobset.",
            attributes=(sc.CICD_PIPELINE_NAME, CICD_PIPELINE_RUN_STATE),
        ),
        Instrument(
            name=WORKER_COUNT,
            kind=InstrumentKind.OBSERVED_UP_DOWN_COUNTER,
            unit="{worker}",
            description="Build machines running at least one step now, as Hydra's machine status counts them.",
            attributes=(sc.CICD_WORKER_STATE,),
        ),
        Instrument(
            name=BUILD_DURATION,
            kind=InstrumentKind.HISTOGRAM,
            unit="s",
            description="Duration of a build attempt, from queueing to its end.",
            attributes=(
                sc.CICD_PIPELINE_NAME,
                sc.HYDRA_BUILD_SYSTEM,
                sc.CICD_PIPELINE_TASK_RUN_RESULT,
                sc.HYDRA_BUILD_CACHED,
            ),
        ),
        Instrument(
            name=BUILD_QUEUE_WAIT,
            kind=InstrumentKind.HISTOGRAM,
            unit="s",
            description="Time a build attempt waited in the queue before its first step started.",
            attributes=(sc.CICD_PIPELINE_NAME, sc.HYDRA_BUILD_SYSTEM),
        ),
        Instrument(
            name=STEP_DURATION,
            kind=InstrumentKind.HISTOGRAM,
            unit="s",
            description="Duration of a build step (a derivation built or substituted).",
            attributes=(
                sc.CICD_PIPELINE_NAME,
                sc.HYDRA_BUILD_SYSTEM,
                sc.CICD_WORKER_NAME,
                sc.CICD_PIPELINE_TASK_RUN_RESULT,
                sc.HYDRA_STEP_TYPE,
            ),
        ),
    )
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """One measurement for instrument ``name``: a histogram sample or a counter increment."""

    name: str
    value: float
    attributes: Attributes


class Role(enum.Enum):
    """What a span stands for, as far as metrics are concerned."""

    PIPELINE_RUN = "pipeline_run"
    BUILD = "build"
    QUEUED = "queued"
    STEP = "step"


def span_role(record: SpanRecord) -> Role | None:
    """The role of ``record`` (see the module docstring), or None if it feeds no metric.

    Args:
        record: a span as rendered by ``core.evals`` or ``core.builds``.

    Returns:
        The role, read from the span's kind, parent and attribute keys.
    """
    keys = {k for k, _ in record.attributes}
    if record.parent_span_id is None and record.kind is Kind.SERVER and sc.CICD_PIPELINE_NAME in keys:
        return Role.PIPELINE_RUN
    if sc.CICD_PIPELINE_TASK_RUN_ID in keys:
        return Role.BUILD
    if sc.HYDRA_STEP_NR in keys:
        return Role.STEP
    if record.name == "queued" and record.parent_span_id is not None:
        return Role.QUEUED
    return None


def duration_s(record: SpanRecord) -> float:
    """The span's duration in seconds (never negative)."""
    return max(0, record.end_ns - record.start_ns) / 1e9


def observation(name: str, value: float, values: Mapping[str, AttrValue | None]) -> Observation:
    """An observation for instrument ``name`` carrying only the keys the instrument allows.

    Args:
        name: a key of :data:`INSTRUMENTS`.
        value: the sample or increment.
        values: candidate attributes; keys the instrument does not declare and None values are dropped.

    Returns:
        The observation, with attributes in the instrument's declared order.
    """
    allowed = INSTRUMENTS[name].attributes
    attrs = tuple((k, v) for k in allowed if (v := values.get(k)) is not None)
    return Observation(name=name, value=value, attributes=attrs)


@dataclass(frozen=True, slots=True)
class _BuildContext:
    pipeline: AttrValue | None
    system: AttrValue | None


class MetricDeriver:
    """Turns exported spans into observations, counting each span once.

    Not thread-safe; one instance lives in the task that sees exported spans.

    Args:
        capacity: spans remembered for de-duplication (and build spans remembered for context).
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._capacity = capacity
        # One int per span, (trace ID << 64) | span ID: lighter than a tuple.
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._builds: OrderedDict[int, _BuildContext] = OrderedDict()
        #: Spans not counted again because they were counted already.
        self.repeats = 0

    def observe(self, records: Iterable[SpanRecord]) -> list[Observation]:
        """The observations for ``records``, in order; spans counted before give none.

        Args:
            records: spans the endpoint accepted, in the order they were rendered.

        Returns:
            New observations (possibly none).
        """
        out: list[Observation] = []
        for record in records:
            role = span_role(record)
            if role is None:
                continue
            if role is Role.BUILD:
                self._remember_build(record)
            if not self._first_time(record):
                self.repeats += 1
                continue
            out += self._derive(role, record)
        return out

    def _derive(self, role: Role, record: SpanRecord) -> list[Observation]:
        attrs = record.attrs()
        if role is Role.PIPELINE_RUN:
            return _pipeline_run(record, attrs)
        if role is Role.BUILD:
            return _build(record, attrs)
        context = self._context(record)
        if role is Role.QUEUED:
            values = {sc.CICD_PIPELINE_NAME: context.pipeline, sc.HYDRA_BUILD_SYSTEM: context.system}
            return [observation(BUILD_QUEUE_WAIT, duration_s(record), values)]
        if sc.HYDRA_STEP_PROPAGATED_FROM in attrs:
            return []
        values = {
            **attrs,
            sc.CICD_PIPELINE_NAME: attrs.get(sc.CICD_PIPELINE_NAME, context.pipeline),
            sc.HYDRA_BUILD_SYSTEM: attrs.get(sc.HYDRA_BUILD_SYSTEM, context.system),
        }
        return [observation(STEP_DURATION, duration_s(record), values)]

    def _first_time(self, record: SpanRecord) -> bool:
        key = (record.trace_id << 64) | record.span_id
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True

    def _remember_build(self, record: SpanRecord) -> None:
        attrs = record.attrs()
        key = (record.trace_id << 64) | record.span_id
        self._builds[key] = _BuildContext(attrs.get(sc.CICD_PIPELINE_NAME), attrs.get(sc.HYDRA_BUILD_SYSTEM))
        self._builds.move_to_end(key)
        if len(self._builds) > self._capacity:
            self._builds.popitem(last=False)

    def _context(self, record: SpanRecord) -> _BuildContext:
        if record.parent_span_id is None:
            return _BuildContext(None, None)
        key = (record.trace_id << 64) | record.parent_span_id
        return self._builds.get(key) or _BuildContext(None, None)


def _pipeline_run(record: SpanRecord, attrs: Mapping[str, AttrValue]) -> list[Observation]:
    values = {**attrs, CICD_PIPELINE_RUN_STATE: RUN_STATE_EXECUTING}
    out = [observation(PIPELINE_RUN_DURATION, duration_s(record), values)]
    if attrs.get(sc.CICD_PIPELINE_RESULT) in _ERROR_RESULTS:
        out.append(_error(attrs))
    return out


def _build(record: SpanRecord, attrs: Mapping[str, AttrValue]) -> list[Observation]:
    out = [observation(BUILD_DURATION, duration_s(record), attrs)]
    if attrs.get(sc.CICD_PIPELINE_TASK_RUN_RESULT) in _ERROR_RESULTS:
        out.append(_error(attrs))
    return out


def _error(attrs: Mapping[str, AttrValue]) -> Observation:
    error_type = attrs.get(sc.ERROR_TYPE, ERROR_TYPE_OTHER)
    component = SYSTEM_ERROR_COMPONENTS.get(str(error_type))
    if component is not None:
        return observation(SYSTEM_ERRORS, 1, {sc.CICD_SYSTEM_COMPONENT: component, sc.ERROR_TYPE: error_type})
    return observation(PIPELINE_RUN_ERRORS, 1, {**attrs, sc.ERROR_TYPE: error_type})


def live_observations(
    active: Iterable[str], busy_workers: int, known: set[str] | None = None
) -> list[Observation]:
    """The current values of the observed instruments.

    Args:
        active: ``cicd.pipeline.name`` of each evaluation running now (one per jobset).
        busy_workers: distinct machines with a busy step.
        known: pipelines reported active before; each is reported again with 0 once it stopped
            (so the series drops to 0 instead of keeping its last value), and ``active`` is added.

    Returns:
        One ``cicd.pipeline.run.active`` point per pipeline (sorted) and one ``cicd.worker.count``.
    """
    counts: dict[str, int] = dict.fromkeys(known or (), 0)
    for name in active:
        counts[name] = counts.get(name, 0) + 1
    if known is not None:
        known.update(counts)
    out = [
        observation(
            PIPELINE_RUN_ACTIVE,
            n,
            {sc.CICD_PIPELINE_NAME: name, CICD_PIPELINE_RUN_STATE: RUN_STATE_EXECUTING},
        )
        for name, n in sorted(counts.items())
    ]
    out.append(observation(WORKER_COUNT, busy_workers, {sc.CICD_WORKER_STATE: sc.STATE_BUSY}))
    return out
