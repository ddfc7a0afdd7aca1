"""The backfill's rate limit under trio's MockClock, and its other pure parts (no I/O).

``autojump_clock`` makes every ``trio.sleep`` return at once while advancing
``trio.current_time()``, so the tests assert exact times of a limiter that
would take seconds in real time.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from hydra_otel.adapters import command_queries
from hydra_otel.adapters.otlp import DELIVERED, Delivery
from hydra_otel.backfill import (
    BackfillOptions,
    BackfillResult,
    PacedSink,
    Tally,
    TokenBucket,
    add_backfill_command,
    options_from_args,
    parse_time,
    progress_text,
)
from hydra_otel.core.spans import Kind, SpanRecord
from hydra_otel.tools import HYDRA_COLUMNS

T0 = 1_700_000_000


async def test_bucket_paces_takes(autojump_clock: trio.testing.MockClock) -> None:
    """The first second's worth goes at once (the bucket starts full); then one take per 1/rate s."""
    bucket = TokenBucket(100)
    start = trio.current_time()
    times = []
    for _ in range(10):
        await bucket.take(100)
        times.append(trio.current_time() - start)
    assert times == pytest.approx([float(i) for i in range(10)])


async def test_bucket_small_takes_reach_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    """2000 single tokens at 500/s with a burst of 500: 1500 must wait, i.e. 3 s."""
    bucket = TokenBucket(500)
    start = trio.current_time()
    for _ in range(2000):
        await bucket.take(1)
    assert trio.current_time() - start == pytest.approx(3.0)


async def test_bucket_take_larger_than_burst_leaves_a_debt(autojump_clock: trio.testing.MockClock) -> None:
    """A take beyond the burst waits for a full bucket, goes through, and the next take waits off the debt."""
    bucket = TokenBucket(10, burst=10)
    await bucket.take(50)  # full bucket: no wait, 40 tokens owed
    assert trio.current_time() == pytest.approx(0.0)
    assert bucket.tokens == pytest.approx(-40)
    await bucket.take(1)  # needs 41 more tokens
    assert trio.current_time() == pytest.approx(4.1)
    await bucket.take(50)  # waits for a full bucket again (10 tokens): 1 s
    assert trio.current_time() == pytest.approx(5.1)


async def test_bucket_refill_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    """An idle bucket holds at most ``burst`` tokens, however long it waited."""
    bucket = TokenBucket(10, burst=20)
    await bucket.take(20)
    await trio.sleep(3600)
    assert bucket.tokens == pytest.approx(20)
    start = trio.current_time()
    await bucket.take(20)
    await bucket.take(10)
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_bucket_long_run_average(autojump_clock: trio.testing.MockClock) -> None:
    """Whatever the take sizes, tokens taken never exceed burst + rate x elapsed + the last take."""
    rng = random.Random(7)
    bucket = TokenBucket(250)
    start = trio.current_time()
    taken = 0
    for _ in range(500):
        n = rng.choice([1, 7, 64, 300, 512])
        await bucket.take(n)
        taken += n
        elapsed = trio.current_time() - start
        assert taken <= bucket.burst + 250 * elapsed + n + 1e-6
        if rng.random() < 0.05:
            await trio.sleep(rng.uniform(0, 2))  # idle spells may refill at most to the burst
    elapsed = trio.current_time() - start
    assert 0.8 * 250 < taken / elapsed <= 250 + (bucket.burst + 512) / elapsed


async def test_bucket_serialises_concurrent_takers(autojump_clock: trio.testing.MockClock) -> None:
    """Two tasks share one budget: 4 takes of 50 at 50/s end at 3 s, not 1.5 s."""
    bucket = TokenBucket(50)
    async with trio.open_nursery() as nursery:
        for _ in range(2):

            async def twice() -> None:
                await bucket.take(50)
                await bucket.take(50)

            nursery.start_soon(twice)
    assert trio.current_time() == pytest.approx(3.0)


def test_bucket_rejects_a_rate_that_is_not_positive() -> None:
    """The limiter needs a positive rate; the CLI's 0 means "no bucket at all"."""
    for rate in (0, -1):
        with pytest.raises(ValueError, match="rate must be > 0"):
            TokenBucket(rate)


