"""Failed-step log tails: reading the end of Hydra's log files, and exporting it.

Theory of operation. For the failed build steps in a batch of spans
(``core.logtail.tail_request``), :class:`StepLogs` reads the end of each log in
one worker thread, then either emits an OTLP log record correlated with the
step span (:class:`LogTailSink`, when logs export is on) or returns the span
with a ``hydra.step.log_tail`` event (when it is off). Call it on spans that
passed the resolver's duplicate filter, so each step's tail is read once.

Only files inside Hydra's log directory are read, and only the step's own log:
its place comes from the step row's derivation (``core.logtail.log_candidates``),
never from a notification payload, which any connected role can forge
(docs/operations.md, "Trust model"). The file is opened below the directory one
component at a time (:func:`open_below`): each component is examined with
``lstat`` relative to its parent's descriptor and must be a directory (then a
regular file) before it is opened with ``O_NOFOLLOW``, so no symbolic link is
followed, and the file is opened ``O_NONBLOCK`` and checked again with
``fstat``, so a FIFO, a device or a socket is never waited on. What is refused
is counted by reason and logged once per reason and window, never raised.

Reading is bounded in size and time. A plain log is read from ``max_bytes``
before its end, whatever its size. Compressed logs must be decompressed from
the start to reach the end: they are streamed through a
:class:`~hydra_otel.core.logtail.TailBuffer` (memory stays ``max_bytes`` plus
one chunk), and files larger than ``max_compressed_bytes`` are skipped.
``.bz2`` uses the standard library on the open descriptor. ``.zst`` is piped
through the ``zstd`` program (``zstd -dcq``, the open descriptor as its
standard input, so no path is opened twice), found on ``PATH`` when the
settings are built: Hydra's own CompressLog plugin and its compress-logs
service run that same program, so a host that has ``.zst`` logs has it, and
hydra-otel needs no new dependency (docs/metrics-and-logs.md). One batch may
take ``timeout_s``: the thread checks the deadline between chunks and kills
``zstd`` at it, and the Trio side stops waiting for the thread shortly after
(a read stuck in the kernel, e.g. on a hung network file system, is abandoned;
no new read starts until it returns). Reading therefore never holds up the
pipeline or a shutdown for longer than that.

Everything async here is Trio-flavoured. Missing, unreadable, oversized,
unsupported, refused and timed-out logs are counted in :class:`TailStatistics`.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import enum
import errno
import logging
import os
import select
import shutil
import stat
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field

import trio
from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import hydra_otel
from hydra_otel.adapters.otlp import ExporterSettings, signal_exporter
from hydra_otel.adapters.otlp_metrics import signal_endpoint
from hydra_otel.core.logtail import (
    DEFAULT_LOGS_DIR,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_COMPRESSED_BYTES,
    DEFAULT_MAX_LINES,
    EVENT_NAME,
    Compression,
    LogLocation,
    LogTail,
    TailBuffer,
    TailRequest,
    compression_of,
    log_attributes,
    log_candidates,
    log_tail_event,
    notified_path_agrees,
    render_tail,
    tail_request,
)
from hydra_otel.core.spans import SpanRecord
from hydra_otel.errors import quote_payload
from hydra_otel.log import RateLimitedLog
from hydra_otel.selfmon.server import Metric, counter, labelled_counter

log = logging.getLogger("hydra_otel.steplogs")

#: Bytes read from a compressed file, and produced by one decompression call, at a time.
CHUNK = 64 * 1024
#: Seconds one batch of tails may take to read (all files of the batch together).
DEFAULT_TIMEOUT_S = 10.0
#: Seconds the Trio side waits past the deadline before it abandons the reading thread.
ABANDON_GRACE_S = 1.0
#: A refusal or timeout is logged once per reason in this many seconds (then summarised).
WARN_WINDOW_S = 600.0

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer (the file is checked to be regular first,
# but it may be replaced between the check and the open); O_NOCTTY: never become a terminal's owner.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class TailOutcome(enum.Enum):
    """What happened when a log tail was looked for."""

    FOUND = "found"
    MISSING = "missing"  # no candidate exists
    UNREADABLE = "unreadable"  # exists, but reading or decompressing failed
    TOO_LARGE = "too_large"  # compressed and over max_compressed_bytes
    UNSUPPORTED = "unsupported"  # .zst without the zstd program
    REFUSED = "refused"  # not a regular file reached without links (reason in TailResult.reason)
    TIMED_OUT = "timed_out"  # the batch's time ran out before or while this log was read


#: When several candidates fail, the outcome reported is the most telling one.
_RANK = {o: n for n, o in enumerate(TailOutcome)}


class Refusal(enum.Enum):
    """Why a log, or the path a notification gave, was not read."""

    SYMLINK = "symlink"  # a symbolic link below the log directory (none is followed)
    NOT_REGULAR = "not_regular"  # a FIFO, device, socket or directory where the log should be
    BAD_NAME = "bad_name"  # the step's derivation path names no file (``..``, ``/`` at the end)
    NOTIFIED_PATH = "notified_path"  # step_finished named another file than the step's log


_REFUSAL_TEXT = {
    Refusal.SYMLINK: "a symbolic link where a step log should be; it is not followed",
    Refusal.NOT_REGULAR: "not a regular file where a step log should be (FIFO, device, socket, directory)",
    Refusal.BAD_NAME: "a step's derivation path names no log file",
    Refusal.NOTIFIED_PATH: "step_finished named a log path that is not the step's log; the path is not read "
    "(a forged notification, or --step-logs-dir does not match Hydra's)",
}


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
    #: Seconds one batch of tails may take.
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class TailResult:
    """The outcome of looking for one log, and the tail when found.

    ``reason`` and ``path`` say what was refused, for REFUSED.
    """

    outcome: TailOutcome
    tail: LogTail | None = None
    reason: Refusal | None = None
    path: str | None = None


class _Refused(Exception):
    """A path component is a link or not the kind of file expected."""

    def __init__(self, reason: Refusal) -> None:
        super().__init__(reason.value)
        self.reason = reason


class _Unreadable(Exception):
    """A log exists but cannot be read or decoded."""


class _TooLarge(Exception):
    """A compressed log over ``max_compressed_bytes``."""


class _Unsupported(Exception):
    """A ``.zst`` log without the ``zstd`` program."""


class _TimedOut(Exception):
    """The batch's deadline passed."""


