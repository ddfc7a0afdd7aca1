"""Payload parsing: one good case per channel and format, every malformed shape, and fuzzing."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra_otel.core import events as ev
from hydra_otel.core import parse as parse_module
from hydra_otel.core.parse import MAX_PAYLOAD_BYTES, PARSERS, parse
from hydra_otel.errors import PAYLOAD_QUOTE_LIMIT, PayloadError, quote_payload

CID = "4112.262815283.16494"  # what hydra-eval-jobset sends: "<CLOCK_MONOTONIC seconds>.<pid>"
LOG = "/var/lib/hydra/build-logs/ab/cdefghijklmnopqrstuvwxyz012345-hello-2.12.drv"
BIG = 2**31 - 1

EXPECTED_CLASS: dict[str, type[ev.HydraEvent]] = {
    ev.EVAL_STARTED: ev.EvalStarted,
    ev.EVAL_ADDED: ev.EvalAdded,
    ev.EVAL_CACHED: ev.EvalCached,
    ev.EVAL_FAILED: ev.EvalFailed,
    ev.BUILD_QUEUED: ev.BuildQueued,
    ev.BUILD_STARTED: ev.BuildStarted,
    ev.STEP_STARTED: ev.StepStarted,
    ev.STEP_FINISHED: ev.StepFinished,
    ev.BUILD_FINISHED: ev.BuildFinished,
    ev.CACHED_BUILD_FINISHED: ev.CachedBuildFinished,
    ev.CACHED_BUILD_QUEUED: ev.CachedBuildQueued,
} | dict.fromkeys(ev.TRIGGER_CHANNELS, ev.TableChanged)

GOOD = [
    # hydra-eval-jobset (same Perl script in both generations) joins fields with a real TAB.
    pytest.param(
        ev.EVAL_STARTED, f"{CID}\t7", ev.EvalStarted(correlation_id=CID, jobset_id=7), id="eval_started"
    ),
    pytest.param(
        ev.EVAL_ADDED,
        f"{CID}\t7\t1234",
        ev.EvalAdded(correlation_id=CID, jobset_id=7, eval_id=1234),
        id="eval_added",
    ),
    pytest.param(
        ev.EVAL_ADDED,
        f"{CID}\\t7\\t1234",
        ev.EvalAdded(correlation_id=CID, jobset_id=7, eval_id=1234),
        id="eval_added-literal-backslash-t",
    ),
    pytest.param(
        ev.EVAL_CACHED,
        f"{CID}\t7\t1233",
        ev.EvalCached(correlation_id=CID, jobset_id=7, previous_eval_id=1233),
        id="eval_cached",
    ),
    pytest.param(
        ev.EVAL_FAILED, f"{CID}\t7", ev.EvalFailed(correlation_id=CID, jobset_id=7), id="eval_failed"
    ),
    pytest.param(
        ev.EVAL_FAILED,
        "opaque-id_with/odd~chars\t7",
        ev.EvalFailed(correlation_id="opaque-id_with/odd~chars", jobset_id=7),
        id="eval_failed-opaque-correlation-id",
    ),
    pytest.param(ev.BUILD_QUEUED, "320000000", ev.BuildQueued(build_id=320000000), id="build_queued"),
    pytest.param(ev.BUILD_QUEUED, str(BIG), ev.BuildQueued(build_id=BIG), id="build_queued-largest-id"),
    pytest.param(ev.BUILD_QUEUED, "007", ev.BuildQueued(build_id=7), id="build_queued-leading-zeros"),
    pytest.param(ev.BUILD_STARTED, "320000001", ev.BuildStarted(build_id=320000001), id="build_started"),
    # Both queue runners: "<build>\t<step>", steps numbered from 1.
    pytest.param(ev.STEP_STARTED, "42\t1", ev.StepStarted(build_id=42, step_nr=1), id="step_started"),
    pytest.param(
        ev.STEP_FINISHED,
        f"42\t3\t{LOG}",
        ev.StepFinished(build_id=42, step_nr=3, log_path=LOG),
        id="step_finished",
    ),
    pytest.param(
        ev.STEP_FINISHED,
        "42\t3\t",
        ev.StepFinished(build_id=42, step_nr=3, log_path=None),
        id="step_finished-legacy-empty-log-path",
    ),
    pytest.param(
        ev.STEP_FINISHED,
        "42\t3\t/srv/hydra logs/a\\tb",
        ev.StepFinished(build_id=42, step_nr=3, log_path="/srv/hydra logs/a\\tb"),
        id="step_finished-log-path-kept-verbatim",
    ),
    pytest.param(
        ev.BUILD_FINISHED, "42", ev.BuildFinished(build_id=42, dependents=()), id="build_finished-alone"
    ),
    pytest.param(
        ev.BUILD_FINISHED,
        "42\t50\t43",
        ev.BuildFinished(build_id=42, dependents=(50, 43)),
        id="build_finished-keeps-order",
    ),
    pytest.param(
        ev.BUILD_FINISHED,
        "42\t42\t50\t43\t50\t42",
        ev.BuildFinished(build_id=42, dependents=(50, 43)),
        id="build_finished-failure-repeats-id-and-duplicates",
    ),
    pytest.param(
        ev.CACHED_BUILD_FINISHED,
        "1234\t99",
        ev.CachedBuildFinished(eval_id=1234, build_id=99),
        id="cached_build_finished",
    ),
    pytest.param(
        ev.CACHED_BUILD_QUEUED,
        "1234\t100",
        ev.CachedBuildQueued(eval_id=1234, build_id=100),
        id="cached_build_queued",
    ),
    pytest.param(
        ev.STEP_FINISHED,
        f"42\t3\t{LOG}".encode(),
        ev.StepFinished(build_id=42, step_nr=3, log_path=LOG),
        id="bytes-payload",
    ),
    pytest.param(
        ev.STEP_FINISHED,
        "42\t3\t/srv/hydra/łogs/x.drv".encode(),
        ev.StepFinished(build_id=42, step_nr=3, log_path="/srv/hydra/łogs/x.drv"),
        id="bytes-payload-non-ascii-log-path",
    ),
]


@pytest.mark.parametrize(("channel", "payload", "expected"), GOOD)
def test_good_payloads(channel: str, payload: str | bytes, expected: ev.HydraEvent) -> None:
    """Each channel's Hydra format parses to the matching event."""
    assert parse(channel, payload) == expected


