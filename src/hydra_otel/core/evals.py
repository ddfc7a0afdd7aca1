"""Evaluation spans: pure functions from Hydra's rows (and live moments) to spans.

Theory of operation. An evaluation attempt ends in one of four ways:

* **added** (``eval_added``): Hydra wrote a JobsetEval row. Its trace is keyed by
  the eval ID. The root span and its ``checkout`` / ``evaluate`` children come
  only from :class:`EvalFacts` (database rows), so any process rebuilds them
  byte for byte. The live notifications add one ``evaluator run`` child.
* **cached** (``eval_cached``) and **failed** (``eval_failed``): no JobsetEval
  row; the trace is keyed by (jobset ID, correlation ID) and the stitched span
  is the root.
* **abandoned**: ``eval_started`` never closed (Hydra sends nothing when the
  evaluator is killed or times out); the root says so with status ERROR.

How times are rebuilt from what hydra-eval-jobset writes (integer seconds):
``evaluationerrors.errortime`` is taken right after nix-eval-jobs starts, i.e.
at the start of evaluation; ``jobsetevals.evaltime`` runs from there to the end
of the database transaction; ``checkouttime`` is the input fetch just before.
Older Hydras took ``timestamp`` at the end of evaluation and had no error row,
so without a usable ``errortime`` the evaluation is placed to end at
``timestamp``. Either way the result is a function of the rows alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hydra_otel.core import ids
from hydra_otel.core import semconv as sc
from hydra_otel.core.spans import (
    AttrValue,
    Kind,
    SpanEvent,
    SpanLink,
    SpanRecord,
    Status,
    attributes,
    seconds_ns,
    truncate,
)
from hydra_otel.core.status import span_status
from hydra_otel.core.vcs import EvalInput, clean_uri, main_input

#: Characters of an error's first line used as the span status message.
STATUS_MESSAGE_LIMIT = 256
#: ``hydra.eval.input`` events an evaluation root carries (jobsets have a handful of inputs).
MAX_INPUT_EVENTS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderConfig:
    """What span content depends on besides Hydra's rows."""

    instance: str
    hydra_url: str
    error_text_limit: int
    #: Builds an evaluation's trace holds; later ones get traces of their own (docs/spans.md).
    max_builds_per_trace: int = 1000
    #: Links an evaluation span carries to builds in their own traces, and to cached builds.
    max_links: int = 32
    #: Spans one trace may hold, split between its builds (core/budget.py, docs/spans.md).
    max_spans_per_trace: int = 6000


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalFacts:
    """One ``jobsetevals`` row with what it joins to."""

    eval_id: int
    jobset_id: int
    project: str
    jobset: str
    timestamp: int
    checkout_time: int | None
    eval_time: int | None
    has_new_builds: bool
    nr_builds: int | None
    hash: str | None
    flake: str | None
    nixexpr_input: str | None
    nixexpr_path: str | None
    error_msg: str | None
    error_time: int | None
    builds_new: int
    builds_cached_finished: int
    builds_cached_queued: int
    #: The first ``max_links`` new builds beyond the trace budget (they are in traces of their own).
    own_trace_build_ids: tuple[int, ...] = ()
    #: The first ``max_links`` cached builds, with the evaluation that created each.
    cached_builds: tuple[tuple[int, int], ...] = ()
    #: Its ``jobsetevalinputs`` rows by (name, alternative); empty when unreadable (docs/spans.md).
    inputs: tuple[EvalInput, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class JobsetFacts:
    """One ``jobsets`` row, as read when an attempt without JobsetEval row ended."""

    jobset_id: int
    project: str
    jobset: str
    error_msg: str | None
    error_time: int | None
    fetch_error_msg: str | None
    start_time: int | None
    last_checked: int | None = None


class AttemptKind(enum.Enum):
    """How an evaluation attempt without a JobsetEval row ended."""

    CACHED = "cached"
    FAILED = "failed"
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """The live facts of an attempt: what only the notifications know."""

    kind: AttemptKind
    jobset_id: int
    correlation_id: str
    started_ns: int | None
    ended_ns: int

    previous_eval_id: int | None = None
    abandon_reason: str | None = None


def eval_url(cfg: RenderConfig, eval_id: int) -> str:
    """Hydra's page for JobsetEval ``eval_id``."""
    return f"{cfg.hydra_url}/eval/{eval_id}"


def jobset_url(cfg: RenderConfig, project: str, jobset: str) -> str:
    """Hydra's page for a jobset."""
    return f"{cfg.hydra_url}/jobset/{project}/{jobset}"


def eval_times(f: EvalFacts) -> tuple[int, int, int]:
    """(checkout start, evaluation start, evaluation end) in Unix seconds."""
    eval_time = max(0, f.eval_time or 0)
    checkout_time = max(0, f.checkout_time or 0)
    if f.error_time is not None and f.timestamp - eval_time <= f.error_time <= f.timestamp:
        eval_start = f.error_time
    else:
        eval_start = f.timestamp - eval_time
    return eval_start - checkout_time, eval_start, eval_start + eval_time


def eval_spans(f: EvalFacts, cfg: RenderConfig) -> list[SpanRecord]:
    """Root, ``checkout`` and ``evaluate`` spans of an evaluation with a JobsetEval row."""
    key = ids.eval_trace(cfg.instance, f.eval_id)
    tid, root_id = ids.trace_id(key), ids.root_span_id(key)
    checkout_start, eval_start, eval_end = eval_times(f)
    root_end = max(eval_end, f.timestamp)
    events = _input_events(f, seconds_ns(eval_start))
    if f.error_msg:
        events += (_error_event("hydra.eval.job_errors", f.error_msg, seconds_ns(eval_end), cfg),)
    root = SpanRecord(
        trace_id=tid,
        span_id=root_id,
        parent_span_id=None,
        name=run_span_name(f.project, f.jobset),
        kind=Kind.SERVER,
        start_ns=seconds_ns(checkout_start),
        end_ns=seconds_ns(root_end),
        attributes=attributes(_eval_attributes(f, cfg)),
        status=Status.OK,
        events=events,
        links=_eval_links(f, cfg),
    )
    phases = [("checkout", checkout_start, eval_start), ("evaluate", eval_start, eval_end)]
    children = [
        SpanRecord(
            trace_id=tid,
            span_id=ids.span_id(key, name),
            parent_span_id=root_id,
            name=name,
            kind=Kind.INTERNAL,
            start_ns=seconds_ns(start),
            end_ns=seconds_ns(end),
            attributes=((sc.HYDRA_SPAN_TYPE, name), (sc.HYDRA_EVAL_ID, f.eval_id)),
        )
        for name, start, end in phases
    ]
    return [root, *children]


def run_span_name(project: str, jobset: str) -> str:
    """``{action} {pipeline}``, the conventions' name of a pipeline run span."""
    return f"{sc.ACTION_BUILD} {project}:{jobset}"


def _input_events(f: EvalFacts, at_ns: int) -> tuple[SpanEvent, ...]:
    """One ``hydra.eval.input`` event per input, at the end of checkout (when they were fetched)."""
    return tuple(
        SpanEvent(
            name=sc.HYDRA_EVAL_INPUT_EVENT,
            time_ns=at_ns,
            attributes=attributes(
                {
                    sc.HYDRA_EVAL_INPUT_NAME: i.name if i.alt_nr == 0 else f"{i.name}[{i.alt_nr}]",
                    sc.HYDRA_EVAL_INPUT_TYPE: i.type,
                    sc.HYDRA_EVAL_INPUT_URI: clean_uri(i.uri) if i.uri else None,
                    sc.HYDRA_EVAL_INPUT_REVISION: i.revision or None,
                }
            ),
        )
        for i in f.inputs[:MAX_INPUT_EVENTS]
    )


def _eval_attributes(f: EvalFacts, cfg: RenderConfig) -> dict[str, AttrValue | None]:
    main = main_input(f.flake, f.nixexpr_input, f.inputs)
    return {
        sc.HYDRA_SPAN_TYPE: "evaluation",
        sc.CICD_PIPELINE_NAME: f"{f.project}:{f.jobset}",
        sc.CICD_PIPELINE_ACTION_NAME: sc.ACTION_BUILD,
        sc.CICD_PIPELINE_RUN_ID: str(f.eval_id),
        sc.CICD_PIPELINE_RUN_URL_FULL: eval_url(cfg, f.eval_id),
        sc.CICD_PIPELINE_RESULT: sc.RESULT_SUCCESS,
        sc.VCS_REF_HEAD_REVISION: main.revision if main else None,
        sc.VCS_REPOSITORY_URL_FULL: main.url if main else None,
        sc.HYDRA_EVAL_MAIN_INPUT: main.source if main else None,
        sc.HYDRA_PROJECT: f.project,
        sc.HYDRA_JOBSET: f.jobset,
        sc.HYDRA_JOBSET_ID: f.jobset_id,
        sc.HYDRA_EVAL_ID: f.eval_id,
        sc.HYDRA_EVAL_HASH: f.hash,
        sc.HYDRA_EVAL_FLAKE: f.flake,
        sc.HYDRA_EVAL_NIXEXPR_INPUT: f.nixexpr_input,
        sc.HYDRA_EVAL_NIXEXPR_PATH: f.nixexpr_path,
        sc.HYDRA_EVAL_HAS_NEW_BUILDS: f.has_new_builds,
        sc.HYDRA_EVAL_BUILDS: f.nr_builds,
        sc.HYDRA_EVAL_BUILDS_NEW: f.builds_new,
        sc.HYDRA_EVAL_BUILDS_CACHED_FINISHED: f.builds_cached_finished,
        sc.HYDRA_EVAL_BUILDS_CACHED_QUEUED: f.builds_cached_queued,
        sc.HYDRA_EVAL_CHECKOUT_TIME: f.checkout_time,
        sc.HYDRA_EVAL_EVAL_TIME: f.eval_time,
        sc.HYDRA_EVAL_HAS_ERRORS: bool(f.error_msg),
        sc.HYDRA_EVAL_BUILDS_OWN_TRACES: max(0, f.builds_new - cfg.max_builds_per_trace),
    }


def _eval_links(f: EvalFacts, cfg: RenderConfig) -> tuple[SpanLink, ...]:
    """Bounded links to builds that live in other traces: beyond the budget, and cached ones."""
    links = []
    for build_id in f.own_trace_build_ids[: cfg.max_links]:
        key = ids.build_trace(cfg.instance, build_id)
        # Attempt 0: the evaluation links to the first run of each build.
        links.append(
            SpanLink(
                trace_id=ids.trace_id(key),
                span_id=ids.span_id(key, "build", build_id, 0),
                attributes=((sc.HYDRA_LINK_TYPE, "build_in_own_trace"), (sc.HYDRA_BUILD_ID, build_id)),
            )
        )
    for build_id, owner in f.cached_builds[: cfg.max_links]:
        key = ids.eval_trace(cfg.instance, owner)
        links.append(
            SpanLink(
                trace_id=ids.trace_id(key),
                span_id=ids.root_span_id(key),
                attributes=((sc.HYDRA_LINK_TYPE, "cached_build"), (sc.HYDRA_BUILD_ID, build_id)),
            )
        )
    return tuple(links)


def evaluator_run_span(
    cfg: RenderConfig, *, eval_id: int, jobset_id: int, correlation_id: str, started_ns: int, ended_ns: int
) -> SpanRecord:
    """The live ``evaluator run`` child of an added evaluation, from eval_started to eval_added."""
    key = ids.eval_trace(cfg.instance, eval_id)
    return SpanRecord(
        trace_id=ids.trace_id(key),
        span_id=ids.span_id(key, "evaluator-run", jobset_id, correlation_id),
        parent_span_id=ids.root_span_id(key),
        name="evaluator run",
        kind=Kind.INTERNAL,
        start_ns=started_ns,
        end_ns=max(started_ns, ended_ns),
        attributes=(
            (sc.HYDRA_SPAN_TYPE, "evaluator_run"),
            (sc.HYDRA_EVAL_ID, eval_id),
            (sc.HYDRA_EVAL_CORRELATION_ID, correlation_id),
        ),
    )


def attempt_span(a: Attempt, j: JobsetFacts, cfg: RenderConfig) -> SpanRecord:
    """The root span of a cached, failed or abandoned attempt (no JobsetEval row)."""
    key = ids.attempt_trace(cfg.instance, a.jobset_id, a.correlation_id)
    end_ns = _attempt_end(a, j)
    start_ns = _attempt_start(a, j, end_ns)
    attrs: dict[str, AttrValue | None] = {
        sc.HYDRA_SPAN_TYPE: "attempt",
        sc.CICD_PIPELINE_NAME: f"{j.project}:{j.jobset}",
        sc.CICD_PIPELINE_ACTION_NAME: sc.ACTION_BUILD,
        sc.CICD_PIPELINE_RUN_ID: a.correlation_id,
        # No page shows this run (Hydra kept no row): the jobset's page is not the run's URL.
        sc.HYDRA_JOBSET_URL: jobset_url(cfg, j.project, j.jobset),
        sc.HYDRA_PROJECT: j.project,
        sc.HYDRA_JOBSET: j.jobset,
        sc.HYDRA_JOBSET_ID: a.jobset_id,
        sc.HYDRA_EVAL_CORRELATION_ID: a.correlation_id,
        sc.HYDRA_EVAL_START_OBSERVED: a.started_ns is not None,
    }
    status, message = Status.OK, ""
    events: tuple[SpanEvent, ...] = ()
    links: tuple[SpanLink, ...] = ()
    if a.kind is AttemptKind.CACHED:
        attrs[sc.CICD_PIPELINE_RESULT] = sc.RESULT_SUCCESS
        attrs[sc.HYDRA_EVAL_INPUTS_UNCHANGED] = True
        attrs[sc.HYDRA_EVAL_PREVIOUS_ID] = a.previous_eval_id
        links = _previous_eval_link(a, cfg)
    else:
        result, error_type, text = _attempt_error(a, j)
        attrs.update({sc.CICD_PIPELINE_RESULT: result, sc.ERROR_TYPE: error_type})
        attrs[sc.HYDRA_EVAL_ABANDON_REASON] = a.abandon_reason
        status, message = span_status(result), truncate(text.strip().split("\n", 1)[0], STATUS_MESSAGE_LIMIT)
        events = (_exception_event(error_type, text, end_ns, cfg),)
    return SpanRecord(
        trace_id=ids.trace_id(key),
        span_id=ids.root_span_id(key),
        parent_span_id=None,
        name=run_span_name(j.project, j.jobset),
        kind=Kind.SERVER,
        start_ns=start_ns,
        end_ns=end_ns,
        attributes=attributes(attrs),
        status=status,
        status_message=message,
        events=events,
        links=links,
    )


def rebuilt_by_catchup(record: SpanRecord) -> bool:
    """Whether the catch-up renders ``record`` again, from Hydra's tables, if it is never acknowledged.

    Every span is, except the live-only ones: the ``evaluator run`` child (its times are when
    notifications arrived) and the roots of cached and abandoned attempts (they leave no row). A
    failed attempt comes again from its ``jobsets`` row (core/catchup.py: ``jobset_failures``), as
    an attempt of its ``lastcheckedtime``. This holds while the progress marks past ``record`` are
    not stored, which is what the exporter's ordering of commits guarantees (core/batching.py).
    """
    kind = result = None
    for key, value in record.attributes:
        if key == sc.HYDRA_SPAN_TYPE:
            kind = value
        elif key == sc.CICD_PIPELINE_RESULT:
            result = value
    if kind == "evaluator_run":
        return False
    return kind != "attempt" or result == sc.RESULT_FAILURE


def _attempt_end(a: Attempt, j: JobsetFacts) -> int:
    # An abandoned evaluation really ended when hydra-evaluator recorded the crash, if it did.
    if a.kind is AttemptKind.ABANDONED and _died_after_start(a, j) and j.error_time is not None:
        # errortime has one-second resolution: never let it end the span before its exact live start.
        return max(min(a.ended_ns, seconds_ns(j.error_time)), a.started_ns or 0)
    return a.ended_ns


def _attempt_start(a: Attempt, j: JobsetFacts, end_ns: int) -> int:
    if a.started_ns is not None:
        return min(a.started_ns, end_ns)
    # Not observed live: hydra-evaluator sets jobsets.starttime while the evaluator runs.
    if j.start_time is not None and seconds_ns(j.start_time) <= end_ns:
        return seconds_ns(j.start_time)
    return end_ns


def _died_after_start(a: Attempt, j: JobsetFacts) -> bool:
    """Did hydra-evaluator record an error for this attempt (after it started)?"""
    if not j.error_msg or j.error_time is None:
        return False
    return a.started_ns is None or seconds_ns(j.error_time + 1) >= a.started_ns


def _attempt_error(a: Attempt, j: JobsetFacts) -> tuple[str, str, str]:
    """(cicd result, error.type, error text) of a failed or abandoned attempt."""
    if a.kind is AttemptKind.FAILED:
        if j.fetch_error_msg:
            return sc.RESULT_FAILURE, "fetch_error", j.fetch_error_msg
        return sc.RESULT_FAILURE, "evaluation_error", j.error_msg or "evaluation failed (no error text)"
    if _died_after_start(a, j) and j.error_msg:
        return sc.RESULT_ERROR, "evaluator_died", j.error_msg
    reason = a.abandon_reason or "no closing notification"
    return sc.RESULT_TIMEOUT, "abandoned", f"evaluation abandoned: {reason}"


def _previous_eval_link(a: Attempt, cfg: RenderConfig) -> tuple[SpanLink, ...]:
    if a.previous_eval_id is None:
        return ()
    prev = ids.eval_trace(cfg.instance, a.previous_eval_id)
    return (
        SpanLink(
            trace_id=ids.trace_id(prev),
            span_id=ids.root_span_id(prev),
            attributes=attributes({sc.HYDRA_LINK_TYPE: "previous_evaluation"}),
        ),
    )


def _exception_event(error_type: str, text: str, at_ns: int, cfg: RenderConfig) -> SpanEvent:
    return SpanEvent(
        name="exception",
        time_ns=at_ns,
        attributes=(
            (sc.EXCEPTION_TYPE, error_type),
            (sc.EXCEPTION_MESSAGE, truncate(text, cfg.error_text_limit)),
        ),
    )


def _error_event(name: str, text: str, at_ns: int, cfg: RenderConfig) -> SpanEvent:
    return SpanEvent(
        name=name, time_ns=at_ns, attributes=((sc.EXCEPTION_MESSAGE, truncate(text, cfg.error_text_limit)),)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AddedEval:
    """The live facts of an attempt that ended with ``eval_added``."""

    eval_id: int
    jobset_id: int
    correlation_id: str
    started_ns: int | None
    ended_ns: int

    @classmethod
    def from_table(cls, eval_id: int, jobset_id: int) -> AddedEval:
        """An evaluation read from ``jobsetevals`` (catch-up, backfill), not announced live: no
        correlation ID and no start, so it gets no ``evaluator run`` span."""
        return cls(eval_id=eval_id, jobset_id=jobset_id, correlation_id="", started_ns=None, ended_ns=0)
