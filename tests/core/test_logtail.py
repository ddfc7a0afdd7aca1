"""Failed-step log tails, the pure part (core/logtail.py): which steps, which paths, how text is cut."""

from __future__ import annotations

import dataclasses

import pytest

from hydra_otel.core import semconv as sc
from hydra_otel.core.builds import step_span
from hydra_otel.core.evals import RenderConfig
from hydra_otel.core.logtail import (
    EVENT_NAME,
    Compression,
    LogTail,
    TailBuffer,
    TailRequest,
    compression_of,
    hydra_log_path,
    is_failed_step,
    log_attributes,
    log_candidates,
    log_location,
    log_tail_event,
    notified_path_agrees,
    render_tail,
    strip_suffix,
    tail_request,
)
from hydra_otel.core.spans import SpanEvent
from tests.factories import make_build, make_step

CFG = RenderConfig(instance="hydra", hydra_url="https://hydra.example.org", error_text_limit=100)
T0 = 1_700_000_000
DRV = "/nix/store/0c9x2f6vxg3lnp6j7x6ia1sc3x6i8j5m-hello-2.12.drv"
LAID_OUT = "/logs/0c/9x2f6vxg3lnp6j7x6ia1sc3x6i8j5m-hello-2.12.drv"

BUILD = make_build(drvpath=DRV, starttime=T0, stoptime=T0 + 60, status=1, size=None, closure_size=None)
STEP = make_step(
    stepnr=2,
    drvpath=DRV,
    status=1,
    errormsg="builder failed",
    starttime=T0,
    stoptime=T0 + 60,
    machine="builder1",
)


def request(**kw: object) -> TailRequest:
    """A request for STEP, with fields overridden."""
    fields: dict[str, object] = {
        "trace_id": 1,
        "span_id": 2,
        "build_id": 100,
        "step_nr": 2,
        "drv_path": DRV,
        "log_path": None,
        "at_ns": 5,
    }
    fields.update(kw)
    return TailRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "failed"),
    [(None, False), (0, False), (13, False), (1, True), (3, True), (7, True), (99, True)],
)
def test_failed_statuses(status: int | None, failed: bool) -> None:
    """Success (0) and CA resolution (13) are no failures; a running step (None) is none either."""
    assert is_failed_step(status) is failed


def test_hydra_layout() -> None:
    """The log sits under the first two characters of the derivation's base name, then the rest."""
    assert hydra_log_path("/logs", DRV) == LAID_OUT
    assert hydra_log_path("/var/lib/hydra/build-logs/", "abc-x.drv") == "/var/lib/hydra/build-logs/ab/c-x.drv"


BUCKET, NAME = "0c", "9x2f6vxg3lnp6j7x6ia1sc3x6i8j5m-hello-2.12.drv"


def test_candidates_come_from_the_derivation_only() -> None:
    """Hydra's layout, plain then .bz2 then .zst, relative to the log directory; a notified path plays no part."""
    expected = ((BUCKET, NAME), (BUCKET, NAME + ".bz2"), (BUCKET, NAME + ".zst"))
    assert log_candidates(request()) == expected
    assert log_candidates(request(log_path="/etc/shadow")) == expected
    assert log_candidates(request(drv_path=None)) == ()


@pytest.mark.parametrize(
    "drv",
    [
        "",
        "/nix/store/..",
        "/nix/store/.",
        "/nix/store/x/",
        "/nix/store/a",
        "/nix/store/..x",
        "/x/a\0b.drv",
        "/x/a b",
    ],
)
def test_a_derivation_path_that_names_no_file(drv: str) -> None:
    """A base name that would be empty, ``.``, ``..`` or hold characters no store path has gives no place."""
    assert log_location(drv) is None
    assert log_candidates(request(drv_path=drv)) == ()


def test_locations_are_plain_names() -> None:
    """The bucket and the file name are single components of store-path characters."""
    assert log_location(DRV) == (BUCKET, NAME)
    assert log_location("abc-x.drv") == ("ab", "c-x.drv")
    assert log_location("/nix/store/ab.c") == ("ab", ".c")  # a dot inside a name is fine


@pytest.mark.parametrize(
    ("notified", "agrees"),
    [
        (None, True),
        ("", True),  # the legacy queue runner sends no path
        (LAID_OUT, True),
        (LAID_OUT + ".zst", True),
        ("/data/hydra/build-logs/0c/9x2f6vxg3lnp6j7x6ia1sc3x6i8j5m-hello-2.12.drv", True),  # another mount
        ("/etc/shadow", False),
        ("/logs/0c/another.drv", False),
        ("/logs/0c/9x2f6vxg3lnp6j7x6ia1sc3x6i8j5m-hello-2.12.drv/../../../etc/passwd", False),
        ("0c", False),
    ],
)
def test_notified_path_agreement(notified: str | None, agrees: bool) -> None:
    """A step_finished path agrees when it names the step's log (bucket and file name)."""
    assert notified_path_agrees(notified, DRV) is agrees


def test_notified_path_without_a_usable_derivation() -> None:
    """With no derivation to compare with, any non-empty path disagrees."""
    assert notified_path_agrees("/logs/0c/x.drv", None) is False
    assert notified_path_agrees("", None) is True


