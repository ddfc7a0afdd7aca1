"""Tests for the terminal waterfall and the OTLP/JSON writer.

The golden test compares a whole rendering with ``tests/data/waterfall_expected.txt``. After a
deliberate change to the layout, rewrite that file with ``UPDATE_GOLDEN=1 pytest
tests/test_waterfall.py`` and review the diff before keeping it.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

# protobuf ships no type stubs and types-protobuf is not a dependency.
from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from opentelemetry.sdk.resources import Resource

from hydra_otel.adapters.otlp import to_readable
from hydra_otel.core.spans import Kind, SpanLink, SpanRecord, attributes
from hydra_otel.core.spans import Status as RecordStatus
from hydra_otel.demo.waterfall import (
    SpanStatus,
    SpanView,
    format_duration,
    from_otlp,
    from_record,
    group_traces,
    otlp_json,
    render_waterfall,
)

GOLDEN = Path(__file__).parent / "data" / "waterfall_expected.txt"
S = 1_000_000_000
T0 = 1_700_000_000 * S
TRACE = 0x0AF7651916CD43DD8448EB211C80319C
ROOT = 0x00F067AA0BA902B7


def view(
    span_id: int, parent: int | None, name: str, start_s: float, end_s: float, status: SpanStatus = "unset"
) -> SpanView:
    """A span of the test trace, with times in seconds after ``T0``."""
    return SpanView(
        trace_id=TRACE,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        start_ns=T0 + round(start_s * S),
        end_ns=T0 + round(end_s * S),
        status=status,
    )


def eval_trace() -> list[SpanView]:
    """A 10-minute evaluation: checkout, evaluation, a cached build, a failed build, an orphan step."""
    return [
        view(7, 5, "step 2 build hello-2.12.1.drv", 176, 590, "error"),
        view(ROOT, None, "eval nixpkgs:trunk", 0, 600, "ok"),
        view(2, ROOT, "checkout", 0, 20, "ok"),
        view(3, ROOT, "evaluate", 20, 170, "ok"),
        view(4, ROOT, "evaluator run", 18, 172),
        view(5, ROOT, "build 4711 hello.x86_64-linux", 175, 590, "error"),
        view(6, 5, "step 1 fetch sources", 175, 175.85, "ok"),
        view(8, ROOT, "cached build 4712 coreutils", 172, 172, "ok"),
        view(9, 0xDEAD, "step 3 of build 4690", 400, 461.5, "error"),
    ]


def names(text: str) -> list[str]:
    """The name column of each span line (after the header and axis lines), stripped."""
    return [line[:35].strip() for line in text.splitlines()[2:]]


def test_golden_rendering() -> None:
    """The evaluation trace renders exactly as stored in the golden file."""
    rendered = render_waterfall(eval_trace(), width=100)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(rendered, encoding="utf-8")
        pytest.skip(f"rewrote {GOLDEN}; review it with git diff, then rerun without UPDATE_GOLDEN")
    expected = GOLDEN.read_text(encoding="utf-8")
    assert rendered == expected, (
        f"the waterfall differs from {GOLDEN}. If the change is intended, rewrite the file with "
        "UPDATE_GOLDEN=1 pytest tests/test_waterfall.py and review the diff.\n"
        f"--- rendered ---\n{rendered}--- expected ---\n{expected}"
    )


def test_tree_order_and_indentation() -> None:
    """Children follow their parent, ordered by start time then name, indented two spaces a level."""
    assert names(render_waterfall(eval_trace())) == [
        "eval nixpkgs:trunk",
        "checkout",
        "evaluator run",
        "evaluate",
        "cached build 4712 coreutils",
        "build 4711 hello.x86_64-linux",
        "step 1 fetch sources",
        "step 2 build hello-2.12.1.drv",
        "step 3 of build 4… (parent missing)",
    ]
    lines = render_waterfall(eval_trace()).splitlines()
    assert lines[3].startswith("  checkout ")
    assert lines[8].startswith("    step 1 fetch sources ")


def test_header_and_axis() -> None:
    """The header names the root, the trace ID, the total duration and the span count."""
    header, axis, *_ = render_waterfall(eval_trace()).splitlines()
    assert header == f"eval nixpkgs:trunk  trace {TRACE:032x}  10m00s  9 spans"
    assert axis.split() == ["0", "10m00s"]


@pytest.mark.parametrize("width", [64, 71, 80, 100, 161])
def test_lines_fit_the_width(width: int) -> None:
    """No line is longer than ``width`` and none has trailing spaces."""
    for line in render_waterfall(eval_trace(), width=width).splitlines():
        assert len(line) <= width
        assert line == line.rstrip()


def bar_column(line: str, width: int = 100) -> str:
    """The time column of a span line rendered at ``width``."""
    name_width = width * 7 // 20
    return line[name_width + 1 : width - 12]


def test_bars_scale_to_the_trace() -> None:
    """The root fills the time column, a zero-length span is one thin mark, others are proportional."""
    lines = render_waterfall(eval_trace()).splitlines()
    root, checkout, cached = bar_column(lines[2]), bar_column(lines[3]), bar_column(lines[6])
    assert set(root) == {"█"}
    assert checkout.startswith("██·")
    assert checkout.count("█") == 2  # 20 s of 600 s in 52 cells
    assert set(cached) == {"│", "·"}
    assert cached.count("│") == 1
    short_step = bar_column(lines[8])
    assert short_step.count("█") == 1  # 850 ms still gets one cell


def test_ascii_mode() -> None:
    """ascii=True draws the same layout with ASCII glyphs and ok/ERR marks."""
    unicode_lines = render_waterfall(eval_trace()).splitlines()
    ascii_text = render_waterfall(eval_trace(), ascii=True)
    assert ascii_text.isascii()
    ascii_lines = ascii_text.splitlines()
    assert len(ascii_lines) == len(unicode_lines)
    table = str.maketrans({"█": "#", "·": ".", "│": "|"})
    for u, a in zip(unicode_lines[2:], ascii_lines[2:], strict=True):
        assert bar_column(u).translate(table) == bar_column(a)
    assert ascii_lines[2].endswith("10m00s ok")
    assert ascii_lines[7].endswith("6m55s ERR")
    assert ascii_lines[5].endswith("2m30s ok")
    assert ascii_lines[4].endswith("2m34s")  # unset status: no mark
    assert ascii_lines[10].startswith("step 3 of build 4~ (parent missing) ")


def test_orphans_come_after_the_roots() -> None:
    """A span whose parent is absent is drawn at top level, after every root's subtree, with a note."""
    spans = [view(1, None, "root", 0, 10), view(2, 99, "orphan a", 1, 2), view(3, 2, "child", 1, 2)]
    spans.append(view(4, 98, "orphan b", 0, 1))
    lines = render_waterfall(spans).splitlines()[2:]
    assert [line[:35].rstrip() for line in lines] == [
        "root",
        "orphan b (parent missing)",
        "orphan a (parent missing)",
        "  child",
    ]


