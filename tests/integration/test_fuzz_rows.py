"""Seeded fuzz: hostile rows in jobsetevals, evaluationerrors, builds and buildsteps.

Hydra's rows are trusted to come from Hydra, not to be well formed (docs/operations.md,
"Trust model"). Between good evaluations, a scripted Hydra writes evaluations, builds and
steps whose values are legal for the schema but not what Hydra means to write: the ends of
int4 and int8, negative and zero times and durations, NULL wherever the schema allows it,
unknown status and type codes, text that is empty, long, full of control, bidi or
non-BMP characters, or looks like escapes. Times after 2100 cannot be stored: Hydra's time
columns are int4, whose end (2**31 - 1) is in 2038, so that is the latest time fuzzed.

What must hold: the daemon never stops; the good evaluations' spans arrive exactly; the
hostile rows' evaluations and builds are exported too (repaired where needed), and every
span received has 0 <= start <= end.

The seed is ``HYDRA_OTEL_FUZZ_SEED`` (default below); a failure names it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import pytest

from hydra_otel.demo.sandbox.hydrasim import NewBuild, lit, notify, tx
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, ReceivedSpan
from tests.integration.harness import Hydra
from tests.integration.workload import (
    Daemons,
    Expected,
    Player,
    SpanKey,
    assert_exactly,
    now,
    received_key,
    wait_for_expected,
)

SEED = int(os.environ.get("HYDRA_OTEL_FUZZ_SEED", "20261206"))
ROUNDS = 8
HOSTILE_JOBSET = 3

I4_MIN, I4_MAX = -(2**31), 2**31 - 1
I8_MIN, I8_MAX = -(2**63), 2**63 - 1
#: Times: before 1970, the epoch, a second after it, today, the end of int4 (2038).
TIMES = (I4_MIN, -86_400 * 365 * 50, -1, 0, 1, 1_700_000_000, I4_MAX)
DURATIONS = (I4_MIN, -1, 0, 1, 86_400 * 365, I4_MAX)
COUNTS = (None, I4_MIN, -1, 0, I4_MAX)
SIZES = (None, I8_MIN, -1, 0, I8_MAX)
STATUSES = (None, I4_MIN, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99, 100, I4_MAX)
TEXTS = (
    "",
    " ",
    "x" * 20_000,
    "\x01\x02\x1b[31mred\x7f",
    "\u202eevil\u202c",
    "\U0001f600" * 500,
    "a\nb\tc\rd",
    "\\0\\x00\\u0000",
    "%s%n%x{}",
    "<script>alert(1)</script>",
    "\ufeff\u200b",
    "é" * 3_000,
    "ssh://root:hunter2@builder.example.org",
)
DRVPATHS = (
    "/nix/store/../../etc/passwd",
    "relative.drv",
    "/nix/store/" + "a" * 5_000 + ".drv",
    "/nix/store/abc-é\U0001f600.drv",
    "/nix/store/..",
    "/nix/store/",
    "",
)


def opt(value: object) -> str:
    """An SQL literal of an int, a str, a bool or None."""
    if isinstance(value, bool):
        return "true" if value else "false"
    assert value is None or isinstance(value, int | str)
    return lit(value)


class Hostile:
    """Renders Hydra's actions with hostile values (seeded), as SQL for the scripted Hydra."""

    def __init__(self, rng: random.Random, hydra: Hydra, *, legacy: bool) -> None:
        self.rng, self.hydra, self.legacy = rng, hydra, legacy

    def pick(self, values: Sequence[object]) -> object:
        return self.rng.choice(values)

    def evaluation(self, cid: str, jobs: int) -> tuple[int, list[int], list[str]]:
        """An evaluation of the hostile jobset whose jobsetevals, evaluationerrors and builds rows are odd."""
        t = now()
        new = [NewBuild(job=f"h{self.rng.randrange(10**6)}") for _ in range(jobs)]
        eval_id, builds, (first, body) = self.hydra.sim.eval_added(
            HOSTILE_JOBSET,
            cid,
            eval_start=t - 20,
            timestamp=t - 10,
            checkout_time=1,
            eval_time=2,
            new_builds=new,
        )
        p = self.pick
        patch = [
            f"UPDATE jobsetevals SET timestamp = {p(TIMES)}, checkouttime = {p(DURATIONS)}, "
            f"evaltime = {p(DURATIONS)}, nrbuilds = {opt(p(COUNTS))}, nrsucceeded = {opt(p(COUNTS))}, "
            f"hash = {opt(p(TEXTS))}, flake = {opt(p((None, *TEXTS)))}, nixexprinput = {opt(p((None, *TEXTS)))}, "
            f"nixexprpath = {opt(p((None, *TEXTS)))}"
            + (", evaluationerror_id = NULL" if self.rng.random() < 0.3 else "")
            + f" WHERE id = {eval_id};",
            f"UPDATE evaluationerrors SET errormsg = {opt(p((None, *TEXTS)))}, errortime = {opt(p((None, *TIMES)))} "
            f"WHERE id = (SELECT evaluationerror_id FROM jobsetevals WHERE id = {eval_id});",
        ]
        for b in builds:
            patch.append(
                f"UPDATE builds SET timestamp = {p(TIMES)}, job = {opt(p(TEXTS))}, nixname = {opt(p((None, *TEXTS)))}, "
                f"description = {opt(p((None, *TEXTS)))}, system = {opt(p(TEXTS))}, priority = {p((I4_MIN, 0, I4_MAX))}, "
                f"globalpriority = {p((I4_MIN, 0, I4_MAX))} WHERE id = {b};"
            )
        return eval_id, builds, [first, _before_commit(body, patch)]

    def steps(self, build_id: int, others: Sequence[int]) -> tuple[list[int], str]:
        """1-3 finished steps with odd values, then their step_finished notifications."""
        numbers = self.rng.sample((I4_MIN, -1, 0, 1, 2, 3, I4_MAX), self.rng.randint(1, 3))
        rows, notes = [], []
        p = self.pick
        for nr in numbers:
            status = p(STATUSES)
            # Schema 87 ties status 13 to resolveddrvpath and forbids a NULL drvpath; 85 has neither rule.
            resolved = "" if self.legacy else ", " + (opt(p(TEXTS[1:])) if status == 13 else "NULL")
            drvpath = p((None, *DRVPATHS) if self.legacy else DRVPATHS)
            rows.append(
                "INSERT INTO buildsteps (build, stepnr, type, drvpath, busy, status, errormsg, starttime, stoptime, "
                "machine, system, propagatedfrom, overhead, timesbuilt, isnondeterministic"
                + ("" if self.legacy else ", resolveddrvpath")
                + ") VALUES "
                f"({build_id}, {nr}, {p((0, 1, 2, -1, I4_MAX))}, {opt(drvpath)}, {p((0, 1, 30, -1, I4_MAX))}, "
                f"{opt(status)}, {opt(p((None, *TEXTS)))}, {opt(p((None, *TIMES)))}, {opt(p((None, *TIMES)))}, "
                f"{opt(p(TEXTS))}, {opt(p((None, *TEXTS)))}, {opt(p((None, build_id, *others)))}, "
                f"{opt(p(COUNTS))}, {opt(p(COUNTS))}, {opt(p((None, True, False)))}{resolved});"
            )
            notes.append(notify("step_finished", build_id, nr, self.rng.choice(("", *DRVPATHS))))
        return numbers, tx(*rows, *notes)

    def finish(self, build_id: int, dependents: Sequence[int], *, silent: bool = False) -> str:
        """The build is marked finished with odd values (times never NULL or 0: the schema forbids it).

        ``silent``: it stops a few seconds ago and no notification is sent (as a web cancel), so
        only a catch-up scan can find it and its odd values.
        """
        p = self.pick
        times = [t for t in TIMES if t != 0]
        stop = now() - 3 if silent else p(times)
        end = "" if silent else notify("build_finished", build_id, *dependents)
        return tx(
            f"UPDATE builds SET finished = 1, starttime = {p(times)}, stoptime = {stop}, "
            f"buildstatus = {opt(p(STATUSES))}, iscachedbuild = {opt(p((None, 0, 1, 2, -1)))}, "
            f"size = {opt(p(SIZES))}, closuresize = {opt(p(SIZES))}, releasename = {opt(p((None, *TEXTS)))} "
            f"WHERE id = {build_id};",
            end,
        )


