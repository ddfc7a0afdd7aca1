"""Failed-step log tails: reading the end of Hydra's log files, and exporting it.

Theory of operation. For the failed build steps in a batch of spans
(``core.logtail.tail_request``), :class:`StepLogs` reads the end of each log in
one worker thread, then either emits an OTLP log record correlated with the
step span (:class:`LogTailSink`, when logs export is on) or returns the span
with a ``hydra.step.log_tail`` event (when it is off). Call it on spans that
passed the resolver's duplicate filter, so each step's tail is read once.

Reading is bounded. A plain log is read from ``max_bytes`` before its end,
whatever its size. Compressed logs must be decompressed from the start to reach
the end: they are streamed through a :class:`~hydra_otel.core.logtail.TailBuffer`
(memory stays ``max_bytes`` plus one chunk), and files larger than
``max_compressed_bytes`` are skipped. ``.bz2`` uses the standard library.
``.zst`` is piped through the ``zstd`` program (``zstd -dcq``), found on
``PATH`` when the settings are built: Hydra's own CompressLog plugin and its
compress-logs service run that same program, so a host that has ``.zst`` logs
has it, and hydra-otel needs no new dependency (docs/metrics-and-logs.md).

Everything async here is Trio-flavoured. Missing, unreadable, oversized or
unsupported logs are counted in :class:`TailStatistics`, never raised.
"""

from __future__ import annotations

import bz2
import dataclasses
import enum
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import trio
from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import hydra_otel
from hydra_otel.adapters.otlp import ExporterSettings, grpc_options
from hydra_otel.adapters.otlp_metrics import signal_endpoint
from hydra_otel.core.logtail import (
    DEFAULT_LOGS_DIR,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_COMPRESSED_BYTES,
    DEFAULT_MAX_LINES,
    EVENT_NAME,
    Compression,
    LogTail,
    TailBuffer,
    TailRequest,
    compression_of,
    log_attributes,
    log_candidates,
    log_tail_event,
    render_tail,
    tail_request,
)
from hydra_otel.core.spans import SpanRecord

#: Bytes read from a compressed file, and produced by one decompression call, at a time.
CHUNK = 64 * 1024
#: Seconds the ``zstd`` program may take to exit after its output was read.
ZSTD_WAIT_S = 10.0


class TailOutcome(enum.Enum):
    """What happened when a log tail was looked for."""

    FOUND = "found"
    MISSING = "missing"  # no candidate path exists
    UNREADABLE = "unreadable"  # exists, but reading or decompressing failed
    TOO_LARGE = "too_large"  # compressed and over max_compressed_bytes
    UNSUPPORTED = "unsupported"  # .zst without the zstd program


#: When several candidates fail, the outcome reported is the most telling one.
_RANK = {o: n for n, o in enumerate(TailOutcome)}


@dataclass(frozen=True, slots=True, kw_only=True)
class TailSettings:
    """Where logs are and how much of them to read.

    ``zstd`` is the path of the ``zstd`` program, or None: ``.zst`` logs are then unsupported.
    """

    logs_dir: str = DEFAULT_LOGS_DIR
    max_lines: int = DEFAULT_MAX_LINES
    max_bytes: int = DEFAULT_MAX_BYTES
    max_compressed_bytes: int = DEFAULT_MAX_COMPRESSED_BYTES
    zstd: str | None = field(default_factory=lambda: shutil.which("zstd"))
    #: Tails read per batch of spans at most (a mass failure must not stall the pipeline).
    max_per_batch: int = 64


@dataclass(frozen=True, slots=True)
class TailResult:
    """The outcome of looking for one log, and the tail when found."""

    outcome: TailOutcome
    tail: LogTail | None = None


class _Unreadable(Exception):
    """A log exists but cannot be read or decoded."""


class _TooLarge(Exception):
    """A compressed log over ``max_compressed_bytes``."""


class _Unsupported(Exception):
    """A ``.zst`` log without the ``zstd`` program."""


