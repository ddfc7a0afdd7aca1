"""Logging set-up: JSON lines when stderr is not a terminal, readable lines when it is.

Log lines are lifecycle events (start, LISTEN active, reconnect, export
failing/recovered, shutdown) and problems, never one line per notification;
:class:`RateLimitedLog` keeps bad-input warnings from flooding.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, ClassVar

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


def configure(level: str) -> None:
    """Install the handler on the root logger (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if sys.stderr.isatty() else JsonFormatter())
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
