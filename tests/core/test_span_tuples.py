"""core/span_tuples.py: spans sent to the export process encode there exactly as they would here."""

from __future__ import annotations

import math
import pickle
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra_otel.core import span_tuples
from hydra_otel.core.builds import build_spans
from hydra_otel.core.otlp_wire import SpanEncoder
from hydra_otel.core.sanitize import DATA_ISSUE
from hydra_otel.core.spans import Kind, SpanEvent, SpanLink, SpanRecord, Status
from tests.core.test_otlp_wire import _records
from tests.core.test_sanitize import HOSTILE, _hostile
from tests.factories import RENDER_CONFIG, make_build, make_span, make_step


def encoder() -> SpanEncoder:
    return SpanEncoder((("service.name", "hydra-otel"),), "hydra_otel", "1")


def encoded(records: Sequence[SpanRecord], extra_repaired: int = 0) -> tuple[list[bytes], int]:
    """Each record's encoded span and how many were repaired, by a fresh encoder (its cache cold)."""
    enc = encoder()
    spans = [enc.span(r) for r in records]
    return spans, enc.repaired + extra_repaired


def assert_travels_intact(records: Sequence[SpanRecord]) -> list[SpanRecord]:
    """Encoding after pack/unpack gives the same bytes and the same repair count as before."""
    rebuilt, repaired = span_tuples.unpack(span_tuples.pack(records))
    assert len(rebuilt) == len(records)
    assert encoded(rebuilt, len(repaired)) == encoded(records)
    return rebuilt


def rendered() -> list[SpanRecord]:
    out: list[SpanRecord] = []
    for build_id in range(1, 31):
        failed = build_id % 5 == 0
        steps = [
            make_step(build_id=build_id, stepnr=n, status=1 if failed and n == 2 else 0) for n in (1, 2, 3)
        ]
        out += build_spans(RENDER_CONFIG, make_build(build_id=build_id, status=1 if failed else 0), steps)
    return out


def test_rendered_spans_come_back_equal() -> None:
    """Spans as the daemon renders them are rebuilt equal and encode to the same bytes."""
    records = rendered()
    assert assert_travels_intact(records) == records


def test_events_links_and_odd_values() -> None:
    """Events, links, both kinds and statuses, and values marshal keeps bit for bit."""
    record = make_span(
        kind=Kind.SERVER,
        status=Status.ERROR,
        status_message="boom",
        attributes=(
            ("nan", math.nan),
            ("neg zero", -0.0),
            ("inf", math.inf),
            ("true", True),
            ("one", 1),
            ("one float", 1.0),
            ("big", (1 << 63) - 1),
            ("empty", ""),
            ("unicode", "ünï ✓ \U0001f600"),
        ),
        events=(SpanEvent(name="exception", time_ns=5, attributes=(("exception.message", "x"),)),),
        links=(SpanLink(trace_id=1 << 100, span_id=7, attributes=(("why", "rebuilt"),)),),
    )
    (back,) = assert_travels_intact([record])
    assert back.attrs()["true"] is True
    assert type(back.attrs()["one"]) is int
    assert math.copysign(1.0, back.attrs()["neg zero"]) == -1.0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "issue"), [(o, i) for _, o, i in HOSTILE], ids=[n for n, _, _ in HOSTILE]
)
def test_a_hostile_record_is_repaired_the_same_after_the_trip(overrides: dict[str, Any], issue: str) -> None:
    """Values the encoder repairs (huge ints, surrogates, NULs, bytes, unknown kinds) arrive as they were."""
    assert_travels_intact([make_span(**overrides), make_span(span_id=99)])


@settings(max_examples=200, deadline=None)
@given(st.lists(_records, max_size=6))
def test_generated_records(records: list[SpanRecord]) -> None:
    """Any record of the declared types is rebuilt equal."""
    records = [r._replace(end_ns=max(r.start_ns, r.end_ns)) for r in records]
    assert assert_travels_intact(records) == records


@settings(max_examples=200, deadline=None)
@given(st.lists(_hostile, min_size=1, max_size=4))
def test_generated_hostile_records(records: list[SpanRecord]) -> None:
    """Anything in any field encodes, after the trip, to what the encoder makes of it here."""
    assert_travels_intact(records)


class _Odd(int):
    """An int subclass: marshal refuses it, so its record travels pickled."""


def test_a_record_marshal_refuses_travels_pickled() -> None:
    """One record of another type does not change how the others travel, and it arrives as itself."""
    odd = make_span(span_id=3, attributes=(("n", _Odd(5)),))
    records = [make_span(span_id=2), odd, make_span(span_id=4)]
    rebuilt = assert_travels_intact(records)
    assert type(rebuilt[1].attrs()["n"]) is _Odd
    assert rebuilt == records


def test_a_record_that_does_not_even_pickle_is_repaired_before_the_trip() -> None:
    """An unpicklable value is repaired in the parent, and reported so that the child counts it."""
    lock = threading.Lock()
    with pytest.raises(TypeError):
        pickle.dumps(lock)
    records = [make_span(span_id=2), make_span(span_id=3, attributes=(("lock", lock),))]
    rebuilt, repaired = span_tuples.unpack(span_tuples.pack(records))
    assert [i for i, _ in repaired] == [1]
    assert "a lock value sent as text" in rebuilt[1].attrs()[DATA_ISSUE]  # type: ignore[operator]
    assert encoded(rebuilt, len(repaired)) == encoded(records)


def test_an_empty_batch() -> None:
    """Nothing packs to nothing."""
    assert span_tuples.unpack(span_tuples.pack([])) == ([], [])
