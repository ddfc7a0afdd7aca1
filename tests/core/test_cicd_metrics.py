"""CI/CD metric observations derived from exported spans (core/cicd_metrics.py).

The spans come from the real renderers (core.evals, core.builds) with rows shaped like Hydra's, so
the roles the deriver reads from attributes are the ones production spans carry.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from hydra_otel.core import semconv as sc
from hydra_otel.core.builds import StepFacts, build_spans, step_span
from hydra_otel.core.cicd_metrics import (
    BUILD_DURATION,
    BUILD_QUEUE_WAIT,
    DURATION_BUCKETS,
    INSTRUMENTS,
    PIPELINE_RUN_ACTIVE,
    PIPELINE_RUN_DURATION,
    PIPELINE_RUN_ERRORS,
    STEP_DURATION,
    SYSTEM_ERRORS,
    WORKER_COUNT,
    MetricDeriver,
    Observation,
    Role,
    live_observations,
    observation,
    span_role,
)
from hydra_otel.core.evals import (
    Attempt,
    AttemptKind,
    EvalFacts,
    JobsetFacts,
    RenderConfig,
    attempt_span,
    eval_spans,
)
from hydra_otel.core.spans import SpanRecord, Status
from tests.factories import make_build

CFG = RenderConfig(instance="hydra", hydra_url="https://hydra.example.org", error_text_limit=100)
S = 1_000_000_000
T0 = 1_700_000_000
DRV = f"/nix/store/{'0' * 32}-hello-2.12.drv"
DEP = f"/nix/store/{'1' * 32}-glibc-2.40.drv"

BUILD = make_build()


def step(
    nr: int,
    *,
    drv: str = DRV,
    status: int | None = 0,
    start: int | None = None,
    stop: int | None = None,
    **kw: object,
) -> StepFacts:
    """A finished build step of BUILD on machine ``builder1``."""
    fields: dict[str, object] = {
        "build_id": 100,
        "stepnr": nr,
        "type": 0,
        "drvpath": drv,
        "status": status,
        "errormsg": None,
        "starttime": start,
        "stoptime": stop,
        "machine": "builder1",
        "system": "x86_64-linux",
        "propagated_from": None,
        "overhead_ms": None,
        "times_built": None,
        "nondeterministic": None,
        "resolved_drv_path": None,
    }
    fields.update(kw)
    return StepFacts(**fields)  # type: ignore[arg-type]


STEPS = [
    step(1, drv=DEP, start=T0 + 80, stop=T0 + 100, type=1),
    step(2, start=T0 + 100, stop=T0 + 300),
]

EVAL = EvalFacts(
    eval_id=42,
    jobset_id=3,
    project="nixpkgs",
    jobset="trunk",
    timestamp=T0,
    checkout_time=10,
    eval_time=50,
    has_new_builds=True,
    nr_builds=1,
    hash="abc",
    flake=None,
    nixexpr_input="nixpkgs",
    nixexpr_path="release.nix",
    error_msg=None,
    error_time=None,
    builds_new=1,
    builds_cached_finished=0,
    builds_cached_queued=0,
)

JOBSET = JobsetFacts(
    jobset_id=3,
    project="nixpkgs",
    jobset="trunk",
    error_msg="error: attribute 'x' missing",
    error_time=T0 + 5,
    fetch_error_msg=None,
    start_time=T0,
)


def by_name(observations: list[Observation], name: str) -> list[dict[str, object]]:
    """The attributes (plus ``value``) of every observation named ``name``."""
    return [{**dict(o.attributes), "value": o.value} for o in observations if o.name == name]


def test_evaluation_root_gives_pipeline_run_duration() -> None:
    """An evaluation's root span gives one run duration (checkout through evaluation) and no error."""
    obs = MetricDeriver().observe(eval_spans(EVAL, CFG))
    assert by_name(obs, PIPELINE_RUN_DURATION) == [
        {
            "cicd.pipeline.name": "nixpkgs:trunk",
            "cicd.pipeline.run.state": "executing",
            "cicd.pipeline.result": "success",
            "value": 60.0,
        }
    ]
    assert by_name(obs, PIPELINE_RUN_ERRORS) == []


