"""Hostile rows and refusing collectors, through the real daemon.

A buildsteps row with impossible times must not crash the daemon (it did, on
every start); a span the collector refuses for good must be dropped alone,
logged once and counted, while the rest of its batch and every later
evaluation are exported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio

from hydra_otel.demo.sandbox.hydrasim import NewBuild
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, HttpOtlpReceiver, ReceivedSpan, attributes_dict
from tests.integration.harness import Hydra, StartDaemon

T0 = 1_700_000_000
DATA_ISSUE = "hydra.data_issue"
REFUSED = "the OTLP endpoint refused a span for good; dropped it and exporting the rest"


def names(spans: Sequence[ReceivedSpan]) -> set[str]:
    return {s.span.name for s in spans}


async def eval_with_builds(hydra: Hydra, cid: str, jobs: list[str], at: int = T0) -> tuple[int, list[int]]:
    eval_id, build_ids, sql = hydra.sim.eval_added(
        1,
        cid,
        eval_start=at,
        timestamp=at + 10,
        checkout_time=5,
        eval_time=12,
        new_builds=[NewBuild(job=j, nixname=j) for j in jobs],
    )
    await hydra.run(*sql)
    return eval_id, build_ids


async def build(hydra: Hydra, build_id: int, start: int, stop: int) -> None:
    sim = hydra.sim
    await hydra.run(
        sim.step_started(build_id, 1, now=start),
        sim.step_finished(build_id, 1, now=stop),
        sim.build_finished(build_id, start=start, stop=stop),
    )


async def test_impossible_step_times_do_not_stop_the_daemon(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Builds with steps before 1970 or stopping before they start, then a good evaluation after them."""
    service = await start_daemon()
    _, (bad, extremes, backwards, good) = await eval_with_builds(
        hydra, "1.1", ["bad", "extremes", "backwards", "good"]
    )
    await build(hydra, bad, start=-5, stop=-1)  # before 1970
    await build(hydra, extremes, start=-(2**31), stop=2**31 - 1)  # the ends of Hydra's int4 columns
    await build(hydra, backwards, start=T0 + 50, stop=T0 + 20)  # stops before it starts
    await build(hydra, good, start=T0 + 20, stop=T0 + 30)
    spans = await otlp_grpc.wait_for_spans(
        lambda got: {"build bad", "build backwards", "build good"} <= names(got)
    )
    for span in spans:
        assert 0 <= span.span.start_time_unix_nano <= span.span.end_time_unix_nano
    issues = {s.span.name: attributes_dict(s.span.attributes).get(DATA_ISSUE) for s in spans}
    assert "start time -5000000000 before 1970" in str(issues["step bad"])
    assert "start time -2147483648000000000 before 1970: set to the end time" in str(issues["step extremes"])
    assert issues["step good"] is None
    # The counter and its log line follow the endpoint's answer, which can come after the receiver
    # has stored the spans.
    with trio.fail_after(10):
        while service.stats.spans_repaired < 2:  # noqa: ASYNC110 - a counter, with no event to wait on
            await trio.sleep(0.01)
    assert service.stats.spans_repaired == 2
    lines = [r for r in caplog.records if r.getMessage().startswith("spans with impossible values")]
    assert sum(r.__dict__["spans"] for r in lines) == 2
    assert "before 1970" in lines[0].__dict__["example"]

    _, (later,) = await eval_with_builds(hydra, "1.2", ["later"], at=T0 + 100)
    await build(hydra, later, start=T0 + 120, stop=T0 + 130)
    await otlp_grpc.wait_for_spans(lambda got: "build later" in names(got))


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_a_refused_span_is_dropped_alone(
    hydra: Hydra,
    start_daemon: StartDaemon,
    otlp_grpc: GrpcOtlpReceiver,
    otlp_http: HttpOtlpReceiver,
    protocol: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = otlp_grpc if protocol == "grpc" else otlp_http
    endpoint = f"http://{otlp_grpc.endpoint}" if protocol == "grpc" else otlp_http.traces_url
    receiver.refuse(lambda span: span.name == "build poison")
    service = await start_daemon(endpoint, otlp_protocol=protocol)
    _, build_ids = await eval_with_builds(hydra, "2.1", ["one", "poison", "two"])
    for i, build_id in enumerate(build_ids):
        await build(hydra, build_id, start=T0 + 20 + i, stop=T0 + 30 + i)
    await receiver.wait_for_spans(lambda got: {"build one", "build two", "BUILD nixpkgs:trunk"} <= names(got))

    # A later evaluation is not held up behind the refused span.
    _, (later,) = await eval_with_builds(hydra, "2.2", ["later"], at=T0 + 100)
    await build(hydra, later, start=T0 + 120, stop=T0 + 130)
    spans = await receiver.wait_for_spans(lambda got: "build later" in names(got))
    assert "build poison" not in names(spans)
    assert {s.name for s in receiver.refused} == {"build poison"}
    assert service.stats.spans_refused == 1
    refusals = [r for r in caplog.records if r.getMessage() == REFUSED]
    assert len(refusals) == 1
    assert refusals[0].levelno == logging.ERROR
    assert ("INVALID_ARGUMENT" if protocol == "grpc" else "HTTP 400") in refusals[0].__dict__["reason"]
    assert not service.stats.exporting_failed
