"""A terminal waterfall of one trace, and the OTLP/JSON encoding of exported traces.

Theory of operation: everything here is a pure function of its arguments; nothing reads the
clock, the terminal size or the environment. Spans from either source (the core's
:class:`~hydra_otel.core.spans.SpanRecord`, or OTLP protobuf ``Span`` messages such as the test
receivers collect) are first converted to one small shape, :class:`SpanView`. The renderer then

1. resolves each span's end (a span still running, ``end_ns < start_ns``, ends at ``now_ns`` or,
   without it, at the end of the trace) and the trace's bounds;
2. builds the parent/child tree from the IDs present: roots (no parent) first, then orphans (a
   parent that is not in the set), then any spans only reachable through a parent cycle, each
   list and each span's children ordered by start time, then name, then span ID;
3. prints one line per span: an indented name column, a bar in a time column scaled to the whole
   trace, a human duration and a status mark.

The line layout is fixed by ``width``, so the output is byte-for-byte reproducible; the golden
test in ``tests/test_waterfall.py`` relies on that.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

# protobuf ships no type stubs and types-protobuf is not a dependency.
from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from hydra_otel.core.spans import SpanRecord
from hydra_otel.core.spans import Status as RecordStatus

SpanStatus = Literal["ok", "error", "unset"]

_RECORD_STATUS: Final[Mapping[RecordStatus, SpanStatus]] = {
    RecordStatus.OK: "ok",
    RecordStatus.ERROR: "error",
    RecordStatus.UNSET: "unset",
}
_OTLP_STATUS: Final[Mapping[int, SpanStatus]] = {
    Status.STATUS_CODE_OK: "ok",
    Status.STATUS_CODE_ERROR: "error",
}

#: Columns after the name and the bar: " " duration(7) " " mark(3).
_TAIL_WIDTH: Final = 12
_DURATION_WIDTH: Final = 7
#: Room for the header's trace ID, duration and span count, plus a few characters of the name.
_MIN_WIDTH: Final = 64
_ORPHAN_NOTE: Final = "(parent missing)"
_CYCLE_NOTE: Final = "(parent cycle)"


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanView:
    """The fields of a span the waterfall needs, whatever it was read from.

    ``end_ns < start_ns`` (an OTLP span with no end time has ``end_ns == 0``) means "still
    running".
    """

    trace_id: int
    span_id: int
    parent_span_id: int | None
    name: str
    start_ns: int
    end_ns: int
    status: SpanStatus = "unset"
    attributes: Mapping[str, object] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class _Glyphs:
    """The characters one rendering style draws with."""

    bar: str
    gap: str
    instant: str
    ellipsis: str
    marks: Mapping[SpanStatus, str]


_UNICODE: Final = _Glyphs("█", "·", "│", "…", {"ok": "✓", "error": "✗", "unset": ""})
_ASCII: Final = _Glyphs("#", ".", "|", "~", {"ok": "ok", "error": "ERR", "unset": ""})


@dataclass(frozen=True, slots=True)
class _Row:
    """One line to draw: a span, its depth, and a note for spans shown out of place."""

    span: SpanView
    depth: int
    note: str = ""


@dataclass(frozen=True, slots=True)
class _Frame:
    """The geometry shared by every line of one rendering."""

    start_ns: int
    end_ns: int
    now_ns: int | None
    width: int
    name_width: int
    bar_width: int
    glyphs: _Glyphs


def from_record(record: SpanRecord) -> SpanView:
    """View a core span record.

    Args:
        record: a finished span from the stitcher.

    Returns:
        The view, with the record's attributes as a read-only mapping.
    """
    return SpanView(
        trace_id=record.trace_id,
        span_id=record.span_id,
        parent_span_id=record.parent_span_id,
        name=record.name,
        start_ns=record.start_ns,
        end_ns=record.end_ns,
        status=_RECORD_STATUS[record.status],
        attributes=MappingProxyType(record.attrs()),
    )


def from_otlp(span: Span) -> SpanView:
    """View an OTLP protobuf span.

    Args:
        span: a ``opentelemetry.proto.trace.v1.trace_pb2.Span``.

    Returns:
        The view: byte IDs read as big-endian integers (an empty parent ID is no parent), status
        code 1 as ``"ok"``, 2 as ``"error"``, anything else as ``"unset"``.
    """
    attributes = {kv.key: _any_value(kv.value) for kv in span.attributes}
    return SpanView(
        trace_id=int.from_bytes(span.trace_id, "big"),
        span_id=int.from_bytes(span.span_id, "big"),
        parent_span_id=int.from_bytes(span.parent_span_id, "big") if span.parent_span_id else None,
        name=span.name,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        status=_OTLP_STATUS.get(span.status.code, "unset"),
        attributes=MappingProxyType(attributes),
    )


def _any_value(value: AnyValue) -> object:
    """The Python value an OTLP ``AnyValue`` holds: arrays become tuples, key-value lists dicts."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_any_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return None if kind is None else getattr(value, kind)


