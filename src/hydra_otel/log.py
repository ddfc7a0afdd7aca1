"""Logging set-up: JSON lines when stderr is not a terminal, readable lines when it is.

Log lines are lifecycle events (start, LISTEN active, reconnect, export
failing/recovered, shutdown) and problems, never one line per notification;
:class:`RateLimitedLog` keeps bad-input warnings from flooding. Every line,
traceback included, passes a :class:`Redactor` fed with the configuration's
secrets (``Config.secrets``) before it is written.

Under systemd, when stderr is the journal (``JOURNAL_STREAM`` names its device
and inode, systemd.exec(5)), every line starts with its sd-daemon(3) priority
(``<3>`` for an error), which journald strips and stores as the entry's
``PRIORITY``: ``journalctl -p err -u hydra-otel`` then finds the errors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TextIO
from urllib.parse import quote

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger: message key=value ...`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname.lower():7} "
        line += f"{record.name}: {record.getMessage()}" + (f" {extras}" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


#: Secrets shorter than this are not searched for: masking every "ab" would garble the log.
MIN_SECRET_LENGTH = 4


class Redactor:
    """Replaces each secret, as written or as it would be escaped in a log line, with ``***``.

    The last line of defence: passwords and header values are kept out of messages where they are
    made, but a library's exception text or a traceback can still quote a connection string.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        variants = {
            form
            for s in secrets
            if len(s) >= MIN_SECRET_LENGTH
            for form in (
                s,
                quote(s, safe=""),
                json.dumps(s)[1:-1],
                repr(s)[1:-1],
                json.dumps(repr(s)[1:-1])[1:-1],
            )
        }
        ordered = sorted(variants, key=len, reverse=True)  # a longer form must win over its own prefix
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        """``text`` with every secret replaced by ``***``."""
        return text if self._pattern is None else self._pattern.sub("***", text)


class RedactingFormatter(logging.Formatter):
    """Formats with ``inner``, then masks the secrets in the whole line, traceback included."""

    def __init__(self, inner: logging.Formatter, redact: Redactor) -> None:
        super().__init__()
        self._inner = inner
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(self._inner.format(record))


#: sd-daemon(3) priorities of the logging levels (a level between two takes the lower's).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_priority(levelno: int) -> int:
    """The syslog priority journald stores for a record of ``levelno`` (7, debug, below INFO)."""
    return next((prio for level, prio in _PRIORITIES if levelno >= level), 7)


class JournalPrefixFormatter(logging.Formatter):
    """Formats with ``inner`` and starts every line with the record's ``<N>`` priority prefix."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        # journald makes each line an entry of its own: a traceback's lines keep the priority too.
        return "\n".join(prefix + line for line in self._inner.format(record).split("\n"))


def stderr_is_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``stream`` is the journal stream systemd names in ``JOURNAL_STREAM`` (``dev:inode``).

    A child process that inherited the variable but writes elsewhere (redirected) is not the journal.
    """
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):  # unset or malformed, or a stream without a descriptor
        return False


def configure(level: str, secrets: Iterable[str] = ()) -> None:
    """Install the handler on the root logger (idempotent); no line it writes can show ``secrets``."""
    handler = logging.StreamHandler(sys.stderr)
    inner = TextFormatter() if sys.stderr.isatty() else JsonFormatter()
    formatter: logging.Formatter = RedactingFormatter(inner, Redactor(secrets))
    if stderr_is_journal(sys.stderr):
        formatter = JournalPrefixFormatter(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLog:
    """Warn about bad input at most ``burst`` times per ``window`` seconds per key, then summarise."""

    clock: ClassVar[Any] = time.monotonic

    def __init__(self, logger: logging.Logger, *, burst: int = 10, window: float = 60.0) -> None:
        self._log = logger
        self._burst = burst
        self._window = window
        self._windows: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, **extra: Any) -> None:
        """Log ``msg`` unless ``key`` already used its burst in the current window."""
        now = type(self).clock()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self._window:
            if count > self._burst:
                self._log.warning(
                    "suppressed similar warnings", extra={"key": key, "suppressed": count - self._burst}
                )
            start, count = now, 0
        count += 1
        self._windows[key] = (start, count)
        if count <= self._burst:
            self._log.warning(msg, extra=extra)
