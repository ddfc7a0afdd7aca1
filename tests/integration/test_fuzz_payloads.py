"""Seeded fuzz: hostile payloads on every channel, interleaved with a real workload.

Every channel hydra-otel LISTENs on gets payloads a role with no grant could send:
wrong field counts, signs, zeros, IDs beyond int4 and int64, non-ASCII digits,
escapes that look like NUL (``\\0``, ``\\x00``, ``\\u0000``), literal ``\\t``
separators, stray tabs and newlines, payloads just under PostgreSQL's 8,000-byte
limit, long dependents lists, unknown IDs and real IDs of other jobsets. Between
batches a scripted Hydra evaluates, builds, fails and retries for real.

What must hold: the daemon never stops; the real workload's spans arrive exactly
(tests/integration/workload.py); per channel, every payload is counted either as an
event or as malformed, and exactly the payloads built to be malformed are; forged
evaluation attempts add at most a few spans. Each payload's class is decided here,
from docs/notifications.md's parser rules, not by the parser under test.

The seed is ``HYDRA_OTEL_FUZZ_SEED`` (default below; ``HYDRA_OTEL_FUZZ_BATCH`` sets the
payloads per batch); a failure names the seed.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

import trio
from trio_asyncio import aio_as_trio

from hydra_otel.core.events import DATA_CHANNELS, TRIGGER_CHANNELS
from hydra_otel.core.stitch import SUPERSEDE_BURST
from hydra_otel.demo.sandbox.hydrasim import NewBuild
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, ReceivedSpan, attributes_dict
from tests.integration.harness import Hydra
from tests.integration.workload import Daemons, Player, assert_exactly, now, wait_for_expected

SEED = int(os.environ.get("HYDRA_OTEL_FUZZ_SEED", "20261206"))
#: Payloads per batch (one batch between each two workload steps).
BATCH = int(os.environ.get("HYDRA_OTEL_FUZZ_BATCH", "400"))
#: PostgreSQL refuses payloads of 8,000 bytes or more; hostile ones go up to the last byte allowed.
MAX_SENDABLE = 7_999
#: Correlation IDs of forged evaluation notifications start with this (real ones never do).
FORGED = "fz"
#: Jobset IDs no row has; the fuzzed jobset (3) is real but only forged eval_* name it.
UNKNOWN_JOBSETS = (424_242, 2**31 - 1)

BAD_IDS = (
    "0", "000", "-1", "-7", "+5", " 7", "7 ", "7\n", "1e3", "0x10", "1_000", "1.5", "",
    str(2**31), str(2**32), str(2**63 - 1), str(2**63), str(2**64 + 1), "9" * 40,
    "\u0663", "\uff17", "\u00b2", "abc", "\\0", "\\x00", "\\u0000", "%00", "NULL", "7\\0",
)  # fmt: skip
BAD_CIDS = ("", "a b", "x" * 129, "é", "日本", "a\nb", "\x01", "a\x7fb", " ", "\u202e1")
ODD_TEXT = ("\\0", "\\x00", "\\u0000", "\\t", "\\n", "%s", "'; DROP TABLE builds; --", "é日😀", "\x01\x7f")


@dataclass
class Rows:
    """Real IDs the fuzz may name: the workload's and the fuzzed jobset's."""

    builds: list[int] = field(default_factory=list)
    evals: list[int] = field(default_factory=list)


@dataclass
class Fuzzer:
    """Builds hostile payloads and records, per channel, what was sent and what must be malformed."""

    rng: random.Random
    rows: Rows
    sent: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    serial: int = 0

    def an_id(self, kind: str) -> str:
        r = self.rng.random()
        real = self.rows.builds if kind == "build" else self.rows.evals
        if r < 0.4 and real:
            return str(self.rng.choice(real))
        if r < 0.5:
            return "0" * self.rng.randint(1, 5) + str(self.rng.randint(1, 10**6))  # leading zeros are fine
        return str(self.rng.randint(10**6, 2**31 - 1))  # no such row

    def cid(self) -> str:
        self.serial += 1
        odd = self.rng.choice(("", "\\0", "\\x00", "\\t", "%00", "'--"))  # printable ASCII: still valid
        return f"{FORGED}{SEED}.{self.serial}{odd}"

    def jobset(self) -> str:
        return str(self.rng.choice((3, *UNKNOWN_JOBSETS)))

    def fields(self, channel: str) -> list[str]:
        """Well-formed fields of ``channel``."""
        if channel in ("eval_started", "eval_failed"):
            return [self.cid(), self.jobset()]
        if channel in ("eval_added", "eval_cached"):
            return [self.cid(), self.jobset(), self.an_id("eval")]
        if channel in ("build_queued", "build_started"):
            return [self.an_id("build")]
        if channel == "step_started":
            return [self.an_id("build"), str(self.rng.randint(1, 5))]
        if channel == "step_finished":
            path = self.rng.choice(
                ("", "/etc/passwd", "../../x", "/nix/var/log/nix/drvs/ab/c.drv.bz2", *ODD_TEXT)
            )
            return [self.an_id("build"), str(self.rng.randint(1, 5)), path]
        if channel == "build_finished":
            return [self.an_id("build")] + [
                self.an_id("build") for _ in range(self.rng.choice((0, 1, 3, 50)))
            ]
        return [self.an_id("eval"), self.an_id("build")]  # cached_build_*

    def payload(self, channel: str) -> str:
        """One payload; records whether it must be counted as malformed."""
        if channel in TRIGGER_CHANNELS:  # any payload at all is a trigger
            return self.rng.choice(("", "?", "x" * MAX_SENDABLE, "1\t2", "\\0", "é日😀", str(2**64)))
        fields, bad = self.fields(channel), False
        how = self.rng.randrange(9)
        if how == 0:  # a field count the channel does not have
            if channel == "build_finished":
                fields, bad = [], True  # any number of dependents is fine; none at all is an empty payload
            else:
                fields = fields[:-1] if len(fields) > 1 and self.rng.random() < 0.5 else [*fields, "1"]
                bad = True
        elif how == 1:  # one ID field malformed
            ids = [i for i in range(len(fields)) if not _is_text_field(channel, i)]
            fields[self.rng.choice(ids)] = self.rng.choice(BAD_IDS)
            bad = True
        elif how == 2 and channel.startswith("eval_"):  # a malformed correlation ID
            fields[0], bad = self.rng.choice(BAD_CIDS), True
        elif how == 3 and channel == "build_finished":  # a long dependents list, just under the limit
            fields = [fields[0]]
            while len("\t".join(fields)) < MAX_SENDABLE - 11:
                fields.append(str(self.rng.randint(10**6, 2**31 - 1)))
        elif how == 4 and channel == "step_finished":  # a path up to the byte limit
            head = "\t".join(fields[:2]) + "\t"
            fields[2] = "/" + "é" * ((MAX_SENDABLE - len(head.encode()) - 1) // 2)
        elif how == 5 and channel.startswith("eval_"):  # a correlation ID far over its 128 characters
            fields[0], bad = FORGED + "y" * (MAX_SENDABLE - 40), True
        elif how == 6 and len(fields) > 1:  # the literal two characters \t as the separator
            if not any("\\t" in f or "\t" in f for f in fields):
                return self._count(channel, "\\t".join(fields), bad=False)
        elif how == 7:  # a stray real tab at an end: one more, empty field
            text = "\t".join(fields)
            return self._count(channel, self.rng.choice((text + "\t", "\t" + text)), bad=True)
        return self._count(channel, "\t".join(fields), bad=bad)

    def _count(self, channel: str, payload: str, *, bad: bool) -> str:
        self.sent[channel] += 1
        self.malformed[channel] += bad
        return payload


def _is_text_field(channel: str, index: int) -> bool:
    return (channel.startswith("eval_") and index == 0) or (channel == "step_finished" and index == 2)


async def send(hydra: Hydra, fuzz: Fuzzer, channels: Sequence[str]) -> None:
    """BATCH payloads on random channels, in one statement; repeats within it are not sent (NOTIFY folds them)."""
    pairs: dict[tuple[str, str], None] = {}
    while len(pairs) < BATCH:
        channel = fuzz.rng.choice(channels)
        before = Counter(fuzz.sent), Counter(fuzz.malformed)
        payload = fuzz.payload(channel)
        if (channel, payload) in pairs:  # folded by PostgreSQL: undo the count
            fuzz.sent, fuzz.malformed = before
            continue
        pairs[(channel, payload)] = None
    await aio_as_trio(hydra.conn.execute)(
        "SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
        [c for c, _ in pairs],
        [p for _, p in pairs],
    )


def forged_spans(spans: Sequence[ReceivedSpan]) -> list[ReceivedSpan]:
    return [
        s
        for s in spans
        if str(attributes_dict(s.span.attributes).get("hydra.eval.correlation_id", "")).startswith(FORGED)
    ]


async def test_hostile_payloads_around_a_real_workload(
    hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """Hostile payloads on every channel: the daemon survives, counts each, and exports the workload exactly."""
    try:
        await _run(hydra, daemons, otlp_grpc)
    except BaseException as exc:
        exc.add_note(f"fuzz seed {SEED}: rerun with HYDRA_OTEL_FUZZ_SEED={SEED}")
        raise


async def _run(hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver) -> None:
    sim = hydra.sim
    _, create = sim.create_jobset("nixpkgs", "fuzzed")
    await hydra.run(create)
    t = now()
    fuzzed_eval, fuzzed_builds, sql = sim.eval_added(
        3, "old.3", eval_start=t - 600, timestamp=t - 590, checkout_time=1, eval_time=5,
        new_builds=[NewBuild(job="f0"), NewBuild(job="f1")],
    )  # fmt: skip
    await hydra.run(*sql)
    daemon = await daemons.start(daemons.config(catchup_interval="0.5"))
    service = daemon.service
    rows = Rows(builds=list(fuzzed_builds), evals=[fuzzed_eval])
    fuzz = Fuzzer(random.Random(SEED), rows)
    channels = DATA_CHANNELS + TRIGGER_CHANNELS
    play = Player(hydra)
    play.expected.evaluation(fuzzed_eval)  # each start re-reads the last evaluations (and the fuzz names it)

    async def step(action: Awaitable[None]) -> None:
        await action
        await send(hydra, fuzz, channels)
        daemon.check_alive()

    e1, b1 = await play.evaluation(1, 5)
    rows.evals.append(e1)
    rows.builds += b1
    await send(hydra, fuzz, channels)
    await step(play.finish(b1[0]))
    await step(play.fail_with_dependents(b1[2], [b1[3]]))
    await step(play.finish(b1[1], status=1))
    # A restart reads as "not finished" to anything later: export the failed attempt first, as Hydra's
    # users give hydra-otel time to (its times survive only in the spans already exported).
    await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=30)
    await step(play.restart(b1[1]))
    await step(play.finish(b1[1]))
    await step(play.cancel(b1[4], at=now() - 3))  # no notification but a trigger: found by catch-up
    e2, b2 = await play.evaluation(2, 3)
    rows.evals.append(e2)
    rows.builds += b2
    await step(play.substituted_step(b2[0]))  # no notification at all: found by catch-up
    await step(play.finish(b2[1]))
    # A real failed evaluation attempt, observed from its start.
    t = now()
    await hydra.run(*sim.evaluator_starts(2, "real.2", t - 3))
    await send(hydra, fuzz, channels)
    await hydra.run(sim.eval_check_failed(2, "real.2", t, "error: undefined variable 'foo'"))
    play.expected.attempt(2, "real.2")
    await step(play.finish(b2[2]))

    stats = service.stats
    # Notifications are counted in order: once this last malformed one is, every earlier one is.
    await aio_as_trio(hydra.conn.execute)("SELECT pg_notify('build_queued', 'the end')")
    await wait_for_expected(otlp_grpc, play.expected, daemon, timeout=30)
    with trio.fail_after(20):
        while stats.payload_errors["build_queued"] <= fuzz.malformed["build_queued"]:
            daemon.check_alive()
            await trio.sleep(0.02)
    stats.payload_errors["build_queued"] -= 1
    daemon.check_alive()
    await daemon.stop()
    assert service.listen.received == sum(stats.events.values()) + sum(stats.payload_errors.values()) + 1
    for channel in DATA_CHANNELS:
        assert stats.payload_errors[channel] == fuzz.malformed[channel], channel
        assert stats.events[channel] >= fuzz.sent[channel] - fuzz.malformed[channel], channel
    for channel in TRIGGER_CHANNELS:
        assert stats.payload_errors[channel] == 0, channel
        assert stats.events[channel] >= fuzz.sent[channel], channel  # Hydra's own triggers add to them
    assert stats.missing_rows["builds"] > 0
    assert stats.missing_rows["jobsetevals"] > 0
    assert stats.notifications_rejected["unknown_jobset"] > 0
    spans = otlp_grpc.spans()
    forged = forged_spans(spans)
    forged_ids = {id(s) for s in forged}
    # Forged starts of the fuzzed jobset: a few superseded ones reported, the last one still open at the
    # stop; forged closings: at most two per check of it (only the one before the start).
    assert len(forged) <= SUPERSEDE_BURST + 2, [s.span.name for s in forged]
    assert_exactly([s for s in spans if id(s) not in forged_ids], play.expected)
