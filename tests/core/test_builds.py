"""Build and step spans rendered from Hydra's rows: placement, attempts, times, attributes, links.

Also the status table (core/status.py, printed in docs/spans.md) and the duplicate filter (core/dedup.py).
The rows below follow what Hydra's queue runner writes: a build's
``stoptime`` is its top-level step's, propagated steps have NULL times, step numbers keep increasing
across restarts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hydra_otel.core import ids
from hydra_otel.core import semconv as sc
from hydra_otel.core.builds import (
    _STORE_NAME,
    Cause,
    Placement,
    StepFacts,
    attempt_at,
    build_attempt,
    build_span_id,
    build_spans,
    derivation_name,
    placement,
    propagated_from,
    step_attempt,
    step_span,
)
from hydra_otel.core.dedup import RecentSpans
from hydra_otel.core.evals import EvalFacts, RenderConfig, eval_spans
from hydra_otel.core.spans import Kind, SpanLink, SpanRecord, Status
from hydra_otel.core.status import STATUSES, StatusInfo, status_info
from tests.factories import make_build, make_step

CFG = RenderConfig(
    instance="hydra",
    hydra_url="https://hydra.example.org",
    error_text_limit=100,
    max_builds_per_trace=1000,
    max_links=2,
)
S = 1_000_000_000
T0 = 1_700_000_000

HASH = "0c9x2f6vxg3lnp6j7x6ia1sc3x6i8j5m"
DRV = f"/nix/store/{HASH}-hello-2.12.drv"
DEP = f"/nix/store/{'1' * 32}-glibc-2.40.drv"
APP = f"/nix/store/{'2' * 32}-app-1.0.drv"
RESOLVED = f"/nix/store/{'3' * 32}-hello-2.12.drv"

EVAL_KEY = ids.eval_trace("hydra", 42)
EVAL_TRACE = ids.trace_id(EVAL_KEY)
EVAL_ROOT = ids.root_span_id(EVAL_KEY)

BUILD = make_build(drvpath=DRV)

# The top-level step: it builds the build's own derivation.
TOP = make_step(
    stepnr=2, drvpath=DRV, machine="ssh://builder1", overhead_ms=1_234, times_built=1, nondeterministic=False
)
# A dependency fetched from a binary cache on the local machine ("" in buildsteps.machine).
SUBST = TOP._replace(
    stepnr=1, type=1, drvpath=DEP, starttime=T0 + 60, stoptime=T0 + 70, machine="", overhead_ms=None
)


EVAL = EvalFacts(
    eval_id=42,
    jobset_id=3,
    project="nixpkgs",
    jobset="trunk",
    timestamp=T0,
    checkout_time=20,
    eval_time=150,
    has_new_builds=True,
    nr_builds=5,
    hash="abc",
    flake=None,
    nixexpr_input="nixpkgs",
    nixexpr_path="pkgs/top-level/release.nix",
    error_msg="",
    error_time=None,
    builds_new=3,
    builds_cached_finished=1,
    builds_cached_queued=0,
)


def _ids(span: SpanRecord) -> tuple[int, int, int | None]:
    return span.trace_id, span.span_id, span.parent_span_id


def _step_nrs(spans: list[SpanRecord]) -> list[object]:
    return [s.attrs()[sc.HYDRA_STEP_NR] for s in spans if sc.HYDRA_STEP_NR in s.attrs()]


# --- derivation_name -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (DRV, "hello-2.12"),
        (f"/nix/store/{HASH}-hello-2.12", "hello-2.12"),
        (f"/nix/store/{HASH}-hello-2.12-dev", "hello-2.12-dev"),
        (f"{HASH}-hello-2.12.drv", "hello-2.12"),
        (f"/gnu/store/{HASH}-hello-2.12.drv", "hello-2.12"),
        (f"/nix/store/{HASH}-foo.drv.drv", "foo.drv"),
        (None, "unknown"),
        ("", "unknown"),
        ("/tmp/not-a-store-path.drv", "not-a-store-path.drv"),
        ("hello.drv", "hello.drv"),
        (f"/nix/store/{HASH[:31]}-short-hash.drv", f"{HASH[:31]}-short-hash.drv"),
        (f"/nix/store/{HASH.upper()}-upper.drv", f"{HASH.upper()}-upper.drv"),
    ],
)
def test_derivation_name(path: str | None, name: str) -> None:
    """Store paths lose directory, hash and one .drv suffix; anything else keeps its base name."""
    assert derivation_name(path) == name


@pytest.mark.parametrize(
    "path",
    [
        f"/nix/store/{HASH}-.drv",
        f"/nix/store/{HASH}-x.drv",
        f"/nix/store/{HASH}-",
        f"/nix/store/{HASH}-hello.drv\n",
        f"/nix/store/{HASH}-a\nb.drv",
        f"/nix/{HASH}-foo/bar",
        f"/nix/store/{HASH}-foo/{HASH}-bar.drv",
        f"/nix/store/{HASH}0-long.drv",
        f"/nix/store/{HASH}-é.drv",
        f"{HASH}-",
    ],
)
def test_derivation_name_agrees_with_the_pattern(path: str) -> None:
    """The string-method fast path gives what the store-path pattern gives, on edge cases too."""
    m = _STORE_NAME.match(path)
    assert derivation_name.__wrapped__(path) == (m.group("name") if m else path.rsplit("/", 1)[-1])


# --- placement -------------------------------------------------------------------------------


def test_build_in_eval_trace_hangs_under_the_eval_root() -> None:
    """Within the budget, a build lives in its evaluation's trace under the root span."""
    assert placement(CFG, BUILD) == Placement(EVAL_KEY, EVAL_ROOT, False)
    assert build_span_id(CFG, BUILD, 0) == (EVAL_TRACE, ids.span_id(EVAL_KEY, "build", 100, 0))


