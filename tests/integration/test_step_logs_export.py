"""Failed-step log tails exported as OTLP log records over gRPC, correlated with the step span."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber
from opentelemetry.sdk.resources import Resource

from hydra_otel.adapters.otlp import ExporterSettings
from hydra_otel.adapters.steplogs import LogTailSink, StepLogs, make_log_exporter
from hydra_otel.core.builds import step_span
from hydra_otel.core.logtail import EVENT_NAME, hydra_log_path
from hydra_otel.demo.sandbox.receiver import attributes_dict
from tests.metrics_logs_receiver import GrpcMetricsLogsReceiver
from tests.test_steplogs import BUILD, CFG, DRV, LINES, STEP, expected_tail, settings, write_log

RESOURCE = Resource({"service.name": "hydra-otel-test"})


@pytest.fixture
def receiver() -> Iterator[GrpcMetricsLogsReceiver]:
    """A running OTLP/gRPC metrics and logs receiver."""
    with GrpcMetricsLogsReceiver() as r:
        yield r


async def test_tail_arrives_as_a_correlated_log_record(
    tmp_path: Path, receiver: GrpcMetricsLogsReceiver
) -> None:
    """The record carries the step span's trace and span IDs, severity ERROR, the tail as body, and its keys."""
    write_log(tmp_path, LINES, ".bz2")
    exporter = make_log_exporter(
        ExporterSettings(protocol="grpc", endpoint=f"http://{receiver.endpoint}", headers={}, timeout_s=5.0)
    )
    sink = LogTailSink(exporter, RESOURCE, schedule_delay_s=60.0)
    failed = step_span(CFG, BUILD, STEP, 0)
    ok = step_span(CFG, BUILD, STEP._replace(stepnr=1, status=0), 0)
    logs = StepLogs(settings(tmp_path), sink)
    out = await logs.process([ok, failed])
    assert out == [ok, failed]  # exported as a log record, so the span stays as it was
    with trio.fail_after(20):
        assert await sink.force_flush()
        await receiver.wait_until(lambda: bool(receiver.logs()))
        await logs.aclose()
    ((resource, record),) = receiver.logs()
    assert resource["service.name"] == "hydra-otel-test"
    assert record.trace_id == failed.trace_id.to_bytes(16, "big")
    assert record.span_id == failed.span_id.to_bytes(8, "big")
    assert record.flags & 0x01  # sampled
    assert record.time_unix_nano == failed.end_ns
    assert record.severity_number == SeverityNumber.SEVERITY_NUMBER_ERROR
    assert record.severity_text == "ERROR"
    assert record.event_name == EVENT_NAME
    assert record.body.string_value == expected_tail()
    assert attributes_dict(record.attributes) == {
        "hydra.build.id": 100,
        "hydra.step.nr": 2,
        "log.file.path": hydra_log_path(str(tmp_path), DRV) + ".bz2",
        "hydra.step.log_tail.lines": 10,
        "hydra.step.log_tail.truncated": True,
    }