def _before_commit(script: str, statements: list[str]) -> str:
    assert script.endswith("\nCOMMIT;")
    return script.removesuffix("COMMIT;") + "\n".join((*statements, "COMMIT;"))


@pytest.mark.parametrize("hydra_db", [85, 87], indirect=True)
async def test_hostile_rows_around_good_evaluations(
    hydra: Hydra, hydra_db: str, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver
) -> None:
    """Odd values in every column hydra-otel reads: the daemon survives and good evaluations export exactly."""
    legacy = await hydra.fetchval("SELECT version FROM schemaversion") == 85
    try:
        await _run(hydra, daemons, otlp_grpc, legacy=legacy)
    except BaseException as exc:
        exc.add_note(f"fuzz seed {SEED}: rerun with HYDRA_OTEL_FUZZ_SEED={SEED}")
        raise


async def _run(hydra: Hydra, daemons: Daemons, otlp_grpc: GrpcOtlpReceiver, *, legacy: bool) -> None:
    _, create = hydra.sim.create_jobset("nixpkgs", "hostile")
    await hydra.run(create)
    daemon = await daemons.start(daemons.config(catchup_interval="0.5"))
    hostile, good = Hostile(random.Random(SEED), hydra, legacy=legacy), Player(hydra)
    bad = Expected()  # the hostile rows' evaluations and finished builds must be exported too
    for r in range(ROUNDS):
        eval_id, builds, sql = hostile.evaluation(f"hostile.{r}", 4)
        await hydra.run(*sql)
        bad.evaluation(eval_id)
        for i, b in enumerate(builds):
            _, steps = hostile.steps(b, [x for x in builds if x != b])
            await hydra.run(steps)
            if i < 3:  # the last one keeps running, with finished steps
                await hydra.run(hostile.finish(b, builds[i + 1 : 3] if r % 2 else (), silent=i == 2))
                bad.build(eval_id, b, queued=False)
        daemon.check_alive()
        _, good_builds = await good.evaluation(1 + r % 2, 2)
        for b in good_builds:
            await good.finish(b, status=r % 2)
        daemon.check_alive()
    await wait_for_expected(otlp_grpc, good.expected, daemon, timeout=30)
    await wait_for_expected(otlp_grpc, bad, daemon, timeout=30)
    daemon.check_alive()
    await daemon.stop()
    spans = otlp_grpc.spans()
    for s in spans:
        assert 0 <= s.span.start_time_unix_nano <= s.span.end_time_unix_nano, s.span.name
    good_traces = {k[0] for k in good.expected.keys}
    assert_exactly([s for s in spans if bytes(s.span.trace_id) in good_traces], good.expected)
    assert daemon.service.stats.spans_repaired > 0
    missing = sorted(bad.names[k] for k in bad.keys - _keys(spans))
    assert not missing, f"hostile rows not exported: {missing}"


def _keys(spans: Sequence[ReceivedSpan]) -> set[SpanKey]:
    return {received_key(s) for s in spans}