def test_failed_evaluation_counts_an_error() -> None:
    """A failed attempt gives a run duration with its result and error type, and one error."""
    attempt = Attempt(
        kind=AttemptKind.FAILED, jobset_id=3, correlation_id="1.2", started_ns=T0 * S, ended_ns=(T0 + 30) * S
    )
    obs = MetricDeriver().observe([attempt_span(attempt, JOBSET, CFG)])
    assert by_name(obs, PIPELINE_RUN_DURATION) == [
        {
            "cicd.pipeline.name": "nixpkgs:trunk",
            "cicd.pipeline.run.state": "executing",
            "cicd.pipeline.result": "failure",
            "error.type": "evaluation_error",
            "value": 30.0,
        }
    ]
    assert by_name(obs, PIPELINE_RUN_ERRORS) == [
        {"cicd.pipeline.name": "nixpkgs:trunk", "error.type": "evaluation_error", "value": 1}
    ]


def test_build_spans_give_build_queue_and_step_observations() -> None:
    """A build gives its duration, its queue wait and one duration per step, with context from the build."""
    obs = MetricDeriver().observe(build_spans(CFG, BUILD, STEPS))
    assert by_name(obs, BUILD_DURATION) == [
        {
            "cicd.pipeline.name": "nixpkgs:trunk",
            "hydra.system": "x86_64-linux",
            "cicd.pipeline.task.run.result": "success",
            "hydra.build.cached": False,
            "value": 300.0,
        }
    ]
    assert by_name(obs, BUILD_QUEUE_WAIT) == [
        {"cicd.pipeline.name": "nixpkgs:trunk", "hydra.system": "x86_64-linux", "value": 80.0}
    ]
    common = {
        "cicd.pipeline.name": "nixpkgs:trunk",
        "hydra.system": "x86_64-linux",
        "cicd.worker.name": "builder1",
        "cicd.pipeline.task.run.result": "success",
    }
    assert by_name(obs, STEP_DURATION) == [
        {**common, "hydra.step.type": "substitution", "value": 20.0},
        {**common, "hydra.step.type": "build", "value": 200.0},
    ]
    assert by_name(obs, PIPELINE_RUN_ERRORS) == []


def test_failed_build_counts_an_error_and_skips_propagated_steps() -> None:
    """A failed build counts one error of its type; a propagated step is a record, not a run."""
    failed = BUILD._replace(status=2)
    steps = [step(1, status=1, propagated_from=99)]
    obs = MetricDeriver().observe(build_spans(CFG, failed, steps))
    assert by_name(obs, PIPELINE_RUN_ERRORS) == [
        {"cicd.pipeline.name": "nixpkgs:trunk", "error.type": "dependency_failed", "value": 1}
    ]
    assert by_name(obs, BUILD_DURATION)[0]["cicd.pipeline.task.run.result"] == "failure"
    assert by_name(obs, STEP_DURATION) == []


def test_cancelled_build_is_no_error() -> None:
    """Cancelled and obsolete builds are measured but not counted as pipeline errors."""
    for status in (4, 5):
        obs = MetricDeriver().observe(build_spans(CFG, BUILD._replace(status=status), STEPS))
        assert by_name(obs, PIPELINE_RUN_ERRORS) == []
        assert len(by_name(obs, BUILD_DURATION)) == 1


def test_same_span_twice_is_counted_once() -> None:
    """At-least-once delivery: a span already counted gives nothing the second time."""
    deriver = MetricDeriver()
    first = deriver.observe(build_spans(CFG, BUILD, STEPS))
    again = deriver.observe(build_spans(CFG, BUILD, STEPS))
    assert len(first) == 4  # build, queued, two steps
    assert again == []
    assert deriver.repeats == 4


def test_restarted_build_attempt_counts_again() -> None:
    """A new attempt has new span IDs, so it is a new run and counts."""
    deriver = MetricDeriver()
    deriver.observe(
        build_spans(CFG, BUILD._replace(status=1), [step(1, status=1, start=T0 + 80, stop=T0 + 300)])
    )
    retry = BUILD._replace(stoptime=T0 + 900)
    steps = [step(1, status=1, start=T0 + 80, stop=T0 + 300), step(2, start=T0 + 600, stop=T0 + 900)]
    obs = deriver.observe(build_spans(CFG, retry, steps))
    assert by_name(obs, BUILD_DURATION) == [
        {
            "cicd.pipeline.name": "nixpkgs:trunk",
            "hydra.system": "x86_64-linux",
            "cicd.pipeline.task.run.result": "success",
            "hydra.build.cached": False,
            "value": 300.0,
        }
    ]
    assert len(by_name(obs, STEP_DURATION)) == 1


