"""A tiny ``/metrics`` (Prometheus text format) and ``/healthz`` HTTP server, as a trio task.

Theory of operation: :func:`render_prometheus` is a pure function from a frozen
:class:`MetricsSnapshot` to exposition text (format 0.0.4), so what a scrape
shows is unit-tested byte for byte. :func:`serve_metrics` is a deliberately
small HTTP/1.1 server on :func:`trio.serve_tcp`: one request per connection
(``Connection: close``), ``GET``/``HEAD`` only, the request head bounded in size
and in time, a bounded number of concurrent connections, and a short "lingering
close" so a client whose oversized request was refused still reads the answer.
There is no new dependency and nothing here touches the pipeline: the service
passes two callables, one for a snapshot and one for health.

:func:`snapshot_from` maps the counters in :mod:`hydra_otel.selfmon.stats` and
:class:`~hydra_otel.selfmon.stats.ListenStatistics` to metric names (see
docs/operations-tools.md).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

import trio

from hydra_otel.selfmon.stats import ListenStatistics, Stats

#: Largest request head (request line plus headers) accepted; larger gets 431.
MAX_REQUEST_BYTES = 8192
#: Time a client has to send its whole request head; then it gets 408.
REQUEST_TIMEOUT = 10.0
#: Time a client has to take the response.
WRITE_TIMEOUT = 10.0
#: Connections served at once; more are closed at once (a scraper needs one).
MAX_CONNECTIONS = 32
#: After answering, how long to read and discard what the client still sends before closing.
LINGER_TIMEOUT = 1.0
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class MetricKind(enum.Enum):
    """The Prometheus metric types hydra-otel exposes."""

    COUNTER = "counter"
    GAUGE = "gauge"


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One value of a metric, with its labels in the order they are rendered."""

    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Metric:
    """A metric family: name, help text, kind and samples (none is valid: HELP and TYPE only).

    Raises:
        ValueError: a metric or label name Prometheus would reject.
    """

    name: str
    help: str
    kind: MetricKind
    samples: tuple[Sample, ...] = ()

    def __post_init__(self) -> None:
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        for sample in self.samples:
            for label, _ in sample.labels:
                if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                    raise ValueError(f"invalid label name {label!r} on {self.name}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSnapshot:
    """Every metric at one moment, in rendering order."""

    metrics: tuple[Metric, ...] = ()


def counter(name: str, help: str, value: float) -> Metric:  # noqa: A002 - Prometheus's word
    """A counter without labels."""
    return Metric(name=name, help=help, kind=MetricKind.COUNTER, samples=(Sample(value=value),))


def labelled_counter(name: str, help: str, label: str, counts: Mapping[str, int]) -> Metric:  # noqa: A002
    """A counter with one label, one sample per key of ``counts`` (sorted, for stable output)."""
    samples = tuple(Sample(value=counts[k], labels=((label, k),)) for k in sorted(counts))
    return Metric(name=name, help=help, kind=MetricKind.COUNTER, samples=samples)


def gauge(name: str, help: str, value: float, labels: tuple[tuple[str, str], ...] = ()) -> Metric:  # noqa: A002
    """A gauge with one sample, e.g. a queue depth for ``snapshot_from``'s ``extra_gauges``."""
    return Metric(name=name, help=help, kind=MetricKind.GAUGE, samples=(Sample(value=value, labels=labels),))


# --- rendering ------------------------------------------------------------------------------------------


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int):  # bool too: True renders as 1
        return str(int(value))
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def render_prometheus(snapshot: MetricsSnapshot) -> str:
    """Render ``snapshot`` in the Prometheus text exposition format 0.0.4.

    Args:
        snapshot: the metrics; families and samples are rendered in the order given.

    Returns:
        ``# HELP`` and ``# TYPE`` lines then one line per sample for each family, every
        line ending in a newline; help text and label values escaped as the format says.
    """
    lines: list[str] = []
    for m in snapshot.metrics:
        lines.append(f"# HELP {m.name} {_escape_help(m.help)}")
        lines.append(f"# TYPE {m.name} {m.kind.value}")
        for s in m.samples:
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels)
            lines.append(
                f"{m.name}{{{labels}}} {_format_value(s.value)}"
                if labels
                else f"{m.name} {_format_value(s.value)}"
            )
    return "".join(line + "\n" for line in lines)


