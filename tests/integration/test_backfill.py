"""``hydra-otel backfill`` against a real database and OTLP receivers.

One seeded history (three evaluations in the period, two jobsets, a failure
with dependents, a substitution, a restarted build, a cached and a failed
evaluation attempt, a build never finished, and an evaluation after the
period) is exported live by the daemon and then by a backfill into a fresh
receiver; the spans must be the same, byte for byte, except the ones only the
live notifications can produce (listed in :func:`live_only`). Every span is
keyed by (trace ID, span ID); a key seen twice must carry the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import io
import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from hydra_otel import cli
from hydra_otel.backfill import (
    PROGRESS_FILE,
    Backfill,
    BackfillError,
    BackfillOptions,
    BackfillProgressFile,
    BackfillResult,
    Tally,
    add_backfill_command,
    backfill,
    run_backfill,
)
from hydra_otel.config import Config
from hydra_otel.core import ids
from hydra_otel.demo.sandbox.hydrasim import NewBuild, store_path
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver, ReceivedSpan
from tests.integration.harness import HYDRA_URL, Hydra, StartDaemon, daemon_config, stop

T0 = 1_700_000_000
WATCHDOG = 30
INSTANCE = "hydra"

#: The period of the backfills: evaluations A, B and C, not D.
SINCE, UNTIL = T0 - 100, T0 + 1000

SpanKey = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class History:
    """IDs of the seeded history."""

    a: int  # nixpkgs:trunk, observed live from eval_started
    b: int  # nixpkgs:staging
    c: int  # nixpkgs:trunk, reuses a build of A
    d: int  # nixpkgs:staging, after the period
    restarted: int  # a build of B that failed, was restarted and then succeeded


async def seed_history(
    hydra: Hydra, before_restart: Callable[[], Awaitable[object]] | None = None
) -> History:
    """Play the history; ``before_restart`` waits until the daemon exported the first finish of B's build."""
    sim = hydra.sim
    await hydra.run(*sim.evaluator_starts(1, "a.1", T0 - 5))
    a, (ok, bad, dep1, dep2, subst), sql = sim.eval_added(
        1, "a.1", eval_start=T0, timestamp=T0 + 10, checkout_time=5, eval_time=10,
        new_builds=[NewBuild(job=j) for j in ("ok", "bad", "dep1", "dep2", "subst")],
    )  # fmt: skip
    await hydra.run(*sql, sim.evaluator_exits(1))
    await hydra.run(
        sim.step_started(
            ok, 1, now=T0 + 20, machine="ssh://builder-1", drvpath=store_path("openssl-3.0.drv", 9)
        ),
        sim.step_finished(ok, 1, now=T0 + 50),
        sim.step_started(ok, 2, now=T0 + 51, machine="ssh://builder-2"),
        sim.step_finished(ok, 2, now=T0 + 80),
        sim.build_finished(ok, start=T0 + 51, stop=T0 + 80),
        sim.step_started(bad, 1, now=T0 + 30),
        sim.step_finished(bad, 1, now=T0 + 40, status=1, error="builder failed with exit code 1"),
        sim.build_failed_with_dependents(bad, start=T0 + 30, stop=T0 + 40, dependents=[(dep1, 1), (dep2, 1)]),
        sim.substituted_step(subst, 1, start=T0 + 21, stop=T0 + 22),
        sim.build_finished(subst, start=T0 + 21, stop=T0 + 22),
    )
    b, (x, r), sql = sim.eval_added(
        2, "b.1", eval_start=T0 + 95, timestamp=T0 + 100, checkout_time=3, eval_time=4,
        new_builds=[NewBuild(job="x"), NewBuild(job="r")],
    )  # fmt: skip
    await hydra.run(
        *sql,
        sim.step_started(x, 1, now=T0 + 110),
        sim.step_finished(x, 1, now=T0 + 120),
        sim.build_finished(x, start=T0 + 110, stop=T0 + 120),
        sim.step_started(r, 1, now=T0 + 110),
        sim.step_finished(r, 1, now=T0 + 130, status=1, error="flaky test"),
        sim.build_finished(r, start=T0 + 110, stop=T0 + 130, status=1),
    )
    if before_restart is not None:
        await before_restart()
    await hydra.run(
        sim.restart(r),
        sim.step_started(r, 2, now=T0 + 200),
        sim.step_finished(r, 2, now=T0 + 230),
        sim.build_finished(r, start=T0 + 200, stop=T0 + 230),
        # attempts without a JobsetEval row: cached (observed from its start) and failed
        *sim.evaluator_starts(1, "a.2", T0 + 250),
        sim.eval_cached(1, "a.2", a, T0 + 260),
        sim.evaluator_exits(1),
        sim.eval_check_failed(2, "b.2", T0 + 270, "error: undefined variable 'foo'"),
    )
    c, (z, _queued), sql = sim.eval_added(
        1, "a.3", eval_start=T0 + 295, timestamp=T0 + 300, checkout_time=2, eval_time=3,
        new_builds=[NewBuild(job="z"), NewBuild(job="never-finished")], cached_builds=[(ok, True)],
    )  # fmt: skip
    await hydra.run(
        *sql,
        sim.step_started(z, 1, now=T0 + 310),
        sim.step_finished(z, 1, now=T0 + 320),
        sim.build_finished(z, start=T0 + 310, stop=T0 + 320),
    )
    d, (w,), sql = sim.eval_added(
        2, "b.3", eval_start=T0 + 4995, timestamp=T0 + 5000, checkout_time=1, eval_time=2,
        new_builds=[NewBuild(job="w")],
    )  # fmt: skip
    await hydra.run(
        *sql,
        sim.step_started(w, 1, now=T0 + 5010),
        sim.step_finished(w, 1, now=T0 + 5020),
        sim.build_finished(w, start=T0 + 5010, stop=T0 + 5020),
    )
    return History(a=a, b=b, c=c, d=d, restarted=r)


