"""The direct OTLP encoder parses to exactly what the SDK's encoder makes of the same spans."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

import hydra_otel
from hydra_otel.adapters.otlp import to_readable
from hydra_otel.core import otlp_wire, sanitize
from hydra_otel.core.builds import build_spans
from hydra_otel.core.otlp_wire import SpanEncoder
from hydra_otel.core.spans import AttrValue, Kind, SpanEvent, SpanLink, SpanRecord, Status
from tests.factories import RENDER_CONFIG, make_build, make_span, make_step

RESOURCE = (("service.name", "hydra-otel"), ("service.version", hydra_otel.__version__), ("deployment", "ci"))


def encoder() -> SpanEncoder:
    return SpanEncoder(RESOURCE, "hydra_otel", hydra_otel.__version__)


def sdk_request(records: Sequence[SpanRecord]) -> ExportTraceServiceRequest:
    return encode_spans([to_readable(r, Resource(dict(RESOURCE))) for r in records])


def parsed(payload: bytes) -> ExportTraceServiceRequest:
    request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(payload)
    return request


def assert_same_as_sdk(records: Sequence[SpanRecord], enc: SpanEncoder | None = None) -> None:
    mine, sdk = parsed((enc or encoder()).request(records)), sdk_request(records)
    assert mine == sdk, f"differs:\n{mine}\nSDK:\n{sdk}"


def test_rendered_build_spans_encode_as_the_sdk_does() -> None:
    failed = make_build(build_id=7, status=1)
    steps = [
        make_step(build_id=7, stepnr=1, drvpath=f"/nix/store/{'1' * 32}-dep.drv"),
        make_step(build_id=7, stepnr=2, status=1, errormsg="builder failed\nwith exit code 1", machine="m1"),
    ]
    records = build_spans(RENDER_CONFIG, make_build(), [make_step()]) + build_spans(
        RENDER_CONFIG, failed, steps
    )
    assert any(r.status is Status.ERROR for r in records)
    assert_same_as_sdk(records)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plain",
        "ünïcødé ✓ \x01 control",
        "x" * 300,  # a length that needs a two-byte varint
        True,
        False,
        0,
        1,
        -1,
        127,
        128,
        2**31 - 1,
        2**63 - 1,
        -(2**63),
        0.0,
        -2.5,
        1e300,
    ],
)
def test_attribute_values(value: AttrValue) -> None:
    assert_same_as_sdk([make_span(attributes=(("k", value),))])


def test_equal_values_of_different_types_are_not_confused_by_the_cache() -> None:
    enc = encoder()
    for value in (1, True, 1.0, 0, False, 0.0):
        assert_same_as_sdk([make_span(attributes=(("k", value),))], enc)


def cached_values(enc: SpanEncoder) -> int:
    return sum(len(values) for keys in enc._cache.values() for _, values in keys.values())


def test_long_values_are_not_cached() -> None:
    enc = encoder()
    before = cached_values(enc)
    for i in range(5):
        assert_same_as_sdk([make_span(attributes=(("log", f"{i}" * 10_000), ("short", "v")))], enc)
    assert cached_values(enc) == before + 1


def test_a_key_of_many_values_keeps_its_recent_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key's memory is bounded; when full it starts afresh, so what recurs soon is still found."""
    monkeypatch.setattr(otlp_wire, "_VALUES_PER_KEY", 5)
    enc = encoder()
    for i in range(23):
        for _ in range(3):  # as a build's ID recurs on each of its spans
            assert_same_as_sdk([make_span(attributes=(("n", i), ("same", "v")))], enc)
    _, numbers = enc._cache[b"\x4a"]["n"]
    assert list(numbers) == [20, 21, 22]  # started afresh at 20, 15, 10 and 5
    assert cached_values(enc) == len(RESOURCE) + 3 + 1  # the resource's attributes, 3 numbers and "same"