def snapshot_from(
    stats: Stats, listen: ListenStatistics, extra_gauges: Iterable[Metric] = ()
) -> MetricsSnapshot:
    """Map the pipeline's counters to metrics (names in docs/operations-tools.md).

    ``Stats.exporting_failed`` is a state, not a counter: it shows through the
    caller's readiness gauge.

    Args:
        stats: the service's shared counters.
        listen: the LISTEN connection's counters.
        extra_gauges: further metrics the caller measures itself (queue depths, open
            evaluations, readiness), appended as they are.

    Returns:
        The snapshot, counters first, in a fixed order.
    """
    p = "hydra_otel_"
    return MetricsSnapshot(
        metrics=(
            counter(
                f"{p}notifications_received_total",
                "Notifications taken off the LISTEN connection.",
                listen.received,
            ),
            counter(
                f"{p}notifications_dropped_total",
                "Notifications dropped because the intake queue was full (each episode triggers a catch-up).",
                listen.dropped,
            ),
            counter(f"{p}db_queries_total", "Read-only queries sent to Hydra's database.", stats.queries),
            counter(
                f"{p}listen_connects_total",
                "Times LISTEN became active (first connect and every reconnect).",
                listen.connects,
            ),
            counter(
                f"{p}listen_connection_losses_total",
                "LISTEN connections lost or refused.",
                listen.connection_losses,
            ),
            labelled_counter(
                f"{p}events_received_total", "Notifications parsed, by channel.", "channel", stats.events
            ),
            labelled_counter(
                f"{p}payload_errors_total",
                "Malformed notification payloads dropped, by channel.",
                "channel",
                stats.payload_errors,
            ),
            labelled_counter(
                f"{p}missing_rows_total",
                "IDs not found in Hydra's tables, by table.",
                "table",
                stats.missing_rows,
            ),
            labelled_counter(
                f"{p}notifications_rejected_total",
                "Evaluation notifications not acted on (eval_started not opened, superseded attempts not "
                "reported), by reason.",
                "reason",
                stats.notifications_rejected,
            ),
            labelled_counter(
                f"{p}resyncs_total",
                "Catch-ups from Hydra's tables requested, by reason.",
                "reason",
                stats.resyncs,
            ),
            counter(
                f"{p}builds_not_finished_total",
                "build_finished for a build restarted again before it was read.",
                stats.not_finished,
            ),
            counter(
                f"{p}spans_exported_total", "Spans the OTLP endpoint acknowledged.", stats.spans_exported
            ),
            counter(
                f"{p}spans_dropped_total",
                "Spans lost: live-only spans the endpoint had not acknowledged when the pipeline stopped.",
                stats.spans_dropped,
            ),
            counter(
                f"{p}spans_requeued_total",
                "Spans the endpoint had not acknowledged when the pipeline stopped; the catch-up exports "
                "them again.",
                stats.spans_requeued,
            ),
            counter(
                f"{p}spans_refused_total",
                "Spans the OTLP endpoint refused for good (bad data); each dropped alone.",
                stats.spans_refused,
            ),
            counter(
                f"{p}spans_repaired_total",
                "Spans sent with impossible values clamped or omitted (see hydra.data_issue).",
                stats.spans_repaired,
            ),
            counter(
                f"{p}spans_deduplicated_total",
                "Exact repeats of recently exported spans, not exported again.",
                stats.spans_deduplicated,
            ),
            counter(
                f"{p}builds_deduplicated_total",
                "Build finishes both the live path and the catch-up brought, rendered once.",
                stats.builds_deduplicated,
            ),
            counter(
                f"{p}spans_over_budget_total",
                "Step spans left out of a trace by the span budget (each build span says how many).",
                stats.spans_over_budget,
            ),
            counter(
                f"{p}export_failures_total",
                "Failed export attempts (each is retried).",
                stats.export_failures,
            ),
            counter(
                f"{p}checkpoints_total",
                "Progress marks stored after the endpoint acknowledged what they cover.",
                stats.checkpoints,
            ),
            counter(
                f"{p}marks_store_failures_total",
                "Progress-mark writes that failed (a full disk, say); exporting goes on and each is retried.",
                stats.marks_store_failures,
            ),
            counter(
                f"{p}notifications_undecodable_total",
                "Notifications dropped because their channel or payload is not valid UTF-8.",
                listen.undecodable,
            ),
            labelled_counter(
                f"{p}permission_denied_total",
                "Queries refused because hydra-otel's role lacks a grant (SQLSTATE 42501), by table.",
                "table",
                stats.permission_denied,
            ),
            Metric(
                name=f"{p}permission_missing",
                help="1 for each table hydra-otel may not read now (unhealthy until granted).",
                kind=MetricKind.GAUGE,
                samples=tuple(Sample(value=1, labels=(("table", t),)) for t in sorted(stats.denied_tables)),
            ),
            counter(
                f"{p}task_restarts_total",
                "Pipeline restarts after an unexpected error (each logged with its traceback).",
                stats.task_restarts,
            ),
            counter(
                f"{p}export_process_restarts_total",
                "Span export processes that died and were replaced (each batch they held is retried).",
                stats.export_process_restarts,
            ),
            *extra_gauges,
        )
    )


# --- HTTP ---------------------------------------------------------------------------------------------