#: Spans in the live export: A 4 + 14, B 3 + 3 + 5 (restarted: 3 + 2), attempts 2, C 3 + 3, D 3 + 3.
LIVE_SPANS = 43
#: Spans of the backfill of [SINCE, UNTIL): evaluations A, B, C with their finished new builds, every attempt.
FULL = Tally(evaluations=3, builds=9, steps=10, spans=34)


def trace(eval_id: int) -> bytes:
    return ids.trace_id(ids.eval_trace(INSTANCE, eval_id)).to_bytes(16, "big")


def key_in_eval(eval_id: int, kind: str, *local: str | int) -> SpanKey:
    k = ids.eval_trace(INSTANCE, eval_id)
    return ids.trace_id(k).to_bytes(16, "big"), ids.span_id(k, kind, *local).to_bytes(8, "big")


def attempt_root(jobset_id: int, correlation_id: str) -> SpanKey:
    k = ids.attempt_trace(INSTANCE, jobset_id, correlation_id)
    return ids.trace_id(k).to_bytes(16, "big"), ids.root_span_id(k).to_bytes(8, "big")


def by_key(spans: list[ReceivedSpan]) -> dict[SpanKey, bytes]:
    """Spans by (trace ID, span ID) -> resource and encoded span; a key twice must carry the same bytes."""
    out: dict[SpanKey, bytes] = {}
    for s in spans:
        data = json.dumps(s.resource, sort_keys=True).encode() + s.span.SerializeToString(deterministic=True)
        previous = out.setdefault((s.span.trace_id, s.span.span_id), data)
        assert previous == data, f"differing duplicate of span {s.span.name!r}"
    return out


def key(s: ReceivedSpan) -> SpanKey:
    return s.span.trace_id, s.span.span_id


def names(spans: list[ReceivedSpan]) -> list[str]:
    """For failure messages: the spans' names and IDs, sorted."""
    return sorted(f"{s.span.name} {s.span.trace_id.hex()}/{s.span.span_id.hex()}" for s in spans)


def live_only(h: History, live: dict[SpanKey, bytes]) -> set[SpanKey]:
    """What the live export has and a backfill of the period does not rebuild (docs/backfill.md)."""
    return {
        key_in_eval(h.a, "evaluator-run", 1, "a.1"),  # from the eval_started / eval_added moments
        attempt_root(1, "a.2"),  # cached attempt: no JobsetEval row
        attempt_root(2, "b.2"),  # failed attempt: no JobsetEval row
        *(k for k in live if k[0] == trace(h.d)),  # evaluation D is after the period
    }


def options(**overrides: Any) -> BackfillOptions:
    """The period's options (progress as lines, not a terminal), with ``overrides``."""
    return dataclasses.replace(BackfillOptions(since=SINCE, until=UNTIL, tty=False), **overrides)


def config_for(hydra_db: str, receiver: GrpcOtlpReceiver, state_dir: Path) -> Config:
    return daemon_config(hydra_db, f"http://{receiver.endpoint}", state_dir)


async def run_to_end(cfg: Config, opts: BackfillOptions, out: io.StringIO | None = None) -> BackfillResult:
    with trio.fail_after(WATCHDOG):
        return await backfill(cfg, opts, out=out or io.StringIO())