def _expect(st: os.stat_result, is_kind: Callable[[int], bool]) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise _Refused(Refusal.SYMLINK)
    if not is_kind(st.st_mode):
        raise _Refused(Refusal.NOT_REGULAR)


def open_below(root_fd: int, parts: Sequence[str]) -> tuple[int, os.stat_result]:
    """Open the regular file ``root/parts[0]/…/parts[-1]`` without leaving ``root``.

    Each part must be one plain name (``core.logtail.log_location`` makes sure). No symbolic
    link is followed, and nothing but directories and the final regular file is opened, so
    the call never blocks on a FIFO or a device.

    Args:
        root_fd: a descriptor of the log directory.
        parts: the path below it, one component per item.

    Returns:
        The open descriptor (the caller closes it) and its ``fstat``.

    Raises:
        _Refused: a part is no plain name, or a component is a symbolic link or not a
            directory / regular file.
        FileNotFoundError: a component does not exist.
        OSError: any other failure (permissions, I/O).
    """
    if not parts or any(name in {"", ".", ".."} or "/" in name or "\0" in name for name in parts):
        raise _Refused(Refusal.BAD_NAME)  # log_location never gives these; refuse rather than trust it
    opened: list[int] = []
    try:
        parent = root_fd
        for name in parts[:-1]:
            _expect(os.stat(name, dir_fd=parent, follow_symlinks=False), stat.S_ISDIR)
            parent = os.open(name, _DIR_FLAGS, dir_fd=parent)
            opened.append(parent)
        _expect(os.stat(parts[-1], dir_fd=parent, follow_symlinks=False), stat.S_ISREG)
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=parent)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the check and the open
            os.close(fd)
            raise _Refused(Refusal.NOT_REGULAR)
        return fd, st
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link that appeared after the check
            raise _Refused(Refusal.SYMLINK) from exc
        if exc.errno == errno.ENOTDIR:
            raise _Refused(Refusal.NOT_REGULAR) from exc
        raise
    finally:
        for fd in opened:
            os.close(fd)