@pytest.mark.parametrize(
    "overrides",
    [
        {"parent_span_id": 0x99},
        {"kind": Kind.SERVER},
        {"status": Status.OK},
        {"status": Status.ERROR},
        {"status": Status.ERROR, "status_message": "exit code 1"},
        {"status": Status.OK, "status_message": "ignored unless an error"},
        {"name": ""},
        {"attributes": ()},
        {"events": (SpanEvent(name="exception", time_ns=5, attributes=(("exception.message", "boom"),)),)},
        {"links": (SpanLink(trace_id=3, span_id=4), SpanLink(trace_id=5, span_id=6, attributes=(("a", 1),)))},
    ],
    ids=lambda o: ",".join(o),
)
def test_span_fields(overrides: dict[str, object]) -> None:
    assert_same_as_sdk([make_span(**overrides)])


def test_an_empty_batch() -> None:
    assert_same_as_sdk([])


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, b"bytes"])
def test_a_value_otlp_cannot_carry_goes_as_text(value: int) -> None:
    # tests/core/test_sanitize.py has the other hostile values.
    enc = encoder()
    (span,) = (
        parsed(enc.request([make_span(attributes=(("k", value),))])).resource_spans[0].scope_spans[0].spans
    )
    assert span.attributes[0].value.string_value in (str(value), repr(value))
    assert enc.repaired == 1


# Generated spans: any mix of the fields hydra-otel uses.
_ids128 = st.integers(min_value=1, max_value=2**128 - 1)
_ids64 = st.integers(min_value=1, max_value=2**64 - 1)
# Valid values only: the SDK encodes invalid ones as given, this encoder repairs them (test_sanitize.py).
_times = st.integers(min_value=0, max_value=sanitize.TIME_MAX_NS - 1)
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=200)
_values: st.SearchStrategy[AttrValue] = st.one_of(
    _text,
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
_attributes = st.dictionaries(_text.filter(lambda k: 0 < len(k) <= 30), _values, max_size=8).map(
    lambda d: tuple(d.items())
)
_records = st.builds(
    SpanRecord,
    trace_id=_ids128,
    span_id=_ids64,
    parent_span_id=st.none() | _ids64,
    name=_text.map(lambda t: t[:50]),
    kind=st.sampled_from(Kind),
    start_ns=_times,
    end_ns=_times,
    attributes=_attributes,
    status=st.sampled_from(Status),
    status_message=_text.map(lambda t: t[:50]),
    events=st.lists(
        st.builds(SpanEvent, name=_text.map(lambda t: t[:20]), time_ns=_times, attributes=_attributes),
        max_size=2,
    ).map(tuple),
    links=st.lists(
        st.builds(SpanLink, trace_id=_ids128, span_id=_ids64, attributes=_attributes), max_size=2
    ).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_records, max_size=5))
def test_generated_spans_encode_as_the_sdk_does(records: list[SpanRecord]) -> None:
    records = [r._replace(end_ns=max(r.start_ns, r.end_ns)) for r in records]
    assert_same_as_sdk(records)


def _spans_of(payloads: Sequence[bytes]) -> list[object]:
    return [s for p in payloads for rs in parsed(p).resource_spans for ss in rs.scope_spans for s in ss.spans]


@pytest.mark.parametrize("max_bytes", [1, 300, 1_000, 5_000, 10**9])
def test_requests_split_by_size_keep_every_span_in_order(max_bytes: int) -> None:
    records = [make_span(span_id=i, attributes=(("text", "x" * (i * 37 % 400)),)) for i in range(1, 60)]
    parts = encoder().requests(records, max_bytes)
    payloads = [p.payload for p in parts]
    assert [p.spans for p in parts] == [
        len(parsed(p).resource_spans[0].scope_spans[0].spans) for p in payloads
    ]
    assert sum(p.spans for p in parts) == len(records)
    assert _spans_of(payloads) == _spans_of([encoder().request(records)])
    for part in parts:
        assert len(part.payload) <= max_bytes or part.spans == 1  # only a span too big on its own goes over
    if max_bytes == 10**9:
        assert payloads == [encoder().request(records)]


def test_requests_of_nothing() -> None:
    assert encoder().requests([], 1000) == []
