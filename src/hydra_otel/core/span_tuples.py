"""Span batches as plain tuples in ``marshal`` bytes: how spans reach the export process.

Theory of operation: the export process (adapters/export_process.py) encodes and sends
spans the daemon's Trio process rendered, so every span crosses a pipe. Pickling a list
of :class:`SpanRecord` costs about as much as encoding it (each record, event, link and
enum member is reduced and rebuilt by name), which would give back most of what the
second core saves. A record flattened to a tuple of ints, strings and tuples, and the
list written with ``marshal``, costs a third of that in the parent: marshal writes
those types in C without looking anything up. Kind and status travel as small ints.

``marshal`` keeps what the encoder looks at exactly: int (any size), bool, float (bit
for bit), str (lone surrogates included) and None, so a record rebuilt by
:func:`unpack` encodes to the same bytes (tests/core/test_span_tuples.py). A record
that does not flatten (a value of another type, an unknown kind: only bad input makes
one) travels pickled, as itself, and the encoder repairs it in the child as it would in
the parent; a record that does not even pickle is repaired here (core/sanitize.py) and
marked, so the child still counts it as repaired.

Pure: bytes in, records out.
"""

from __future__ import annotations

import marshal
import pickle
from collections.abc import Sequence

from hydra_otel.core import sanitize
from hydra_otel.core.spans import Attributes, Kind, SpanEvent, SpanLink, SpanRecord, Status

#: A record as plain values: IDs, name, kind code, times, attributes, status code and message,
#: events as (name, time, attributes), links as (trace ID, span ID, attributes).
Flat = tuple[
    int,
    int,
    int | None,
    str,
    int,
    int,
    int,
    Attributes,
    int,
    str,
    tuple[tuple[str, int, Attributes], ...],
    tuple[tuple[int, int, Attributes], ...],
]

_KINDS = (Kind.INTERNAL, Kind.SERVER)
_STATUSES = (Status.UNSET, Status.OK, Status.ERROR)
# Codes looked up by identity: hashing an Enum member runs Python code (Enum.__hash__), twice a span.
_KIND_CODES = {id(k): i for i, k in enumerate(_KINDS)}
_STATUS_CODES = {id(s): i for i, s in enumerate(_STATUSES)}
#: What flattening a record that is not as the types say can raise (it then travels pickled).
_ODD = (KeyError, TypeError, ValueError, AttributeError)


def _flat(r: SpanRecord) -> Flat:
    """``r`` as a tuple of plain values; raises on a value that is not one of the declared types."""
    events = tuple([(e.name, e.time_ns, e.attributes) for e in r.events]) if r.events else ()
    links = tuple([(lk.trace_id, lk.span_id, lk.attributes) for lk in r.links]) if r.links else ()
    return (
        r.trace_id,
        r.span_id,
        r.parent_span_id,
        r.name,
        _KIND_CODES[id(r.kind)],
        r.start_ns,
        r.end_ns,
        r.attributes,
        _STATUS_CODES[id(r.status)],
        r.status_message,
        events,
        links,
    )


def pack(records: Sequence[SpanRecord]) -> bytes:
    """``records`` as one ``marshal`` payload for :func:`unpack` (never raises on a record)."""
    try:
        return marshal.dumps([_flat(r) for r in records])
    except _ODD:
        return marshal.dumps([_one(r) for r in records])


def _one(r: SpanRecord) -> object:
    """One record for a batch that did not flatten whole: flat, pickled, or repaired here."""
    try:
        flat = _flat(r)
        marshal.dumps(flat)  # raises ValueError on a value of another type
    except _ODD:
        pass
    else:
        return flat
    try:
        return pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - whatever an odd value's __reduce__ raises, repair instead
        return _repaired(r)


def _repaired(r: SpanRecord) -> list[str | Flat]:
    """``[example, flat repaired record]``: a list, where every other record is a tuple or bytes."""
    try:
        fixed = sanitize.repair(r)
        flat = _flat(fixed)
        marshal.dumps(flat)
    except _ODD:  # a gap in repair(), as the encoder handles it: send the span's identity
        fixed = sanitize.stub(r)
        flat = _flat(fixed)
    example = f"{fixed.name[:100]}: {fixed.attrs().get(sanitize.DATA_ISSUE, '')}"
    return [example, flat]


def _record(t: Flat) -> SpanRecord:
    """The record :func:`_flat` flattened (values of other types come back as they went)."""
    (trace_id, span_id, parent, name, kind, start, end, attributes, status, message, events, links) = t
    return SpanRecord(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind=_KINDS[kind],
        start_ns=start,
        end_ns=end,
        attributes=attributes,
        status=_STATUSES[status],
        status_message=message,
        events=tuple([SpanEvent(name=n, time_ns=w, attributes=a) for n, w, a in events]) if events else (),
        links=tuple([SpanLink(trace_id=i, span_id=s, attributes=a) for i, s, a in links]) if links else (),
    )


def unpack(payload: bytes) -> tuple[list[SpanRecord], list[tuple[int, str]]]:
    """The records :func:`pack` wrote, and the (index, example) of those repaired by it.

    Args:
        payload: :func:`pack`'s bytes.

    Returns:
        The records, in order, and for each one :func:`pack` had to repair, its index and a
        ``"<name>: <data issue>"`` example.
    """
    items: list[Flat | bytes | list[str | Flat]] = marshal.loads(payload)
    records: list[SpanRecord] = []
    repaired: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            records.append(pickle.loads(item))
        elif isinstance(item, list):
            example, flat = item
            records.append(_record(flat))  # type: ignore[arg-type]  # [example, flat], as _repaired wrote
            repaired.append((i, example))  # type: ignore[arg-type]
        else:
            records.append(_record(item))
    return records, repaired