def test_build_beyond_budget_is_a_linked_root() -> None:
    """Beyond the budget, a build roots its own trace and links back to the evaluation's root."""
    b = BUILD._replace(in_eval_trace=False)
    key = ids.build_trace("hydra", 100)
    assert placement(CFG, b) == Placement(key, None, True)
    root, _, *steps = build_spans(CFG, b, [SUBST, TOP])
    assert _ids(root) == (ids.trace_id(key), ids.span_id(key, "build", 100, 0), None)
    assert root.links == (
        SpanLink(trace_id=EVAL_TRACE, span_id=EVAL_ROOT, attributes=((sc.HYDRA_LINK_TYPE, "evaluation"),)),
    )
    assert root.attrs()[sc.HYDRA_BUILD_OWN_TRACE] is True
    assert root.attrs()[sc.HYDRA_EVAL_ID] == 42
    assert {s.trace_id for s in steps} == {ids.trace_id(key)}
    assert {s.parent_span_id for s in steps} == {root.span_id}


def test_build_without_eval_is_an_unlinked_root() -> None:
    """A build no evaluation contains roots its own trace, with no link and no eval ID."""
    b = BUILD._replace(eval_id=None)
    key = ids.build_trace("hydra", 100)
    assert placement(CFG, b) == Placement(key, None, True)
    (root, *_) = build_spans(CFG, b, [SUBST, TOP])
    assert (root.trace_id, root.parent_span_id, root.links) == (ids.trace_id(key), None, ())
    assert sc.HYDRA_EVAL_ID not in root.attrs()
    assert root.attrs()[sc.HYDRA_BUILD_OWN_TRACE] is True


# --- attempts --------------------------------------------------------------------------------


def test_first_attempt_is_zero() -> None:
    """A build that finished once, and each of its steps, belong to attempt 0."""
    steps = [SUBST, TOP]
    assert build_attempt(BUILD, steps) == 0
    assert [step_attempt(BUILD, steps, s.stepnr) for s in steps] == [0, 0]


# Attempt 0 failed at T0+100; the build was restarted and built again from T0+1000 to T0+1200.
FAILED_TOP = TOP._replace(status=1, starttime=T0 + 80, stoptime=T0 + 100)
RERUN_DEP = SUBST._replace(stepnr=3, starttime=T0 + 1000, stoptime=T0 + 1010)
RERUN_TOP = TOP._replace(stepnr=4, starttime=T0 + 1020, stoptime=T0 + 1200)
RESTARTED = BUILD._replace(starttime=T0 + 1020, stoptime=T0 + 1200)
RESTARTED_STEPS = [SUBST, FAILED_TOP, RERUN_DEP, RERUN_TOP]


