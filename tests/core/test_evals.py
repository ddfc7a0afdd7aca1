"""Evaluation spans rendered from Hydra's rows: times, IDs, attributes, statuses."""

from __future__ import annotations

import dataclasses

from hydra_otel.core import ids
from hydra_otel.core import semconv as sc
from hydra_otel.core.builds import build_spans
from hydra_otel.core.evals import (
    MAX_INPUT_EVENTS,
    Attempt,
    AttemptKind,
    EvalFacts,
    JobsetFacts,
    RenderConfig,
    attempt_span,
    eval_spans,
    eval_times,
    evaluator_run_span,
    rebuilt_by_catchup,
)
from hydra_otel.core.spans import Kind, Status
from hydra_otel.core.vcs import EvalInput
from tests.factories import RENDER_CONFIG, make_build, make_step

CFG = RenderConfig(instance="hydra", hydra_url="https://hydra.example.org", error_text_limit=100)
S = 1_000_000_000

FACTS = EvalFacts(
    eval_id=42,
    jobset_id=3,
    project="nixpkgs",
    jobset="trunk",
    timestamp=1_700_000_100,
    checkout_time=20,
    eval_time=150,
    has_new_builds=True,
    nr_builds=5,
    hash="abc",
    flake=None,
    nixexpr_input="nixpkgs",
    nixexpr_path="pkgs/top-level/release.nix",
    error_msg="",
    error_time=1_700_000_000,
    builds_new=3,
    builds_cached_finished=1,
    builds_cached_queued=1,
)
JOBSET = JobsetFacts(
    jobset_id=3,
    project="nixpkgs",
    jobset="trunk",
    error_msg="",
    error_time=1_699_999_000,
    fetch_error_msg=None,
    start_time=1_700_000_000,
)


def test_times_from_current_hydra_rows() -> None:
    """errortime marks the evaluation start; evaltime runs past the row's timestamp; checkout precedes."""
    assert eval_times(FACTS) == (1_699_999_980, 1_700_000_000, 1_700_000_150)


def test_times_without_usable_errortime_end_at_timestamp() -> None:
    """Older rows (no error row, or an errortime outside the window) end the evaluation at timestamp."""
    facts = dataclasses.replace(FACTS, error_time=None)
    assert eval_times(facts) == (1_700_000_100 - 150 - 20, 1_700_000_100 - 150, 1_700_000_100)


def test_eval_spans_tree_and_attributes() -> None:
    """Root (SERVER) plus checkout and evaluate children, in the eval's deterministic trace."""
    root, checkout, evaluate = eval_spans(FACTS, CFG)
    key = ids.eval_trace("hydra", 42)
    assert root.trace_id == checkout.trace_id == evaluate.trace_id == ids.trace_id(key)
    assert root.span_id == ids.root_span_id(key)
    assert root.parent_span_id is None
    assert checkout.parent_span_id == evaluate.parent_span_id == root.span_id
    assert (root.kind, checkout.kind) == (Kind.SERVER, Kind.INTERNAL)
    assert (root.start_ns, root.end_ns) == (1_699_999_980 * S, 1_700_000_150 * S)
    assert (checkout.start_ns, checkout.end_ns) == (1_699_999_980 * S, 1_700_000_000 * S)
    assert (evaluate.start_ns, evaluate.end_ns) == (1_700_000_000 * S, 1_700_000_150 * S)
    assert root.status is Status.OK
    a = root.attrs()
    assert a[sc.CICD_PIPELINE_NAME] == "nixpkgs:trunk"
    assert a[sc.CICD_PIPELINE_RUN_ID] == "42"
    assert a[sc.CICD_PIPELINE_RUN_URL_FULL] == "https://hydra.example.org/eval/42"
    assert a[sc.CICD_PIPELINE_RESULT] == "success"
    assert (a[sc.HYDRA_EVAL_BUILDS_NEW], a[sc.HYDRA_EVAL_BUILDS_CACHED_FINISHED]) == (3, 1)
    assert a[sc.HYDRA_EVAL_HASH] == "abc"
    assert sc.HYDRA_EVAL_FLAKE not in a
    assert a[sc.HYDRA_EVAL_HAS_ERRORS] is False
    assert root.events == ()