def read_tail_sync(paths: Sequence[str], settings: TailSettings) -> TailResult:
    """Read the tail of the first of ``paths`` that exists (blocking; run it in a worker thread).

    Args:
        paths: candidates in order (``core.logtail.log_candidates``).
        settings: bounds and the ``zstd`` program.

    Returns:
        The tail, or why there is none (MISSING when no candidate exists).
    """
    worst = TailOutcome.MISSING
    for path in paths:
        try:
            return TailResult(TailOutcome.FOUND, _read_one(path, settings))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except _TooLarge:
            outcome = TailOutcome.TOO_LARGE
        except _Unsupported:
            outcome = TailOutcome.UNSUPPORTED
        except (OSError, _Unreadable):
            # OSError: permissions, I/O errors, bz2's "Invalid data stream", zstd not executable.
            outcome = TailOutcome.UNREADABLE
        worst = max(worst, outcome, key=_RANK.__getitem__)
    return TailResult(worst)


def _read_one(path: str, s: TailSettings) -> LogTail:
    kind = compression_of(path)
    if kind is Compression.PLAIN:
        return _read_plain(path, s)
    size = os.stat(path).st_size  # FileNotFoundError: try the next candidate
    if size > s.max_compressed_bytes:
        raise _TooLarge
    buf = TailBuffer(s.max_bytes)
    if kind is Compression.BZIP2:
        with open(path, "rb") as f:
            for chunk in _bz2_chunks(f):
                buf.feed(chunk)
    else:
        if s.zstd is None:
            raise _Unsupported
        for chunk in _zstd_chunks(s.zstd, path):
            buf.feed(chunk)
    text, lines, truncated = render_tail(buf.value(), max_lines=s.max_lines, cut=buf.dropped)
    return LogTail(path=path, text=text, lines=lines, truncated=truncated, bytes_read=size)


def _read_plain(path: str, s: TailSettings) -> LogTail:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = max(0, size - s.max_bytes)
        f.seek(start)
        data = f.read(s.max_bytes)
    text, lines, truncated = render_tail(data, max_lines=s.max_lines, cut=start > 0)
    return LogTail(path=path, text=text, lines=lines, truncated=truncated, bytes_read=len(data))


def _bz2_chunks(f: BinaryIO) -> Iterator[bytes]:
    """Decompressed chunks of a (possibly multi-stream) bzip2 file, each at most ``CHUNK`` bytes.

    A stream cut short (a log still being compressed) ends the output instead of failing.
    """
    dec = bz2.BZ2Decompressor()
    data = b""
    while True:
        if dec.eof:
            data = dec.unused_data or f.read(CHUNK)
            if not data:
                return
            dec = bz2.BZ2Decompressor()
        elif dec.needs_input:
            data = f.read(CHUNK)
            if not data:
                return
        else:
            data = b""
        yield dec.decompress(data, max_length=CHUNK)