def test_restart_starts_attempt_one() -> None:
    """After a finished top-level step, later steps and the next finish belong to attempt 1."""
    assert [step_attempt(RESTARTED, RESTARTED_STEPS, s.stepnr) for s in RESTARTED_STEPS] == [0, 0, 1, 1]
    assert build_attempt(RESTARTED, RESTARTED_STEPS) == 1


def test_propagated_step_of_own_derivation_does_not_end_an_attempt() -> None:
    """A propagated failure row for the build's own derivation is not a top-level step."""
    propagated = FAILED_TOP._replace(stepnr=1, propagated_from=7, starttime=None, stoptime=T0 + 100)
    steps = [propagated, TOP._replace(stepnr=2)]
    assert step_attempt(BUILD, steps, 2) == 0
    assert build_attempt(BUILD, steps) == 0


def test_dependency_steps_do_not_end_an_attempt() -> None:
    """Finished steps of other derivations never count, however many precede the build's finish."""
    deps = [SUBST._replace(stepnr=n, type=0, starttime=T0 + n, stoptime=T0 + n) for n in (1, 2, 3)]
    steps = [*deps, TOP._replace(stepnr=4)]
    assert [step_attempt(BUILD, steps, n) for n in (1, 2, 3, 4)] == [0, 0, 0, 0]
    assert build_attempt(BUILD, steps) == 0


def test_running_top_level_step_does_not_end_an_attempt() -> None:
    """A top-level step still running (status NULL) has not ended its attempt."""
    running = TOP._replace(stepnr=1, status=None, stoptime=None)
    later = SUBST._replace(stepnr=2)
    assert step_attempt(BUILD, [running, later], 2) == 0
    assert build_attempt(BUILD, [running, later]) == 0


# --- build_spans -----------------------------------------------------------------------------


def test_successful_build_spans() -> None:
    """A build with two steps: the build span, its queued wait, and both steps, with exact values."""
    build, queued, subst, top = build_spans(CFG, BUILD, [SUBST, TOP])
    build_id = ids.span_id(EVAL_KEY, "build", 100, 0)
    assert _ids(build) == (EVAL_TRACE, build_id, EVAL_ROOT)
    assert (build.name, build.kind, build.status, build.status_message) == (
        "build hello.x86_64-linux",
        Kind.INTERNAL,
        Status.OK,
        "",
    )
    assert (build.start_ns, build.end_ns) == (T0 * S, (T0 + 300) * S)
    assert build.links == ()
    assert build.attrs() == {
        sc.HYDRA_SPAN_TYPE: "build",
        sc.CICD_PIPELINE_NAME: "nixpkgs:trunk",
        sc.CICD_PIPELINE_TASK_NAME: "hello.x86_64-linux",
        sc.CICD_PIPELINE_TASK_RUN_ID: "100",
        sc.CICD_PIPELINE_TASK_RUN_URL_FULL: "https://hydra.example.org/build/100",
        sc.CICD_PIPELINE_TASK_RUN_RESULT: "success",
        sc.HYDRA_PROJECT: "nixpkgs",
        sc.HYDRA_JOBSET: "trunk",
        sc.HYDRA_EVAL_ID: 42,
        sc.HYDRA_BUILD_ID: 100,
        sc.HYDRA_BUILD_JOB: "hello.x86_64-linux",
        sc.HYDRA_BUILD_SYSTEM: "x86_64-linux",
        sc.HYDRA_BUILD_NIXNAME: "hello-2.12",
        sc.HYDRA_BUILD_DRV_PATH: DRV,
        sc.HYDRA_BUILD_STATUS: 0,
        sc.HYDRA_BUILD_STATUS_NAME: "succeeded",
        sc.HYDRA_BUILD_CACHED: False,
        sc.HYDRA_BUILD_PRIORITY: 100,
        sc.HYDRA_BUILD_GLOBAL_PRIORITY: 0,
        sc.HYDRA_BUILD_SIZE: 1_000,
        sc.HYDRA_BUILD_CLOSURE_SIZE: 5_000,
        sc.HYDRA_BUILD_ATTEMPT: 0,
    }

    assert _ids(queued) == (EVAL_TRACE, ids.span_id(EVAL_KEY, "queued", 100, 0), build_id)
    assert (queued.name, queued.start_ns, queued.end_ns) == ("queued", T0 * S, (T0 + 60) * S)
    assert queued.attributes == ((sc.HYDRA_SPAN_TYPE, "queued"), (sc.HYDRA_BUILD_ID, 100))

    assert _ids(subst) == (EVAL_TRACE, ids.span_id(EVAL_KEY, "step", 100, 1), build_id)
    assert (subst.name, subst.start_ns, subst.end_ns) == (
        "substitute glibc-2.40",
        (T0 + 60) * S,
        (T0 + 70) * S,
    )
    assert subst.attrs()[sc.CICD_WORKER_NAME] == "localhost"
    assert subst.attrs()[sc.HYDRA_STEP_TYPE] == "substitution"

    assert _ids(top) == (EVAL_TRACE, ids.span_id(EVAL_KEY, "step", 100, 2), build_id)
    assert (top.name, top.kind, top.status) == ("step hello-2.12", Kind.INTERNAL, Status.OK)
    assert (top.start_ns, top.end_ns) == ((T0 + 80) * S, (T0 + 300) * S)
    assert top.attrs() == {
        sc.HYDRA_SPAN_TYPE: "step",
        sc.CICD_WORKER_ID: "ssh://builder1",
        sc.CICD_WORKER_NAME: "ssh://builder1",
        sc.CICD_PIPELINE_TASK_RUN_RESULT: "success",
        sc.HYDRA_BUILD_ID: 100,
        sc.HYDRA_STEP_NR: 2,
        sc.HYDRA_STEP_TYPE: "build",
        sc.HYDRA_BUILD_SYSTEM: "x86_64-linux",
        sc.HYDRA_BUILD_DRV_PATH: DRV,
        sc.HYDRA_STEP_STATUS: 0,
        sc.HYDRA_STEP_STATUS_NAME: "succeeded",
        sc.HYDRA_STEP_OVERHEAD_MS: 1_234,
        sc.HYDRA_STEP_TIMES_BUILT: 1,
        sc.HYDRA_STEP_NONDETERMINISTIC: False,
        sc.HYDRA_STEP_LOG_URL: "https://hydra.example.org/build/100/nixlog/2",
    }


