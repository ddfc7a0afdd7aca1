"""Hostile span values: the encoder never raises, and each repair is clamped or omitted and said so."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

import hydra_otel
from hydra_otel.core import sanitize
from hydra_otel.core.otlp_wire import SpanEncoder
from hydra_otel.core.sanitize import DATA_ISSUE, SPAN_BYTES_LIMIT, TIME_MAX_NS, repair
from hydra_otel.core.spans import Kind, SpanEvent, SpanLink, SpanRecord, Status
from hydra_otel.demo.sandbox.receiver import attributes_dict
from tests.factories import T0, make_span

S = 1_000_000_000
START, END = T0 * S, (T0 + 300) * S


def encode(*records: SpanRecord) -> tuple[SpanEncoder, list[Span]]:
    enc = SpanEncoder((("service.name", "t"),), "hydra_otel", hydra_otel.__version__)
    parts = enc.requests(records, 3 << 20)
    spans = [
        s
        for p in parts
        for rs in ExportTraceServiceRequest.FromString(p.payload).resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    assert sum(p.repaired for p in parts) == enc.repaired
    return enc, spans


def encode_one(**overrides: Any) -> tuple[Span, dict[str, Any]]:
    enc, spans = encode(make_span(**overrides))
    assert enc.repaired == 1, "the span should have needed repair"
    (span,) = spans
    attrs = attributes_dict(span.attributes)
    assert isinstance(attrs[DATA_ISSUE], str)
    return span, attrs


# (overrides, what the data issue says, a check on the span received)
HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("negative start", {"start_ns": -5 * S}, "start time -5000000000 before 1970: set to the end time"),
    ("negative end", {"end_ns": -1}, "end time -1 before 1970: set to the start time"),
    ("both negative", {"start_ns": -2, "end_ns": -1}, "left unset"),
    ("start after 2100", {"start_ns": TIME_MAX_NS + 1, "end_ns": TIME_MAX_NS + 2}, "after 2100"),
    ("beyond uint64", {"start_ns": 1 << 70}, "after 2100"),
    ("NULL start", {"start_ns": None}, "start time missing (None)"),
    ("stop before start", {"start_ns": END, "end_ns": START}, "before start time"),
    ("negative span ID", {"span_id": -7}, "span ID -7 out of range"),
    ("zero span ID", {"span_id": 0}, "span ID 0 out of range"),
    ("huge trace ID", {"trace_id": 1 << 200}, "trace ID"),
    ("huger than str() takes", {"span_id": 1 << 20_000, "start_ns": -(1 << 20_000)}, "span ID 0x1000"),
    ("huger int attribute", {"attributes": (("n", 1 << 20_000),)}, "integer beyond int64"),
    ("zero parent", {"parent_span_id": 0}, "parent span ID 0: sent as a root span"),
    ("parent beyond uint64", {"parent_span_id": 1 << 64}, "parent span ID"),
    ("int beyond int64", {"attributes": (("hydra.build.id", 1 << 63),)}, "integer beyond int64 sent as text"),
    ("int below int64", {"attributes": (("hydra.build.id", -(1 << 63) - 1),)}, "beyond int64"),
    ("lone surrogate", {"attributes": (("hydra.job", "a\udc80b"),)}, "lone surrogate"),
    ("NUL", {"attributes": (("hydra.job", "a\x00b"),)}, "NUL"),
    ("NUL in the name", {"name": "build \x00"}, "name: NUL"),
    ("surrogate in a key", {"attributes": (("k\ud800", "v"),)}, "attribute key"),
    ("huge string", {"attributes": (("log", "x" * 3_000_000),)}, "characters cut"),
    ("huge name", {"name": "n" * 5000}, "name: 5000 characters cut to 1024"),
    (
        "huge attribute list",
        {"attributes": tuple((f"k{i}", i) for i in range(1000))},
        "744 attributes omitted",
    ),
    ("bytes value", {"attributes": (("k", b"raw"),)}, "a bytes value sent as text"),
    ("None value", {"attributes": (("k", None),)}, "a NoneType value sent as text"),
    ("surrogate status", {"status": Status.ERROR, "status_message": "\udfff"}, "status message"),
    ("event before 1970", {"events": (SpanEvent(name="e", time_ns=-1),)}, "event time -1 before 1970"),
    (
        "too many events",
        {"events": tuple(SpanEvent(name="e", time_ns=START) for _ in range(200))},
        "72 events",
    ),
    ("link with ID 0", {"links": (SpanLink(trace_id=0, span_id=5),)}, "link trace ID 0"),
    ("unknown kind", {"kind": "consumer"}, "kind 'consumer' unknown"),
    ("malformed attribute", {"attributes": (("k",), ("ok", 1))}, "1 attributes omitted (malformed"),
]


@pytest.mark.parametrize(
    ("overrides", "issue"), [(o, i) for _, o, i in HOSTILE], ids=[n for n, _, _ in HOSTILE]
)
def test_a_hostile_value_is_repaired_and_said_so(overrides: dict[str, Any], issue: str) -> None:
    span, attrs = encode_one(**overrides)
    assert issue in attrs[DATA_ISSUE]
    assert 0 <= span.start_time_unix_nano <= span.end_time_unix_nano < TIME_MAX_NS
    assert int.from_bytes(span.trace_id, "big") != 0
    assert int.from_bytes(span.span_id, "big") != 0
    assert len(span.SerializeToString()) <= SPAN_BYTES_LIMIT


def test_times_are_clamped_to_the_valid_one() -> None:
    span, _ = encode_one(start_ns=-5 * S)
    assert span.start_time_unix_nano == span.end_time_unix_nano == END
    span, _ = encode_one(start_ns=END, end_ns=START)
    assert span.start_time_unix_nano == span.end_time_unix_nano == END


def test_an_int_beyond_int64_is_sent_as_its_text() -> None:
    _, attrs = encode_one(attributes=(("hydra.build.id", 1 << 64),))
    assert attrs["hydra.build.id"] == str(1 << 64)


def test_the_good_values_of_a_repaired_span_are_kept() -> None:
    span, attrs = encode_one(start_ns=-1, attributes=(("hydra.project", "nixpkgs"), ("hydra.build.id", 100)))
    assert attrs["hydra.project"] == "nixpkgs"
    assert attrs["hydra.build.id"] == 100
    assert span.name == "build hello"


def test_a_data_issue_the_span_already_carries_is_extended() -> None:
    _, attrs = encode_one(start_ns=-1, attributes=((DATA_ISSUE, "gap in the steps"),))
    assert attrs[DATA_ISSUE].startswith("gap in the steps; start time -1")


def test_many_huge_values_fit_the_span_limit() -> None:
    values = tuple((f"k{i}", "é" * 900_000) for i in range(20))
    span, attrs = encode_one(attributes=values)
    assert len(span.SerializeToString()) <= SPAN_BYTES_LIMIT
    assert "cut to fit the span size limit" in attrs[DATA_ISSUE]


def test_a_sane_span_is_not_touched() -> None:
    record = make_span(events=(SpanEvent(name="e", time_ns=END),), links=(SpanLink(trace_id=1, span_id=2),))
    assert repair(record) is record
    enc, _ = encode(record)
    assert enc.repaired == 0


def test_repaired_spans_are_counted_per_request() -> None:
    records = [make_span(span_id=i, start_ns=-1 if i % 3 == 0 else START) for i in range(1, 31)]
    enc = SpanEncoder((), "s", "1")
    parts = enc.requests(records, 600)
    assert len(parts) > 2
    assert [p.repaired for p in parts] == [
        sum(1 for r in records[sum(q.spans for q in parts[:i]) :][: p.spans] if r.start_ns < 0)
        for i, p in enumerate(parts)
    ]
    assert enc.repaired == 10


def test_the_resource_is_cleaned_too() -> None:
    enc = SpanEncoder((("service.name", "a\x00"), ("n", 1 << 64)), "s", "1")
    request = ExportTraceServiceRequest.FromString(enc.request([make_span()]))
    resource = attributes_dict(request.resource_spans[0].resource.attributes)
    assert resource == {"service.name": "a\ufffd", "n": str(1 << 64)}


def test_a_record_that_is_not_one_still_encodes() -> None:
    _, (span,) = encode(make_span(attributes=None, events=5))  # repair() itself fails on these
    assert span.name == "unencodable span"


def test_the_stub_is_the_last_resort(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sanitize, "repair", lambda r: r)  # a repair that repairs nothing
    _, (span,) = encode(make_span(start_ns=-1))
    assert span.name == "unencodable span"
    assert attributes_dict(span.attributes)[DATA_ISSUE]


# Anything at all in every field: the encoder returns bytes that parse, with sane times and IDs.
_any_int = st.one_of(st.integers(), st.integers(min_value=-(2**70), max_value=2**130), st.none())
_any_text = st.text(alphabet=st.characters(), max_size=60)  # includes NUL and lone surrogates
_any_value = st.one_of(_any_text, st.integers(), st.booleans(), st.floats(), st.binary(max_size=5), st.none())
_any_attributes = st.lists(st.tuples(_any_text, _any_value), max_size=6).map(tuple)
_hostile = st.builds(
    SpanRecord,
    trace_id=_any_int,
    span_id=_any_int,
    parent_span_id=_any_int,
    name=_any_text,
    kind=st.sampled_from([*Kind, "other"]),
    start_ns=_any_int,
    end_ns=_any_int,
    attributes=_any_attributes,
    status=st.sampled_from([*Status, None]),
    status_message=_any_text,
    events=st.lists(
        st.builds(SpanEvent, name=_any_text, time_ns=_any_int, attributes=_any_attributes), max_size=2
    ).map(tuple),
    links=st.lists(
        st.builds(SpanLink, trace_id=_any_int, span_id=_any_int, attributes=_any_attributes), max_size=2
    ).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_hostile, min_size=1, max_size=4))
def test_any_record_encodes(records: list[SpanRecord]) -> None:
    _, spans = encode(*records)
    assert len(spans) == len(records)
    for span in spans:
        assert 0 <= span.start_time_unix_nano <= span.end_time_unix_nano < TIME_MAX_NS
        assert all(0 <= e.time_unix_nano < TIME_MAX_NS for e in span.events)
        assert int.from_bytes(span.trace_id, "big")
        assert int.from_bytes(span.span_id, "big")