def test_live_step_before_its_build_has_no_pipeline_name() -> None:
    """A step exported on step_finished, before its build span exists, lacks only the pipeline name."""
    deriver = MetricDeriver()
    live = step_span(CFG, BUILD, STEPS[1], 0)
    (obs,) = deriver.observe([live])
    assert dict(obs.attributes) == {
        "hydra.system": "x86_64-linux",
        "cicd.worker.name": "builder1",
        "cicd.pipeline.task.run.result": "success",
        "hydra.step.type": "build",
    }
    later = deriver.observe(build_spans(CFG, BUILD, STEPS))
    assert len(by_name(later, STEP_DURATION)) == 1  # only the substitution: the build step was counted


def test_step_carrying_pipeline_name_keeps_it() -> None:
    """A step span that carries ``cicd.pipeline.name`` itself needs no build span for it."""
    live = step_span(CFG, BUILD, STEPS[1], 0)
    tagged = live._replace(attributes=(*live.attributes, (sc.CICD_PIPELINE_NAME, "nixpkgs:trunk")))
    (obs,) = MetricDeriver().observe([tagged])
    assert dict(obs.attributes)["cicd.pipeline.name"] == "nixpkgs:trunk"


def test_unchanged_inputs_are_told_apart() -> None:
    """A check that found its inputs unchanged is a successful run marked as such."""
    attempt = Attempt(
        kind=AttemptKind.CACHED, jobset_id=3, correlation_id="1.2", started_ns=T0 * S, ended_ns=(T0 + 2) * S
    )
    (obs,) = MetricDeriver().observe([attempt_span(attempt, JOBSET, CFG)])
    assert dict(obs.attributes) == {
        "cicd.pipeline.name": "nixpkgs:trunk",
        "cicd.pipeline.run.state": "executing",
        "cicd.pipeline.result": "success",
        "hydra.eval.inputs_unchanged": True,
    }


def test_memory_is_bounded() -> None:
    """The de-duplication memory forgets the oldest spans beyond its capacity."""
    deriver = MetricDeriver(capacity=2)
    spans = eval_spans(EVAL, CFG)[:1] + [
        attempt_span(
            Attempt(
                kind=AttemptKind.CACHED,
                jobset_id=3,
                correlation_id=str(i),
                started_ns=T0 * S,
                ended_ns=T0 * S,
            ),
            JOBSET,
            CFG,
        )
        for i in range(2)
    ]
    assert len(deriver.observe(spans)) == 3
    assert len(deriver.observe(spans[:1])) == 1  # forgotten, so counted again
    with pytest.raises(ValueError, match="capacity"):
        MetricDeriver(capacity=0)


def test_roles() -> None:
    """Only evaluation roots, builds, queued and step spans feed metrics."""
    roles = [span_role(r) for r in eval_spans(EVAL, CFG)]
    assert roles == [Role.PIPELINE_RUN, None, None]
    roles = [span_role(r) for r in build_spans(CFG, BUILD, STEPS)]
    assert roles == [Role.BUILD, Role.QUEUED, Role.STEP, Role.STEP]


FORBIDDEN_KEYS = {
    sc.HYDRA_BUILD_ID,
    sc.HYDRA_EVAL_ID,
    sc.HYDRA_STEP_NR,
    sc.HYDRA_BUILD_JOB,
    sc.CICD_PIPELINE_TASK_NAME,
    sc.CICD_PIPELINE_TASK_RUN_ID,
    sc.CICD_PIPELINE_RUN_ID,
    sc.CICD_PIPELINE_RUN_URL_FULL,
    sc.CICD_PIPELINE_TASK_RUN_URL_FULL,
    sc.HYDRA_BUILD_DRV_PATH,
    sc.HYDRA_BUILD_NIXNAME,
    sc.HYDRA_STEP_ERROR,
    sc.HYDRA_EVAL_CORRELATION_ID,
}