def test_failed_build_spans() -> None:
    """A failed build and step are errors named after Hydra's status, with the error text truncated."""
    text = "builder for '/nix/store/...-hello-2.12.drv' failed with exit code 1\n" + "x" * 200
    b = BUILD._replace(status=1)
    top = TOP._replace(status=1, errormsg=text)
    build, _, _, step = build_spans(CFG, b, [SUBST, top])
    assert (build.status, build.status_message) == (Status.ERROR, "failed")
    assert build.attrs()[sc.ERROR_TYPE] == "build_failed"
    assert build.attrs()[sc.CICD_PIPELINE_TASK_RUN_RESULT] == "failure"
    assert build.attrs()[sc.HYDRA_BUILD_STATUS_NAME] == "failed"
    assert step.status is Status.ERROR
    assert step.status_message == "builder for '/nix/store/...-hello-2.12.drv' failed with exit code 1"
    assert step.attrs()[sc.ERROR_TYPE] == "build_failed"
    error = step.attrs()[sc.HYDRA_STEP_ERROR]
    assert isinstance(error, str)
    assert len(error) <= 100
    assert error.startswith("builder for")
    assert error.endswith("more characters]")


def test_dependency_failed_build_links_its_cause() -> None:
    """A dependent's propagated step (NULL times) sits at the build's stop time; the build links its cause."""
    dependent = BUILD._replace(
        build_id=101,
        job="app.x86_64-linux",
        nixname="app-1.0",
        drvpath=APP,
        timestamp=T0 + 5,
        status=2,
    )
    propagated = FAILED_TOP._replace(
        build_id=101, stepnr=1, starttime=None, stoptime=None, machine="", propagated_from=100
    )
    assert propagated_from(dependent, [propagated]) == 100
    assert propagated_from(BUILD, [SUBST, TOP]) is None
    cause = Cause(100, *build_span_id(CFG, BUILD, 0))
    build, step = build_spans(CFG, dependent, [propagated], cause)
    assert (build.start_ns, build.end_ns) == ((T0 + 5) * S, (T0 + 300) * S)
    assert (build.status, build.status_message) == (Status.ERROR, "dependency failed")
    assert build.attrs()[sc.ERROR_TYPE] == "dependency_failed"
    assert build.links == (
        SpanLink(
            trace_id=EVAL_TRACE,
            span_id=ids.span_id(EVAL_KEY, "build", 100, 0),
            attributes=((sc.HYDRA_LINK_TYPE, "caused_by"), (sc.HYDRA_BUILD_ID, 100)),
        ),
    )
    assert (step.start_ns, step.end_ns) == ((T0 + 300) * S, (T0 + 300) * S)
    assert step.parent_span_id == build.span_id
    assert step.attrs()[sc.HYDRA_STEP_PROPAGATED_FROM] == 100
    assert step.name == "step hello-2.12"