def span(name: str, attrs: dict[str, str | int]) -> SpanRecord:
    return SpanRecord(
        trace_id=1,
        span_id=len(name) + 1,
        parent_span_id=None,
        name=name,
        kind=Kind.INTERNAL,
        start_ns=0,
        end_ns=0,
        attributes=tuple(attrs.items()),
    )


class _Recorder:
    """A sink that records when batches arrive; fails the first ``failures`` attempts."""

    def __init__(self, failures: int = 0) -> None:
        self.times: list[float] = []
        self.failures = failures

    async def export(self, batch: Sequence[SpanRecord]) -> Delivery:
        if self.failures:
            self.failures -= 1
            return Delivery(done=False)
        self.times.append(trio.current_time())
        return DELIVERED

    def shutdown(self) -> None:
        pass


async def test_metered_sink_limits_and_counts(autojump_clock: trio.testing.MockClock) -> None:
    """Batches of 512 at --rate 1000 go 0.512 s apart; a failed attempt spends its tokens too."""
    inner, tally = _Recorder(failures=1), Tally()
    sink = PacedSink(inner, TokenBucket(1000), tally)
    batch = [span("step x", {"hydra.step.nr": 1})] * 512
    assert not (await sink.export(batch)).done  # rejected: nothing counted
    for _ in range(3):
        assert (await sink.export(batch)).done
    assert inner.times == pytest.approx([0.024, 0.536, 1.048])
    assert (tally.steps, tally.spans) == (3 * 512, 3 * 512)


async def test_dry_run_sink_acknowledges_without_waiting(autojump_clock: trio.testing.MockClock) -> None:
    """Without an inner sink or a bucket, every batch is counted at once."""
    tally = Tally()
    sink = PacedSink(None, None, tally)
    assert (await sink.export([span("eval p:j", {"cicd.pipeline.run.id": "1"})] * 10_000)).done
    assert trio.current_time() == 0
    assert (tally.evaluations, tally.spans) == (10_000, 10_000)


def test_tally_kinds() -> None:
    """Evaluation roots, builds and steps are told apart by their attributes; every span counts."""
    tally = Tally()
    tally.add(
        [
            span("eval nixpkgs:trunk", {"cicd.pipeline.run.id": "1", "hydra.eval.id": 1}),
            span("checkout", {"hydra.eval.id": 1}),
            span("build hello", {"cicd.pipeline.task.name": "hello", "hydra.build.id": 3}),
            span("queued", {"hydra.build.id": 3}),
            span("step hello", {"hydra.build.id": 3, "hydra.step.nr": 1}),
            span("substitute glibc", {"hydra.build.id": 3, "hydra.step.nr": 2}),
        ]
    )
    assert tally == Tally(evaluations=1, builds=1, steps=2, spans=6)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1700000000", T0),
        ("0", 0),
        ("2023-11-14", T0 - (22 * 3600 + 13 * 60 + 20)),
        ("2023-11-14T22:13:20", T0),
        ("2023-11-14T22:13:20Z", T0),
        ("2023-11-14 22:13:20+00:00", T0),
        ("2023-11-15T00:13:20+02:00", T0),
        ("2023-11-14T22:13:19.25Z", T0),  # rounded up: since <= t and t < until stay exact
        ("2023-11-14T22:13", T0 - 20),
    ],
)
def test_parse_time(text: str, seconds: int) -> None:
    """Dates, datetimes (UTC unless an offset is given) and Unix seconds."""
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["yesterday", "2023-13-01", "-5", "1.5", "", "2023-11-14T25:00"])
def test_parse_time_rejects(text: str) -> None:
    """Anything else is a usage error naming the value."""
    with pytest.raises(argparse.ArgumentTypeError, match="not a date"):
        parse_time(text)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hydra-otel")
    add_backfill_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["backfill", *argv])


