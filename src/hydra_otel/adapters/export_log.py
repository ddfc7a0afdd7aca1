"""One line when an OTLP outage starts and one when it ends, whatever the SDK's exporters log.

Theory of operation: the SDK's OTLP exporters log every transient error
("Transient error … retrying in 2.0s") and every failed export ("Failed to export
…"), so a collector down for an hour writes a line every few seconds for each
signal. hydra-otel promises one line per outage and one on recovery
(docs/operations.md):

* Traces: the exporter task logs both itself (``OTLP export failed; retrying
  with backoff`` with the SDK's reason, then ``OTLP export recovered``); the SDK's
  lines about traces are dropped.
* Metrics and step logs: the first SDK line of an outage passes; its repeats are
  dropped until an export of that signal succeeds, which :func:`watch` notices
  and logs once as ``OTLP export recovered``. Without a watch a signal is
  reminded of at most every :data:`REMIND_AFTER_S` seconds.

The filter sits on the SDK's loggers and recognises the lines by the start of
their format string, a behaviour of every release in the declared range
(tests/test_export_log.py checks it against the real exporters, on the lowest and newest). A release that
rewords them lets them through; nothing else is ever hidden.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Final, Protocol

log = logging.getLogger("hydra_otel.export")

#: The SDK exporters' loggers, and the signal of the HTTP ones (the gRPC one serves every signal).
SDK_LOGGERS: Final = {
    "opentelemetry.exporter.otlp.proto.grpc.exporter": None,
    "opentelemetry.exporter.otlp.proto.http.trace_exporter": "traces",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter": "metrics",
    "opentelemetry.exporter.otlp.proto.http._log_exporter": "logs",
}
_SIGNALS: Final = ("traces", "metrics", "logs")
#: How the retry and failure lines start (grpc/exporter.py and common/http.py of the SDK).
_OUTAGE_LINES: Final = ("Transient error", "Failed to export", "Shutdown in progress, aborting retry")
#: A signal whose recovery nobody watches is reminded of after this long.
REMIND_AFTER_S: Final = 600.0


class OutageFilter(logging.Filter):
    """Drops the SDK exporters' retry and failure lines beyond the first of each outage."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._failing: dict[str, float] = {}  # signal -> when its outage was last logged (monotonic)

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a retry or failure line that the outage's first line already covers."""
        if not isinstance(record.msg, str) or not record.msg.startswith(_OUTAGE_LINES):
            return True
        signal = SDK_LOGGERS.get(record.name) or _signal_in(record.args)
        if signal == "traces":
            return False  # the exporter task logs trace outages itself, with this line's reason
        now = time.monotonic()
        with self._lock:
            since = self._failing.get(signal)
            if since is not None and now - since < REMIND_AFTER_S:
                return False
            self._failing[signal] = now
        record.msg += " (further OTLP %s export errors are not logged until it recovers)"
        record.args = (*(record.args if isinstance(record.args, tuple) else ()), signal)
        return True

    def recovered(self, signal: str) -> None:
        """An export of ``signal`` succeeded: log the recovery if an outage was logged."""
        with self._lock:
            was_failing = self._failing.pop(signal, None) is not None
        if was_failing:
            log.info("OTLP export recovered", extra={"signal": signal})


def _signal_in(args: object) -> str:
    if isinstance(args, tuple):
        for arg in args:
            if arg in _SIGNALS:
                return str(arg)
    return "unknown"


#: The one filter, on every SDK exporter logger (see :func:`install`).
OUTAGES = OutageFilter()
_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Put :data:`OUTAGES` on the SDK exporters' loggers (idempotent)."""
    global _installed
    with _install_lock:
        if not _installed:
            for name in SDK_LOGGERS:
                logging.getLogger(name).addFilter(OUTAGES)
            _installed = True


class ExportResult(Protocol):
    """What an SDK exporter's ``export_operation`` yields (its class is private to the SDK)."""

    error: BaseException | None


class ExporterMetrics(Protocol):
    """An SDK exporter's self-metrics, as far as :class:`ExportWatch` uses them."""

    def export_operation(self, num_items: int) -> AbstractContextManager[ExportResult]:
        """Time and count one export."""
        ...


class ExportWatch:
    """Wraps an SDK exporter's self-metrics: notes each export's error, and reports recoveries.

    The SDK exporters run every export inside ``self._metrics.export_operation``, whose result
    carries the error the export ended with (None on success). That is the one place that sees
    both outcomes for every signal, so it is where a recovery is noticed.

    Args:
        inner: the exporter's own ``_metrics``.
        signal: ``traces``, ``metrics`` or ``logs``.
    """

    def __init__(self, inner: ExporterMetrics, signal: str) -> None:
        self._inner = inner
        self._signal = signal
        self._local = threading.local()

    @contextmanager
    def export_operation(self, num_items: int) -> Iterator[ExportResult]:
        """The inner context, noting its result's error when it ends."""
        self._local.error = None
        with self._inner.export_operation(num_items) as result:
            try:
                yield result
            finally:
                self._local.error = result.error
        if result.error is None:
            OUTAGES.recovered(self._signal)

    def error(self) -> BaseException | None:
        """The error the latest export on this thread ended with, if any."""
        error: BaseException | None = getattr(self._local, "error", None)
        return error


def watch(exporter: object, signal: str) -> ExportWatch | None:
    """Install :class:`ExportWatch` on an SDK OTLP exporter (and the filter); return it.

    Returns:
        The watch, or None when the exporter has no ``_metrics`` to wrap (another SDK release):
        then only the filter's reminder interval bounds the lines.
    """
    install()
    inner = getattr(exporter, "_metrics", None)
    if inner is None or not hasattr(inner, "export_operation"):
        return None
    current = inner if isinstance(inner, ExportWatch) else ExportWatch(inner, signal)
    exporter._metrics = current  # type: ignore[attr-defined]  # checked above
    return current