def test_cause_attempt_is_the_one_that_failed_then() -> None:
    """A dependent finished with the failure's stop time names that attempt of its cause, even after the
    cause was restarted and finished again."""
    failed_then = FAILED_TOP.stoptime
    assert failed_then is not None
    assert attempt_at(RESTARTED, RESTARTED_STEPS, failed_then) == 0
    assert build_attempt(RESTARTED, RESTARTED_STEPS) == 1


def test_cached_build_is_a_single_span() -> None:
    """A build finished by another build's step has no steps, hence no queued span."""
    b = BUILD._replace(cached=True, starttime=T0 + 300)
    (build,) = build_spans(CFG, b, [])
    assert (build.start_ns, build.end_ns) == (T0 * S, (T0 + 300) * S)
    assert build.attrs()[sc.HYDRA_BUILD_CACHED] is True
    assert build.status is Status.OK


def test_restarted_build_renders_its_latest_attempt_then_the_earlier_one() -> None:
    """The second finish is a new span in the same trace, starting at the attempt's first step; the first
    attempt comes again, rebuilt from its steps, equal to its rendering when the row held it."""
    failed = BUILD._replace(status=1, stoptime=T0 + 100, size=None, closure_size=None)
    first = build_spans(CFG, failed, [SUBST, FAILED_TOP])
    second = build_spans(CFG, RESTARTED, RESTARTED_STEPS)
    assert first[0].attrs()[sc.HYDRA_BUILD_ATTEMPT] == 0
    assert second[0].attrs()[sc.HYDRA_BUILD_ATTEMPT] == 1
    assert first[0].trace_id == second[0].trace_id == EVAL_TRACE
    assert second[0].span_id == ids.span_id(EVAL_KEY, "build", 100, 1) != first[0].span_id
    assert second[0].parent_span_id == EVAL_ROOT
    assert (second[0].start_ns, second[0].end_ns) == ((T0 + 1000) * S, (T0 + 1200) * S)
    assert [s.name for s in second[:3]] == [
        "build hello.x86_64-linux",
        "substitute glibc-2.40",
        "step hello-2.12",
    ]
    assert _step_nrs(second[:3]) == [3, 4]
    assert {s.parent_span_id for s in second[1:3]} == {second[0].span_id}
    assert _step_nrs(first) == [1, 2]
    assert second[3:] == first


def test_build_without_a_recorded_finish_is_refused() -> None:
    """Rendering a build that never finished (no stop time) is a caller error."""
    with pytest.raises(ValueError, match="build 100 has no recorded finish"):
        build_spans(CFG, BUILD._replace(stoptime=None), [SUBST, TOP])


def test_restarted_build_renders_its_last_finish() -> None:
    """A build restarted after build_finished (finished = 0, old values kept) renders that finish, identically."""
    restarted = BUILD._replace(finished=False)
    assert build_spans(CFG, restarted, [SUBST, TOP]) == build_spans(CFG, BUILD, [SUBST, TOP])


def test_build_spans_are_a_pure_function_of_rows() -> None:
    """Rendering twice, from copies or rows in another order, gives equal records with equal reprs."""
    once = build_spans(CFG, BUILD, [SUBST, TOP])
    again = build_spans(CFG, BUILD._replace(), [TOP, SUBST._replace()])
    assert once == again
    assert repr(once).encode() == repr(again).encode()
    assert [hash(r) for r in once] == [hash(r) for r in again]


