"""One line per OTLP outage and one on recovery, not one per SDK retry."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pytest
import trio
from opentelemetry.sdk.resources import Resource

from hydra_otel.adapters import export_log
from hydra_otel.adapters.export_log import SDK_LOGGERS, OutageFilter
from hydra_otel.adapters.otlp import ExporterSettings, OtlpSink, make_exporter
from hydra_otel.core.backoff import Backoff
from hydra_otel.core.catchup import Checkpoint, Marks
from hydra_otel.core.spans import SpanRecord
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, HttpOtlpReceiver
from hydra_otel.selfmon.stats import Stats
from hydra_otel.tasks.exporter import run_exporter
from tests.factories import make_span

GRPC_LOGGER = "opentelemetry.exporter.otlp.proto.grpc.exporter"


def sdk_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name in SDK_LOGGERS and r.levelno >= logging.WARNING]


def hydra_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hydra_otel.exporter"]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_an_outage_is_logged_once_and_its_end_once(
    otlp_grpc: GrpcOtlpReceiver, otlp_http: HttpOtlpReceiver, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    receiver = otlp_grpc if protocol == "grpc" else otlp_http
    endpoint = f"http://{otlp_grpc.endpoint}" if protocol == "grpc" else otlp_http.traces_url
    settings = ExporterSettings(protocol=protocol, endpoint=endpoint, headers={}, timeout_s=1.5)
    sink = OtlpSink(make_exporter(settings), Resource({"service.name": "t"}))
    receiver.set_down()  # UNAVAILABLE / 503: the SDK retries inside each export, then the task does
    send, receive = trio.open_memory_channel[Sequence[SpanRecord] | Checkpoint](10)
    stats = Stats()

    async def commit(marks: Marks) -> None:
        await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_exporter(
                receive,
                sink,
                stats,
                batch_size=10,
                delay=0.01,
                backoff=Backoff(base=0.1, cap=0.2),
                commit=commit,
            )
        )
        await send.send([make_span()])
        with trio.fail_after(20):
            # ASYNC110: counters moved by the exporter task and the receiver's threads, polled.
            while stats.export_failures < 3 or receiver.attempts < 6:  # noqa: ASYNC110
                await trio.sleep(0.05)
        receiver.set_up()
        await receiver.wait_for_spans(1)
        await send.aclose()
    sink.shutdown()
    assert sdk_lines(caplog) == []
    assert hydra_lines(caplog) == ["OTLP export failed; retrying with backoff", "OTLP export recovered"]


def record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, "exporter.py", 1, msg, args, None)


def transient(signal: str) -> logging.LogRecord:
    # As grpc/exporter.py words it: code, signal, endpoint, delay, details.
    return record(
        GRPC_LOGGER,
        "Transient error %s encountered while exporting %s to %s, retrying in %.2fs. Error details: %s",
        "StatusCode.UNAVAILABLE",
        signal,
        "c:4317",
        1.0,
        "down",
    )


def test_the_first_line_of_an_outage_passes_and_its_repeats_do_not(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    f = OutageFilter()
    first = transient("metrics")
    assert f.filter(first)
    assert first.getMessage().endswith(
        "(further OTLP metrics export errors are not logged until it recovers)"
    )
    assert not f.filter(transient("metrics"))
    assert not f.filter(record(GRPC_LOGGER, "Failed to export %s to %s", "metrics", "c:4317"))
    assert f.filter(transient("logs"))  # another signal has its own outage
    f.recovered("metrics")
    assert [r.getMessage() for r in caplog.records] == ["OTLP export recovered"]
    f.recovered("metrics")  # no outage, no line
    assert len(caplog.records) == 1
    assert f.filter(transient("metrics"))  # a new outage


def test_trace_lines_are_left_to_the_exporter_task() -> None:
    f = OutageFilter()
    assert not f.filter(transient("traces"))
    http = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    assert not f.filter(record(http, "Failed to export %s batch code: %s, reason: %s", "spans", 400, "bad"))


def test_other_lines_pass() -> None:
    f = OutageFilter()
    assert f.filter(record(GRPC_LOGGER, "Exporter already shutdown, ignoring batch"))
    assert f.filter(
        record("opentelemetry.exporter.otlp.proto.http.metric_exporter", "Failed to encode metrics")
    )


def test_a_long_outage_is_reminded_of(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    f = OutageFilter()
    assert f.filter(transient("logs"))
    now[0] += export_log.REMIND_AFTER_S - 1
    assert not f.filter(transient("logs"))
    now[0] += 2
    assert f.filter(transient("logs"))