def test_trace_without_root() -> None:
    """A trace with only orphans is still drawn, under a "(no root span)" header."""
    header = render_waterfall([view(2, 99, "lonely", 0, 5)]).splitlines()[0]
    assert header.startswith("(no root span)  trace ")
    assert header.endswith("  5.0s  1 span")


def test_parent_cycle_terminates() -> None:
    """Spans only reachable through a parent cycle are drawn once each, with a note."""
    spans = [view(1, None, "root", 0, 10), view(2, 3, "a", 1, 2), view(3, 2, "b", 2, 3)]
    lines = render_waterfall(spans).splitlines()[2:]
    assert [line[:35].rstrip() for line in lines] == ["root", "a (parent cycle)", "  b"]


def test_running_span_ends_at_now() -> None:
    """A span without an end is drawn up to now_ns and its duration marked as a lower bound."""
    spans = [view(1, None, "eval", 0, 60), replace(view(2, 1, "build", 30, 0), end_ns=0)]
    lines = render_waterfall(spans, now_ns=T0 + 120 * S).splitlines()
    assert lines[0].endswith("  2m00s  2 spans")
    assert lines[3].endswith(" 1m30s+")
    assert bar_column(lines[3]).endswith("█")
    without_now = render_waterfall(spans).splitlines()
    assert without_now[3].endswith(" 30.0s+")


