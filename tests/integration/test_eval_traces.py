"""End to end: Hydra's evaluation notifications become OTLP traces.

A scripted Hydra sends real NOTIFYs from its own connection, inside
transactions as hydra-eval-jobset does; the real daemon exports to an
in-process OTLP receiver; the tests assert on what the receiver got.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

import pytest
import trio

from hydra_otel.core import ids
from hydra_otel.demo.sandbox.hydrasim import NewBuild
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, HttpOtlpReceiver, ReceivedSpan, attributes_dict
from tests.integration.harness import HYDRA_URL, Hydra, StartDaemon, stop

S = 1_000_000_000
T0 = 1_700_000_000
CID = "4112.262815283.16494"
SPAN_KIND_INTERNAL, SPAN_KIND_SERVER = 1, 2
STATUS_OK, STATUS_ERROR = 1, 2


def tid(value: int) -> bytes:
    return value.to_bytes(16, "big")


def sid(value: int) -> bytes:
    return value.to_bytes(8, "big")


def named(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    out = {s.span.name: s for s in spans}
    assert len(out) == len(spans), f"duplicate span names in {[s.span.name for s in spans]}"
    return out


async def add_eval(hydra: Hydra, jobset_id: int = 1, cid: str = CID, builds: int = 2) -> int:
    eval_id, _, sql = hydra.sim.eval_added(
        jobset_id,
        cid,
        eval_start=T0,
        timestamp=T0 + 100,
        checkout_time=20,
        eval_time=150,
        new_builds=[NewBuild(job=f"job{i}") for i in range(builds)],
    )
    await hydra.run(*sql)
    return eval_id


async def test_added_evaluation_trace(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """eval_started + eval_added: root, checkout, evaluate from the rows, plus the live evaluator run."""
    await start_daemon()
    await hydra.run(*hydra.sim.evaluator_starts(1, CID, T0 - 25))
    eval_id = await add_eval(hydra)
    spans = named(await otlp_grpc.wait_for_spans(4))
    root, checkout, evaluate, run = (
        spans[n] for n in ("BUILD nixpkgs:trunk", "checkout", "evaluate", "evaluator run")
    )
    key = ids.eval_trace("hydra", eval_id)
    assert {s.span.trace_id for s in spans.values()} == {tid(ids.trace_id(key))}
    assert root.span.span_id == sid(ids.root_span_id(key))
    assert root.span.parent_span_id == b""
    for child in (checkout, evaluate, run):
        assert child.span.parent_span_id == root.span.span_id
        assert child.span.kind == SPAN_KIND_INTERNAL
    assert root.span.kind == SPAN_KIND_SERVER
    assert (root.span.start_time_unix_nano, root.span.end_time_unix_nano) == ((T0 - 20) * S, (T0 + 150) * S)
    assert (checkout.span.start_time_unix_nano, checkout.span.end_time_unix_nano) == ((T0 - 20) * S, T0 * S)
    assert (evaluate.span.start_time_unix_nano, evaluate.span.end_time_unix_nano) == (T0 * S, (T0 + 150) * S)
    assert run.span.start_time_unix_nano < run.span.end_time_unix_nano
    assert root.span.status.code == STATUS_OK
    attrs = attributes_dict(root.span.attributes)
    assert attrs["cicd.pipeline.name"] == "nixpkgs:trunk"
    assert attrs["cicd.pipeline.run.id"] == str(eval_id)
    assert attrs["cicd.pipeline.run.url.full"] == f"{HYDRA_URL}/eval/{eval_id}"
    assert attrs["cicd.pipeline.result"] == "success"
    assert attrs["hydra.eval.builds.new"] == 2
    assert attrs["hydra.eval.has_new_builds"] is True
    assert attrs["hydra.jobset.id"] == 1
    assert attributes_dict(run.span.attributes)["hydra.eval.correlation_id"] == CID
    assert root.resource["service.name"] == "hydra-otel"
    assert root.resource["deployment.environment.name"] == "test"
    assert root.resource["service.instance.id"] == f"hydra@{socket.gethostname()}"


async def test_eval_with_no_new_builds(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """eval_added for an evaluation with hasnewbuilds = 0 and no member rows still gets its spans."""
    await start_daemon()
    await hydra.run(*hydra.sim.evaluator_starts(1, CID, T0))
    eval_id, _, sql = hydra.sim.eval_added(
        1, CID, eval_start=T0, timestamp=T0 + 5, checkout_time=1, eval_time=6
    )
    await hydra.run(*sql)
    root = named(await otlp_grpc.wait_for_spans(4))["BUILD nixpkgs:trunk"]
    attrs = attributes_dict(root.span.attributes)
    assert attrs["hydra.eval.has_new_builds"] is False
    assert "hydra.eval.builds" not in attrs
    assert attrs["hydra.eval.builds.new"] == 0
    assert attrs["cicd.pipeline.run.id"] == str(eval_id)


async def test_cached_evaluation_links_previous(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """eval_cached: the stitched span is the root, successful, linked to the previous evaluation's root."""
    previous = await add_eval(hydra, cid="earlier")  # before the start: not exported
    await start_daemon()
    await hydra.run(*hydra.sim.evaluator_starts(1, CID, T0))
    await hydra.run(hydra.sim.eval_cached(1, CID, previous_eval_id=previous, now=T0 + 3))
    key = ids.attempt_trace("hydra", 1, CID)

    def attempt(spans: Sequence[ReceivedSpan]) -> bool:
        return any(s.span.trace_id == tid(ids.trace_id(key)) for s in spans)

    (span,) = [
        s for s in await otlp_grpc.wait_for_spans(attempt) if s.span.trace_id == tid(ids.trace_id(key))
    ]
    assert (span.span.trace_id, span.span.span_id) == (tid(ids.trace_id(key)), sid(ids.root_span_id(key)))
    assert span.span.parent_span_id == b""
    assert span.span.kind == SPAN_KIND_SERVER
    attrs = attributes_dict(span.span.attributes)
    assert attrs["hydra.eval.inputs_unchanged"] is True
    assert attrs["cicd.pipeline.result"] == "success"
    assert attrs["hydra.eval.start_observed"] is True
    (link,) = span.span.links
    prev = ids.eval_trace("hydra", previous)
    assert (link.trace_id, link.span_id) == (tid(ids.trace_id(prev)), sid(ids.root_span_id(prev)))


