"""ProcessSink against real OTLP receivers: the export process delivers what OtlpSink delivers.

Each test starts a real child process (``python -m hydra_otel.adapters.export_worker``), so
what is checked here is also the pipe protocol, the restart after a death and the shutdown.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

import grpc
import pytest
import trio
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from hydra_otel.adapters.export_process import ProcessSink
from hydra_otel.adapters.otlp import Delivery, to_readable
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, HttpOtlpReceiver
from hydra_otel.selfmon.stats import Stats
from tests.integration.test_otlp_encoded import RESOURCE, endpoints, records, settings

Make = Callable[..., ProcessSink]


@pytest.fixture
def make() -> Iterator[Make]:
    """Build process sinks; every one is shut down at teardown."""
    sinks: list[ProcessSink] = []

    def build(endpoint: str, protocol: str, **kwargs: object) -> ProcessSink:
        timeout = float(kwargs.pop("timeout", 5.0))  # type: ignore[arg-type]
        sink = ProcessSink(settings(endpoint, protocol, timeout=timeout), RESOURCE, **kwargs)  # type: ignore[arg-type]
        sinks.append(sink)
        return sink

    yield build
    for sink in sinks:
        sink.shutdown()


def span_ids(receiver: GrpcOtlpReceiver | HttpOtlpReceiver) -> list[int]:
    return [int.from_bytes(s.span.span_id, "big") for s in receiver.spans()]


def gone(pid: int) -> bool:
    """The process ended: it no longer exists, or it is a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_delivers_what_the_sdk_would_send(
    otlp_grpc: GrpcOtlpReceiver, otlp_http: HttpOtlpReceiver, make: Make
) -> None:
    """Over gRPC and HTTP, the requests that arrive are the SDK encoder's, byte for byte."""
    spans = records()
    for endpoint, protocol in endpoints(otlp_grpc, otlp_http):
        with trio.fail_after(30):
            assert await make(endpoint, protocol).export(spans) == Delivery(done=True)
    expected = encode_spans([to_readable(r, RESOURCE) for r in spans])
    assert otlp_grpc.requests == otlp_http.requests == [expected]


async def test_a_refused_span_comes_back_as_the_parents_record(
    otlp_grpc: GrpcOtlpReceiver, otlp_http: HttpOtlpReceiver, make: Make
) -> None:
    """The poison span is isolated in the child and reported as the very record the batch holds."""
    spans = records()
    poison = spans[37]
    for receiver in (otlp_grpc, otlp_http):
        receiver.refuse(lambda s: int.from_bytes(s.span_id, "big") == poison.span_id)
    for endpoint, protocol in endpoints(otlp_grpc, otlp_http):
        with trio.fail_after(30):
            delivery = await make(endpoint, protocol).export(spans)
        assert delivery.done
        assert [r for r, _ in delivery.refused] == [poison]
        assert delivery.refused[0][0] is poison
        assert delivery.refused[0][1].startswith(("INVALID_ARGUMENT", "HTTP 400"))
    for receiver in (otlp_grpc, otlp_http):
        assert span_ids(receiver) == [r.span_id for r in spans if r is not poison]


async def test_a_dead_collector_then_recovery(otlp_grpc: GrpcOtlpReceiver, make: Make) -> None:
    """A failing endpoint gives a Delivery that is not done; the same batch goes once it is back."""
    spans = records()
    sink = make(f"http://{otlp_grpc.endpoint}", "grpc", timeout=1.0)
    otlp_grpc.set_down(grpc.StatusCode.UNAVAILABLE)
    with trio.fail_after(30):
        failed = await sink.export(spans)
        assert not failed.done
        assert failed.refused == ()
        otlp_grpc.set_up()
        assert (await sink.export(spans)).done
    assert span_ids(otlp_grpc) == [r.span_id for r in spans]


class TakesOneThenFails(GrpcOtlpReceiver):
    """A receiver that accepts the first request and fails the others until ``recover()``."""

    failing = True

    def _admit(self) -> grpc.StatusCode | None:
        failure = super()._admit()
        if failure is None and self.failing and self.requests:
            return grpc.StatusCode.UNAVAILABLE
        return failure


async def test_a_retry_resumes_at_the_first_unacknowledged_request(make: Make) -> None:
    """Requests the endpoint took before it failed are not sent again (the child holds the batch)."""
    spans = records()
    with TakesOneThenFails() as receiver:
        sink = make(f"http://{receiver.endpoint}", "grpc", timeout=1.0, max_request_bytes=8_000)
        with trio.fail_after(30):
            assert not (await sink.export(spans)).done
            assert len(receiver.requests) == 1
            receiver.failing = False
            assert (await sink.export(spans)).done
        assert len(receiver.requests) > 2
        assert span_ids(receiver) == [r.span_id for r in spans]  # each once, in order