def _zstd_chunks(program: str, path: str) -> Iterator[bytes]:
    """The decompressed output of ``zstd -dcq path``, in chunks.

    Raises:
        _Unreadable: the program failed before producing any output.
    """
    with subprocess.Popen(
        [program, "-dcq", "--", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        produced = 0
        try:
            while chunk := proc.stdout.read(CHUNK):
                produced += len(chunk)
                yield chunk
        finally:
            proc.stdout.close()
            try:
                code = proc.wait(timeout=ZSTD_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        if code != 0 and produced == 0:
            raise _Unreadable(f"zstd exited with {code}")


def make_log_exporter(s: ExporterSettings, endpoint: str | None = None) -> LogRecordExporter:
    """The official OTLP log exporter for ``s`` (``/v1/logs`` with HTTP).

    Args:
        s: the traces exporter settings (protocol, headers, TLS, timeout, compression).
        endpoint: overrides the endpoint derived from the traces'.

    Returns:
        A gRPC or HTTP/protobuf log exporter.
    """
    url = endpoint or signal_endpoint(s, "logs")
    if s.protocol == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcExporter

        o = grpc_options(s)
        return GrpcExporter(
            endpoint=url,
            insecure=o.insecure,
            credentials=o.credentials,
            headers=dict(s.headers),
            timeout=s.timeout_s,
            compression=grpc.Compression.Gzip if o.gzip else None,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpExporter

    return HttpExporter(
        endpoint=url,
        certificate_file=s.certificate,
        headers=dict(s.headers),
        timeout=s.timeout_s,
        compression=HttpCompression.Gzip if s.compression == "gzip" else HttpCompression.NoCompression,
    )


_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class LogTailSink:
    """Emits log tails as OTLP log records through the SDK's LoggerProvider and batch processor.

    :meth:`emit` only queues (the processor's thread exports); :meth:`force_flush` and
    :meth:`shutdown` export, so they run in a worker thread.

    Args:
        exporter: the OTLP log exporter.
        resource: the traces' resource.
        schedule_delay_s: seconds between two exports of queued records.
    """

    def __init__(
        self, exporter: LogRecordExporter, resource: Resource, *, schedule_delay_s: float = 5.0
    ) -> None:
        self._provider: LoggerProvider | None = LoggerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_log_record_processor(
            BatchLogRecordProcessor(exporter, schedule_delay_millis=schedule_delay_s * 1000)
        )
        self._logger = self._provider.get_logger("hydra_otel", hydra_otel.__version__)

    def emit(self, request: TailRequest, tail: LogTail) -> None:
        """Queue a log record for ``tail``, correlated with the step span of ``request``."""
        span = NonRecordingSpan(
            SpanContext(request.trace_id, request.span_id, is_remote=False, trace_flags=_SAMPLED)
        )
        self._logger.emit(
            timestamp=request.at_ns,
            context=trace.set_span_in_context(span),
            severity_number=SeverityNumber.ERROR,
            severity_text="ERROR",
            body=tail.text,
            attributes=dict(log_attributes(request, tail)),
            event_name=EVENT_NAME,
        )

    async def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export queued records now (worker thread); True on success."""
        provider = self._provider
        if provider is None:
            return True
        return await trio.to_thread.run_sync(provider.force_flush, int(timeout_s * 1000))

    async def shutdown(self) -> None:
        """Export what is queued and stop the processor's thread (worker thread)."""
        provider, self._provider = self._provider, None
        if provider is not None:
            await trio.to_thread.run_sync(provider.shutdown)


@dataclass(slots=True)
class TailStatistics:
    """Counters of log tail lookups, by outcome, plus what the per-batch bound left out."""

    outcomes: Counter[str] = field(default_factory=Counter)
    skipped: int = 0  # failed steps beyond max_per_batch

    def snapshot(self) -> dict[str, object]:
        """A JSON-friendly copy."""
        return {"outcomes": dict(self.outcomes), "skipped": self.skipped}


class StepLogs:
    """Adds log tails to the failed steps in a batch of spans (Trio-flavoured).

    Args:
        settings: where logs are, and the bounds.
        sink: where tails go as OTLP log records; None puts them on the step span as an event.
    """

    def __init__(self, settings: TailSettings, sink: LogTailSink | None = None) -> None:
        self.settings = settings
        self.sink = sink
        self.stats = TailStatistics()

    async def process(
        self, records: Sequence[SpanRecord], log_paths: Mapping[tuple[int, int], str] | None = None
    ) -> list[SpanRecord]:
        """Read the tails of the failed steps among ``records`` and export or attach them.

        Args:
            records: spans about to be exported (after duplicate filtering).
            log_paths: (build ID, step number) -> log path, from ``step_finished`` notifications.

        Returns:
            ``records``, where a step got a ``hydra.step.log_tail`` event if there is no sink.
        """
        paths = log_paths or {}
        wanted: list[tuple[int, TailRequest]] = []
        for index, record in enumerate(records):
            request = tail_request(record)
            if request is not None:
                found = paths.get((request.build_id, request.step_nr))
                wanted.append((index, dataclasses.replace(request, log_path=found or None)))
        if len(wanted) > self.settings.max_per_batch:
            self.stats.skipped += len(wanted) - self.settings.max_per_batch
            wanted = wanted[: self.settings.max_per_batch]
        if not wanted:
            return list(records)
        candidates = [log_candidates(request, self.settings.logs_dir) for _, request in wanted]
        results = await trio.to_thread.run_sync(_read_all, candidates, self.settings)
        out = list(records)
        for (index, request), result in zip(wanted, results, strict=True):
            self.stats.outcomes[result.outcome.value] += 1
            if result.tail is None:
                continue
            if self.sink is not None:
                self.sink.emit(request, result.tail)
            else:
                record = out[index]
                event = log_tail_event(result.tail, request.at_ns)
                out[index] = dataclasses.replace(record, events=(*record.events, event))
        return out

    async def aclose(self) -> None:
        """Shut the sink down, if any."""
        if self.sink is not None:
            await self.sink.shutdown()


def _read_all(candidates: Sequence[Sequence[str]], settings: TailSettings) -> list[TailResult]:
    return [read_tail_sync(paths, settings) for paths in candidates]