def test_suffixes() -> None:
    """Compression is read from the suffix; stripping it gives the uncompressed name."""
    assert compression_of("a.drv") is Compression.PLAIN
    assert compression_of("a.drv.bz2") is Compression.BZIP2
    assert compression_of("a.drv.zst") is Compression.ZSTD
    assert strip_suffix("a.drv.zst") == strip_suffix("a.drv.bz2") == strip_suffix("a.drv") == "a.drv"


def test_request_for_a_failed_step() -> None:
    """A failed build step gives a request keyed by the step span, timed at its end."""
    span = step_span(CFG, BUILD, STEP, 0)
    got = tail_request(span, "/x/y.drv")
    assert got == TailRequest(
        trace_id=span.trace_id,
        span_id=span.span_id,
        build_id=100,
        step_nr=2,
        drv_path=DRV,
        log_path="/x/y.drv",
        at_ns=span.end_ns,
    )
    assert tail_request(span, "") == dataclasses.replace(got, log_path=None)  # the legacy runner sends ""


@pytest.mark.parametrize(
    "change",
    [
        {"status": 0},
        {"status": 13},
        {"status": None},
        {"status": 8},  # cached failure: nothing ran
        {"status": 9},  # unsupported system: nothing ran
        {"propagated_from": 7},  # the cause's step has the log
        {"type": 1},  # substitution
    ],
)
def test_no_request(change: dict[str, object]) -> None:
    """Successful steps and failed steps that ran no builder get no request."""
    assert tail_request(step_span(CFG, BUILD, STEP._replace(**change), 0)) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [*range(-1, 20), None])
def test_request_agrees_with_the_step_status(status: int | None) -> None:
    """Every step status, known or not: a request exactly for failed steps that ran a builder
    (the OK span status that ends the check early stands for the successful statuses only)."""
    got = tail_request(step_span(CFG, BUILD, STEP._replace(status=status), 0))
    assert (got is not None) == (is_failed_step(status) and status not in (8, 9))


def test_no_request_for_other_spans() -> None:
    """A span that is not a step (no step number or status) gets no request."""
    span = step_span(CFG, BUILD, STEP, 0)
    stripped = span._replace(attributes=tuple(a for a in span.attributes if a[0] != sc.HYDRA_STEP_NR))
    assert tail_request(stripped) is None


def test_tail_buffer_keeps_the_end() -> None:
    """The buffer keeps the last max_bytes across chunks and says when it forgot some."""
    buf = TailBuffer(5)
    buf.feed(b"abc")
    assert (buf.value(), buf.dropped) == (b"abc", False)
    buf.feed(b"defg")
    assert (buf.value(), buf.dropped, buf.total) == (b"cdefg", True, 7)
    buf.feed(b"0123456789")
    assert buf.value() == b"56789"
    with pytest.raises(ValueError, match="max_bytes"):
        TailBuffer(0)


def test_render_last_lines() -> None:
    """At most max_lines lines are kept, the final newline ending the last one."""
    data = b"".join(b"line %d\n" % i for i in range(10))
    assert render_tail(data, max_lines=3, cut=False) == ("line 7\nline 8\nline 9", 3, True)
    assert render_tail(data, max_lines=50, cut=False) == (data.decode().rstrip("\n"), 10, False)


def test_render_drops_a_partial_first_line() -> None:
    """When the data starts mid-file, its first (partial) line is dropped, unless it is the only one."""
    assert render_tail(b"ne 1\nline 2\n", max_lines=50, cut=True) == ("line 2", 1, True)
    assert render_tail(b"xxxxxxxx", max_lines=50, cut=True) == ("xxxxxxxx", 1, True)


def test_render_decodes_bytes_leniently() -> None:
    """Invalid UTF-8 becomes replacement characters and CRLF becomes LF."""
    text, lines, _ = render_tail(b"ok \xff\xfe\r\nnext\r\n", max_lines=50, cut=False)
    assert (text, lines) == ("ok \ufffd\ufffd\nnext", 2)


TAIL = LogTail(path="/logs/0c/rest.drv.bz2", text="error: boom", lines=1, truncated=False, bytes_read=10)


def test_event_when_logs_export_is_off() -> None:
    """The span event carries the text and the log's uncompressed name, so it does not depend on compression."""
    assert log_tail_event(TAIL, 7) == SpanEvent(
        name=EVENT_NAME,
        time_ns=7,
        attributes=(
            ("log.file.path", "/logs/0c/rest.drv"),
            ("hydra.step.log_tail", "error: boom"),
            ("hydra.step.log_tail.lines", 1),
            ("hydra.step.log_tail.truncated", False),
        ),
    )


def test_log_record_attributes() -> None:
    """The OTLP log record names the build, the step and the file read."""
    assert dict(log_attributes(request(), TAIL)) == {
        "hydra.build.id": 100,
        "hydra.step.nr": 2,
        "log.file.path": "/logs/0c/rest.drv.bz2",
        "hydra.step.log_tail.lines": 1,
        "hydra.step.log_tail.truncated": False,
    }