def test_empty_span_is_one_mark_even_in_a_zero_length_trace() -> None:
    """A trace whose only span has no duration renders without dividing by zero."""
    lines = render_waterfall([view(1, None, "instant", 5, 5)]).splitlines()
    assert bar_column(lines[2]).startswith("│")
    assert lines[2].endswith("   0ms")


@pytest.mark.parametrize(
    "spans",
    [[], [view(1, None, "a", 0, 1), replace(view(2, None, "b", 0, 1), trace_id=1)]],
    ids=["empty", "two traces"],
)
def test_one_trace_only(spans: list[SpanView]) -> None:
    """Rendering nothing, or more than one trace, is a caller's mistake."""
    with pytest.raises(ValueError, match="exactly one trace"):
        render_waterfall(spans)


def test_width_too_small() -> None:
    """A width below 64 leaves no room for the header's facts and is refused."""
    with pytest.raises(ValueError, match="at least 64"):
        render_waterfall(eval_trace(), width=63)


def test_narrow_header_cuts_the_name_not_the_trace_id() -> None:
    """When the header does not fit, the root name is shortened and the trace ID kept whole."""
    header = render_waterfall(eval_trace(), width=64).splitlines()[0]
    assert header == f"eval n…  trace {TRACE:032x}  10m00s  9 spans"
    assert len(header) == 64


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (-5, "0ms"),
        (0, "0ms"),
        (999_999, "0ms"),
        (850_000_000, "850ms"),
        (999_999_999, "999ms"),
        (1 * S, "1.0s"),
        (12_345_000_000, "12.3s"),
        (59_990_000_000, "59.9s"),
        (60 * S, "1m00s"),
        (245 * S, "4m05s"),
        (3599 * S, "59m59s"),
        (3600 * S, "1h00m"),
        (3720 * S + 59 * S, "1h02m"),
        (100 * 3600 * S, "100h00m"),
    ],
)
def test_format_duration(ns: int, text: str) -> None:
    """Durations round down to the unit shown and switch units at 1 s, 1 min and 1 h."""
    assert format_duration(ns) == text


def test_group_traces_keeps_first_seen_order() -> None:
    """Spans are grouped by trace ID, traces and spans in the order first seen."""
    a1, b1, a2 = (
        view(1, None, "a1", 0, 1),
        replace(view(2, None, "b1", 0, 1), trace_id=5),
        view(3, 1, "a2", 0, 1),
    )
    grouped = group_traces([a1, b1, a2])
    assert grouped == {TRACE: [a1, a2], 5: [b1]}
    assert list(grouped) == [TRACE, 5]


def record(span_id: int, parent: int | None, name: str, status: RecordStatus) -> SpanRecord:
    """A core span record in the test trace."""
    return SpanRecord(
        trace_id=TRACE,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind=Kind.SERVER if parent is None else Kind.INTERNAL,
        start_ns=T0,
        end_ns=T0 + 5 * S,
        attributes=attributes([("cicd.pipeline.name", "nixpkgs:trunk"), ("hydra.eval.builds", 3)]),
        status=status,
        links=(SpanLink(trace_id=TRACE + 1, span_id=77),) if parent else (),
    )


RECORDS = [
    record(ROOT, None, "eval nixpkgs:trunk", RecordStatus.OK),
    record(2, ROOT, "evaluate", RecordStatus.ERROR),
    record(3, ROOT, "checkout", RecordStatus.UNSET),
]


def encoded(records: list[SpanRecord]) -> ExportTraceServiceRequest:
    """Encode records the way the exporter does: through the SDK's protobuf encoder."""
    resource = Resource.create({"service.name": "hydra-otel"})
    request: ExportTraceServiceRequest = encode_spans([to_readable(r, resource) for r in records])
    return request


def otlp_spans(request: ExportTraceServiceRequest) -> Iterator[Span]:
    """Every span in a request."""
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            yield from scope_spans.spans


