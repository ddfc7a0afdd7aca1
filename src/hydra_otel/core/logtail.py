"""Failed-step log tails: which steps get one, where the log is, and how a tail is cut.

Theory of operation. When a build step fails, the last lines of its log say
why. The I/O lives in ``adapters/steplogs.py``; this module decides:

* **which steps** (:func:`tail_request`): finished build steps whose status is
  not a success (0) or a resolution to a content-addressed derivation (13),
  skipping those that never ran a builder and so have no log of their own:
  propagated failures (the cause's step has the log), cached failures (8),
  unsupported systems (9) and substitutions;
* **where** (:func:`log_candidates`): only from the step row's derivation,
  in Hydra's layout ``<log dir>/<first two characters of the derivation's base
  name>/<the rest>`` (queue runner ``construct_log_file_path``, web
  ``getDrvLogPath``), tried as is, then with ``.bz2`` and ``.zst``: Hydra's
  CompressLog plugin compresses a log in place right after the step finishes.
  Candidates are names *relative to* the log directory, each one a plain file
  name (:func:`log_location`), so the reader can open them below the directory
  without ever resolving a path. The path a ``step_finished`` payload carries
  is never opened: any role that can connect to Hydra's database can send that
  notification (docs/operations.md, "Trust model"). It is only compared with
  the layout (:func:`notified_path_agrees`), so a forged or misconfigured one
  is noticed;
* **how much** (:class:`TailBuffer`, :func:`render_tail`): the last
  ``max_bytes`` of decompressed text, then at most ``max_lines`` lines of it,
  decoded as UTF-8 with replacement characters (build output is bytes).

The result is a :class:`LogTail`; :func:`log_tail_event` turns it into a span
event for when OTLP logs export is off, and :func:`log_attributes` gives the
attributes of the OTLP log record otherwise.
"""

from __future__ import annotations

import enum
import posixpath
import re
from dataclasses import dataclass
from typing import Final

from hydra_otel.core import semconv as sc
from hydra_otel.core.spans import Attributes, SpanEvent, SpanRecord, Status

DEFAULT_LOGS_DIR: Final = "/var/lib/hydra/build-logs"
DEFAULT_MAX_LINES: Final = 50
#: Decompressed bytes kept from the end of a log.
DEFAULT_MAX_BYTES: Final = 64 * 1024
#: Compressed logs larger than this are not decompressed (it takes the whole file to reach the end).
DEFAULT_MAX_COMPRESSED_BYTES: Final = 16 * 1024 * 1024

#: Suffixes Hydra gives a compressed log, in the order they are tried.
SUFFIXES: Final = ("", ".bz2", ".zst")

#: Step statuses that are no failure.
_SUCCESS = frozenset({0, 13})
#: Failed statuses of steps that never ran a builder, so there is no log to read.
_NO_LOG = frozenset({8, 9})

LOG_FILE_PATH = "log.file.path"
EVENT_NAME = "hydra.step.log_tail"
TAIL_TEXT = "hydra.step.log_tail"
TAIL_LINES = "hydra.step.log_tail.lines"
TAIL_TRUNCATED = "hydra.step.log_tail.truncated"


class Compression(enum.Enum):
    """How a log file is stored."""

    PLAIN = "plain"
    BZIP2 = "bzip2"
    ZSTD = "zstd"


@dataclass(frozen=True, slots=True, kw_only=True)
class TailRequest:
    """A failed step whose log tail is wanted, with the span it belongs to."""

    trace_id: int
    span_id: int
    build_id: int
    step_nr: int
    drv_path: str | None
    #: The path ``step_finished`` carried: untrusted, never opened (see :func:`notified_path_agrees`).
    log_path: str | None
    at_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LogTail:
    """The end of one log file.

    ``path`` is the file read (compressed or not); ``truncated`` says earlier
    content was left out; ``bytes_read`` counts the bytes read from the file.
    """

    path: str
    text: str
    lines: int
    truncated: bool
    bytes_read: int


def is_failed_step(status: int | None) -> bool:
    """True for a finished step that did not succeed (None: still running, not failed)."""
    return status is not None and status not in _SUCCESS


def tail_request(record: SpanRecord, log_path: str | None = None) -> TailRequest | None:
    """A :class:`TailRequest` if ``record`` is a failed build step that has a log, else None.

    Args:
        record: any span; only step spans from ``core.builds.step_span`` qualify.
        log_path: the path ``step_finished`` carried, if any (the legacy queue runner sends "").

    Returns:
        The request, timed at the step's end.
    """
    if record.status is Status.OK:
        # A step's span is OK exactly for the statuses in _SUCCESS (core/status.py): most spans
        # stop here, before their attributes are copied into a dict.
        return None
    attrs = record.attrs()
    nr, build_id, status = (
        attrs.get(sc.HYDRA_STEP_NR),
        attrs.get(sc.HYDRA_BUILD_ID),
        attrs.get(sc.HYDRA_STEP_STATUS),
    )
    if not isinstance(nr, int) or not isinstance(build_id, int) or not isinstance(status, int):
        return None
    if not is_failed_step(status) or status in _NO_LOG:
        return None
    if sc.HYDRA_STEP_PROPAGATED_FROM in attrs or attrs.get(sc.HYDRA_STEP_TYPE) == "substitution":
        return None
    drv = attrs.get(sc.HYDRA_BUILD_DRV_PATH)
    return TailRequest(
        trace_id=record.trace_id,
        span_id=record.span_id,
        build_id=build_id,
        step_nr=nr,
        drv_path=drv if isinstance(drv, str) else None,
        log_path=log_path or None,
        at_ns=record.end_ns,
    )


