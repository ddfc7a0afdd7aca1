"""The trace span budget: shares, which steps are kept, the marker, and the size it bounds."""

from __future__ import annotations

import dataclasses

import pytest

from hydra_otel.core import semconv as sc
from hydra_otel.core.budget import build_share, min_spans_per_trace, step_limit, steps_omitted
from hydra_otel.core.builds import BuildFacts, StepFacts, build_spans, step_in_budget
from hydra_otel.core.evals import RenderConfig
from hydra_otel.core.otlp_wire import SpanEncoder
from hydra_otel.core.spans import SpanRecord
from tests.factories import T0, make_build, make_step

CFG = RenderConfig(
    instance="hydra", hydra_url="https://hydra.example.org", error_text_limit=4096, max_builds_per_trace=1000
)
DRV = "/nix/store/0c9x2f6vxg3lnp6j7x6ia1sc3x6i8j5m-bootstrap-tools.drv"
TEMPO_MAX_BYTES = 5_000_000


def dep(i: int) -> str:
    return f"/nix/store/{i:032d}-python3.12-some-package-{i}.drv"


def big_build(n: int, **build: object) -> tuple[BuildFacts, list[StepFacts]]:
    """A build whose attempt has ``n`` steps: ``n - 1`` dependencies, then its own derivation."""
    b = make_build(drvpath=DRV, stoptime=T0 + n + 1, **build)  # the own step stops with the build
    steps = [
        make_step(
            build_id=b.build_id,
            stepnr=i,
            drvpath=DRV if i == n else dep(i),
            starttime=T0 + i,
            stoptime=T0 + i + 1,
            machine="ssh://builder@big-builder-01.example.org",
        )
        for i in range(1, n + 1)
    ]
    return b, steps


def step_numbers(spans: list[SpanRecord]) -> list[object]:
    return [s.attrs().get(sc.HYDRA_STEP_NR) for s in spans if s.attrs().get(sc.HYDRA_SPAN_TYPE) == "step"]


def test_shares() -> None:
    """A build alone in its trace gets the whole budget; builds of an evaluation split it."""
    assert build_share(6000, 1, own_trace=True) == 6000
    assert build_share(6000, 1, own_trace=False) == 5996
    assert build_share(6000, 1000, own_trace=False) == 5
    assert step_limit(5) == 3
    assert step_limit(2) == 1  # never below one step (the configuration check keeps it there)
    assert min_spans_per_trace(1000) == 3004


def test_build_of_20000_steps_keeps_its_share_and_says_so() -> None:
    """The first steps by number and the build's own step are kept; the build span counts the rest."""
    b, steps = big_build(20_000)
    spans = build_spans(CFG, b, steps)
    kept = step_numbers(spans)
    assert len(spans) <= 5996
    assert kept == [*range(1, 5994), 20_000]
    root = spans[0]
    assert root.attrs().get(sc.HYDRA_BUILD_STEPS_OMITTED) == 20_000 - len(kept)
    assert steps_omitted(root) == 20_000 - len(kept)
    assert root.attributes[-1] == (sc.HYDRA_BUILD_STEPS_OMITTED, 20_000 - len(kept))  # where it looks
    assert all(steps_omitted(s) == 0 for s in spans[1:])


def test_20000_step_trace_fits_tempo() -> None:
    """Encoded as sent, the trace of a 20,000-step build stays under Tempo's 5 MB (it was 12 MB)."""
    b, steps = big_build(20_000)
    encoder = SpanEncoder((("service.name", "hydra-otel"),), "hydra_otel", "1")
    size = sum(len(r.payload) for r in encoder.requests(build_spans(CFG, b, steps), 4_000_000))
    assert size <= TEMPO_MAX_BYTES
    unbounded = dataclasses.replace(CFG, max_spans_per_trace=10**9)
    assert sum(len(r.payload) for r in encoder.requests(build_spans(unbounded, b, steps), 4_000_000)) > (
        2 * TEMPO_MAX_BYTES
    )


def test_evaluation_trace_splits_the_budget() -> None:
    """A build sharing its evaluation's trace with 999 others keeps 3 steps: 2 first and its own."""
    b, steps = big_build(50, trace_builds=1000)
    spans = build_spans(CFG, b, steps)
    assert step_numbers(spans) == [1, 2, 50]
    assert spans[0].attrs().get(sc.HYDRA_BUILD_STEPS_OMITTED) == 47


def test_small_builds_are_untouched() -> None:
    """A build within its share renders every step and carries no marker."""
    b, steps = big_build(3, trace_builds=1000)
    spans = build_spans(CFG, b, steps)
    assert step_numbers(spans) == [1, 2, 3]
    assert spans[0].attrs().get(sc.HYDRA_BUILD_STEPS_OMITTED) is None


@pytest.mark.parametrize("trace_builds", [1, 10, 1000])
def test_live_steps_make_the_same_choice(trace_builds: int) -> None:
    """A step rendered alone (step_finished: its row and the build's top-level ones) is kept exactly
    when the whole build's rendering keeps it, so live, restarted and backfilled runs agree."""
    b, steps = big_build(1_000, trace_builds=trace_builds)
    kept = set(step_numbers(build_spans(CFG, b, steps)))
    top = [s for s in steps if s.drvpath == b.drvpath]
    live = {s.stepnr for s in steps if step_in_budget(CFG, b, [*top, s], s)}
    assert live == kept


def test_restart_gets_a_new_share() -> None:
    """After a restart, the new attempt's steps count from the step that ended the previous attempt."""
    b, first = big_build(10, trace_builds=1000)
    rerun = [
        s._replace(stepnr=s.stepnr + 10, starttime=T0 + 100 + s.stepnr, stoptime=T0 + 101 + s.stepnr)
        for s in first
    ]
    b = b._replace(stoptime=T0 + 111)
    spans = build_spans(CFG, b, [*first, *rerun])
    assert spans[0].attrs().get(sc.HYDRA_BUILD_ATTEMPT) == 1
    latest = [s for s in spans if s.parent_span_id == spans[0].span_id]
    assert step_numbers(latest) == [11, 12, 20]
    assert step_numbers(spans) == [11, 12, 20, 1, 2, 10]  # the first attempt, rebuilt, has its own share
    top = [s for s in [*first, *rerun] if s.drvpath == b.drvpath]
    assert {s.stepnr for s in rerun if step_in_budget(CFG, b, [*top, s], s)} == {11, 12, 20}