@pytest.mark.parametrize("channel", ev.TRIGGER_CHANNELS)
@pytest.mark.parametrize("payload", ["", "?", "320000000", b"\xff\xfe", "x" * 9000])
def test_trigger_channels_ignore_payload(channel: str, payload: str | bytes) -> None:
    """A trigger channel parses to TableChanged whatever its payload."""
    assert parse(channel, payload) == ev.TableChanged(channel=channel)


def test_parsers_cover_exactly_the_data_channels() -> None:
    """The table has one parser per data channel and none for a trigger channel."""
    assert set(PARSERS) == set(ev.DATA_CHANNELS)
    assert not set(PARSERS) & set(ev.TRIGGER_CHANNELS)


def _chunks(build_id: int, dependents: list[int], limit: int = 7000) -> list[str]:
    """Split like the Rust queue runner: every chunk starts with build_id and stays within limit."""
    chunks, current = [], str(build_id)
    for dependent in dependents:
        if len(current) + 1 + len(str(dependent)) > limit:
            chunks.append(current)
            current = str(build_id)
        current += f"\t{dependent}"
    return [*chunks, current]


def test_chunked_build_finished_reassembles() -> None:
    """Several chunks that each repeat the build ID parse to events whose dependents add up."""
    dependents = [42, *range(1_000_000, 1_005_000)]  # a failure lists the failed build first
    payloads = _chunks(42, dependents)
    assert len(payloads) > 3
    parsed = [parse(ev.BUILD_FINISHED, payload) for payload in payloads]
    assert all(isinstance(event, ev.BuildFinished) and event.build_id == 42 for event in parsed)
    received = [dep for event in parsed if isinstance(event, ev.BuildFinished) for dep in event.dependents]
    assert received == dependents[1:]