def test_live_step_span_equals_the_one_rendered_with_its_build() -> None:
    """A step rendered at step_finished (build not finished yet) equals its rendering with the build."""
    running = BUILD._replace(finished=False, starttime=None, stoptime=None, status=None)
    live = step_span(CFG, running, TOP, step_attempt(running, [SUBST, TOP], TOP.stepnr))
    assert live == build_spans(CFG, BUILD, [SUBST, TOP])[-1]


# --- known bugs ------------------------------------------------------------------------------

# Each case is a build that finished exactly once, with step rows as Hydra's current queue runner
# writes them. All are attempt 0: the eval root's links point at attempt 0 and live step spans
# name the attempt-0 build span as their parent.
FINISHED_ONCE = {
    # A transient failure (e.g. the builder's connection dropped) is recorded on the top-level step
    # with status 3 (aborted) and retried; so is a step cleared by clear_busy at queue-runner start.
    "retried-aborted-step": [
        TOP._replace(stepnr=1, status=3, starttime=T0 + 60, stoptime=T0 + 70),
        TOP,
    ],
    # A content-addressed derivation: the top-level step is written as resolved (status 13) and the
    # resolved derivation is then built under its own drv path.
    "resolved-ca-step": [
        TOP._replace(stepnr=1, status=13, starttime=T0 + 60, stoptime=T0 + 60, resolved_drv_path=RESOLVED),
        TOP._replace(drvpath=RESOLVED),
    ],
    # A multi-output derivation fetched from the cache: one substitution step per output.
    "substituted-outputs": [
        TOP._replace(stepnr=1, type=1, starttime=T0 + 299, machine=""),
        TOP._replace(stepnr=2, type=1, starttime=T0 + 299, machine=""),
    ],
    # The substitution step's stop time and the build's (handle_cached_build's own `now`) can differ.
    "substituted-a-second-earlier": [
        TOP._replace(stepnr=1, type=1, starttime=T0 + 298, stoptime=T0 + 299, machine=""),
    ],
}


@pytest.mark.parametrize("steps", list(FINISHED_ONCE.values()), ids=list(FINISHED_ONCE))
def test_build_that_finished_once_is_attempt_zero(steps: list[StepFacts]) -> None:
    """A build that finished once renders as attempt 0 with all of its steps."""
    spans = build_spans(CFG, BUILD, steps)
    assert spans[0].attrs()[sc.HYDRA_BUILD_ATTEMPT] == 0
    assert _step_nrs(spans) == [s.stepnr for s in steps]


def test_restart_after_untimed_top_level_step_keeps_steps_and_build_together() -> None:
    """The attempt of a restarted build's finish and of its new steps agree."""
    unsupported = TOP._replace(stepnr=1, status=9, starttime=None, stoptime=None, machine="")
    rerun = TOP._replace(stepnr=2, starttime=T0 + 1000, stoptime=T0 + 1200)
    b = BUILD._replace(stoptime=T0 + 1200)
    steps = [unsupported, rerun]
    assert build_attempt(b, steps) == step_attempt(b, steps, 2)
    assert 2 in _step_nrs(build_spans(CFG, b, steps))


def test_later_attempt_without_steps_starts_after_the_previous_one() -> None:
    """A restarted build finished as cached does not begin before its previous attempt ended."""
    b = BUILD._replace(cached=True, starttime=T0 + 1000, stoptime=T0 + 1000)
    build = build_spans(CFG, b, [SUBST, FAILED_TOP])[0]
    assert build.attrs()[sc.HYDRA_BUILD_ATTEMPT] == 1
    assert build.start_ns >= (T0 + 100) * S


# --- evaluation links ------------------------------------------------------------------------


