"""Parse Hydra NOTIFY payloads into typed events.

Theory of operation: :func:`parse` looks the channel up in :data:`PARSERS`, a
table with one small function per data channel. Payload-less trigger channels
(``builds_cancelled``, ...) are not in the table; they map to a shared
:class:`~hydra_otel.core.events.TableChanged` whatever their payload, because
their payload carries nothing (``builds_added`` even gets ``?`` from one
sender and a build ID from the other). Any other channel is an error.

For a data channel the payload is checked once as a whole (UTF-8, at most
:data:`MAX_PAYLOAD_BYTES`, not empty), split into fields on a real TAB (or, if
there is none, on the two characters backslash-t, see ``docs/notifications.md``)
and handed to the channel's function, which checks the field count and every
field. Those functions raise a private ``ValueError`` subclass that ``parse``
turns into the one error type callers see, :class:`~hydra_otel.errors.PayloadError`,
carrying the channel and the raw payload. Exceptions are raised only for bad
input; the happy path uses ``str`` methods only (no regex), because a nixpkgs
evaluation sends ~150,000 notifications in one commit.

The module is pure: no I/O, no clock, no logging; it imports only the standard
library, :mod:`hydra_otel.core.events` and :mod:`hydra_otel.errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from hydra_otel.core.events import (
    BUILD_FINISHED,
    BUILD_QUEUED,
    BUILD_STARTED,
    CACHED_BUILD_FINISHED,
    CACHED_BUILD_QUEUED,
    EVAL_ADDED,
    EVAL_CACHED,
    EVAL_FAILED,
    EVAL_STARTED,
    STEP_FINISHED,
    STEP_STARTED,
    TRIGGER_CHANNELS,
    BuildFinished,
    BuildQueued,
    BuildStarted,
    CachedBuildFinished,
    CachedBuildQueued,
    EvalAdded,
    EvalCached,
    EvalFailed,
    EvalStarted,
    HydraEvent,
    StepFinished,
    StepStarted,
    TableChanged,
)
from hydra_otel.errors import PayloadError, quote_payload

#: PostgreSQL's NOTIFY payload cap (it refuses payloads of 8000 bytes or more with 8 kB pages).
MAX_PAYLOAD_BYTES = 8000
#: Upper bound for a correlation ID; Hydra's are about 25 characters.
MAX_CORRELATION_ID_CHARS = 128
#: IDs must fit PostgreSQL's ``integer`` (int4): Hydra's ID columns are ``serial``, and a larger
#: value would make every batched lookup (``= ANY($1::int[])``) fail for the whole batch.
ID_LIMIT = 2**31

_ID_MAX_DIGITS = len(str(ID_LIMIT))  # 10: longer digit strings are out of range
_FIELD_QUOTE_CHARS = 40
_LITERAL_TAB = "\\t"


class _Reject(ValueError):
    """A field-level problem; :func:`parse` adds the channel and payload."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- field checks -------------------------------------------------------------------------------


def _positive_id(field: str, what: str) -> int:
    # isdigit alone accepts non-ASCII digits (Arabic-Indic, superscripts, ...); isascii rules them out.
    if field.isascii() and field.isdigit():
        # Leading zeros are harmless; stripping them bounds the int() call (int() of a
        # 5000-digit string would raise, and the payload cap allows 8000 digits).
        digits = field.lstrip("0") if field[0] == "0" else field
        if 0 < len(digits) <= _ID_MAX_DIGITS:
            value = int(digits)
            if value < ID_LIMIT:
                return value
    raise _Reject(_id_problem(field, what))


def _id_problem(field: str, what: str) -> str:
    if not field:
        return f"{what} is empty"
    if not (field.isascii() and field.isdigit()):
        quoted = quote_payload(field, _FIELD_QUOTE_CHARS)
        return f"{what} {quoted} is not a decimal integer (ASCII digits only, no sign or spaces)"
    if not field.lstrip("0"):
        return f"{what} is zero (must be at least 1)"
    quoted = quote_payload(field, _FIELD_QUOTE_CHARS)
    return f"{what} {quoted} is out of range (Hydra's IDs are below 2**31)"