def group_traces(views: Iterable[SpanView]) -> dict[int, list[SpanView]]:
    """Split spans by trace.

    Args:
        views: spans of any number of traces.

    Returns:
        A dict from trace ID to that trace's spans, traces and spans in the order first seen.
    """
    traces: dict[int, list[SpanView]] = {}
    for view in views:
        traces.setdefault(view.trace_id, []).append(view)
    return traces


def format_duration(ns: int) -> str:
    """A short human duration, rounded down: ``850ms``, ``12.3s``, ``4m05s``, ``1h02m``.

    Args:
        ns: nanoseconds; negative counts as zero.

    Returns:
        At most 5 characters below 10 hours (``59m59s`` is the one 6-character case).
    """
    ns = max(ns, 0)
    if ns < 1_000_000_000:
        return f"{ns // 1_000_000}ms"
    seconds = ns // 1_000_000_000
    if seconds < 60:
        tenths = ns // 100_000_000
        return f"{tenths // 10}.{tenths % 10}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render_waterfall(
    spans: Sequence[SpanView],
    *,
    width: int = 100,
    now_ns: int | None = None,
    ascii: bool = False,  # noqa: A002 - keyword-only, and the builtin is not needed here
) -> str:
    """Draw one trace as an indented tree with a time bar per span.

    Args:
        spans: the spans of one trace, in any order.
        width: the length of the longest line, at least 64.
        now_ns: where spans still running end; without it, at the end of the trace. Their
            durations get a ``+`` ("at least").
        ascii: draw with ``#``/``.``/``|`` and mark ``ok``/``ERR`` instead of block characters,
            ``✓`` and ``✗``.

    Returns:
        A header line, a time axis line, then one line per span; lines end with ``\\n`` and carry
        no trailing spaces.

    Raises:
        ValueError: if ``spans`` is empty, mixes traces, or ``width`` is below 64.
    """
    if not spans or len({s.trace_id for s in spans}) != 1:
        raise ValueError("render_waterfall draws exactly one trace: pass one group of group_traces()")
    if width < _MIN_WIDTH:
        raise ValueError(f"width must be at least {_MIN_WIDTH}, got {width}")
    frame = _frame(spans, width, now_ns, _ASCII if ascii else _UNICODE)
    rows = _rows(spans)
    lines = [_header(rows, frame), _axis(frame), *(_line(row, frame) for row in rows)]
    return "".join(line.rstrip() + "\n" for line in lines)


def _frame(spans: Sequence[SpanView], width: int, now_ns: int | None, glyphs: _Glyphs) -> _Frame:
    """Work out the trace's time bounds and the column widths."""
    start = min(s.start_ns for s in spans)
    running = any(s.end_ns < s.start_ns for s in spans)
    ends = [max(s.start_ns, s.end_ns) for s in spans]
    end = max([*ends, now_ns]) if running and now_ns is not None else max(ends)
    name_width = width * 7 // 20
    return _Frame(start, end, now_ns, width, name_width, width - name_width - 1 - _TAIL_WIDTH, glyphs)


def _end(span: SpanView, frame: _Frame) -> int:
    """Where a span ends on the chart: its end, or for a running span ``now_ns`` or the trace end."""
    if span.end_ns >= span.start_ns:
        return span.end_ns
    return max(span.start_ns, frame.end_ns if frame.now_ns is None else frame.now_ns)


def _rows(spans: Sequence[SpanView]) -> list[_Row]:
    """Order the spans depth-first: roots, then orphans, then spans caught in a parent cycle."""
    ids = {s.span_id for s in spans}
    children: dict[int, list[SpanView]] = {}
    for span in spans:
        if span.parent_span_id is not None:
            children.setdefault(span.parent_span_id, []).append(span)
    roots = [s for s in spans if s.parent_span_id is None]
    orphans = [s for s in spans if s.parent_span_id is not None and s.parent_span_id not in ids]
    rows: list[_Row] = []
    seen: set[int] = set()
    for group, note in ((roots, ""), (orphans, _ORPHAN_NOTE)):
        for span in sorted(group, key=_order):
            _walk(span, 0, note, children, rows, seen)
    for span in sorted(spans, key=_order):
        if id(span) not in seen:
            _walk(span, 0, _CYCLE_NOTE, children, rows, seen)
    return rows


def _order(span: SpanView) -> tuple[int, str, int]:
    """Sort key: start time, then name, then span ID."""
    return (span.start_ns, span.name, span.span_id)