def _response(
    status: HTTPStatus,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head: bool = False,
    allow: bool = False,
) -> bytes:
    headers = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    if allow:
        headers.append("Allow: GET, HEAD")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + (b"" if head else body)


def _plain(status: HTTPStatus, text: str | None = None, *, head: bool = False, allow: bool = False) -> bytes:
    return _response(status, ((text or status.phrase) + "\n").encode(), head=head, allow=allow)


class _RequestTooLargeError(Exception):
    """The request head passed :data:`MAX_REQUEST_BYTES`."""


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The request head up to its blank line; None if the client closed first."""
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            end = buffer.find(b"\n\n")  # tolerate bare LF, as RFC 9112 allows
        if end >= 0:
            return bytes(buffer[:end])
        if len(buffer) > MAX_REQUEST_BYTES:
            raise _RequestTooLargeError
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        buffer += chunk


def route(head: bytes, snapshot: Callable[[], MetricsSnapshot], healthy: Callable[[], bool]) -> bytes:
    """The complete response to one request head (pure apart from the two callables).

    Args:
        head: the request line and headers, without the blank line.
        snapshot: called for ``/metrics``.
        healthy: called for ``/healthz``.

    Returns:
        The response bytes: 200, 400, 404, 405 or 503.
    """
    request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _plain(HTTPStatus.BAD_REQUEST)
    method, raw_target = parts[0], parts[1]
    try:
        target = raw_target.decode("ascii")
    except UnicodeDecodeError:
        return _plain(HTTPStatus.BAD_REQUEST)
    if method not in (b"GET", b"HEAD"):
        return _plain(HTTPStatus.METHOD_NOT_ALLOWED, allow=True)
    is_head = method == b"HEAD"
    path = urlsplit(target).path if "://" in target else target.split("?", 1)[0]
    if path == "/metrics":
        body = render_prometheus(snapshot()).encode()
        return _response(HTTPStatus.OK, body, content_type=PROMETHEUS_CONTENT_TYPE, head=is_head)
    if path == "/healthz":
        if healthy():
            return _plain(HTTPStatus.OK, "ok", head=is_head)
        return _plain(HTTPStatus.SERVICE_UNAVAILABLE, "unhealthy", head=is_head)
    return _plain(HTTPStatus.NOT_FOUND, head=is_head)


class _Server:
    """Per-server state: the callables and the number of open connections."""

    def __init__(
        self, snapshot: Callable[[], MetricsSnapshot], healthy: Callable[[], bool], request_timeout: float
    ) -> None:
        self.snapshot = snapshot
        self.healthy = healthy
        self.request_timeout = request_timeout
        self.active = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection; a client that disappears is not an error."""
        async with stream:
            if self.active >= MAX_CONNECTIONS:
                return
            self.active += 1
            try:
                await self._serve(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away; nothing to tell it
            finally:
                self.active -= 1

    async def _serve(self, stream: trio.SocketStream) -> None:
        response: bytes | None = _plain(HTTPStatus.REQUEST_TIMEOUT)
        with trio.move_on_after(self.request_timeout):
            try:
                head = await _read_head(stream)
            except _RequestTooLargeError:
                response = _plain(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            else:
                response = None if head is None else route(head, self.snapshot, self.healthy)
        if response is None:
            return
        with trio.move_on_after(WRITE_TIMEOUT):
            await stream.send_all(response)
            await stream.send_eof()
            await _linger(stream)


async def _linger(stream: trio.abc.ReceiveStream) -> None:
    # Closing with unread input makes the kernel send RST, which can destroy the response
    # before the client reads it (an oversized request); read a bounded amount first.
    with trio.move_on_after(LINGER_TIMEOUT):
        for _ in range(16):
            if not await stream.receive_some(65536):
                return


async def serve_metrics(
    host: str,
    port: int,
    snapshot: Callable[[], MetricsSnapshot],
    healthy: Callable[[], bool],
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` and ``/healthz`` on ``host``:``port`` until cancelled.

    ``GET /metrics`` answers :func:`render_prometheus` of ``snapshot()``; ``GET /healthz``
    answers 200 ``ok`` when ``healthy()`` is true, else 503; any other path 404, any
    other method 405. ``HEAD`` works too. Each connection serves one request.

    Args:
        host: address to bind, e.g. ``127.0.0.1``, or ``""``/``0.0.0.0`` for every interface.
        port: TCP port; 0 picks a free one (read it from the listeners ``started()`` reports).
        snapshot: returns the current metrics; called once per scrape, in the trio thread.
        healthy: returns the health; called once per ``/healthz`` request.
        request_timeout: seconds a client has to send its request head.
        task_status: reports the bound :class:`trio.SocketListener` list once listening.

    Raises:
        OSError: the address cannot be bound.
    """
    server = _Server(snapshot, healthy, request_timeout)
    await trio.serve_tcp(server.handle, port, host=host or None, task_status=task_status)
