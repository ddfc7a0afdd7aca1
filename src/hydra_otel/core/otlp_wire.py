"""OTLP/protobuf encoding of :class:`SpanRecord` batches, written straight to bytes.

Theory of operation: an OTLP ``ExportTraceServiceRequest`` is a few nested
protobuf messages, and hydra-otel's spans use a small, fixed part of it (one
resource, one instrumentation scope, string/int/bool/float attributes, events,
links and a status). Encoding that part by hand is about five times cheaper
than building the SDK's ``ReadableSpan`` objects and running them through its
encoder, which creates one Python protobuf object per attribute and value
(measured in docs/performance.md). The output parses to the same message the
SDK's encoder produces for the same span (tests/core/test_otlp_wire.py checks
that on generated spans), so backends see no difference.

Pure and synchronous: values in, bytes out; the transport lives in
``adapters/otlp.py``. The wire format is protobuf's (varints, little-endian
fixed64/fixed32, length-delimited sub-messages); field numbers are those of
``opentelemetry/proto/trace/v1/trace.proto`` and ``common/v1/common.proto``,
written in ascending order as protobuf's own encoders do.

The encoder never raises on a span. Each span is checked as it is encoded,
against core/sanitize.py's limits (IDs, times and counts up front, attribute
types and text on a cache miss, the encoded size at the end), so values the
cache already holds cost nothing more; a span that fails any check is
encoded again from :func:`~hydra_otel.core.sanitize.repair`'s copy, which
clamps or omits the impossible values and says so in ``hydra.data_issue``.
:attr:`SpanEncoder.repaired` counts those spans.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from hydra_otel.core import sanitize
from hydra_otel.core.sanitize import (
    ATTRIBUTE_COUNT_LIMIT,
    EVENT_COUNT_LIMIT,
    KEY_LIMIT,
    LINK_COUNT_LIMIT,
    NAME_LIMIT,
    SPAN_BYTES_LIMIT,
    TIME_MAX_NS,
    VALUE_LIMIT,
    valid_time,
)
from hydra_otel.core.spans import Attributes, AttrValue, Kind, SpanEvent, SpanLink, SpanRecord, Status

# Field tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
_SPAN_KINDS = {Kind.INTERNAL: b"\x30\x01", Kind.SERVER: b"\x30\x02"}  # Span.kind (6)
_STATUS_CODES = {Status.UNSET: 0, Status.OK: 1, Status.ERROR: 2}  # Status.code (3)
# Span.flags (16, fixed32) and Link.flags (6, fixed32): SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
# (0x100) with IS_REMOTE clear, as the SDK writes for local parents and links.
_SPAN_FLAGS = b"\x85\x01" + struct.pack("<I", 0x100)
_LINK_FLAGS = b"\x35" + struct.pack("<I", 0x100)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")

#: Encoded attributes are remembered per key. Most keys take few values (status names, systems,
#: machines, span types, projects), and those are encoded once. A key's memory holds
#: ``_VALUES_PER_KEY`` values at most and starts afresh when full, so for keys of many values
#: (build IDs, derivation paths) it keeps the recent ones: a build's ID is on each of its spans,
#: which are encoded together. Long values (error texts, log tails) are never kept, so the cache
#: stays under a few MB.
_VALUES_PER_KEY = 256
_CACHE_ITEM_LIMIT = 256


@dataclass(frozen=True, slots=True)
class Encoded:
    """A serialized ``ExportTraceServiceRequest``, how many spans it holds and how many were repaired."""

    payload: bytes
    spans: int
    repaired: int = 0
    #: One repaired span of the request, as ``"<name>: <its data issue>"``, for a log line.
    example: str = ""


class _UnfitError(Exception):
    """A value the encoder's fast path does not take; the span is repaired and encoded again."""


#: What encoding an unchecked value can raise: each sends the span to :func:`sanitize.repair`.
_UNFIT = (_UnfitError, ValueError, TypeError, OverflowError, AttributeError, KeyError, struct.error)


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint; negative numbers as 64-bit two's complement (int64)."""
    if n < 0:
        n += 1 << 64
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes([i]) for i in range(0x80)]