def _correlation_id(field: str) -> str:
    # Printable ASCII is U+0020..U+007E, so excluding the space leaves exactly the non-whitespace ones.
    if (
        0 < len(field) <= MAX_CORRELATION_ID_CHARS
        and field.isascii()
        and field.isprintable()
        and " " not in field
    ):
        return field
    raise _Reject(_correlation_problem(field))


def _correlation_problem(field: str) -> str:
    if not field:
        return "correlation ID is empty"
    if len(field) > MAX_CORRELATION_ID_CHARS:
        return f"correlation ID is {len(field)} characters long (at most {MAX_CORRELATION_ID_CHARS})"
    quoted = quote_payload(field, _FIELD_QUOTE_CHARS)
    return f"correlation ID {quoted} must be printable ASCII without whitespace"


def _expect(fields: list[str], names: tuple[str, ...]) -> None:
    if len(fields) != len(names):
        raise _Reject(f"expected {len(names)} fields ({', '.join(names)}), got {len(fields)}")


# --- one function per channel -------------------------------------------------------------------

_EVAL_STARTED_FIELDS = ("correlation ID", "jobset ID")
_EVAL_ADDED_FIELDS = ("correlation ID", "jobset ID", "eval ID")
_EVAL_CACHED_FIELDS = ("correlation ID", "jobset ID", "previous eval ID")
_BUILD_FIELDS = ("build ID",)
_STEP_STARTED_FIELDS = ("build ID", "step number")
_STEP_FINISHED_FIELDS = ("build ID", "step number", "log path")
_CACHED_BUILD_FIELDS = ("eval ID", "build ID")


def _eval_started(fields: list[str]) -> HydraEvent:
    _expect(fields, _EVAL_STARTED_FIELDS)
    return EvalStarted(
        correlation_id=_correlation_id(fields[0]),
        jobset_id=_positive_id(fields[1], "jobset ID"),
    )


def _eval_added(fields: list[str]) -> HydraEvent:
    _expect(fields, _EVAL_ADDED_FIELDS)
    return EvalAdded(
        correlation_id=_correlation_id(fields[0]),
        jobset_id=_positive_id(fields[1], "jobset ID"),
        eval_id=_positive_id(fields[2], "eval ID"),
    )


def _eval_cached(fields: list[str]) -> HydraEvent:
    _expect(fields, _EVAL_CACHED_FIELDS)
    return EvalCached(
        correlation_id=_correlation_id(fields[0]),
        jobset_id=_positive_id(fields[1], "jobset ID"),
        previous_eval_id=_positive_id(fields[2], "previous eval ID"),
    )


def _eval_failed(fields: list[str]) -> HydraEvent:
    _expect(fields, _EVAL_STARTED_FIELDS)
    return EvalFailed(
        correlation_id=_correlation_id(fields[0]),
        jobset_id=_positive_id(fields[1], "jobset ID"),
    )


def _build_queued(fields: list[str]) -> HydraEvent:
    _expect(fields, _BUILD_FIELDS)
    return BuildQueued(build_id=_positive_id(fields[0], "build ID"))


def _build_started(fields: list[str]) -> HydraEvent:
    _expect(fields, _BUILD_FIELDS)
    return BuildStarted(build_id=_positive_id(fields[0], "build ID"))


def _step_started(fields: list[str]) -> HydraEvent:
    _expect(fields, _STEP_STARTED_FIELDS)
    return StepStarted(
        build_id=_positive_id(fields[0], "build ID"),
        step_nr=_positive_id(fields[1], "step number"),
    )


def _step_finished(fields: list[str]) -> HydraEvent:
    # Both queue runners always send three fields; the legacy one leaves the third empty
    # when the outputs were substituted or already valid (no log was written).
    _expect(fields, _STEP_FINISHED_FIELDS)
    return StepFinished(
        build_id=_positive_id(fields[0], "build ID"),
        step_nr=_positive_id(fields[1], "step number"),
        log_path=fields[2] or None,
    )


def _build_finished(fields: list[str]) -> HydraEvent:
    build_id = _positive_id(fields[0], "build ID")
    if len(fields) == 1:
        return BuildFinished(build_id=build_id, dependents=())
    # dict keeps first-seen order while dropping duplicates; failure payloads repeat build_id.
    dependents = dict.fromkeys([_positive_id(field, "dependent build ID") for field in fields[1:]])
    dependents.pop(build_id, None)
    return BuildFinished(build_id=build_id, dependents=tuple(dependents))