def test_eval_spans_are_a_pure_function_of_rows() -> None:
    """Rendering twice gives equal records (the basis of byte-identical re-export)."""
    assert eval_spans(FACTS, CFG) == eval_spans(dataclasses.replace(FACTS), CFG)


def test_job_errors_become_a_truncated_event() -> None:
    """Per-job evaluation errors keep the eval successful but are shown, truncated to the limit."""
    (root, *_) = eval_spans(dataclasses.replace(FACTS, error_msg="x" * 1000), CFG)
    assert root.attrs()[sc.HYDRA_EVAL_HAS_ERRORS] is True
    (event,) = root.events
    message = dict(event.attributes)[sc.EXCEPTION_MESSAGE]
    assert isinstance(message, str)
    assert len(message) <= 100
    assert message.endswith("more characters]")


def test_evaluator_run_lives_in_the_eval_trace() -> None:
    """The live child hangs under the eval's root with its notification times."""
    span = evaluator_run_span(CFG, eval_id=42, jobset_id=3, correlation_id="1.2", started_ns=10, ended_ns=20)
    key = ids.eval_trace("hydra", 42)
    assert (span.trace_id, span.parent_span_id) == (ids.trace_id(key), ids.root_span_id(key))
    assert (span.start_ns, span.end_ns, span.name) == (10, 20, "evaluator run")


def _attempt(kind: AttemptKind, **kw: object) -> Attempt:
    base: dict[str, object] = {
        "kind": kind,
        "jobset_id": 3,
        "correlation_id": "1.2",
        "started_ns": 1_700_000_000 * S,
        "ended_ns": 1_700_000_030 * S,
    }
    base.update(kw)
    return Attempt(**base)  # type: ignore[arg-type]


def test_cached_attempt_links_previous_eval() -> None:
    """eval_cached: a successful root in the attempt's trace, linked to the previous eval's root."""
    span = attempt_span(_attempt(AttemptKind.CACHED, previous_eval_id=41), JOBSET, CFG)
    key = ids.attempt_trace("hydra", 3, "1.2")
    assert (span.trace_id, span.span_id, span.parent_span_id) == (
        ids.trace_id(key),
        ids.root_span_id(key),
        None,
    )
    assert span.status is Status.OK
    assert span.attrs()[sc.HYDRA_EVAL_INPUTS_UNCHANGED] is True
    assert span.attrs()[sc.CICD_PIPELINE_RESULT] == "success"
    (link,) = span.links
    prev = ids.eval_trace("hydra", 41)
    assert (link.trace_id, link.span_id) == (ids.trace_id(prev), ids.root_span_id(prev))


def test_failed_fetch_uses_fetcherrormsg() -> None:
    """A fetch error is reported from jobsets.fetcherrormsg with error.type fetch_error."""
    jobset = dataclasses.replace(JOBSET, fetch_error_msg="cannot fetch input\nmore detail", error_msg="old")
    span = attempt_span(_attempt(AttemptKind.FAILED), jobset, CFG)
    assert span.status is Status.ERROR
    assert span.status_message == "cannot fetch input"
    assert span.attrs()[sc.ERROR_TYPE] == "fetch_error"
    assert span.attrs()[sc.CICD_PIPELINE_RESULT] == "failure"
    (event,) = span.events
    assert event.name == "exception"
    assert dict(event.attributes)[sc.EXCEPTION_MESSAGE] == "cannot fetch input\nmore detail"