def test_no_high_cardinality_attributes() -> None:
    """No observation carries an ID, a job name, a derivation path, a URL or error text."""
    failed = BUILD._replace(status=1)
    spans: list[SpanRecord] = [
        *eval_spans(EVAL, CFG),
        *build_spans(CFG, failed, [step(1, status=1, start=T0 + 80, stop=T0 + 300, errormsg="boom")]),
        *build_spans(CFG, BUILD._replace(build_id=101, status=3), []),
        attempt_span(
            Attempt(
                kind=AttemptKind.FAILED, jobset_id=3, correlation_id="9.9", started_ns=T0 * S, ended_ns=T0 * S
            ),
            JOBSET,
            CFG,
        ),
    ]
    obs = MetricDeriver().observe(spans) + live_observations(["nixpkgs:trunk"], 2, set())
    assert {o.name for o in obs} == set(INSTRUMENTS)
    for o in obs:
        keys = {k for k, _ in o.attributes}
        assert keys <= set(INSTRUMENTS[o.name].attributes)
        assert not keys & FORBIDDEN_KEYS
        for _, value in o.attributes:
            assert value not in {100, "100", 42, "42", DRV, "hello.x86_64-linux", "boom"}


def test_observation_drops_undeclared_keys() -> None:
    """Building an observation keeps only the instrument's declared keys, in declared order."""
    o = observation(
        BUILD_QUEUE_WAIT, 1.5, {sc.HYDRA_BUILD_ID: 7, sc.HYDRA_BUILD_SYSTEM: "aarch64-linux", "x": None}
    )
    assert o == Observation(
        name=BUILD_QUEUE_WAIT, value=1.5, attributes=((sc.HYDRA_BUILD_SYSTEM, "aarch64-linux"),)
    )


def test_buckets_span_seconds_to_hours() -> None:
    """Bucket boundaries increase strictly from one second to eight hours."""
    assert DURATION_BUCKETS[0] == 1.0
    assert DURATION_BUCKETS[-1] == 8 * 3600.0
    assert all(a < b for a, b in itertools.pairwise(DURATION_BUCKETS))


def test_aborted_build_and_dead_evaluator_are_system_errors() -> None:
    """Failures of Hydra itself count in cicd.system.errors by component, not as pipeline errors."""
    dead = Attempt(
        kind=AttemptKind.ABANDONED,
        jobset_id=3,
        correlation_id="9.9",
        started_ns=T0 * S,
        ended_ns=(T0 + 9) * S,
    )
    died = dataclasses.replace(JOBSET, error_msg="evaluation failed with exit code 137", error_time=T0 + 5)
    spans = [*build_spans(CFG, BUILD._replace(status=3), STEPS), attempt_span(dead, died, CFG)]
    obs = MetricDeriver().observe(spans)
    assert by_name(obs, PIPELINE_RUN_ERRORS) == []
    assert by_name(obs, SYSTEM_ERRORS) == [
        {"cicd.system.component": "hydra-queue-runner", "error.type": "aborted", "value": 1},
        {"cicd.system.component": "hydra-evaluator", "error.type": "evaluator_died", "value": 1},
    ]


@pytest.mark.parametrize("status", list(range(14)))
def test_error_counters_agree_with_span_status(status: int) -> None:
    """A build counts one error (pipeline or system) exactly when its span status is ERROR."""
    spans = build_spans(CFG, BUILD._replace(status=status), STEPS)
    obs = MetricDeriver().observe(spans)
    errors = len(by_name(obs, PIPELINE_RUN_ERRORS)) + len(by_name(obs, SYSTEM_ERRORS))
    assert errors == (1 if spans[0].status is Status.ERROR else 0)
    assert (sc.ERROR_TYPE in spans[0].attrs()) == (errors == 1)


def test_live_observations_count_runs_and_report_stopped_ones_as_zero() -> None:
    """Active runs per pipeline; a pipeline seen before and now idle is 0; busy workers as one point."""
    known: set[str] = set()
    first = live_observations(["nixpkgs:trunk", "nixpkgs:staging"], 3, known)
    assert [(o.name, dict(o.attributes), o.value) for o in first] == [
        (
            PIPELINE_RUN_ACTIVE,
            {"cicd.pipeline.name": "nixpkgs:staging", "cicd.pipeline.run.state": "executing"},
            1,
        ),
        (
            PIPELINE_RUN_ACTIVE,
            {"cicd.pipeline.name": "nixpkgs:trunk", "cicd.pipeline.run.state": "executing"},
            1,
        ),
        (WORKER_COUNT, {"cicd.worker.state": "busy"}, 3),
    ]
    later = live_observations([], 0, known)
    assert [o.value for o in later] == [0, 0, 0]