def test_from_record() -> None:
    """A record's IDs, times, status and attributes carry over."""
    v = from_record(RECORDS[1])
    assert (v.trace_id, v.span_id, v.parent_span_id, v.name) == (TRACE, 2, ROOT, "evaluate")
    assert (v.start_ns, v.end_ns, v.status) == (T0, T0 + 5 * S, "error")
    assert dict(v.attributes) == {"cicd.pipeline.name": "nixpkgs:trunk", "hydra.eval.builds": 3}


def test_from_otlp_agrees_with_from_record() -> None:
    """A record viewed directly and after protobuf encoding gives the same view."""
    via_otlp = [from_otlp(span) for span in otlp_spans(encoded(RECORDS))]
    direct = [from_record(r) for r in RECORDS]
    assert via_otlp == direct
    assert [dict(v.attributes) for v in via_otlp] == [dict(v.attributes) for v in direct]
    assert [v.status for v in via_otlp] == ["ok", "error", "unset"]
    assert via_otlp[0].parent_span_id is None


def test_from_otlp_reads_nested_values() -> None:
    """Array attributes become tuples; status codes other than 1 and 2 read as unset."""
    span = Span(
        trace_id=TRACE.to_bytes(16, "big"),
        span_id=(5).to_bytes(8, "big"),
        name="x",
        attributes=[
            KeyValue(key="list", value=AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1)]))),
            KeyValue(key="empty", value=AnyValue()),
        ],
        status=Status(code=Status.STATUS_CODE_UNSET),
    )
    v = from_otlp(span)
    assert dict(v.attributes) == {"list": (1,), "empty": None}
    assert (v.span_id, v.parent_span_id, v.status) == (5, None, "unset")


def test_otlp_json_uses_hex_ids_and_integer_enums() -> None:
    """IDs are lowercase hex, enums integers, 64-bit integers strings, keys lowerCamelCase."""
    text = otlp_json([encoded(RECORDS)])
    assert text.endswith("}\n")
    assert text.count("\n") == 1
    document = json.loads(text)
    spans = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert spans[0]["traceId"] == f"{TRACE:032x}"
    assert spans[0]["spanId"] == f"{ROOT:016x}"
    assert "parentSpanId" not in spans[0]
    assert spans[1]["parentSpanId"] == f"{ROOT:016x}"
    link = spans[1]["links"][0]
    assert (link["traceId"], link["spanId"]) == (f"{TRACE + 1:032x}", f"{77:016x}")
    assert (spans[0]["kind"], spans[1]["kind"]) == (2, 1)
    assert spans[1]["status"]["code"] == 2
    assert spans[0]["startTimeUnixNano"] == str(T0)


def test_otlp_json_round_trip() -> None:
    """Decoding the JSON (hex IDs turned back to base64) gives the merged requests back."""
    first, second = encoded(RECORDS[:1]), encoded(RECORDS[1:])
    document = json.loads(otlp_json([first, second], indent=2))
    expected = ExportTraceServiceRequest()
    expected.resource_spans.extend([*first.resource_spans, *second.resource_spans])
    decoded = json_format.ParseDict(_base64_ids(document), ExportTraceServiceRequest())
    assert decoded == expected


def _base64_ids(node: object) -> object:
    """Undo the OTLP hex ID rule, for the protobuf JSON parser."""
    if isinstance(node, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in {"traceId", "spanId", "parentSpanId"}
            else _base64_ids(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_base64_ids(item) for item in node]
    return node


def test_otlp_json_of_nothing() -> None:
    """No requests give an empty but valid document."""
    assert otlp_json([]) == '{"resourceSpans": []}\n'


def test_otlp_json_keeps_other_bytes_base64() -> None:
    """Only IDs are hex; a bytes attribute value stays base64 as the protobuf mapping says."""
    span = Span(
        trace_id=TRACE.to_bytes(16, "big"),
        span_id=(1).to_bytes(8, "big"),
        attributes=[KeyValue(key="spanId", value=AnyValue(bytes_value=b"\x01\x02"))],
    )
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )
    value = json.loads(otlp_json([request]))["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"][0]
    assert value == {"key": "spanId", "value": {"bytesValue": "AQI="}}