def read_tail_sync(
    candidates: Sequence[LogLocation], settings: TailSettings, deadline: float | None = None
) -> TailResult:
    """Read the tail of the first of ``candidates`` that exists (blocking; run it in a worker thread).

    Args:
        candidates: places below ``settings.logs_dir``, in order (``core.logtail.log_candidates``).
        settings: the directory, the bounds and the ``zstd`` program.
        deadline: ``time.monotonic()`` value to give up at (default: ``settings.timeout_s`` from now).

    Returns:
        The tail, or why there is none (MISSING when no candidate exists).
    """
    if deadline is None:
        deadline = time.monotonic() + settings.timeout_s
    try:
        root = os.open(settings.logs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return TailResult(TailOutcome.MISSING)
    except OSError:
        return TailResult(TailOutcome.UNREADABLE)
    try:
        return _read_first(root, candidates, settings, deadline)
    finally:
        os.close(root)


def _read_first(root: int, candidates: Sequence[LogLocation], s: TailSettings, deadline: float) -> TailResult:
    worst = TailOutcome.MISSING
    for parts in candidates:
        path = os.path.join(s.logs_dir, *parts)
        if time.monotonic() >= deadline:
            return TailResult(TailOutcome.TIMED_OUT, path=path)
        try:
            fd, st = open_below(root, parts)
        except FileNotFoundError:
            continue
        except _Refused as refused:  # the log dir holds something odd: stop looking for this step
            return TailResult(TailOutcome.REFUSED, reason=refused.reason, path=path)
        except OSError:
            worst = max(worst, TailOutcome.UNREADABLE, key=_RANK.__getitem__)
            continue
        try:
            return TailResult(TailOutcome.FOUND, _read_fd(fd, st, path, s, deadline))
        except _TimedOut:
            return TailResult(TailOutcome.TIMED_OUT, path=path)
        except _TooLarge:
            outcome = TailOutcome.TOO_LARGE
        except _Unsupported:
            outcome = TailOutcome.UNSUPPORTED
        except (OSError, EOFError, _Unreadable):
            # OSError: I/O errors, bz2's "Invalid data stream", zstd not executable.
            outcome = TailOutcome.UNREADABLE
        finally:
            os.close(fd)
        worst = max(worst, outcome, key=_RANK.__getitem__)
    return TailResult(worst)


def _read_fd(fd: int, st: os.stat_result, path: str, s: TailSettings, deadline: float) -> LogTail:
    kind = compression_of(path)
    if kind is Compression.PLAIN:
        return _read_plain(fd, st.st_size, path, s)
    if st.st_size > s.max_compressed_bytes:
        raise _TooLarge
    if kind is Compression.ZSTD and s.zstd is None:
        raise _Unsupported
    buf = TailBuffer(s.max_bytes)
    if kind is Compression.BZIP2:
        chunks = _bz2_chunks(_capped_reader(fd, s.max_compressed_bytes))
    else:
        assert s.zstd is not None  # checked above
        chunks = _zstd_chunks(s.zstd, fd, deadline)
    with contextlib.closing(chunks):
        for chunk in chunks:
            if time.monotonic() >= deadline:  # a decompression bomb ends here
                raise _TimedOut
            buf.feed(chunk)
    text, lines, truncated = render_tail(buf.value(), max_lines=s.max_lines, cut=buf.dropped)
    return LogTail(path=path, text=text, lines=lines, truncated=truncated, bytes_read=st.st_size)


def _read_plain(fd: int, size: int, path: str, s: TailSettings) -> LogTail:
    start = max(0, size - s.max_bytes)
    data = b""
    while len(data) < s.max_bytes and (chunk := os.pread(fd, s.max_bytes - len(data), start + len(data))):
        data += chunk
    text, lines, truncated = render_tail(data, max_lines=s.max_lines, cut=start > 0)
    return LogTail(path=path, text=text, lines=lines, truncated=truncated, bytes_read=len(data))


def _capped_reader(fd: int, limit: int) -> Callable[[int], bytes]:
    """``read(n)`` on ``fd`` that reports end of file after ``limit`` bytes (a log still growing)."""
    left = limit

    def read(n: int) -> bytes:
        nonlocal left
        data = os.read(fd, min(n, left)) if left > 0 else b""
        left -= len(data)
        return data

    return read


def _bz2_chunks(read: Callable[[int], bytes]) -> Generator[bytes, None, None]:
    """Decompressed chunks of a (possibly multi-stream) bzip2 file, each at most ``CHUNK`` bytes.

    A stream cut short (a log still being compressed) ends the output instead of failing.
    """
    dec = bz2.BZ2Decompressor()
    data = b""
    while True:
        if dec.eof:
            data = dec.unused_data or read(CHUNK)
            if not data:
                return
            dec = bz2.BZ2Decompressor()
        elif dec.needs_input:
            data = read(CHUNK)
            if not data:
                return
        else:
            data = b""
        yield dec.decompress(data, max_length=CHUNK)


def _zstd_chunks(program: str, fd: int, deadline: float) -> Generator[bytes, None, None]:
    """The decompressed output of ``zstd -dcq`` reading the open ``fd``, in chunks, until ``deadline``.

    Raises:
        _Unreadable: the program failed before producing any output.
        _TimedOut: the deadline passed while waiting for output.
    """
    with subprocess.Popen(
        [program, "-dcq"],
        stdin=fd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        out = proc.stdout.fileno()
        produced = 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([out], [], [], remaining)[0]:
                    raise _TimedOut
                chunk = os.read(out, CHUNK)
                if not chunk:
                    break
                produced += len(chunk)
                yield chunk
        finally:
            proc.stdout.close()  # a zstd still writing gets EPIPE and exits
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        if code != 0 and produced == 0:
            raise _Unreadable(f"zstd exited with {code}")


def make_log_exporter(s: ExporterSettings, endpoint: str | None = None) -> LogRecordExporter:
    """The official OTLP log exporter for ``s`` (``/v1/logs`` with HTTP).

    Args:
        s: the logs exporter settings (protocol, headers, TLS, timeout, compression).
        endpoint: the logs endpoint as configured; else derived with ``signal_endpoint``.

    Returns:
        A gRPC or HTTP/protobuf log exporter.
    """
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpExporter

    exporter: LogRecordExporter = signal_exporter(
        s, GrpcExporter, HttpExporter, endpoint or signal_endpoint(s, "logs")
    )
    return exporter


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
    """Counters of log tail lookups, by outcome and refusal reason, plus what was left out."""

    outcomes: Counter[str] = field(default_factory=Counter)
    #: Logs (and notified paths) not read, by :class:`Refusal` value.
    refused: Counter[str] = field(default_factory=Counter)
    #: Failed steps beyond max_per_batch, or met while an abandoned read is still stuck.
    skipped: int = 0

    def snapshot(self) -> dict[str, object]:
        """A JSON-friendly copy."""
        return {"outcomes": dict(self.outcomes), "refused": dict(self.refused), "skipped": self.skipped}

    def metrics(self) -> list[Metric]:
        """The counters for ``/metrics`` (names in docs/operations-tools.md)."""
        p = "hydra_otel_log_tails"
        return [
            labelled_counter(
                f"{p}_total", "Failed-step log tails looked for, by outcome.", "outcome", self.outcomes
            ),
            labelled_counter(
                f"{p}_refused_total",
                "Step logs and step_finished log paths not read, by reason.",
                "reason",
                self.refused,
            ),
            counter(
                f"{p}_skipped_total",
                "Failed steps whose log was not read (batch bound, or a stuck read still pending).",
                self.skipped,
            ),
        ]


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
        self._warn = RateLimitedLog(log, burst=1, window=WARN_WINDOW_S)
        #: Set when the last abandoned reading thread returns; None while none is pending.
        self._abandoned: threading.Event | None = None

    async def process(
        self, records: Sequence[SpanRecord], log_paths: Mapping[tuple[int, int], str] | None = None
    ) -> list[SpanRecord]:
        """Read the tails of the failed steps among ``records`` and export or attach them.

        Args:
            records: spans about to be exported (after duplicate filtering).
            log_paths: (build ID, step number) -> log path, from ``step_finished`` notifications.
                Untrusted: never opened, only compared with the step's log (a mismatch is
                counted as refused, ``notified_path``).

        Returns:
            ``records``, where a step got a ``hydra.step.log_tail`` event if there is no sink.
        """
        paths = log_paths or {}
        wanted: list[tuple[int, TailRequest]] = []
        for index, record in enumerate(records):
            request = tail_request(record)
            if request is not None:
                notified = paths.get((request.build_id, request.step_nr)) or None
                request = dataclasses.replace(request, log_path=notified)
                if not notified_path_agrees(notified, request.drv_path):
                    # The sender chose this text: quoted and bounded before it reaches a log line.
                    self._refuse(Refusal.NOTIFIED_PATH, request, quote_payload(notified or ""))
                wanted.append((index, request))
        if len(wanted) > self.settings.max_per_batch:
            self.stats.skipped += len(wanted) - self.settings.max_per_batch
            wanted = wanted[: self.settings.max_per_batch]
        if not wanted:
            return list(records)
        places = [log_candidates(request) for _, request in wanted]
        results = await self._read(places)
        out = list(records)
        for (index, request), where, result in zip(wanted, places, results, strict=True):
            if result is None:
                continue
            if not where and request.drv_path:  # a row whose derivation path names no file
                result = TailResult(TailOutcome.REFUSED, reason=Refusal.BAD_NAME, path=request.drv_path)
            self._count(request, result)
            if result.tail is None:
                continue
            if self.sink is not None:
                self.sink.emit(request, result.tail)
            else:
                record = out[index]
                event = log_tail_event(result.tail, request.at_ns)
                out[index] = record._replace(events=(*record.events, event))
        return out

    async def _read(self, candidates: list[tuple[LogLocation, ...]]) -> list[TailResult | None]:
        """Read in a worker thread, for ``timeout_s`` at most; None for tails not attempted."""
        if self._abandoned is not None and not self._abandoned.is_set():
            self.stats.skipped += len(candidates)
            self._warn.warning(
                "stuck",
                "a step log read is still stuck after its deadline; tails left out",
                count=len(candidates),
            )
            return [None] * len(candidates)
        done: list[TailResult] = []
        finished, stop = threading.Event(), threading.Event()
        timeout = self.settings.timeout_s
        deadline = time.monotonic() + timeout
        try:
            with trio.move_on_after(timeout + ABANDON_GRACE_S):
                await trio.to_thread.run_sync(
                    _read_all,
                    candidates,
                    self.settings,
                    deadline,
                    done,
                    stop,
                    finished,
                    abandon_on_cancel=True,
                )
        finally:
            stop.set()  # a thread left behind stops at its next check
            if not finished.is_set():
                self._abandoned = finished
        got: list[TailResult | None] = list(done)
        return got + [TailResult(TailOutcome.TIMED_OUT)] * (len(candidates) - len(got))

    def _count(self, request: TailRequest, result: TailResult) -> None:
        self.stats.outcomes[result.outcome.value] += 1
        if result.outcome is TailOutcome.REFUSED and result.reason is not None:
            self._refuse(result.reason, request, result.path)
        elif result.outcome is TailOutcome.TIMED_OUT:
            self._warn.warning(
                "timed_out",
                f"reading step logs took longer than {self.settings.timeout_s:g} s; tails left out",
                build_id=request.build_id,
                step=request.step_nr,
            )

    def _refuse(self, reason: Refusal, request: TailRequest, path: str | None) -> None:
        self.stats.refused[reason.value] += 1
        self._warn.warning(
            reason.value,
            _REFUSAL_TEXT[reason],
            reason=reason.value,
            build_id=request.build_id,
            step=request.step_nr,
            path=path,
        )

    async def aclose(self) -> None:
        """Shut the sink down, if any."""
        if self.sink is not None:
            await self.sink.shutdown()


def _read_all(
    candidates: Sequence[Sequence[LogLocation]],
    settings: TailSettings,
    deadline: float,
    done: list[TailResult],
    stop: threading.Event,
    finished: threading.Event,
) -> None:
    """Append one result per step to ``done`` until all are read, ``stop`` is set or time is up."""
    try:
        for places in candidates:
            if stop.is_set() or time.monotonic() >= deadline:
                return
            done.append(read_tail_sync(places, settings, deadline))
    finally:
        finished.set()