def test_failed_evaluation_uses_errormsg() -> None:
    """Without a fetch error, jobsets.errormsg is the reason."""
    span = attempt_span(_attempt(AttemptKind.FAILED), dataclasses.replace(JOBSET, error_msg="boom"), CFG)
    assert span.attrs()[sc.ERROR_TYPE] == "evaluation_error"
    assert span.status_message == "boom"


def test_orphan_attempt_starts_at_jobset_starttime() -> None:
    """Without eval_started, the start comes from jobsets.starttime (set while the evaluator runs)."""
    span = attempt_span(_attempt(AttemptKind.FAILED, started_ns=None), JOBSET, CFG)
    assert span.start_ns == 1_700_000_000 * S
    assert span.attrs()[sc.HYDRA_EVAL_START_OBSERVED] is False


def test_orphan_attempt_without_starttime_is_instant() -> None:
    """With no start known at all, the span is zero-length at the closing notification."""
    span = attempt_span(
        _attempt(AttemptKind.CACHED, started_ns=None), dataclasses.replace(JOBSET, start_time=None), CFG
    )
    assert span.start_ns == span.end_ns == 1_700_000_030 * S


def test_abandoned_uses_evaluator_crash_record() -> None:
    """If hydra-evaluator recorded a crash after the start, that is the reason and the end time."""
    jobset = dataclasses.replace(
        JOBSET, error_msg="evaluation failed with exit code 1", error_time=1_700_000_010
    )
    span = attempt_span(
        _attempt(AttemptKind.ABANDONED, abandon_reason="x", ended_ns=1_700_009_000 * S), jobset, CFG
    )
    assert span.end_ns == 1_700_000_010 * S
    assert span.attrs()[sc.ERROR_TYPE] == "evaluator_died"
    assert span.attrs()[sc.CICD_PIPELINE_RESULT] == "error"
    assert span.status_message == "evaluation failed with exit code 1"


def test_abandoned_without_record_is_a_timeout() -> None:
    """With no crash record newer than the start, the attempt is reported abandoned at the limit."""
    span = attempt_span(
        _attempt(AttemptKind.ABANDONED, abandon_reason="no closing notification before the abandon limit"),
        JOBSET,
        CFG,
    )
    assert span.status is Status.ERROR
    assert span.attrs()[sc.ERROR_TYPE] == "abandoned"
    assert span.attrs()[sc.CICD_PIPELINE_RESULT] == "timeout"
    assert span.end_ns == 1_700_000_030 * S


def test_abandoned_end_never_precedes_live_start() -> None:
    """A crash record in the same second as the live start cannot end the span before it began."""
    start_ns = 1_700_000_010 * S + 700_000_000
    jobset = dataclasses.replace(JOBSET, error_msg="killed by signal 9", error_time=1_700_000_010)
    span = attempt_span(
        _attempt(AttemptKind.ABANDONED, started_ns=start_ns, ended_ns=1_700_000_500 * S), jobset, CFG
    )
    assert span.start_ns == span.end_ns == start_ns


# --- revisions, action and run URL -------------------------------------------------------------

REV = "0123456789abcdef0123456789abcdef01234567"
INPUTS = (
    EvalInput(
        name="nixpkgs", alt_nr=0, type="git", uri="https://tok:en@github.com/NixOS/nixpkgs.git", revision=REV
    ),
    EvalInput(
        name="nixpkgs", alt_nr=1, type="git", uri="https://github.com/NixOS/nixpkgs", revision="f" * 40
    ),
    EvalInput(name="officialRelease", alt_nr=0, type="boolean", uri=None, revision=None),
)


