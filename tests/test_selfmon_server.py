"""The /metrics and /healthz server: exact exposition text, and real HTTP over a trio socket.

Rendering tests are pure. Server tests bind 127.0.0.1 on a free port and talk raw
HTTP/1.1 with a trio TCP client, on the real clock (sockets), each under a watchdog.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import trio

from hydra_otel.selfmon.server import (
    MAX_REQUEST_BYTES,
    PROMETHEUS_CONTENT_TYPE,
    Metric,
    MetricKind,
    MetricsSnapshot,
    Sample,
    counter,
    gauge,
    labelled_counter,
    render_prometheus,
    serve_metrics,
    snapshot_from,
)
from hydra_otel.selfmon.stats import ListenStatistics, Stats

WATCHDOG = 10


def test_render_exact_output() -> None:
    """Families render as HELP, TYPE and samples, in the given order, with labels and integer values."""
    snapshot = MetricsSnapshot(
        metrics=(
            counter("hydra_otel_spans_exported_total", "Spans the endpoint acknowledged.", 42),
            labelled_counter(
                "hydra_otel_events_received_total",
                "By channel.",
                "channel",
                {"eval_started": 2, "build_queued": 5},
            ),
            gauge("hydra_otel_queue_depth", "Items waiting.", 1.5, (("stage", "exporter"),)),
        )
    )
    assert render_prometheus(snapshot) == (
        "# HELP hydra_otel_spans_exported_total Spans the endpoint acknowledged.\n"
        "# TYPE hydra_otel_spans_exported_total counter\n"
        "hydra_otel_spans_exported_total 42\n"
        "# HELP hydra_otel_events_received_total By channel.\n"
        "# TYPE hydra_otel_events_received_total counter\n"
        'hydra_otel_events_received_total{channel="build_queued"} 5\n'
        'hydra_otel_events_received_total{channel="eval_started"} 2\n'
        "# HELP hydra_otel_queue_depth Items waiting.\n"
        "# TYPE hydra_otel_queue_depth gauge\n"
        'hydra_otel_queue_depth{stage="exporter"} 1.5\n'
    )


def test_render_escapes_help_and_label_values() -> None:
    """Backslash and newline are escaped in HELP; backslash, quote and newline in label values."""
    metric = Metric(
        name="m",
        help='a\\b\nc "quoted"',
        kind=MetricKind.GAUGE,
        samples=(Sample(value=1, labels=(("a", 'x\\y"z\nw'), ("b", ""))),),
    )
    assert render_prometheus(MetricsSnapshot(metrics=(metric,))) == (
        '# HELP m a\\\\b\\nc "quoted"\n# TYPE m gauge\nm{a="x\\\\y\\"z\\nw",b=""} 1\n'
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3.0, "3"),
        (0.25, "0.25"),
        (1e300, "1e+300"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
        (True, "1"),
    ],
)
def test_render_values(value: float, text: str) -> None:
    """Values render as Prometheus parses them: integers without a point, special floats by name."""
    out = render_prometheus(MetricsSnapshot(metrics=(gauge("g", "h", value),)))
    assert out.splitlines()[-1] == f"g {text}"


def test_render_empty_family_and_snapshot() -> None:
    """A family with no samples keeps its HELP and TYPE lines; an empty snapshot renders nothing."""
    assert render_prometheus(MetricsSnapshot()) == ""
    empty = labelled_counter("c_total", "h", "reason", {})
    assert (
        render_prometheus(MetricsSnapshot(metrics=(empty,))) == "# HELP c_total h\n# TYPE c_total counter\n"
    )


@pytest.mark.parametrize(
    ("name", "label"), [("1bad", "ok"), ("has-dash", "ok"), ("ok", "__reserved"), ("ok", "x-y")]
)
def test_invalid_names_are_rejected(name: str, label: str) -> None:
    """Metric and label names Prometheus would reject fail at construction."""
    with pytest.raises(ValueError, match="invalid"):
        Metric(name=name, help="h", kind=MetricKind.GAUGE, samples=(Sample(value=1, labels=((label, "v"),)),))


def test_snapshot_from_maps_every_counter() -> None:
    """Every Stats and ListenStatistics counter appears under its metric name (Stats.queries excepted)."""
    stats = Stats(
        events=Counter({"eval_added": 3}),
        payload_errors=Counter({"step_finished": 1}),
        missing_rows=Counter({"builds": 2}),
        resyncs=Counter({"overflow": 4}),
        spans_deduplicated=5,
        not_finished=6,
        spans_exported=7,
        spans_dropped=8,
        spans_requeued=15,
        export_failures=9,
        checkpoints=10,
    )
    listen = ListenStatistics(received=11, dropped=12, connects=13, connection_losses=14)
    extra = gauge("hydra_otel_ready", "1 once LISTEN is active.", 1)
    lines = set(render_prometheus(snapshot_from(stats, listen, [extra])).splitlines())
    assert {
        'hydra_otel_events_received_total{channel="eval_added"} 3',
        'hydra_otel_payload_errors_total{channel="step_finished"} 1',
        'hydra_otel_missing_rows_total{table="builds"} 2',
        'hydra_otel_resyncs_total{reason="overflow"} 4',
        "hydra_otel_spans_deduplicated_total 5",
        "hydra_otel_builds_not_finished_total 6",
        "hydra_otel_spans_exported_total 7",
        "hydra_otel_spans_dropped_total 8",
        "hydra_otel_spans_requeued_total 15",
        "hydra_otel_export_failures_total 9",
        "hydra_otel_checkpoints_total 10",
        "hydra_otel_notifications_received_total 11",
        "hydra_otel_notifications_dropped_total 12",
        "hydra_otel_listen_connects_total 13",
        "hydra_otel_listen_connection_losses_total 14",
        "hydra_otel_ready 1",
    } <= lines


def test_snapshot_from_covers_new_stats_fields() -> None:
    """A counter added to Stats or ListenStatistics must be exported (or listed here as deliberately not)."""
    not_exported = {"exporting_failed"}  # a state shown through the readiness gauge
    stats = Stats()
    for f in dataclasses.fields(Stats):
        if isinstance(getattr(stats, f.name), Counter | dict):
            getattr(stats, f.name)[f"marker_{f.name}"] = 1
        elif isinstance(getattr(stats, f.name), bool):
            setattr(stats, f.name, True)
        else:
            setattr(stats, f.name, 1000 + len(f.name))
    text = render_prometheus(snapshot_from(stats, ListenStatistics()))
    for f in dataclasses.fields(Stats):
        value = getattr(stats, f.name)
        needle = f'"marker_{f.name}"' if isinstance(value, Counter | dict) else f" {value}\n"
        assert (needle in text) != (f.name in not_exported), f"Stats.{f.name}"
    listen = ListenStatistics(
        **{f.name: 2000 + i for i, f in enumerate(dataclasses.fields(ListenStatistics))}
    )
    text = render_prometheus(snapshot_from(Stats(), listen))
    for i, f in enumerate(dataclasses.fields(ListenStatistics)):
        assert f" {2000 + i}\n" in text, f"ListenStatistics.{f.name}"


# --- the server ---------------------------------------------------------------------------------------


class Health:
    """A switchable health flag."""

    def __init__(self) -> None:
        self.ok = True

    def __call__(self) -> bool:
        return self.ok


SNAPSHOT = MetricsSnapshot(metrics=(counter("hydra_otel_spans_exported_total", "Spans.", 3),))


async def start(nursery: trio.Nursery, health: Health, **kwargs: float) -> int:
    listeners: list[trio.SocketListener] = await nursery.start(
        lambda task_status: serve_metrics(
            "127.0.0.1", 0, lambda: SNAPSHOT, health, task_status=task_status, **kwargs
        )
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` raw and read the whole response until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n".encode()


async def test_metrics_endpoint(nursery: trio.Nursery) -> None:
    """GET /metrics answers 200 with the rendered snapshot, the Prometheus content type and a length."""
    with trio.fail_after(WATCHDOG):
        port = await start(nursery, Health())
        status, headers, body = await exchange(port, get("/metrics?name[]=x"))
    assert status == 200
    assert headers["content-type"] == PROMETHEUS_CONTENT_TYPE
    assert headers["content-length"] == str(len(body))
    assert headers["connection"] == "close"
    assert body.decode() == render_prometheus(SNAPSHOT)


async def test_healthz_follows_health(nursery: trio.Nursery) -> None:
    """/healthz is 200 "ok" while healthy() is true and 503 once it is false."""
    health = Health()
    with trio.fail_after(WATCHDOG):
        port = await start(nursery, health)
        assert await exchange(port, get("/healthz")) == (
            200,
            {
                "content-type": "text/plain; charset=utf-8",
                "content-length": "3",
                "connection": "close",
                "cache-control": "no-store",
            },
            b"ok\n",
        )
        health.ok = False
        status, _, body = await exchange(port, get("/healthz"))
    assert (status, body) == (503, b"unhealthy\n")


async def test_head_has_no_body(nursery: trio.Nursery) -> None:
    """HEAD gets the headers of GET (including its length) and no body."""
    with trio.fail_after(WATCHDOG):
        port = await start(nursery, Health())
        status, headers, body = await exchange(port, get("/metrics", "HEAD"))
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len(render_prometheus(SNAPSHOT)))


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (get("/"), 404),
        (get("/metrics/extra"), 404),
        (get("/metrics", "POST"), 405),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.0\n\n", 200),
    ],
)
async def test_other_requests(nursery: trio.Nursery, request_bytes: bytes, expected: int) -> None:
    """Unknown paths get 404, other methods 405 (with Allow), malformed request lines 400; bare LF works."""
    with trio.fail_after(WATCHDOG):
        port = await start(nursery, Health())
        status, headers, _ = await exchange(port, request_bytes)
    assert status == expected
    if expected == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_too_large_request_is_rejected(nursery: trio.Nursery) -> None:
    """A request head beyond the limit gets 431, and the server keeps serving."""
    huge = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * (4 * MAX_REQUEST_BYTES) + b"\r\n\r\n"
    with trio.fail_after(WATCHDOG):
        port = await start(nursery, Health())
        status, _, body = await exchange(port, huge)
        assert (status, body) == (431, b"Request Header Fields Too Large\n")
        assert (await exchange(port, get("/healthz")))[0] == 200


async def test_slow_client_times_out(nursery: trio.Nursery) -> None:
    """A client that never finishes its request head gets 408 after the request timeout."""
    with trio.fail_after(WATCHDOG):
        port = await start(nursery, Health(), request_timeout=0.2)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


async def test_client_closing_early_is_harmless(nursery: trio.Nursery) -> None:
    """A client that connects and closes without a request does not disturb the server."""
    with trio.fail_after(WATCHDOG):
        port = await start(nursery, Health())
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
        assert (await exchange(port, get("/healthz")))[0] == 200
