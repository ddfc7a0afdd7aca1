"""Impossible values in a span, made exportable: clamped or omitted, and said so.

Theory of operation: spans are rendered from Hydra's rows and from notification
payloads, and neither is bound to be sane. A step time before 1970, an ID past
int64, a string with a lone surrogate or a 10 MB attribute would each make the
OTLP encoder raise (``struct.error``, ``OverflowError``, ``UnicodeEncodeError``)
or the collector refuse the whole request, and either way every span behind it
would stop. So every value that reaches the encoder is checked here first:

* The encoder (core/otlp_wire.py) checks each span against the limits below as
  it encodes it: integer comparisons and lengths, and text only for values its
  cache does not hold yet.
* :func:`repair` is the slow path for a span that failed a check. It returns
  a record that encodes within :data:`SPAN_BYTES_LIMIT`, whatever the input, with
  a ``hydra.data_issue`` attribute listing what was changed, so the backend shows
  the span *and* says that its data was bad.

The rules, one per kind of value (docs/operations.md, "OTLP export failures"):

| value | accepted | repair |
| --- | --- | --- |
| time | 1970-01-01 ≤ t < 2100-01-01 (Unix ns) | the span's other time if that one is valid, else 0 (unset) |
| end time | ≥ start | set to the start |
| event time | as a time | the span's end |
| trace / span ID | 1 ≤ id < 2^128 / 2^64 | reduced modulo 2^128 / 2^64, 0 becoming 1; a parent of 0 makes a root |
| int attribute | int64 | sent as its decimal text |
| other attribute value | str, bool, int, float | sent as its ``repr`` |
| text | no lone surrogate, no NUL | each replaced by U+FFFD |
| name / key / value / status message | 1,024 / 256 / 1,000,000 characters | cut, saying how much |
| attributes / events / links | 256 / 128 / 128 per span | the rest omitted, counted |
| whole span | :data:`SPAN_BYTES_LIMIT` of text | values cut, then attributes omitted |

Pure: no I/O, no logging. The caller counts repaired spans.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeGuard, TypeVar

from hydra_otel.core.spans import (
    Attributes,
    AttrValue,
    Kind,
    SpanEvent,
    SpanLink,
    SpanRecord,
    Status,
    truncate,
)

#: The attribute that says what was repaired, e.g. ``"start time -5000000000 before 1970: set to the end time"``.
DATA_ISSUE = "hydra.data_issue"

#: Times are Unix nanoseconds in [TIME_MIN_NS, TIME_MAX_NS): 1970-01-01 to 2100-01-01.
TIME_MIN_NS = 0
TIME_MAX_NS = 4_102_444_800 * 1_000_000_000
NAME_LIMIT = 1024
KEY_LIMIT = 256
#: The largest ``--error-text-limit``: no configured text is ever cut here.
VALUE_LIMIT = 1_000_000
ATTRIBUTE_COUNT_LIMIT = 256
EVENT_COUNT_LIMIT = 128
LINK_COUNT_LIMIT = 128
#: Encoded bytes one span may take: well under the 4 MiB a collector's gRPC receiver accepts
#: by default, so that a span alone never makes a request the collector refuses.
SPAN_BYTES_LIMIT = 2 * 1024 * 1024
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_ID128, _ID64 = 1 << 128, 1 << 64
#: The data-issue text is short: a list of what was repaired, not a copy of the bad data.
_ISSUE_LIMIT = 1000
_QUOTE_LIMIT = 80  # truncate() keeps 40 characters of it
#: Bytes a key-value pair's tags and lengths add to its text, counted against the span's budget.
_FRAMING = 16
#: What the span's text may take: its limit less room for IDs, times, tags and the issue itself.
_TEXT_BUDGET = SPAN_BYTES_LIMIT - 64 * 1024
E = TypeVar("E", Kind, Status)
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


def valid_time(t: int) -> bool:
    """True when ``t`` (Unix ns) is between 1970 and 2100."""
    return TIME_MIN_NS <= t < TIME_MAX_NS


def _is_pair(item: object) -> TypeGuard[tuple[object, object]]:
    return isinstance(item, tuple) and len(item) == 2


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class _Repair:
    """What one repair found, and the encoded bytes still allowed for the span's text."""

    budget: int = _TEXT_BUDGET
    issues: list[str] = field(default_factory=list)

    def note(self, issue: str) -> None:
        if issue not in self.issues:
            self.issues.append(issue)

    def text(self, value: str, limit: int, what: str) -> str:
        """``value`` cut to ``limit`` characters and to the span's budget, bad characters replaced."""
        if _BAD_CHARS.search(value):
            value = _BAD_CHARS.sub("\ufffd", value)
            self.note(f"{what}: NUL or lone surrogate characters replaced by U+FFFD")
        if len(value) > limit:
            self.note(f"{what}: {len(value)} characters cut to {limit}")
            value = truncate(value, limit)
        encoded = value.encode()
        if len(encoded) > self.budget:
            kept = encoded[: max(0, self.budget - 64)].decode("utf-8", "ignore")
            self.note(f"{what}: cut to fit the span size limit")
            value = kept + f"… [{len(value) - len(kept)} more characters]"
            encoded = value.encode()
        self.budget -= len(encoded) + _FRAMING
        return value

    def value(self, key: str, value: object) -> AttrValue:
        if isinstance(value, bool | float):
            return value
        if isinstance(value, int):
            if INT64_MIN <= value <= INT64_MAX:
                return value
            self.note(f"attribute {key}: integer beyond int64 sent as text")
            return self.text(_int_text(value), VALUE_LIMIT, f"attribute {key}")
        if isinstance(value, str):
            return self.text(value, VALUE_LIMIT, f"attribute {key}")
        self.note(f"attribute {key}: a {type(value).__name__} value sent as text")
        return self.text(_show(value), VALUE_LIMIT, f"attribute {key}")

    def attributes(self, attributes: Iterable[tuple[object, object]], what: str) -> Attributes:
        out: list[tuple[str, AttrValue]] = []
        omitted = 0
        for item in attributes:
            if len(out) >= ATTRIBUTE_COUNT_LIMIT or self.budget <= 0 or not _is_pair(item):
                omitted += 1
                continue
            key, value = item
            k = self.text(key if isinstance(key, str) else _show(key), KEY_LIMIT, f"{what} key")
            out.append((k, self.value(_quote(k), value)))
        if omitted:
            self.note(
                f"{omitted} {what}s omitted (malformed, more than {ATTRIBUTE_COUNT_LIMIT}, or too large)"
            )
        return tuple(out)

    def time(self, t: object, what: str, fallback: object, fallback_name: str) -> int:
        if _is_int(t) and valid_time(t):
            return t
        if not _is_int(t):
            problem = f"{what} missing ({_quote(_show(t))})"
        else:
            problem = f"{what} {_quote(_int_text(t))} {'before 1970' if t < TIME_MIN_NS else 'after 2100'}"
        if _is_int(fallback) and valid_time(fallback):
            self.note(f"{problem}: set to {fallback_name}")
            return fallback
        self.note(f"{problem}: left unset")
        return 0

    def ident(self, value: object, bound: int, what: str) -> int:
        if _is_int(value) and 0 < value < bound:
            return value
        fixed = (value % bound if _is_int(value) else 0) or 1
        self.note(f"{what} {_quote(_show(value))} out of range: replaced by {fixed:x}")
        return fixed