def hydra_log_path(logs_dir: str, drv_path: str) -> str:
    """Where Hydra writes the (uncompressed) log of ``drv_path``, for display.

    ``/nix/store/abc…-hello.drv`` -> ``<logs_dir>/ab/c…-hello.drv``.
    """
    base = posixpath.basename(drv_path)
    return posixpath.join(logs_dir, base[:2], base[2:])


#: Characters of a Nix store path name (Nix's ``checkName``), hence of a derivation's base name.
_STORE_NAME = re.compile(r"[A-Za-z0-9+\-._?=]+")

#: A log's place below the log directory: (bucket directory, file name), both plain names.
LogLocation = tuple[str, str]


def log_location(drv_path: str | None) -> LogLocation | None:
    """The (bucket, file name) of ``drv_path``'s uncompressed log below the log directory.

    Both parts are single path components made of store-path characters, neither ``.`` nor
    ``..``: whatever the row holds, the result cannot name anything outside the directory.

    Returns:
        None when ``drv_path`` has no usable base name (empty, ``..``, a slash at the end, a
        character no store path has).
    """
    if not drv_path:
        return None
    base = posixpath.basename(drv_path)
    bucket, name = base[:2], base[2:]
    for part in (bucket, name):
        if part in {".", ".."} or not _STORE_NAME.fullmatch(part):
            return None
    return bucket, name


def log_candidates(request: TailRequest) -> tuple[LogLocation, ...]:
    """Places to try for ``request``'s log below the log directory, in order.

    Args:
        request: the step (its derivation comes from the step row).

    Returns:
        Hydra's layout as is, then with every suffix in :data:`SUFFIXES`; empty when the
        derivation cannot name a log (:func:`log_location`).
    """
    loc = log_location(request.drv_path)
    if loc is None:
        return ()
    bucket, name = loc
    return tuple((bucket, name + suffix) for suffix in SUFFIXES)


def notified_path_agrees(log_path: str | None, drv_path: str | None) -> bool:
    """Whether the path ``step_finished`` carried names the same log as the step row's derivation.

    Only the last two components are compared (the bucket and the file name, without a
    compression suffix): the queue runner may see the log directory under another name (a
    symbolic link, a bind mount). An empty path (the legacy queue runner) agrees.
    """
    if not log_path:
        return True
    loc = log_location(drv_path)
    if loc is None:
        return False
    parts = posixpath.normpath(strip_suffix(log_path)).split("/")
    return tuple(parts[-2:]) == loc


def strip_suffix(path: str) -> str:
    """``path`` without a compression suffix: the log's uncompressed name."""
    for suffix in SUFFIXES[1:]:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def compression_of(path: str) -> Compression:
    """How the file at ``path`` is compressed, from its suffix."""
    if path.endswith(".bz2"):
        return Compression.BZIP2
    if path.endswith(".zst"):
        return Compression.ZSTD
    return Compression.PLAIN


class TailBuffer:
    """The last ``max_bytes`` of a byte stream, kept while it streams past.

    Args:
        max_bytes: bytes to keep (at least 1).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._max = max_bytes
        self._buf = bytearray()
        #: Bytes fed in total.
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        """Append ``chunk``, forgetting what falls out of the window."""
        self.total += len(chunk)
        self._buf += chunk[-self._max :]
        if len(self._buf) > self._max:
            del self._buf[: len(self._buf) - self._max]

    @property
    def dropped(self) -> bool:
        """True once earlier bytes were forgotten."""
        return self.total > len(self._buf)

    def value(self) -> bytes:
        """The bytes kept."""
        return bytes(self._buf)


def render_tail(data: bytes, *, max_lines: int, cut: bool) -> tuple[str, int, bool]:
    """The last ``max_lines`` lines of ``data`` as text.

    Args:
        data: the end of a log.
        max_lines: lines to keep (at least 1).
        cut: ``data`` does not start at the log's beginning, so its first line may be partial.

    Returns:
        (text, number of lines, whether anything before it was left out).
    """
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends a line; it does not start one
    if cut and len(lines) > 1:
        lines.pop(0)  # a partial line reads as nonsense; the ones after it are whole
    kept = lines[-max_lines:] if max_lines > 0 else []
    return "\n".join(kept), len(kept), cut or len(kept) < len(lines)


def log_tail_event(tail: LogTail, at_ns: int) -> SpanEvent:
    """The span event carrying ``tail``, for when OTLP logs export is off.

    Args:
        tail: what was read.
        at_ns: the event time, normally the step span's end.

    Returns:
        An event named :data:`EVENT_NAME` with the text, line count, truncation and the log's
        uncompressed name (the same before and after Hydra compresses it, so a span rendered
        again stays identical).
    """
    return SpanEvent(
        name=EVENT_NAME,
        time_ns=at_ns,
        attributes=(
            (LOG_FILE_PATH, strip_suffix(tail.path)),
            (TAIL_TEXT, tail.text),
            (TAIL_LINES, tail.lines),
            (TAIL_TRUNCATED, tail.truncated),
        ),
    )


def log_attributes(request: TailRequest, tail: LogTail) -> Attributes:
    """Attributes of the OTLP log record carrying ``tail``."""
    return (
        (sc.HYDRA_BUILD_ID, request.build_id),
        (sc.HYDRA_STEP_NR, request.step_nr),
        (LOG_FILE_PATH, tail.path),
        (TAIL_LINES, tail.lines),
        (TAIL_TRUNCATED, tail.truncated),
    )