def _field(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: tag, length, body."""
    n = len(body)
    return tag + (_SMALL[n] if n < 0x80 else _varint(n)) + body


def _any_value(value: AttrValue) -> bytes:
    """An ``AnyValue`` body. Oneof members are written even when zero, as protobuf does."""
    if isinstance(value, str):
        if len(value) > VALUE_LIMIT or "\x00" in value:
            raise _UnfitError(value[:40])
        return _field(b"\x0a", value.encode())  # string_value (1)
    if isinstance(value, bool):  # before int: bool is an int subclass
        return b"\x10\x01" if value else b"\x10\x00"  # bool_value (2)
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"integer attribute value {value} does not fit OTLP's int64")
        return b"\x18" + _varint(value)  # int_value (3)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)  # double_value (4)
    raise TypeError(f"attribute values must be str, bool, int or float, not {type(value).__name__}")


class SpanEncoder:
    """Encodes batches of spans for one resource and instrumentation scope.

    Args:
        resource: the resource's attributes (``service.name`` and the rest).
        scope_name: the instrumentation scope's name.
        scope_version: the instrumentation scope's version.
    """

    def __init__(self, resource: Attributes, scope_name: str, scope_version: str) -> None:
        #: tag -> key -> the key's encoded field and, by value, the class and ``KeyValue`` field
        #: encoded for it.
        self._cache: dict[bytes, dict[str, tuple[bytes, dict[AttrValue, tuple[type, bytes]]]]] = {}
        #: Spans encoded from a repaired copy, since this encoder was made, and the latest of them.
        self.repaired = 0
        self.last_repair = ""
        # ResourceSpans.resource (1) = Resource{attributes (1)}
        resource = sanitize.clean_attributes(resource)
        self._resource = _field(b"\x0a", self._attributes(b"\x0a", resource))
        # ScopeSpans.scope (1) = InstrumentationScope{name (1), version (2)}
        scope = (_field(b"\x0a", scope_name.encode()) if scope_name else b"") + (
            _field(b"\x12", scope_version.encode()) if scope_version else b""
        )
        self._scope = _field(b"\x0a", scope)
        # What a request adds around its spans: resource and scope, and two tags with lengths.
        self._overhead = len(self._resource) + len(self._scope) + 2 * (1 + 5)

    def request(self, records: Iterable[SpanRecord]) -> bytes:
        """A serialized ``ExportTraceServiceRequest`` holding ``records``."""
        span = self.span
        return self._wrap([_field(b"\x12", span(r)) for r in records])

    def requests(self, records: Iterable[SpanRecord], max_bytes: int) -> list[Encoded]:
        """``records`` as consecutive requests of at most ``max_bytes`` each, with their span counts.

        Collectors refuse larger messages (a gRPC receiver takes 4 MiB unless configured
        otherwise), and retrying a refused request cannot help. A span that alone exceeds
        ``max_bytes`` travels alone. Each span is encoded once.
        """
        out: list[Encoded] = []
        fields: list[bytes] = []
        size = self._overhead
        span = self.span
        repaired, example = 0, ""
        for r in records:
            before = self.repaired
            encoded = _field(b"\x12", span(r))  # ScopeSpans.spans (2)
            if fields and size + len(encoded) > max_bytes:
                out.append(Encoded(self._wrap(fields), len(fields), repaired, example))
                fields, size, repaired, example = [], self._overhead, 0, ""
            fields.append(encoded)
            size += len(encoded)
            if self.repaired != before:
                repaired += 1
                example = example or self.last_repair
        if fields:
            out.append(Encoded(self._wrap(fields), len(fields), repaired, example))
        return out

    def _wrap(self, span_fields: list[bytes]) -> bytes:
        spans = b"".join(span_fields)
        if not spans:
            return b""  # no ResourceSpans at all, as the SDK encodes an empty batch
        scope_spans = _field(b"\x12", self._scope + spans)  # ResourceSpans.scope_spans (2)
        return _field(b"\x0a", self._resource + scope_spans)  # request.resource_spans (1)

    def span(self, r: SpanRecord) -> bytes:
        """One serialized ``Span`` message; never raises (see the module's docstring)."""
        try:
            body = self._span(r)
            if len(body) <= SPAN_BYTES_LIMIT:
                return body
        except _UNFIT:
            pass
        self.repaired += 1
        try:
            fixed = sanitize.repair(r)
            body = self._span(fixed)
        except _UNFIT:  # a gap in repair(): still send the span's identity rather than stop
            fixed = sanitize.stub(r)
            body = self._span(fixed)
        self.last_repair = f"{fixed.name[:100]}: {fixed.attrs().get(sanitize.DATA_ISSUE, '')}"
        return body

    def _span(self, r: SpanRecord) -> bytes:
        # One unpacking of the record's tuple costs less than reading its fields one by one.
        (
            trace_id,
            span_id,
            parent,
            name,
            kind,
            start_ns,
            end_ns,
            attributes,
            status,
            message,
            events,
            links,
        ) = r
        # What the wire format would take but OTLP forbids: to_bytes() and pack() refuse the rest
        # (negative or oversized IDs and times).
        if not (0 <= start_ns <= end_ns < TIME_MAX_NS and trace_id and span_id and parent != 0):
            raise _UnfitError("IDs or times")
        parts = [
            b"\x0a\x10" + trace_id.to_bytes(16, "big"),  # trace_id (1)
            b"\x12\x08" + span_id.to_bytes(8, "big"),  # span_id (2)
        ]
        if parent is not None:
            parts.append(b"\x22\x08" + parent.to_bytes(8, "big"))  # parent_span_id (4)
        if name:
            if len(name) > NAME_LIMIT or "\x00" in name:
                raise _UnfitError("name")
            parts.append(_field(b"\x2a", name.encode()))  # name (5)
        parts.append(_SPAN_KINDS[kind])
        if start_ns:
            parts.append(b"\x39" + _FIXED64.pack(start_ns))  # start_time_unix_nano (7)
        if end_ns:
            parts.append(b"\x41" + _FIXED64.pack(end_ns))  # end_time_unix_nano (8)
        parts.append(self._attributes(b"\x4a", attributes))  # attributes (9)
        if events or links:
            if len(events) > EVENT_COUNT_LIMIT or len(links) > LINK_COUNT_LIMIT:
                raise _UnfitError("events or links")
            parts.extend(self._event(e) for e in events)  # events (11)
            parts.extend(self._link(lk) for lk in links)  # links (13)
        parts.append(_status(status, message))  # status (15)
        parts.append(_SPAN_FLAGS)
        return b"".join(parts)

    def _attributes(self, tag: bytes, attributes: Attributes) -> bytes:
        """Each attribute as a ``KeyValue`` field with ``tag``; recurring ones come from the cache."""
        if len(attributes) > ATTRIBUTE_COUNT_LIMIT:
            raise _UnfitError("attributes")
        keys = self._cache.get(tag)
        if keys is None:
            keys = self._cache[tag] = {}
        out = []
        for key, value in attributes:
            entry = keys.get(key)
            if entry is None:  # a key seen for the first time: checked and encoded once
                if len(key) > KEY_LIMIT or "\x00" in key:
                    raise _UnfitError(key)
                entry = keys[key] = (_field(b"\x0a", key.encode()) if key else b"", {})
            prefix, values = entry
            # Keyed by the value alone (no tuple to build per attribute), so True, 1 and 1.0 share
            # an entry: it holds the class it was encoded for, and another class is encoded apart.
            hit = values.get(value)
            if hit is not None and hit[0] is value.__class__:
                out.append(hit[1])
                continue
            encoded = _field(tag, prefix + _field(b"\x12", _any_value(value)))
            if hit is None and len(encoded) <= _CACHE_ITEM_LIMIT:
                if len(values) >= _VALUES_PER_KEY:
                    values.clear()  # a key of many values: the recent ones are the ones that recur
                values[value] = (value.__class__, encoded)
            out.append(encoded)
        return b"".join(out)

    def _event(self, e: SpanEvent) -> bytes:
        if not valid_time(e.time_ns) or len(e.name) > NAME_LIMIT or "\x00" in e.name:
            raise _UnfitError(e.name[:40])
        if len(e.attributes) > ATTRIBUTE_COUNT_LIMIT:
            raise _UnfitError(e.name[:40])
        body = b"".join(
            [
                b"\x09" + _FIXED64.pack(e.time_ns) if e.time_ns else b"",  # time_unix_nano (1)
                _field(b"\x12", e.name.encode()) if e.name else b"",  # name (2)
                self._attributes(b"\x1a", e.attributes),  # attributes (3)
            ]
        )
        return _field(b"\x5a", body)

    def _link(self, lk: SpanLink) -> bytes:
        if lk.trace_id <= 0 or lk.span_id <= 0 or len(lk.attributes) > ATTRIBUTE_COUNT_LIMIT:
            raise _UnfitError("link")
        body = b"".join(
            [
                b"\x0a\x10" + lk.trace_id.to_bytes(16, "big"),  # trace_id (1)
                b"\x12\x08" + lk.span_id.to_bytes(8, "big"),  # span_id (2)
                self._attributes(b"\x22", lk.attributes),  # attributes (4)
                _LINK_FLAGS,  # flags (6)
            ]
        )
        return _field(b"\x6a", body)


def _status(status: Status, message: str) -> bytes:
    """``Span.status`` (15), always present: message (2) only with an error, then code (3)."""
    code = _STATUS_CODES[status]
    body = b""
    if status is Status.ERROR and message:
        if len(message) > VALUE_LIMIT or "\x00" in message:
            raise _UnfitError("status message")
        body = _field(b"\x12", message.encode())
    if code:
        body += b"\x18" + _SMALL[code]
    return _field(b"\x7a", body)