def _cached_build_finished(fields: list[str]) -> HydraEvent:
    _expect(fields, _CACHED_BUILD_FIELDS)
    return CachedBuildFinished(
        eval_id=_positive_id(fields[0], "eval ID"),
        build_id=_positive_id(fields[1], "build ID"),
    )


def _cached_build_queued(fields: list[str]) -> HydraEvent:
    _expect(fields, _CACHED_BUILD_FIELDS)
    return CachedBuildQueued(
        eval_id=_positive_id(fields[0], "eval ID"),
        build_id=_positive_id(fields[1], "build ID"),
    )


#: Data channel -> field parser. Read-only by contract; ``parse`` is the public entry point.
PARSERS: Mapping[str, Callable[[list[str]], HydraEvent]] = {
    EVAL_STARTED: _eval_started,
    EVAL_ADDED: _eval_added,
    EVAL_CACHED: _eval_cached,
    EVAL_FAILED: _eval_failed,
    BUILD_QUEUED: _build_queued,
    BUILD_STARTED: _build_started,
    STEP_STARTED: _step_started,
    STEP_FINISHED: _step_finished,
    BUILD_FINISHED: _build_finished,
    CACHED_BUILD_FINISHED: _cached_build_finished,
    CACHED_BUILD_QUEUED: _cached_build_queued,
}

# Events are frozen, so one instance per trigger channel can be shared.
_TRIGGER_EVENTS: Mapping[str, TableChanged] = {name: TableChanged(channel=name) for name in TRIGGER_CHANNELS}


# --- entry point --------------------------------------------------------------------------------


def _payload_text(channel: str, payload: str | bytes) -> str:
    if isinstance(payload, bytes):
        _check_size(channel, len(payload), payload)
        text = _decode(channel, payload)
    else:
        text = payload
        # ASCII (the normal case, an O(1) check) needs no encoding to know its size in bytes.
        _check_size(channel, len(text) if text.isascii() else _utf8_size(channel, text), text)
    if not text:
        raise PayloadError(channel, "empty payload", payload)
    return text


def _check_size(channel: str, size: int, payload: str | bytes) -> None:
    if size > MAX_PAYLOAD_BYTES:
        reason = f"over-long payload: {size} bytes, more than PostgreSQL's {MAX_PAYLOAD_BYTES}-byte cap"
        raise PayloadError(channel, reason, payload)


def _decode(channel: str, payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError(channel, "not valid UTF-8", payload) from None


def _utf8_size(channel: str, text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates cannot have come from PostgreSQL
        raise PayloadError(channel, "not valid UTF-8", text) from None


def _split(text: str) -> list[str]:
    fields = text.split("\t")
    # The literal two characters backslash-t count as a separator only when there is no real
    # TAB, so a real-TAB payload whose log path happens to contain them is not split further.
    if len(fields) == 1 and _LITERAL_TAB in text:
        return text.split(_LITERAL_TAB)
    return fields


def parse(channel: str, payload: str | bytes) -> HydraEvent:
    """Turn one notification into an event.

    Args:
        channel: the NOTIFY channel the notification arrived on.
        payload: its payload, as text or as the raw bytes (decoded as strict UTF-8).

    Returns:
        The channel's event; :class:`~hydra_otel.core.events.TableChanged` for a trigger
        channel, whatever its payload.

    Raises:
        PayloadError: the channel is unknown, or the payload is not valid UTF-8, longer
            than :data:`MAX_PAYLOAD_BYTES`, empty, has the wrong number of fields, or a
            field is malformed. The error names the channel and the reason and quotes a
            truncated payload.
    """
    parser = PARSERS.get(channel)
    if parser is None:
        trigger = _TRIGGER_EVENTS.get(channel)
        if trigger is None:
            raise PayloadError(channel, "unknown channel", payload)
        return trigger
    fields = _split(_payload_text(channel, payload))
    try:
        return parser(fields)
    except _Reject as problem:
        raise PayloadError(channel, problem.reason, payload) from None