@pytest.mark.parametrize("kind", ["fetch", "check"])
async def test_failed_evaluation(
    kind: str, hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """eval_failed: status ERROR with Hydra's error text as an exception event."""
    await start_daemon()
    await hydra.run(*hydra.sim.evaluator_starts(2, CID, T0))
    error = (
        "error: cannot fetch input 'src'\n  from git"
        if kind == "fetch"
        else "evaluation crashed: out of memory"
    )
    if kind == "fetch":
        await hydra.run(hydra.sim.eval_fetch_failed(2, CID, T0 + 9, error))
    else:
        await hydra.run(hydra.sim.eval_check_failed(2, CID, T0 + 9, error))
    (span,) = await otlp_grpc.wait_for_spans(1)
    assert span.span.name == "BUILD nixpkgs:staging"
    assert span.span.status.code == STATUS_ERROR
    assert span.span.status.message == error.split("\n")[0]
    attrs = attributes_dict(span.span.attributes)
    assert attrs["error.type"] == ("fetch_error" if kind == "fetch" else "evaluation_error")
    assert attrs["cicd.pipeline.result"] == "failure"
    (event,) = span.span.events
    assert event.name == "exception"
    assert attributes_dict(event.attributes)["exception.message"] == error


async def test_orphan_closing_event(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """A daemon started mid-evaluation still exports what the database allows, and no evaluator run."""
    await hydra.run(*hydra.sim.evaluator_starts(1, CID, T0))  # before the daemon listens
    await start_daemon()
    await add_eval(hydra)
    await hydra.run(*hydra.sim.evaluator_starts(2, "99.1", T0 + 50))
    await otlp_grpc.wait_for_spans(3)
    await hydra.run(hydra.sim.eval_fetch_failed(2, "99.1", T0 + 60, "boom"))
    spans = await otlp_grpc.wait_for_spans(4)
    names = sorted(s.span.name for s in spans)
    assert names == ["BUILD nixpkgs:staging", "BUILD nixpkgs:trunk", "checkout", "evaluate"]


async def test_orphan_attempt_starts_at_jobset_starttime(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """Without eval_started, a failed attempt starts at jobsets.starttime, which hydra-evaluator set."""
    await hydra.run(*hydra.sim.evaluator_starts(2, CID, T0))
    await start_daemon()
    await hydra.run(hydra.sim.eval_fetch_failed(2, CID, T0 + 60, "boom"))
    (span,) = await otlp_grpc.wait_for_spans(1)
    assert span.span.start_time_unix_nano == T0 * S
    assert attributes_dict(span.span.attributes)["hydra.eval.start_observed"] is False


async def test_abandoned_evaluation(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """An eval_started that never closes is ended after the abandon limit with status ERROR."""
    await start_daemon(eval_abandon_after="0.3")
    await hydra.run(*hydra.sim.evaluator_starts(1, CID, T0))
    (span,) = await otlp_grpc.wait_for_spans(1)
    attrs = attributes_dict(span.span.attributes)
    assert span.span.status.code == STATUS_ERROR
    assert attrs["error.type"] == "abandoned"
    assert attrs["cicd.pipeline.result"] == "timeout"
    assert span.span.end_time_unix_nano - span.span.start_time_unix_nano >= int(0.3 * S)


async def test_superseded_evaluation_reports_evaluator_crash(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """A new eval_started of the same jobset ends the dead one, with hydra-evaluator's crash record."""
    await start_daemon()
    # Live receive times are real, so the crash record must be too for "after the start" to hold.
    start = int(time.time())
    await hydra.run(*hydra.sim.evaluator_starts(1, "1.1", start))
    crash = int(time.time()) + 1
    await hydra.run(hydra.sim.evaluator_dies(1, crash, "evaluation failed with exit code 137"))
    await hydra.run(*hydra.sim.evaluator_starts(1, "2.2", crash))
    (span,) = await otlp_grpc.wait_for_spans(1)
    attrs = attributes_dict(span.span.attributes)
    assert attrs["hydra.eval.correlation_id"] == "1.1"
    assert attrs["error.type"] == "evaluator_died"
    assert span.span.status.message == "evaluation failed with exit code 137"
    assert span.span.start_time_unix_nano <= span.span.end_time_unix_nano <= crash * S


@pytest.mark.parametrize("hydra_db", [85, 87], indirect=True)
async def test_http_protobuf_and_both_schemas(
    hydra: Hydra, start_daemon: StartDaemon, otlp_http: HttpOtlpReceiver
) -> None:
    """OTLP over HTTP/protobuf works, against the legacy (85) and current (87) Hydra schema."""
    await start_daemon(otlp_http.traces_url, otlp_protocol="http/protobuf")
    await hydra.run(*hydra.sim.evaluator_starts(1, CID, T0))
    await add_eval(hydra)
    spans = named(await otlp_http.wait_for_spans(4))
    assert set(spans) == {"BUILD nixpkgs:trunk", "checkout", "evaluate", "evaluator run"}


async def test_bad_input_is_counted_and_survived(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """Malformed payloads and unknown IDs are counted; the daemon goes on exporting."""
    service = await start_daemon()
    await hydra.run(
        "SELECT pg_notify('eval_added', 'only-one-field');",
        "SELECT pg_notify('build_finished', 'x');",
        "SELECT pg_notify('eval_added', E'1.1\\t1\\t999999');",  # no such JobsetEval
        "SELECT pg_notify('eval_failed', E'1.2\\t424242');",  # no such jobset
    )
    await hydra.run(*hydra.sim.evaluator_starts(1, CID, T0))
    await add_eval(hydra)
    await otlp_grpc.wait_for_spans(4)
    assert service.stats.payload_errors == {"eval_added": 1, "build_finished": 1}
    assert service.stats.missing_rows == {"jobsetevals": 1}
    assert service.stats.notifications_rejected == {"unknown_jobset": 1}  # eval_failed: checked first


async def test_rebuilt_spans_are_byte_identical(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """A restarted daemon seeing the same eval_added again re-creates the database spans byte for byte."""
    first = await start_daemon()
    await hydra.run(*hydra.sim.evaluator_starts(1, CID, T0))
    eval_id = await add_eval(hydra)
    before = {s.span.name: s.span.SerializeToString() for s in await otlp_grpc.wait_for_spans(4)}
    await stop(first)
    otlp_grpc.clear()
    await start_daemon()
    await hydra.run(f"SELECT pg_notify('eval_added', E'{CID}\\t1\\t{eval_id}');")  # a replay: no eval_started
    after = {s.span.name: s.span.SerializeToString() for s in await otlp_grpc.wait_for_spans(3)}
    assert set(after) == {"BUILD nixpkgs:trunk", "checkout", "evaluate"}
    for name, encoded in after.items():
        assert encoded == before[name], name


async def test_graceful_stop_flushes(
    hydra: Hydra, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """Stopping right after a notification still resolves and exports it before run() returns."""
    previous = await add_eval(hydra, cid="earlier")  # before the start: not exported
    service = await start_daemon(export_delay="30")  # only the shutdown flush can send this batch
    await hydra.run(*hydra.sim.evaluator_starts(1, CID, T0))
    await hydra.run(hydra.sim.eval_cached(1, CID, previous_eval_id=previous, now=T0 + 1))
    with trio.fail_after(10):
        while service.stats.events["eval_cached"] == 0:  # noqa: ASYNC110 - wait for the listener to receive it
            await trio.sleep(0.01)
    await stop(service)
    key = ids.attempt_trace("hydra", 1, CID)
    # The previous evaluation may come too: each start re-reads the last evaluations.
    assert [s.span.name for s in otlp_grpc.spans() if s.span.trace_id == tid(ids.trace_id(key))] == [
        "BUILD nixpkgs:trunk"
    ]
    assert service.stats.spans_exported == len(otlp_grpc.spans())