def test_eval_root_links_builds_in_other_traces() -> None:
    """The eval root links (at most max_links of each kind) to builds in own traces and to cached builds' owners."""
    cfg = dataclasses.replace(CFG, max_builds_per_trace=1000)
    facts = dataclasses.replace(
        EVAL, builds_new=1003, own_trace_build_ids=(7, 8, 9), cached_builds=((5, 40), (6, 41), (4, 39))
    )
    (root, *_) = eval_spans(facts, cfg)
    expected = []
    for build_id in (7, 8):
        key = ids.build_trace("hydra", build_id)
        expected.append(
            SpanLink(
                trace_id=ids.trace_id(key),
                span_id=ids.span_id(key, "build", build_id, 0),
                attributes=((sc.HYDRA_LINK_TYPE, "build_in_own_trace"), (sc.HYDRA_BUILD_ID, build_id)),
            )
        )
    for build_id, owner in ((5, 40), (6, 41)):
        key = ids.eval_trace("hydra", owner)
        expected.append(
            SpanLink(
                trace_id=ids.trace_id(key),
                span_id=ids.root_span_id(key),
                attributes=((sc.HYDRA_LINK_TYPE, "cached_build"), (sc.HYDRA_BUILD_ID, build_id)),
            )
        )
    assert root.links == tuple(expected)
    assert root.attrs()[sc.HYDRA_EVAL_BUILDS_OWN_TRACES] == 3


def test_eval_link_targets_the_span_the_build_renders() -> None:
    """The eval root's link to a build beyond the budget is that build's first span, and vice versa."""
    facts = dataclasses.replace(EVAL, builds_new=1001, own_trace_build_ids=(100,))
    (root, *_) = eval_spans(facts, CFG)
    (build, *_) = build_spans(CFG, BUILD._replace(in_eval_trace=False), [SUBST, TOP])
    assert (root.links[0].trace_id, root.links[0].span_id) == (build.trace_id, build.span_id)
    assert (build.links[0].trace_id, build.links[0].span_id) == (root.trace_id, root.span_id)


@pytest.mark.parametrize(("builds_new", "own"), [(0, 0), (999, 0), (1000, 0), (1001, 1), (80_000, 79_000)])
def test_own_traces_count(builds_new: int, own: int) -> None:
    """hydra.eval.builds.own_traces is the number of new builds beyond the budget, never negative."""
    (root, *_) = eval_spans(dataclasses.replace(EVAL, builds_new=builds_new), CFG)
    assert root.attrs()[sc.HYDRA_EVAL_BUILDS_OWN_TRACES] == own
    assert root.links == ()


# --- status.py -------------------------------------------------------------------------------


def test_every_hydra_status_code_is_known() -> None:
    """Codes 0 to 13 each have an entry; success, cancelled and obsolete lack an error type."""
    assert sorted(STATUSES) == list(range(14))
    for code, info in STATUSES.items():
        assert status_info(code) is info
        assert (info.error_type is None) == (code in (0, 4, 5, 13))
        assert (info.result == sc.RESULT_SUCCESS) == (code in (0, 13))


@pytest.mark.parametrize(
    ("code", "result", "status"),
    [
        (0, "success", Status.OK),
        (1, "failure", Status.ERROR),
        (3, "error", Status.ERROR),
        (4, "cancellation", Status.UNSET),
        (5, "skip", Status.UNSET),
        (7, "timeout", Status.ERROR),
        (13, "success", Status.OK),
        (None, "error", Status.ERROR),
    ],
)
def test_status_result_and_span_status(code: int | None, result: str, status: Status) -> None:
    """Span status follows the result: error only for failure, error and timeout; error.type only then."""
    info = status_info(code)
    assert (info.result, info.span_status) == (result, status)
    assert (info.error_type is not None) == (status is Status.ERROR)


@pytest.mark.parametrize("code", [4, 5])
def test_cancelled_and_obsolete_builds_are_not_errors(code: int) -> None:
    """A cancelled or obsolete build and its cancelled step: status UNSET, no error.type, no message."""
    b = BUILD._replace(status=code)
    steps = [TOP._replace(status=code, errormsg="cancelled by user")]
    build, *_, step = build_spans(CFG, b, steps)
    for span in (build, step):
        assert (span.status, span.status_message) == (Status.UNSET, "")
        assert sc.ERROR_TYPE not in span.attrs()
    assert build.attrs()[sc.CICD_PIPELINE_TASK_RUN_RESULT] == ("cancellation" if code == 4 else "skip")


@pytest.mark.parametrize(
    ("code", "info"),
    [
        (42, StatusInfo("unknown status 42", "error", "status_42")),
        (100, StatusInfo("unknown status 100", "error", "status_100")),
        (-1, StatusInfo("unknown status -1", "error", "status_-1")),
        (None, StatusInfo("unknown", "error", "unknown_status")),
    ],
)
def test_unknown_status_is_an_error(code: int | None, info: StatusInfo) -> None:
    """Codes outside the table (and a NULL status) map to errors named after them."""
    assert status_info(code) == info