async def test_backfill_equals_the_live_export(
    hydra: Hydra, hydra_db: str, start_daemon: StartDaemon, otlp_grpc: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """Live export, then a backfill of the same period into a fresh receiver: the same spans, byte for byte,
    apart from the live-only ones. A second run does nothing; --restart exports the identical spans again."""
    daemon = await start_daemon()

    async def first_finish_exported() -> None:
        with trio.fail_after(WATCHDOG):
            await otlp_grpc.wait_for_spans(
                lambda got: any(s.span.name == "build r" for s in got), timeout=WATCHDOG
            )

    h = await seed_history(hydra, first_finish_exported)
    with trio.fail_after(WATCHDOG):
        await otlp_grpc.wait_for_spans(LIVE_SPANS, timeout=WATCHDOG)
    await stop(daemon)
    live = by_key(otlp_grpc.spans())
    assert len(live) == LIVE_SPANS == len(otlp_grpc.spans()), names(otlp_grpc.spans())
    extra = live_only(h, live)
    assert extra <= set(live)
    assert len(extra) == 9

    with GrpcOtlpReceiver() as fresh:
        cfg = config_for(hydra_db, fresh, tmp_path)  # the daemon's state directory: separate files
        result = await run_to_end(cfg, options())
        assert (result.complete, result.resumed_after, result.evals_total, result.evals_done) == (
            True,
            0,
            3,
            3,
        )
        assert result.exported == FULL
        assert result.last_eval_id == h.c
        backfilled = by_key(fresh.spans())
        assert len(fresh.spans()) == FULL.spans, names(fresh.spans())
        expected = {k: v for k, v in live.items() if k not in extra}
        assert backfilled == expected, names(
            [
                s
                for s in [*fresh.spans(), *otlp_grpc.spans()]
                if backfilled.get(key(s)) != expected.get(key(s))
            ]
        )
        assert {s.span.trace_id for s in fresh.spans()} == {trace(h.a), trace(h.b), trace(h.c)}

        again = await run_to_end(cfg, options())
        assert (again.already_complete, again.exported) == (True, Tally())
        assert "already complete" in again.summary()

        fresh.clear()
        restarted = await run_to_end(cfg, options(restart=True))
        assert restarted.exported == FULL
        assert by_key(fresh.spans()) == backfilled

        # A --restart interrupted at once replaces the "complete" entry, so the next run resumes.
        store, slow = BackfillProgressFile(tmp_path), options(restart=True, batch=1, rate=1)
        with trio.fail_after(WATCHDOG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(Backfill(cfg, slow, out=io.StringIO()).run)
                while (entry := store.load(slow.key())) is None or entry.complete:  # noqa: ASYNC110 - polled under a deadline
                    await trio.sleep(0.005)
                nursery.cancel_scope.cancel()
        resumed = await run_to_end(cfg, options())
        assert (resumed.already_complete, resumed.complete) == (False, True)
        assert resumed.resumed_after in (0, h.a)
        assert by_key(fresh.spans()) == backfilled
    saved = BackfillProgressFile(tmp_path).load(options().key())
    assert saved is not None
    assert (saved.last_eval_id, saved.complete, saved.until) == (h.c, True, UNTIL)
    assert (tmp_path / "progress.sqlite3").exists(), "the daemon's marks are a separate file"


async def test_dry_run_and_jobset_filter(
    aio_loop: asyncio.AbstractEventLoop,
    hydra: Hydra,
    hydra_db: str,
    otlp_grpc: GrpcOtlpReceiver,
    tmp_path: Path,
) -> None:
    """A dry run counts what a run exports and exports and stores nothing; --jobset selects its evaluations."""
    h = await seed_history(hydra)
    cfg = config_for(hydra_db, otlp_grpc, tmp_path)
    out = io.StringIO()
    dry = await run_to_end(cfg, options(dry_run=True), out)
    assert (dry.dry_run, dry.complete, dry.evals_total, dry.exported) == (True, True, 3, FULL)
    assert "would export 3 evaluations, 9 builds, 10 steps (34 spans)" in dry.summary(2000)
    assert out.getvalue() == ""  # a dry run is quick; off a terminal it prints no progress lines
    # The run has returned, and a run only returns once its exports are acknowledged: none was attempted.
    assert otlp_grpc.attempts == 0
    assert otlp_grpc.spans() == []
    assert not (tmp_path / PROGRESS_FILE).exists()

    tty = io.StringIO()
    staging = await run_to_end(cfg, options(jobsets=("nixpkgs:staging",), tty=True), tty)
    assert staging.exported == Tally(evaluations=1, builds=3, steps=3, spans=11)
    assert {s.span.trace_id for s in otlp_grpc.spans()} == {trace(h.b)}
    assert staging.last_eval_id == h.b
    drawn = tty.getvalue()
    assert drawn.startswith("\r[")
    assert drawn.endswith("\n")
    assert re.fullmatch(
        r"\[#{24}\] 100\.0%  1/1 evals  [\d,]+ spans/s  ETA 0:00:00\x1b\[K\n", drawn.rsplit("\r", 1)[1]
    )
    saved = BackfillProgressFile(tmp_path).load(options(jobsets=("nixpkgs:staging",)).key())
    assert saved is not None
    assert saved.complete

    with pytest.raises(BackfillError, match="no such jobset in the database: nixpkgs:nope"):
        await run_to_end(cfg, options(jobsets=("nixpkgs:trunk", "nixpkgs:nope")))


async def test_interrupted_backfill_resumes(
    aio_loop: asyncio.AbstractEventLoop,
    hydra: Hydra,
    hydra_db: str,
    otlp_grpc: GrpcOtlpReceiver,
    tmp_path: Path,
) -> None:
    """Cancelled after its first acknowledged page, a backfill resumes after it; the union of both runs is
    the full set, and a span received twice is the same bytes."""
    h = await seed_history(hydra)
    cfg = config_for(hydra_db, otlp_grpc, tmp_path)
    # One evaluation per page, 10 spans/s: A's 17 spans go at once, then B waits for tokens.
    slow = options(batch=1, rate=10, line_interval=0)
    out = io.StringIO()
    first = Backfill(cfg, slow, out=out)
    with trio.fail_after(WATCHDOG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.run)
            while first.result.last_eval_id < h.a:  # noqa: ASYNC110 - set by its exporter, polled under a deadline
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert not first.result.complete
    assert first.result.evals_done == 1
    saved = BackfillProgressFile(tmp_path).load(slow.key())
    assert saved is not None
    assert (saved.last_eval_id, saved.evals_done, saved.complete) == (h.a, 1, False)
    assert "backfill: [########----------------]  33.3%  1/3 evals" in out.getvalue()
    interrupted = by_key(otlp_grpc.spans())
    assert len(interrupted) >= 17

    dry = await run_to_end(cfg, options(batch=1, rate=10, dry_run=True))
    assert (dry.resumed_after, dry.exported.evaluations, dry.exported.spans) == (h.a, 2, 17)

    out = io.StringIO()
    second = await run_to_end(cfg, slow, out)
    assert (second.complete, second.resumed_after, second.evals_done) == (True, h.a, 3)
    assert second.exported == Tally(evaluations=2, builds=4, steps=4, spans=17)
    assert f"backfill: resuming after evaluation {h.a} (1 of 3 evaluations done)" in out.getvalue()
    union = by_key(otlp_grpc.spans())  # asserts: no differing duplicates across both runs

    with GrpcOtlpReceiver() as reference:
        await run_to_end(config_for(hydra_db, reference, tmp_path / "other"), options())
        assert union == by_key(reference.spans())


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hydra-otel")
    add_backfill_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["backfill", *argv])


async def test_run_backfill_exit_statuses(
    aio_loop: asyncio.AbstractEventLoop,
    hydra: Hydra,
    hydra_db: str,
    otlp_grpc: GrpcOtlpReceiver,
    tmp_path: Path,
) -> None:
    """The synchronous entry point (own trio loop, here in a worker thread): summary on stdout and 0;
    usage problems 2; an unreachable database 1, without its password."""
    await seed_history(hydra)
    cfg = config_for(hydra_db, otlp_grpc, tmp_path)

    def run(args: argparse.Namespace, config: Config = cfg) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = run_backfill(args, config, out=out, err=err)
        return status, out.getvalue(), err.getvalue()

    async def in_thread(args: argparse.Namespace, config: Config = cfg) -> tuple[int, str, str]:
        with trio.fail_after(WATCHDOG):
            return await trio.to_thread.run_sync(run, args, config)

    status, out, _ = await in_thread(parse("--since", "2023-11-14T22:11:40Z", "--until", str(UNTIL)))
    assert status == 0
    assert re.fullmatch(
        r"backfill complete, 2023-11-14T22:11:40Z to 2023-11-14T22:30:00Z: exported 3 evaluations, 9 builds, "
        r"10 steps \(34 spans\) in 0:00:\d\d; 3/3 evaluations done\n",
        out,
    )
    with trio.fail_after(WATCHDOG):
        await otlp_grpc.wait_for_spans(FULL.spans, timeout=WATCHDOG)

    status, out, err = await in_thread(parse("--since", str(UNTIL), "--until", str(SINCE)))
    assert (status, out) == (2, "")
    assert "empty period" in err

    dsn = "postgresql://hydra:s3cret-pw@127.0.0.1:1/hydra"
    status, out, err = await in_thread(
        parse("--since", "0", "--dry-run"), daemon_config(dsn, "http://127.0.0.1:1", tmp_path)
    )
    assert (status, out) == (1, "")
    assert "cannot read the database postgresql://hydra:***@127.0.0.1:1/hydra" in err
    assert "s3cret" not in err


#: What cli.py's wiring does, for a subprocess (the CLI may not have the command yet).
CLI_SCRIPT = """
import argparse, os, sys
from hydra_otel import config, log
from hydra_otel.backfill import add_backfill_command, run_backfill
parser = argparse.ArgumentParser(prog="hydra-otel")
add_backfill_command(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
cfg = config.load(vars(args), os.environ)
log.configure(cfg.log_level)
sys.exit(run_backfill(args, cfg))
"""


async def test_sigint_stops_and_the_same_command_resumes(
    aio_loop: asyncio.AbstractEventLoop,
    hydra: Hydra,
    hydra_db: str,
    otlp_grpc: GrpcOtlpReceiver,
    tmp_path: Path,
) -> None:
    """A process interrupted by SIGINT after its first page exits 130 with the stored progress; the same
    command line then resumes and completes."""
    h = await seed_history(hydra)
    argv = [
        sys.executable, "-c", CLI_SCRIPT, "backfill", "--since", str(SINCE), "--until", str(UNTIL),
        "--batch", "1", "--rate", "10", "--database-url", hydra_db, "--otlp-endpoint",
        f"http://{otlp_grpc.endpoint}", "--state-dir", str(tmp_path), "--hydra-url", HYDRA_URL,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "OTEL_"))}
    env["OTEL_RESOURCE_ATTRIBUTES"] = "deployment.environment.name=test"
    store = BackfillProgressFile(tmp_path)
    key = options().key()

    def first_page_stored() -> bool:
        saved = store.load(key) if store.path.exists() else None
        return saved is not None and saved.last_eval_id >= h.a

    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with trio.fail_after(WATCHDOG), out_path.open("wb") as out, err_path.open("wb") as err:
        async with trio.open_nursery() as nursery:
            run = functools.partial(trio.run_process, argv, env=env, stdout=out, stderr=err, check=False)
            proc = await nursery.start(run)
            while not first_page_stored():  # noqa: ASYNC110 - written by another process, polled under a deadline
                await trio.sleep(0.02)
            proc.send_signal(signal.SIGINT)
    stderr = err_path.read_text()
    assert proc.returncode == 130, stderr
    assert out_path.read_bytes() == b""
    assert "backfill interrupted" in stderr
    assert "run the same command again to resume" in stderr
    saved = store.load(key)
    assert saved is not None
    assert not saved.complete

    with trio.fail_after(WATCHDOG):
        done = await trio.run_process(argv, env=env, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert f"resuming after evaluation {saved.last_eval_id}" in done.stderr.decode()
    assert done.stdout.decode().startswith("backfill complete, ")
    assert "3/3 evaluations done" in done.stdout.decode()
    with GrpcOtlpReceiver() as reference:
        await run_to_end(config_for(hydra_db, reference, tmp_path / "other"), options())
        assert by_key(otlp_grpc.spans()) == by_key(reference.spans())


def cli_has_backfill() -> bool:
    """Whether cli.py has wired the backfill command in yet."""
    subs = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return any("backfill" in a.choices for a in subs)


@pytest.mark.skipif(not cli_has_backfill(), reason="cli.py does not wire the backfill command yet")
async def test_cli_dry_run(
    aio_loop: asyncio.AbstractEventLoop, hydra: Hydra, hydra_db: str, tmp_path: Path
) -> None:
    """`python -m hydra_otel backfill --dry-run` prints the counts on stdout and exits 0."""
    await seed_history(hydra)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "OTEL_"))}
    argv = [
        sys.executable, "-m", "hydra_otel", "backfill", "--since", str(SINCE), "--until", str(UNTIL),
        "--dry-run", "--database-url", hydra_db, "--state-dir", str(tmp_path),
    ]  # fmt: skip
    with trio.fail_after(WATCHDOG):
        proc = await trio.run_process(argv, env=env, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "would export 3 evaluations, 9 builds, 10 steps (34 spans)" in proc.stdout.decode()
