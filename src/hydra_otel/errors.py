"""Error types, named by what the caller should do with them.

| class            | what the caller does                                   |
|------------------|--------------------------------------------------------|
| PayloadError     | log, count, drop the notification, carry on            |
| ConfigError      | refuse to start; the message lists every problem       |
| StateDirError    | refuse to start; the message names the directory        |
| DbUnavailable    | reconnect with backoff, then catch up from the tables  |
| PermissionDenied | hold what needs the table, export the rest, retry      |
| LeadershipLost   | stop exporting; exit so a supervisor restarts a standby |

An export the endpoint does not take is not an exception either: the sink says
what became of the batch (adapters/otlp.py ``Delivery``). A transient failure,
or a refusal that is not about the data, holds the batch and retries it with
capped backoff; a span refused for good (gRPC INVALID_ARGUMENT, HTTP 400/413)
is isolated, dropped and counted (docs/operations.md, "OTLP export failures").
Anything else is a bug: the service's supervisor logs it with its traceback and
restarts the pipeline, which re-derives its in-flight work from the progress
marks (service.py); only ConfigError, StateDirError and LeadershipLost end the
process.
"""

from __future__ import annotations

#: How many characters of an offending payload an error message quotes.
PAYLOAD_QUOTE_LIMIT = 120


class HydraOtelError(Exception):
    """Root of every error hydra-otel raises on purpose."""


class PayloadError(HydraOtelError):
    """A notification payload that does not match its channel's format.

    Args:
        channel: the NOTIFY channel the payload came on.
        reason: what is wrong, in words an operator can act on.
        payload: the raw payload; only a truncated quote of it is kept.
    """

    def __init__(self, channel: str, reason: str, payload: str | bytes) -> None:
        self.channel = channel
        self.reason = reason
        self.quoted = quote_payload(payload)
        super().__init__(f"malformed {channel} payload: {reason}: {self.quoted}")


class ConfigError(HydraOtelError):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class DbSettingsError(ConfigError):
    """The database connection settings are invalid (``sslmode=bogus``): retrying cannot help.

    One problem, and its message is that one line (tools quote the first line of an error).
    """

    def __init__(self, problem: str) -> None:
        super().__init__([problem])
        self.args = (problem,)


class StateDirError(HydraOtelError):
    """The state directory cannot be created or written; the message says which setting to change."""


class DbUnavailable(HydraOtelError):
    """The database cannot be reached or the connection was lost; retry later."""


class PermissionDenied(HydraOtelError):
    """hydra-otel's role may not read a table (SQLSTATE 42501): an operator must GRANT it.

    Not "unavailable": retrying does not help until someone runs :attr:`grant`, so the
    caller holds only the work that needs ``table`` and carries on with the rest.
    """

    def __init__(self, table: str, grant: str, detail: str) -> None:
        self.table = table
        self.grant = grant
        super().__init__(
            f"{detail}: hydra-otel cannot read {table}; as its owner or a superuser, run: {grant}"
        )


class LeadershipLost(DbUnavailable):
    """The connection holding the active instance's advisory lock was lost; stop exporting."""


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups, or ``exc`` itself: what to report."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def quote_payload(payload: str | bytes, limit: int = PAYLOAD_QUOTE_LIMIT) -> str:
    """Return a printable, bounded quote of ``payload`` for log lines and errors."""
    if isinstance(payload, bytes):
        text = payload[: limit * 4].decode("utf-8", errors="backslashreplace")
        total = len(payload)
    else:
        text, total = payload, len(payload)
    shown = repr(text[:limit])
    if total > limit or len(text) > limit:
        return f"{shown}… ({total} {'bytes' if isinstance(payload, bytes) else 'chars'})"
    return shown