async def test_after_a_death_only_the_unsettled_spans_go_to_the_new_child(make: Make) -> None:
    """Killed after part of a batch was taken: the rest goes, once, and a refusal in it names the right span."""
    spans = records()
    poison = spans[-3]
    with TakesOneThenFails() as receiver:
        receiver.refuse(lambda s: int.from_bytes(s.span_id, "big") == poison.span_id)
        sink = make(f"http://{receiver.endpoint}", "grpc", timeout=1.0, max_request_bytes=8_000)
        with trio.fail_after(30):
            assert not (await sink.export(spans)).done
            taken = len(span_ids(receiver))
            assert 0 < taken < len(spans)
            assert sink.pid is not None
            os.kill(sink.pid, signal.SIGKILL)
            receiver.failing = False
            died = await sink.export(spans)
            assert not died.done
            assert sink.restarts == 1
            delivery = await sink.export(spans)
        assert delivery.done
        assert [r for r, _ in delivery.refused] == [poison]
        assert delivery.refused[0][0] is poison
        assert span_ids(receiver) == [r.span_id for r in spans if r is not poison]  # each once, in order


async def test_a_new_batch_after_an_unfinished_one_is_not_taken_for_a_retry(make: Make) -> None:
    """A pipeline restart hands over new batches: the child's unfinished one is dropped, not resumed."""
    spans = records()
    first, second = spans[:60], spans[60:]
    with TakesOneThenFails() as receiver:
        sink = make(f"http://{receiver.endpoint}", "grpc", timeout=1.0, max_request_bytes=8_000)
        with trio.fail_after(30):
            assert not (await sink.export(first)).done
            taken = span_ids(receiver)
            receiver.failing = False
            assert (await sink.export(second)).done
        assert span_ids(receiver) == taken + [r.span_id for r in second]


async def test_a_killed_child_is_replaced_and_nothing_is_lost(
    otlp_grpc: GrpcOtlpReceiver, make: Make
) -> None:
    """SIGKILL while the child works: the call returns not done, a new child sends the batch, no span lost."""
    spans = records()
    stats = Stats()
    sink = make(f"http://{otlp_grpc.endpoint}", "grpc", timeout=10.0, stats=stats)
    with trio.fail_after(60):
        assert (await sink.export(spans[:10])).done  # the child is up and has sent once
        otlp_grpc.set_down(grpc.StatusCode.UNAVAILABLE)  # the child now retries inside the SDK
        first = sink.pid
        assert first is not None
        async with trio.open_nursery() as nursery:
            result: list[Delivery] = []

            async def export() -> None:
                result.append(await sink.export(spans))

            nursery.start_soon(export)
            while otlp_grpc.attempts < 2:  # noqa: ASYNC110 - polls a receiver thread
                await trio.sleep(0.01)
            os.kill(first, signal.SIGKILL)
        (died,) = result
        assert not died.done
        assert "ended" in died.reason
        assert sink.restarts == stats.export_process_restarts == 1
        otlp_grpc.set_up()
        assert (await sink.export(spans)).done
    assert sink.pid not in (None, first)
    assert set(span_ids(otlp_grpc)) == {r.span_id for r in spans}


async def test_a_cancelled_export_kills_the_child_and_the_next_one_works(
    otlp_grpc: GrpcOtlpReceiver, make: Make
) -> None:
    """A cancelled call cannot leave a late answer in the pipe for the next batch."""
    spans = records()
    sink = make(f"http://{otlp_grpc.endpoint}", "grpc", timeout=10.0)
    otlp_grpc.set_down(grpc.StatusCode.UNAVAILABLE)
    first = sink.pid
    assert first is not None
    with trio.move_on_after(1.0):
        await sink.export(spans)
    with trio.fail_after(10):
        while not gone(first):  # noqa: ASYNC110 - polls another process
            await trio.sleep(0.01)
    otlp_grpc.set_up()
    with trio.fail_after(30):
        assert (await sink.export(spans[:5])).done
    assert sink.restarts == 0  # a kill of our own is not a death
    assert set(span_ids(otlp_grpc)) >= {r.span_id for r in spans[:5]}


async def test_shutdown_leaves_no_child(otlp_grpc: GrpcOtlpReceiver, make: Make) -> None:
    """After shutdown the child has exited and been waited for."""
    sink = make(f"http://{otlp_grpc.endpoint}", "grpc")
    pid = sink.pid
    assert pid is not None
    with trio.fail_after(30):
        assert (await sink.export(records()[:3])).done
    sink.shutdown()
    assert sink.pid is None
    assert gone(pid)


async def test_the_child_exits_when_its_parent_goes(otlp_grpc: GrpcOtlpReceiver) -> None:
    """A child whose input pipe closes (its parent died) exits by itself."""
    sink = ProcessSink(settings(f"http://{otlp_grpc.endpoint}", "grpc"), RESOURCE)
    child = sink._child
    assert child is not None
    child.close()  # what the kernel does when the parent dies
    with trio.fail_after(30):
        code = await trio.to_thread.run_sync(child.proc.wait)
    assert code == 0