def test_payload_at_the_cap_is_accepted() -> None:
    """A payload of exactly MAX_PAYLOAD_BYTES bytes is still parsed."""
    payload = "10" + "\t2" * ((MAX_PAYLOAD_BYTES - 2) // 2)
    assert len(payload.encode()) == MAX_PAYLOAD_BYTES
    event = parse(ev.BUILD_FINISHED, payload)
    assert event == ev.BuildFinished(build_id=10, dependents=(2,))


FIELD_COUNT = "expected {n} fields"
NOT_INT = "is not a decimal integer"
ZERO = "is zero"
RANGE = "out of range"
BAD_CID = "correlation ID"
UTF8 = "not valid UTF-8"
LONG = "over-long payload"

MALFORMED: list[tuple[str, str | bytes, str]] = [
    # wrong field counts
    (ev.EVAL_STARTED, CID, FIELD_COUNT.format(n=2)),
    (ev.EVAL_STARTED, f"{CID}\t7\t8", FIELD_COUNT.format(n=2)),
    (ev.EVAL_ADDED, f"{CID}\t7", FIELD_COUNT.format(n=3)),
    (ev.EVAL_ADDED, f"{CID}\t7\t8\t9", FIELD_COUNT.format(n=3)),
    (ev.EVAL_CACHED, f"{CID}\t7", FIELD_COUNT.format(n=3)),
    (ev.EVAL_FAILED, f"{CID}\t7\t8", FIELD_COUNT.format(n=2)),
    (ev.BUILD_QUEUED, "1\t2", FIELD_COUNT.format(n=1)),
    (ev.BUILD_STARTED, "1\t", FIELD_COUNT.format(n=1)),
    (ev.STEP_STARTED, "42", FIELD_COUNT.format(n=2)),
    (ev.STEP_STARTED, "42\t1\t/log", FIELD_COUNT.format(n=2)),
    (ev.STEP_FINISHED, "42\t3", FIELD_COUNT.format(n=3)),  # no Hydra sends the 2-field form
    (ev.STEP_FINISHED, f"42\t3\t{LOG}\textra", FIELD_COUNT.format(n=3)),
    (ev.CACHED_BUILD_FINISHED, "1234", FIELD_COUNT.format(n=2)),
    (ev.CACHED_BUILD_QUEUED, "1234\t5\t6", FIELD_COUNT.format(n=2)),
    # non-integer IDs
    (ev.BUILD_QUEUED, "abc", NOT_INT),
    (ev.BUILD_QUEUED, "12a", NOT_INT),
    (ev.BUILD_QUEUED, "1.5", NOT_INT),
    (ev.BUILD_QUEUED, "0x10", NOT_INT),
    (ev.BUILD_QUEUED, "1e3", NOT_INT),
    (ev.BUILD_QUEUED, "1_000", NOT_INT),
    (ev.CACHED_BUILD_QUEUED, "x\t5", NOT_INT),
    (ev.EVAL_ADDED, f"{CID}\t7\tnew", NOT_INT),
    (ev.BUILD_FINISHED, "42\t43\tabc", NOT_INT),
    # zero, negative, signed
    (ev.BUILD_QUEUED, "0", ZERO),
    (ev.BUILD_QUEUED, "000", ZERO),
    (ev.STEP_STARTED, "42\t0", ZERO),
    (ev.EVAL_STARTED, f"{CID}\t0", ZERO),
    (ev.BUILD_FINISHED, "42\t0", ZERO),
    (ev.BUILD_QUEUED, "-5", NOT_INT),
    (ev.BUILD_QUEUED, "+5", NOT_INT),
    (ev.STEP_FINISHED, f"42\t-1\t{LOG}", NOT_INT),
    # huge
    (ev.BUILD_QUEUED, str(2**31), RANGE),
    (ev.BUILD_QUEUED, "9" * 30, RANGE),
    (ev.BUILD_QUEUED, "1" * 5000, RANGE),  # beyond int()'s default digit limit: must not escape as ValueError
    (ev.BUILD_FINISHED, f"42\t{2**64}", RANGE),
    # unicode digits (str.isdigit accepts them)
    (ev.BUILD_QUEUED, "\u0661\u0662\u0663", NOT_INT),  # Arabic-Indic
    (ev.BUILD_QUEUED, "\u00b2", NOT_INT),  # superscript two
    (ev.BUILD_QUEUED, "\uff11\uff12", NOT_INT),  # fullwidth
    (ev.STEP_STARTED, "42\t\u0967", NOT_INT),  # Devanagari one
    # whitespace
    (ev.BUILD_QUEUED, " 5", NOT_INT),
    (ev.BUILD_QUEUED, "5 ", NOT_INT),
    (ev.BUILD_QUEUED, "5\n", NOT_INT),
    (ev.BUILD_QUEUED, "\u00a05", NOT_INT),
    (ev.CACHED_BUILD_FINISHED, "1234 \t5", NOT_INT),
    # empty fields
    (ev.BUILD_FINISHED, "42\t", "dependent build ID is empty"),
    (ev.BUILD_FINISHED, "\t42", "build ID is empty"),
    (ev.STEP_FINISHED, f"\t3\t{LOG}", "build ID is empty"),
    # bad correlation IDs
    (ev.EVAL_STARTED, "\t7", "correlation ID is empty"),
    (ev.EVAL_STARTED, "a b\t7", BAD_CID),
    (ev.EVAL_ADDED, "x" * 129 + "\t7\t8", "129 characters"),
    (ev.EVAL_CACHED, "caf\u00e9\t7\t8", BAD_CID),
    (ev.EVAL_FAILED, "a\x01b\t7", BAD_CID),
    (ev.EVAL_FAILED, "a\x7fb\t7", BAD_CID),
    (ev.EVAL_FAILED, "a\x0bb\t7", BAD_CID),
    (ev.EVAL_FAILED, "ab\n\t7", BAD_CID),
    # non-UTF-8 bytes and strings that cannot be UTF-8
    (ev.BUILD_QUEUED, b"\xff", UTF8),
    (ev.STEP_FINISHED, b"42\t3\t/log/\xc3", UTF8),  # truncated sequence
    (ev.BUILD_QUEUED, b"\xc0\xb1", UTF8),  # overlong encoding of "1"
    (ev.BUILD_QUEUED, b"\xed\xa0\x80", UTF8),  # encoded surrogate
    (ev.STEP_FINISHED, "42\t3\t/log/\ud800", UTF8),  # lone surrogate in a str
    # over-long
    (ev.BUILD_FINISHED, "1" + "\t2" * 4000, LONG),
    (ev.BUILD_FINISHED, ("1" + "\t2" * 4000).encode(), LONG),
    (ev.STEP_FINISHED, "42\t3\t/" + "\u00e9" * 4000, LONG),  # 4006 chars but 8006 bytes
    # unknown channels
    ("eval_finished", "1", "unknown channel"),
    ("BUILD_QUEUED", "1", "unknown channel"),
    ("status_dumped", "", "unknown channel"),
    ("", "1", "unknown channel"),
]
EMPTY: list[tuple[str, str | bytes, str]] = [
    (channel, "", "empty payload") for channel in ev.DATA_CHANNELS
] + [(ev.BUILD_QUEUED, b"", "empty payload")]


@pytest.mark.parametrize(("channel", "payload", "reason"), MALFORMED + EMPTY)
def test_malformed_payloads(channel: str, payload: str | bytes, reason: str) -> None:
    """A malformed payload raises PayloadError naming the channel and the reason, with a bounded quote."""
    with pytest.raises(PayloadError) as caught:
        parse(channel, payload)
    error = caught.value
    assert error.channel == channel
    assert reason in error.reason
    assert error.quoted == quote_payload(payload)
    assert f"malformed {channel} payload: {error.reason}" in str(error)
    assert len(error.quoted) < 2 * PAYLOAD_QUOTE_LIMIT


@pytest.mark.parametrize("payload", ["9" * 9000, b"9" * 9000])
def test_quoted_payload_is_truncated(payload: str | bytes) -> None:
    """An over-long payload is quoted only in part, with its full size."""
    with pytest.raises(PayloadError) as caught:
        parse(ev.BUILD_QUEUED, payload)
    assert caught.value.quoted.startswith(repr("9" * PAYLOAD_QUOTE_LIMIT))
    assert caught.value.quoted.endswith("(9000 chars)" if isinstance(payload, str) else "(9000 bytes)")


def test_error_quotes_field_in_bounded_form() -> None:
    """A reason quoting a bad field keeps the quote short even for a huge field."""
    with pytest.raises(PayloadError) as caught:
        parse(ev.BUILD_QUEUED, "x" * 7000)
    assert len(caught.value.reason) < 200


def test_imports_only_stdlib_events_and_errors() -> None:
    """The parser stays pure: only the standard library, core.events and errors are imported."""
    tree = ast.parse(Path(parse_module.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    allowed = {"hydra_otel.core.events", "hydra_otel.errors"}
    assert all(name in allowed or name.split(".")[0] in sys.stdlib_module_names for name in imported)


# --- properties ---------------------------------------------------------------------------------

_plausible_id = st.integers(min_value=1, max_value=2**31).map(str)
_any_int = st.integers(min_value=-(2**64), max_value=2**64).map(str)
_field = st.one_of(_plausible_id, _plausible_id, _any_int, st.text(max_size=4))
_fields = st.lists(_field, max_size=6)
PAYLOADS: st.SearchStrategy[str | bytes] = st.one_of(
    st.text(),
    st.binary(),
    _fields.map("\t".join),
    _fields.map("\\t".join),
    _fields.map(lambda fields: "\t".join([CID, *fields])),
    _fields.map(lambda fields: "\t".join(fields).encode()),
    st.text(alphabet="0123456789\t", max_size=9000),
)
_known = st.sampled_from(sorted(EXPECTED_CLASS))
# Mostly channels that exist, so that payloads are exercised beyond the channel lookup.
CHANNELS = st.integers(min_value=0, max_value=3).flatmap(lambda n: _known if n else st.text(max_size=20))


@settings(max_examples=500)
@given(channel=CHANNELS, payload=PAYLOADS)
def test_parse_returns_event_or_payload_error(channel: str, payload: str | bytes) -> None:
    """Any channel and payload give an event of the channel's class or a PayloadError, nothing else."""
    expected = EXPECTED_CLASS.get(channel)
    outcome: ev.HydraEvent | PayloadError
    try:
        outcome = parse(channel, payload)
    except PayloadError as error:
        outcome = error
    if isinstance(outcome, PayloadError):
        assert outcome.channel == channel
        assert expected is not ev.TableChanged  # trigger channels never fail
    else:
        assert expected is not None
        assert isinstance(outcome, expected)


@given(
    build_id=st.integers(min_value=1, max_value=BIG),
    dependents=st.lists(st.integers(min_value=1, max_value=20), max_size=30),
)
def test_build_finished_dependents_property(build_id: int, dependents: list[int]) -> None:
    """Dependents come back deduplicated in first-seen order and never include the build itself."""
    payload = "\t".join(map(str, [build_id, *dependents]))
    expected = tuple(dict.fromkeys(dep for dep in dependents if dep != build_id))
    assert parse(ev.BUILD_FINISHED, payload) == ev.BuildFinished(build_id=build_id, dependents=expected)
