"""A neutral span model: what hydra-otel exports, with no SDK types.

Theory of operation: the core builds :class:`SpanRecord` values from Hydra's
rows and the live notifications; only ``adapters/otlp.py`` turns them into
OpenTelemetry SDK objects. Records are frozen and compare by value, so "the
same span twice" is an equality test, and attributes are an ordered tuple so
the encoded bytes do not depend on dict ordering.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

AttrValue = str | bool | int | float
Attributes = tuple[tuple[str, AttrValue], ...]


class Kind(enum.Enum):
    """Span kinds hydra-otel uses (a subset of OpenTelemetry's)."""

    INTERNAL = "internal"
    SERVER = "server"

    # Members are singletons compared by identity, so the identity hash is a valid one, and it is
    # computed in C: Enum's own hashes the name in Python, twice per record in the duplicate filter.
    __hash__ = object.__hash__


class Status(enum.Enum):
    """Span status codes."""

    UNSET = "unset"
    OK = "ok"
    ERROR = "error"

    __hash__ = object.__hash__  # as Kind's


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanEvent:
    """A timestamped event on a span (e.g. an ``exception``)."""

    name: str
    time_ns: int
    attributes: Attributes = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanLink:
    """A link to a span in this or another trace."""

    trace_id: int
    span_id: int
    attributes: Attributes = ()


class SpanRecord(NamedTuple):
    """One finished span, ready to export.

    A named tuple, not a frozen dataclass like the others: the daemon makes one for every
    span, and a tuple is built, hashed (the duplicate filter) and compared in C, where a frozen
    dataclass sets each field through ``object.__setattr__`` in Python (about 2.4 µs against
    0.9 µs a record; docs/performance.md). Change one with ``record._replace(...)``.
    """

    trace_id: int
    span_id: int
    parent_span_id: int | None
    name: str
    kind: Kind
    start_ns: int
    end_ns: int
    attributes: Attributes
    status: Status = Status.UNSET
    status_message: str = ""
    events: tuple[SpanEvent, ...] = ()
    links: tuple[SpanLink, ...] = ()

    def attrs(self) -> dict[str, AttrValue]:
        """The attributes as a dict, for reading (tests, renderers)."""
        return dict(self.attributes)


def attributes(pairs: Mapping[str, AttrValue | None] | Iterable[tuple[str, AttrValue | None]]) -> Attributes:
    """Build an :data:`Attributes` tuple, dropping ``None`` values and keeping the given order."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return tuple([(k, v) for k, v in items if v is not None])  # a list is built faster than a generator


def present(pairs: list[tuple[str, AttrValue | None]]) -> Attributes:
    """:func:`attributes` for a list of pairs built for the purpose: the pairs are kept, not copied."""
    return tuple([p for p in pairs if p[1] is not None])  # type: ignore[misc]  # None values are dropped


def seconds_ns(seconds: int) -> int:
    """Hydra stores integer Unix seconds; spans take nanoseconds."""
    return seconds * 1_000_000_000


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    kept = max(0, limit - 40)  # room for the marker, which is shorter than 40 characters
    return text[:kept] + f"… [{len(text) - kept} more characters]"