def _walk(
    span: SpanView,
    depth: int,
    note: str,
    children: Mapping[int, list[SpanView]],
    rows: list[_Row],
    seen: set[int],
) -> None:
    """Append ``span`` and its descendants to ``rows``, each span once (cycles stop here)."""
    if id(span) in seen:
        return
    seen.add(id(span))
    rows.append(_Row(span, depth, note))
    for child in sorted(children.get(span.span_id, ()), key=_order):
        _walk(child, depth + 1, "", children, rows, seen)


def _header(rows: Sequence[_Row], frame: _Frame) -> str:
    """Name the trace: its first root's name (cut to fit), ID, total duration and span count."""
    title = rows[0].span.name if rows[0].note == "" else "(no root span)"
    count = len(rows)
    total = format_duration(frame.end_ns - frame.start_ns)
    facts = f"  trace {rows[0].span.trace_id:032x}  {total}  {count} {'span' if count == 1 else 'spans'}"
    return _truncate(title, frame.width - len(facts), frame.glyphs.ellipsis) + facts


def _axis(frame: _Frame) -> str:
    """A scale under the header: 0 at the left of the bar column, the total at its right."""
    total = format_duration(frame.end_ns - frame.start_ns)
    return " " * (frame.name_width + 1) + "0" + total.rjust(frame.bar_width - 1)


def _line(row: _Row, frame: _Frame) -> str:
    """One span: name column, bar, duration and status mark."""
    span = row.span
    end = _end(span, frame)
    duration = format_duration(end - span.start_ns) + ("+" if span.end_ns < span.start_ns else "")
    mark = frame.glyphs.marks[span.status]
    name = _name_cell(row, frame)
    return f"{name} {_bar(span.start_ns, end, frame)} {duration.rjust(_DURATION_WIDTH)} {mark}"


def _name_cell(row: _Row, frame: _Frame) -> str:
    """The indented, truncated name, with the row's note kept whole at the right."""
    note = f" {row.note}" if row.note else ""
    text = _truncate("  " * row.depth + row.span.name, frame.name_width - len(note), frame.glyphs.ellipsis)
    return (text + note).ljust(frame.name_width)


def _truncate(text: str, room: int, ellipsis: str) -> str:
    """Cut ``text`` to ``room`` characters, ending in ``ellipsis`` when cut."""
    if len(text) <= room:
        return text
    return text[: room - 1] + ellipsis if room > 0 else ""


def _bar(start: int, end: int, frame: _Frame) -> str:
    """The time column: the span's cells filled, the rest dotted; an instant is one thin mark."""
    glyphs, cells = frame.glyphs, frame.bar_width
    total = max(frame.end_ns - frame.start_ns, 1)
    first = min((start - frame.start_ns) * cells // total, cells - 1)
    if end == start:
        return glyphs.gap * first + glyphs.instant + glyphs.gap * (cells - first - 1)
    last = max(-((frame.start_ns - end) * cells // total), first + 1)  # ceiling division
    last = min(last, cells)
    return glyphs.gap * first + glyphs.bar * (last - first) + glyphs.gap * (cells - last)


def otlp_json(requests: Sequence[ExportTraceServiceRequest], *, indent: int | None = None) -> str:
    """Encode export requests as one OTLP/JSON ``ExportTraceServiceRequest``.

    The OTLP/JSON encoding is the protobuf JSON mapping with lowerCamelCase keys, plus two rules of
    the OTLP specification: trace and span IDs (``traceId``, ``spanId``, ``parentSpanId``, also
    in links) are lowercase hex instead of base64, and enums are integers. 64-bit integers stay
    decimal strings, and other bytes (``bytesValue``) stay base64, as the mapping says.

    Args:
        requests: requests as received (e.g. a test receiver's); their ``resourceSpans`` are
            concatenated into one request.
        indent: pretty-print with this indent; by default the document is a single line, so the
            file is also valid JSON Lines for the collector's ``otlpjsonfile`` receiver.

    Returns:
        The JSON text, ending with a newline.
    """
    merged = ExportTraceServiceRequest()
    for request in requests:
        merged.resource_spans.extend(request.resource_spans)
    document: dict[str, object] = json_format.MessageToDict(
        merged, preserving_proto_field_name=False, use_integers_for_enums=True
    )
    document.setdefault("resourceSpans", [])
    return json.dumps(_hex_ids(document), indent=indent, ensure_ascii=False) + "\n"


_ID_KEYS: Final = frozenset({"traceId", "spanId", "parentSpanId"})


def _hex_ids(node: object) -> object:
    """Re-encode every ID key's base64 value as lowercase hex, recursively."""
    if isinstance(node, dict):
        return {key: _hex_id(value) if key in _ID_KEYS else _hex_ids(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_hex_ids(item) for item in node]
    return node


def _hex_id(value: object) -> object:
    """A base64 ID as lowercase hex (the mapping encodes bytes as base64 strings)."""
    return base64.b64decode(value, validate=True).hex() if isinstance(value, str) else value