def test_eval_root_carries_main_input_revision_and_input_events() -> None:
    """The nixexpr input gives vcs.*; each input is an event at the end of checkout, without credentials."""
    root, *_ = eval_spans(dataclasses.replace(FACTS, inputs=INPUTS), CFG)
    a = root.attrs()
    assert (a[sc.VCS_REF_HEAD_REVISION], a[sc.VCS_REPOSITORY_URL_FULL]) == (
        REV,
        "https://github.com/NixOS/nixpkgs",
    )
    assert (a[sc.HYDRA_EVAL_MAIN_INPUT], a[sc.CICD_PIPELINE_ACTION_NAME]) == ("nixpkgs", "BUILD")
    assert root.name == "BUILD nixpkgs:trunk"
    events = [e for e in root.events if e.name == sc.HYDRA_EVAL_INPUT_EVENT]
    assert {e.time_ns for e in events} == {1_700_000_000 * S}  # end of checkout
    assert [dict(e.attributes) for e in events] == [
        {"hydra.eval.input.name": "nixpkgs", "hydra.eval.input.type": "git",
         "hydra.eval.input.uri": "https://github.com/NixOS/nixpkgs.git", "hydra.eval.input.revision": REV},
        {"hydra.eval.input.name": "nixpkgs[1]", "hydra.eval.input.type": "git",
         "hydra.eval.input.uri": "https://github.com/NixOS/nixpkgs", "hydra.eval.input.revision": "f" * 40},
        {"hydra.eval.input.name": "officialRelease", "hydra.eval.input.type": "boolean"},
    ]  # fmt: skip


def test_eval_without_inputs_has_no_revision() -> None:
    """Inputs unreadable (or none): no vcs.* and no input events; the span is otherwise the same."""
    root, *_ = eval_spans(FACTS, CFG)
    assert not {sc.VCS_REF_HEAD_REVISION, sc.VCS_REPOSITORY_URL_FULL, sc.HYDRA_EVAL_MAIN_INPUT} & set(
        root.attrs()
    )
    assert [e.name for e in root.events] == []


def test_input_events_are_bounded() -> None:
    many = tuple(
        EvalInput(name=f"i{n}", alt_nr=0, type="string", uri=None, revision=None) for n in range(100)
    )
    root, *_ = eval_spans(dataclasses.replace(FACTS, inputs=many), CFG)
    assert len(root.events) == MAX_INPUT_EVENTS


def test_attempt_has_no_run_url_but_its_jobset_page() -> None:
    """A cached attempt has no page of its own: the jobset's page is hydra.jobset.url, not the run URL."""
    attempt = Attempt(
        kind=AttemptKind.CACHED,
        jobset_id=3,
        correlation_id="1.2",
        started_ns=0,
        ended_ns=S,
        previous_eval_id=41,
    )
    a = attempt_span(attempt, JOBSET, CFG).attrs()
    assert sc.CICD_PIPELINE_RUN_URL_FULL not in a
    assert a[sc.HYDRA_JOBSET_URL] == "https://hydra.example.org/jobset/nixpkgs/trunk"
    assert a[sc.CICD_PIPELINE_ACTION_NAME] == "BUILD"


def test_only_live_only_spans_are_not_rebuilt_by_catchup() -> None:
    """Spans from rows, and failed attempts (their jobsets row), come again; the live-only ones do not."""
    from_rows = [*eval_spans(FACTS, CFG), *build_spans(RENDER_CONFIG, make_build(), [make_step()])]
    failed = attempt_span(_attempt(AttemptKind.FAILED), dataclasses.replace(JOBSET, error_msg="boom"), CFG)
    assert all(rebuilt_by_catchup(s) for s in [*from_rows, failed])
    live_only = [
        evaluator_run_span(CFG, eval_id=42, jobset_id=3, correlation_id="1.2", started_ns=10, ended_ns=20),
        attempt_span(_attempt(AttemptKind.CACHED, previous_eval_id=41), JOBSET, CFG),
        attempt_span(_attempt(AttemptKind.ABANDONED), JOBSET, CFG),
        attempt_span(_attempt(AttemptKind.ABANDONED), dataclasses.replace(JOBSET, error_msg="died"), CFG),
    ]
    assert not any(rebuilt_by_catchup(s) for s in live_only)