def test_options_from_the_command_line() -> None:
    """Flags become options; repeated jobsets keep their order once; defaults are bounded."""
    opts = options_from_args(
        parse(
            "--since", "2023-11-14T22:13:20Z", "--until", "1700003600", "--jobset", "nixpkgs:trunk",
            "--jobset", "nixpkgs:staging", "--jobset", "nixpkgs:trunk", "--dry-run", "--rate", "0",
            "--batch", "5", "--restart",
        )
    )  # fmt: skip
    assert opts == BackfillOptions(
        since=T0,
        until=T0 + 3600,
        jobsets=("nixpkgs:trunk", "nixpkgs:staging"),
        dry_run=True,
        rate=0,
        batch=5,
        restart=True,
    )
    defaults = options_from_args(parse("--since", "0"))
    assert (defaults.until, defaults.jobsets, defaults.rate, defaults.batch) == (None, (), 2000, 50)
    assert defaults.key() == "since=0 until=now jobsets=*"
    assert opts.key() == f"since={T0} until={T0 + 3600} jobsets=nixpkgs:staging,nixpkgs:trunk"


@pytest.mark.parametrize(
    "argv",
    [
        ("--until", "2024-01-01"),  # --since is required
        ("--since", "0", "--jobset", "trunk"),
        ("--since", "0", "--rate", "-1"),
        ("--since", "0", "--batch", "0"),
        ("--since", "0", "--batch", "10001"),
    ],
)
def test_options_rejected(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    """Bad flags exit with argparse's usage status 2."""
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_progress_text() -> None:
    """Bar, percentage, evaluations done/total, spans per second, ETA from this run's pace."""
    text = progress_text(done=30, total=120, done_here=20, spans=5000, elapsed=10.0, width=8)
    assert text == "[##------]  25.0%  30/120 evals  500 spans/s  ETA 0:00:45"
    assert progress_text(done=0, total=0, done_here=0, spans=0, elapsed=0.0, width=4) == (
        "[####] 100.0%  0/0 evals  0 spans/s  ETA 0:00:00"
    )
    assert progress_text(done=3, total=9, done_here=0, spans=0, elapsed=1.0, width=3, failing=True) == (
        "[#--]  33.3%  3/9 evals  0 spans/s  ETA -:--:--  (export failing, retrying)"
    )


def test_summaries() -> None:
    """The final line says what was done, and how to resume an interrupted run."""
    r = BackfillResult(since=T0, until=T0 + 3600, jobsets=("nixpkgs:trunk",), dry_run=False)
    r.exported = Tally(evaluations=2, builds=5, steps=9, spans=30)
    r.evals_total, r.evals_done, r.seconds = 4, 2, 61.0
    assert r.summary() == (
        "backfill interrupted, 2023-11-14T22:13:20Z to 2023-11-14T23:13:20Z, jobsets nixpkgs:trunk: exported "
        "2 evaluations, 5 builds, 9 steps (30 spans) in 0:01:01; 2/4 evaluations done; "
        "run the same command again to resume"
    )
    r.exported = Tally(evaluations=1, builds=1, steps=1, spans=1)
    assert "exported 1 evaluation, 1 build, 1 step (1 span) in" in r.summary()
    r.exported = Tally(evaluations=2, builds=5, steps=9, spans=30)
    r.dry_run, r.resumed_after = True, 7
    assert r.summary(rate=10) == (
        "dry run, 2023-11-14T22:13:20Z to 2023-11-14T23:13:20Z, jobsets nixpkgs:trunk: would export "
        "2 evaluations, 5 builds, 9 steps (30 spans), resuming after evaluation 7; at --rate 10 about 0:00:03"
    )


# Table aliases used in the backfill's SQL (adapters/command_queries.py; check's own catalogue
# queries there use other aliases).
ALIASES = {"b": "builds", "e": "jobsetevals", "j": "jobsets", "m": "jobsetevalmembers"}


def test_columns_are_the_ones_check_verifies() -> None:
    """Every alias.column in the backfill's SQL (command_queries) is in tools.HYDRA_COLUMNS, so `check` vouches for it."""
    texts = [v for k, v in vars(command_queries).items() if k.endswith("_SQL") and isinstance(v, str)]
    assert len(texts) == 6  # the backfill's four, check's two
    referenced = {
        (ALIASES[alias], column)
        for text in texts
        for alias, column in re.findall(r"\b([a-z])\.([a-z_]+)\b", text)
        if alias in ALIASES
    }
    assert {t for t, _ in referenced} == set(ALIASES.values())
    assert {f"{t}.{c}" for t, c in referenced if c not in HYDRA_COLUMNS[t]} == set()