def repair(r: SpanRecord) -> SpanRecord:
    """A copy of ``r`` that the encoder accepts, with :data:`DATA_ISSUE` saying what was changed.

    Args:
        r: any record, however broken its values.

    Returns:
        The repaired record; ``r`` itself when nothing needed repair.
    """
    fix = _Repair()
    start = fix.time(r.start_ns, "start time", r.end_ns, "the end time")
    end = fix.time(r.end_ns, "end time", start, "the start time")
    if end < start:
        fix.note(f"end time {end} before start time {start}: set to the start time")
        end = start
    parent = r.parent_span_id
    if parent == 0:
        fix.note("parent span ID 0: sent as a root span")
        parent = None
    elif parent is not None:
        parent = fix.ident(parent, _ID64, "parent span ID")
    fixed = r._replace(
        trace_id=fix.ident(r.trace_id, _ID128, "trace ID"),
        span_id=fix.ident(r.span_id, _ID64, "span ID"),
        parent_span_id=parent,
        start_ns=start,
        end_ns=end,
        name=fix.text(r.name, NAME_LIMIT, "name"),
        status_message=fix.text(r.status_message, VALUE_LIMIT, "status message"),
        attributes=fix.attributes(r.attributes, "attribute"),
        events=_events(fix, r.events, end),
        links=_links(fix, r.links),
        kind=_member(fix, r.kind, Kind.INTERNAL, "kind"),
        status=_member(fix, r.status, Status.UNSET, "status"),
    )
    if not fix.issues:
        return r
    return fixed._replace(attributes=_with_issues(fixed.attributes, fix.issues))