def _spans_doc() -> str:
    return (Path(__file__).parents[2] / "docs" / "spans.md").read_text(encoding="utf-8")


def render_status_table() -> str:
    """The "Status codes" table of docs/spans.md, generated from STATUSES."""
    lines = [
        "| code | Hydra name | `cicd.pipeline.task.run.result` | `error.type` | span status |",
        "| --- | --- | --- | --- | --- |",
    ]
    for code, info in sorted(STATUSES.items()):
        error = f"`{info.error_type}`" if info.error_type else "(none)"
        status = info.span_status.name
        lines.append(f"| {code} | {info.name} | `{info.result}` | {error} | {status} |")
    return "\n".join(lines) + "\n"


def test_docs_status_table_is_current() -> None:
    """docs/spans.md contains the status table generated from core/status.py, verbatim."""
    table = render_status_table()
    assert table in _spans_doc(), (
        "docs/spans.md's status table is out of date; paste this table under 'Status codes':\n\n" + table
    )


# --- dedup.py --------------------------------------------------------------------------------


def _record(span_id: int, name: str = "queued") -> SpanRecord:
    return SpanRecord(
        trace_id=1,
        span_id=span_id,
        parent_span_id=None,
        name=name,
        kind=Kind.INTERNAL,
        start_ns=0,
        end_ns=1,
        attributes=(),
    )


def test_exact_repeat_is_skipped() -> None:
    """The same record twice is exported once and the repeat is counted."""
    recent = RecentSpans(10)
    assert recent.fresh(_record(1)) is True
    assert recent.fresh(_record(1)) is False
    assert recent.skipped == 1


def test_changed_content_passes() -> None:
    """A record with known IDs but new content is exported, and becomes the one remembered."""
    recent = RecentSpans(10)
    assert recent.fresh(_record(1)) is True
    assert recent.fresh(_record(1, "changed")) is True
    assert recent.fresh(_record(1, "changed")) is False
    assert recent.skipped == 1


def test_known_ids_whatever_the_content() -> None:
    """known() answers for IDs exported recently, with any content (rebuilt attempts are checked so)."""
    recent = RecentSpans(10)
    r = _record(1)
    assert not recent.known(r.trace_id, r.span_id)
    recent.fresh(r)
    assert recent.known(r.trace_id, r.span_id)
    assert not recent.known(r.trace_id, r.span_id + 1)


def test_capacity_evicts_least_recently_seen() -> None:
    """Beyond capacity the least recently seen record is forgotten; a repeat refreshes its entry."""
    recent = RecentSpans(2)
    assert [recent.fresh(_record(i)) for i in (1, 2, 1, 3)] == [True, True, False, True]
    assert recent.fresh(_record(1)) is False  # refreshed by its repeat, so 2 was evicted
    assert recent.fresh(_record(2)) is True
    assert recent.skipped == 2


@pytest.mark.parametrize("capacity", [0, -1])
def test_invalid_capacity(capacity: int) -> None:
    """A capacity below one is refused."""
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        RecentSpans(capacity)


def test_a_build_with_thousands_of_steps_splits_attempts_as_step_attempt_does() -> None:
    # 3,000 steps with a failed attempt at its own derivation half-way: split as step_attempt splits.
    b = make_build(drvpath=DRV, stoptime=T0 + 10_000)
    steps = [make_step(stepnr=n, drvpath=DEP, starttime=T0 + n, stoptime=T0 + n + 1) for n in range(1, 3001)]
    steps[1499] = make_step(stepnr=1500, drvpath=DRV, status=1, starttime=T0 + 1500, stoptime=T0 + 1501)
    spans = build_spans(CFG, b, steps)
    latest = [s for s in spans if s.parent_span_id == spans[0].span_id]
    expected = [s.stepnr for s in steps if step_attempt(b, steps, s.stepnr) == 1]
    assert _step_nrs(latest) == expected
    assert sorted(int(str(n)) for n in _step_nrs(spans)) == [s.stepnr for s in steps]