def stub(r: SpanRecord) -> SpanRecord:
    """The last resort for a record :func:`repair` could not make encodable: its IDs only."""
    trace_id, span_id = getattr(r, "trace_id", None), getattr(r, "span_id", None)
    return SpanRecord(
        trace_id=trace_id if _is_int(trace_id) and 0 < trace_id < _ID128 else 1,
        span_id=span_id if _is_int(span_id) and 0 < span_id < _ID64 else 1,
        parent_span_id=None,
        name="unencodable span",
        kind=Kind.INTERNAL,
        start_ns=0,
        end_ns=0,
        attributes=((DATA_ISSUE, "the span could not be encoded even after repair"),),
    )


def clean_attributes(attributes: Iterable[tuple[object, object]]) -> Attributes:
    """``attributes`` made encodable by the rules above, without saying so (for the resource)."""
    return _Repair().attributes(attributes, "attribute")


def _events(fix: _Repair, events: tuple[SpanEvent, ...], end: int) -> tuple[SpanEvent, ...]:
    if len(events) > EVENT_COUNT_LIMIT:
        fix.note(f"{len(events) - EVENT_COUNT_LIMIT} events omitted (more than {EVENT_COUNT_LIMIT})")
    return tuple(
        SpanEvent(
            name=fix.text(e.name, NAME_LIMIT, "event name"),
            time_ns=fix.time(e.time_ns, "event time", end, "the span's end"),
            attributes=fix.attributes(e.attributes, "event attribute"),
        )
        for e in events[:EVENT_COUNT_LIMIT]
    )


def _links(fix: _Repair, links: tuple[SpanLink, ...]) -> tuple[SpanLink, ...]:
    if len(links) > LINK_COUNT_LIMIT:
        fix.note(f"{len(links) - LINK_COUNT_LIMIT} links omitted (more than {LINK_COUNT_LIMIT})")
    return tuple(
        SpanLink(
            trace_id=fix.ident(lk.trace_id, _ID128, "link trace ID"),
            span_id=fix.ident(lk.span_id, _ID64, "link span ID"),
            attributes=fix.attributes(lk.attributes, "link attribute"),
        )
        for lk in links[:LINK_COUNT_LIMIT]
    )


def _member(fix: _Repair, value: object, default: E, what: str) -> E:
    if isinstance(value, type(default)):
        return value
    fix.note(f"{what} {_quote(_show(value))} unknown: set to {default.value}")
    return default


def _with_issues(attributes: Attributes, issues: list[str]) -> Attributes:
    """``attributes`` plus :data:`DATA_ISSUE`, appended to one the span already carries."""
    text = "; ".join(issues)
    earlier = [v for k, v in attributes if k == DATA_ISSUE]
    if earlier:
        text = f"{earlier[0]}; {text}"
    text = truncate(text, _ISSUE_LIMIT)
    kept = tuple((k, v) for k, v in attributes if k != DATA_ISSUE)
    if len(kept) >= ATTRIBUTE_COUNT_LIMIT:  # room for the issue: it matters more than the last attribute
        kept = kept[: ATTRIBUTE_COUNT_LIMIT - 1]
    return (*kept, (DATA_ISSUE, text))


def _int_text(n: int) -> str:
    """``n`` in decimal, or in hex past the digits Python converts to decimal (``int_max_str_digits``)."""
    if n.bit_length() <= 12_000:
        return str(n)
    return f"{'-' if n < 0 else ''}0x{abs(n):x}"


def _show(value: object) -> str:
    """``repr(value)``, safe for integers of any size."""
    return _int_text(value) if _is_int(value) else repr(value)


def _quote(text: str) -> str:
    """A short, printable quote for an issue text (the issue is not a copy of the bad data)."""
    return truncate(text, _QUOTE_LIMIT).encode("utf-8", "replace").decode()
