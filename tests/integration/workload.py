"""Known workloads for the "nothing lost" tests, and the exact spans they must produce.

:class:`Expected` computes the (trace ID, span ID) of every span a workload must
produce with the core ID functions (``hydra_otel.core.ids``), independently of
the daemon's rendering code. :class:`Player` plays Hydra's actions through the
scripted :class:`~tests.integration.harness.Hydra` with times near the real
clock (catch-up scans only look at the last minutes) and records what each
action must produce. :func:`assert_exactly` compares what a receiver got with
the expected set: none missing, none extra, and no two spans with the same IDs
but different bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from hydra_otel import config
from hydra_otel.config import Config
from hydra_otel.core import ids
from hydra_otel.demo.sandbox.hydrasim import NewBuild
from hydra_otel.demo.sandbox.receiver import ReceivedSpan, TraceSink, attributes_dict
from hydra_otel.pipeline.factories import make_sink
from hydra_otel.service import Service
from tests.integration.harness import HYDRA_URL, Hydra

INSTANCE = "hydra"

#: (trace ID, span ID) as the receiver's protobuf has them: 16 and 8 big-endian bytes.
SpanKey = tuple[bytes, bytes]


def span_key(trace: ids.TraceKey, span_id: int) -> SpanKey:
    """The receiver-side key of span ``span_id`` in trace ``trace``."""
    return ids.trace_id(trace).to_bytes(16, "big"), span_id.to_bytes(8, "big")


def received_key(span: ReceivedSpan) -> SpanKey:
    """The key of a received span."""
    return bytes(span.span.trace_id), bytes(span.span.span_id)


@dataclass
class Expected:
    """The spans a workload must produce, by key, with a readable name for messages."""

    instance: str = INSTANCE
    names: dict[SpanKey, str] = field(default_factory=dict)

    @property
    def keys(self) -> set[SpanKey]:
        """Every expected key."""
        return set(self.names)

    def evaluation(self, eval_id: int) -> None:
        """Root, ``checkout`` and ``evaluate`` of an evaluation with a JobsetEval row."""
        key = ids.eval_trace(self.instance, eval_id)
        self.names[span_key(key, ids.root_span_id(key))] = f"eval {eval_id}"
        for phase in ("checkout", "evaluate"):
            self.names[span_key(key, ids.span_id(key, phase))] = f"eval {eval_id} {phase}"

    def attempt(self, jobset_id: int, correlation_id: str) -> None:
        """The root span of an attempt with no JobsetEval row (failed, cached, abandoned)."""
        key = ids.attempt_trace(self.instance, jobset_id, correlation_id)
        self.names[span_key(key, ids.root_span_id(key))] = f"attempt {jobset_id}/{correlation_id}"

    def build(self, eval_id: int, build_id: int, attempt: int = 0, *, queued: bool) -> None:
        """The span of one finished attempt of a build in its evaluation's trace, with its ``queued`` wait."""
        key = ids.eval_trace(self.instance, eval_id)
        self.names[span_key(key, ids.span_id(key, "build", build_id, attempt))] = (
            f"build {build_id} attempt {attempt}"
        )
        if queued:
            self.names[span_key(key, ids.span_id(key, "queued", build_id, attempt))] = (
                f"queued {build_id} attempt {attempt}"
            )

    def step(self, eval_id: int, build_id: int, stepnr: int) -> None:
        """The span of one finished step of a build in its evaluation's trace."""
        key = ids.eval_trace(self.instance, eval_id)
        self.names[span_key(key, ids.span_id(key, "step", build_id, stepnr))] = f"step {build_id}.{stepnr}"


def merge_tx(*scripts: str) -> str:
    """One transaction made of several ``HydraSim`` transactions (their BEGIN/COMMIT removed)."""
    body = [line for s in scripts for line in s.splitlines() if line not in ("BEGIN;", "COMMIT;")]
    return "\n".join(("BEGIN;", *body, "COMMIT;"))


def now() -> int:
    """The wall clock in Unix seconds (the sandbox database runs on the same machine)."""
    return int(time.time())


@dataclass
class Player:
    """Plays Hydra's actions with times near the real clock, recording the spans each must produce."""

    hydra: Hydra
    expected: Expected = field(default_factory=Expected)
    #: build ID -> the evaluation that created it
    owner: dict[int, int] = field(default_factory=dict)
    #: build ID -> the next step number
    next_step: dict[int, int] = field(default_factory=dict)
    #: build ID -> when its last attempt stopped
    last_stop: dict[int, int] = field(default_factory=dict)

    async def evaluation(
        self, jobset_id: int, jobs: int, *, correlation_id: str = ""
    ) -> tuple[int, list[int]]:
        """A finished evaluation creating ``jobs`` builds (no eval_started: no live-only span)."""
        t = now()
        eval_id, builds, sql = self.hydra.sim.eval_added(
            jobset_id,
            correlation_id or f"{jobset_id}.{t}",
            eval_start=t - 40,
            timestamp=t - 30,
            checkout_time=5,
            eval_time=10,
            new_builds=[NewBuild(job=f"job{i}") for i in range(jobs)],
        )
        await self.hydra.run(*sql)
        self.expected.evaluation(eval_id)
        for b in builds:
            self.owner[b] = eval_id
            self.next_step[b] = 1
        return eval_id, builds

    def finish_sql(self, build_id: int, *, status: int = 0) -> list[str]:
        """A build attempt of one step that finishes now (three transactions).

        Its spans: the build attempt, its step and, for a first attempt, its ``queued`` wait. A
        later attempt (after :meth:`restart`) starts after the previous one stopped, as in Hydra.
        """
        nr = self.next_step[build_id]
        self.next_step[build_id] = nr + 1
        start = max(now() - 10, self.last_stop.get(build_id, 0) + 1)
        stop = max(now() - 5, start + 1)
        self.last_stop[build_id] = stop
        sim, eval_id = self.hydra.sim, self.owner[build_id]
        self.expected.build(eval_id, build_id, nr - 1, queued=nr == 1)
        self.expected.step(eval_id, build_id, nr)
        error = None if status == 0 else "builder failed"
        return [
            sim.step_started(build_id, nr, now=start),
            sim.step_finished(build_id, nr, now=stop, status=status, error=error),
            sim.build_finished(build_id, start=start, stop=stop, status=status),
        ]

    async def finish(self, build_id: int, *, status: int = 0) -> None:
        """Run :meth:`finish_sql`."""
        await self.hydra.run(*self.finish_sql(build_id, status=status))

    async def fail_with_dependents(self, bad: int, dependents: Sequence[int]) -> None:
        """``bad`` fails in its step; each dependent gets a propagated failure step and finishes."""
        t, sim, eval_id = now(), self.hydra.sim, self.owner[bad]
        await self.hydra.run(
            sim.step_started(bad, 1, now=t - 10),
            sim.step_finished(bad, 1, now=t - 5, status=1, error="builder failed with exit code 1"),
            sim.build_failed_with_dependents(
                bad, start=t - 10, stop=t - 5, dependents=[(d, 1) for d in dependents]
            ),
        )
        self.expected.build(eval_id, bad, queued=True)
        self.expected.step(eval_id, bad, 1)
        for d in dependents:
            self.expected.build(self.owner[d], d, queued=False)
            self.expected.step(self.owner[d], d, 1)

    async def cancel(self, build_id: int, at: int | None = None) -> None:
        """The web UI's cancel: only the payload-less ``builds_cancelled`` trigger fires."""
        await self.hydra.run(self.hydra.sim.cancel(build_id, now() if at is None else at))
        self.expected.build(self.owner[build_id], build_id, queued=False)

    async def substituted_step(self, build_id: int) -> None:
        """A substitution step of a still-running build: inserted finished, with no notification at all."""
        t, nr = now(), self.next_step[build_id]
        self.next_step[build_id] = nr + 1
        await self.hydra.run(self.hydra.sim.substituted_step(build_id, nr, start=t - 4, stop=t - 3))
        self.expected.step(self.owner[build_id], build_id, nr)

    async def restart(self, build_id: int) -> None:
        """The web UI's restart (``builds_restarted`` fires); the next finish is a new attempt."""
        await self.hydra.run(self.hydra.sim.restart(build_id))

    async def fetch_failed_unseen(self, jobset_id: int, at: int) -> None:
        """A fetch failure whose eval_failed nobody hears: catch-up finds it by ``lastcheckedtime``."""
        await self.hydra.run(
            self.hydra.sim.eval_fetch_failed(jobset_id, f"lost.{at}", at, "cannot fetch 'src'")
        )
        self.expected.attempt(jobset_id, f"lastchecked-{at}")


def assert_exactly(
    spans: Sequence[ReceivedSpan], expected: Expected, *, identical_repeats: bool = False
) -> None:
    """The spans are exactly the expected ones: none missing, none extra, no differing duplicates.

    Args:
        spans: everything the receiver accepted.
        expected: the spans the workload must produce.
        identical_repeats: whether a span may arrive more than once (byte-identical), as after a crash.
    """
    encodings: dict[SpanKey, set[bytes]] = {}
    counts: Counter[SpanKey] = Counter()
    names: dict[SpanKey, str] = {}
    for s in spans:
        k = received_key(s)
        encodings.setdefault(k, set()).add(s.span.SerializeToString())
        counts[k] += 1
        names[k] = s.span.name
    missing = sorted(expected.names[k] for k in expected.keys - set(encodings))
    attrs = {received_key(s): attributes_dict(s.span.attributes) for s in spans}
    extra = sorted(f"{names[k]} {k[0].hex()}/{k[1].hex()} {attrs[k]}" for k in set(encodings) - expected.keys)
    differing = sorted(names[k] for k, e in encodings.items() if len(e) > 1)
    assert not missing, f"missing spans: {missing}"
    assert not extra, f"unexpected spans: {extra}"
    assert not differing, f"same IDs, different bytes: {differing}"
    if not identical_repeats:
        repeated = sorted(f"{names[k]} x{n}" for k, n in counts.items() if n > 1)
        assert not repeated, f"repeated spans: {repeated}"


async def wait_for_expected(
    receiver: TraceSink[Any],
    expected: Expected,
    *alive: Daemon,
    timeout: float = 15.0,  # noqa: ASYNC109 - a test helper's own deadline
) -> list[ReceivedSpan]:
    """Wait until every expected span has arrived, failing at once if one of ``alive`` ends."""

    def arrived(got: Sequence[ReceivedSpan]) -> bool:
        for daemon in alive:
            daemon.check_alive()
        return expected.keys <= {received_key(s) for s in got}

    try:
        return await receiver.wait_for_spans(arrived, timeout=timeout)
    except trio.TooSlowError:
        got = {received_key(s) for s in receiver.spans()}
        missing = sorted(expected.names[k] for k in expected.keys - got)
        raise trio.TooSlowError(f"still missing after {timeout:g}s: {missing}") from None


def make_config(
    dsn: str, endpoint: str, state_dir: Path, *, environ: Mapping[str, str] | None = None, **flags: str
) -> Config:
    """Like ``harness.daemon_config``, plus environment variables (e.g. ``OTEL_EXPORTER_OTLP_TIMEOUT``)."""
    values: dict[str, str | None] = {
        "database_url": dsn,
        "hydra_url": HYDRA_URL,
        "otlp_endpoint": endpoint,
        "state_dir": str(state_dir),
        "export_delay": "0.05",
        "shutdown_grace": "5",
    }
    values.update(flags)
    return config.load(
        values, {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test", **(environ or {})}
    )


@dataclass
class Daemon:
    """An in-process daemon; ``error`` holds what ``Service.run`` raised, if anything."""

    service: Service
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None

    async def run(self) -> None:
        """Run the service, recording (not raising) how it failed, so the test can assert on it."""
        try:
            await self.service.run()
        except Exception as exc:  # noqa: BLE001 - recorded for the test to assert on
            self.error = exc
        finally:
            self.done.set()

    def check_alive(self) -> None:
        """Fail if the daemon has ended on its own."""
        if self.done.is_set() and not self.service.stopping:
            raise AssertionError(f"the daemon ended unexpectedly: {self.error!r}")

    async def stop(self, *, timeout: float = 15.0) -> None:  # noqa: ASYNC109 - a test helper's own deadline
        """Stop gracefully (a no-op once it has ended) and wait until it has."""
        if not self.done.is_set():
            self.service.stop()
        with trio.fail_after(timeout):
            await self.done.wait()


@dataclass
class Daemons:
    """Starts in-process daemons in a nursery; the test fixture stops every one at teardown."""

    nursery: trio.Nursery
    dsn: str
    endpoint: str
    state_dir: Path
    started: list[Daemon] = field(default_factory=list)

    def config(
        self,
        *,
        endpoint: str | None = None,
        dsn: str | None = None,
        environ: Mapping[str, str] | None = None,
        **flags: str,
    ) -> Config:
        """A configuration for the test's database, receiver and state directory unless overridden."""
        return make_config(
            dsn or self.dsn, endpoint or self.endpoint, self.state_dir, environ=environ, **flags
        )

    async def start(self, cfg: Config | None = None, *, ready_within: float = 15.0) -> Daemon:
        """Run a daemon (default configuration unless given) and wait until it is ready."""
        cfg = cfg or self.config()
        daemon = Daemon(Service(cfg=cfg, sink=make_sink(cfg)))
        self.started.append(daemon)
        self.nursery.start_soon(daemon.run)
        with trio.fail_after(ready_within):
            while not daemon.service.ready.is_set():
                daemon.check_alive()
                await trio.sleep(0.01)
        return daemon

    async def stop_all(self) -> None:
        """Stop every daemon started."""
        for daemon in self.started:
            await daemon.stop()


@dataclass
class DaemonProcess:
    """A ``hydra-otel run`` subprocess whose JSON log lines (stderr) are collected as they come."""

    process: trio.Process
    lines: list[dict[str, Any]] = field(default_factory=list)

    async def collect(self) -> None:
        """Read log lines until the process closes stderr."""
        stream, buffer = self.process.stderr, b""
        assert stream is not None
        while chunk := await stream.receive_some():
            *complete, buffer = (buffer + chunk).split(b"\n")
            for line in complete:
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.lines.append({"message": line.decode(errors="replace"), "level": "unparsed"})

    async def wait_for(self, message: str, *, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """Wait until a log line has ``message``; fail at once if the process exits first."""
        with trio.fail_after(timeout):
            while not any(line.get("message") == message for line in self.lines):
                if self.process.returncode is not None:
                    raise AssertionError(f"exited {self.process.returncode} before {message!r}: {self.lines}")
                await trio.sleep(0.01)


@asynccontextmanager
async def daemon_processes(env: Mapping[str, str]) -> AsyncIterator[Callable[[], Awaitable[DaemonProcess]]]:
    """Yield a function starting ``python -m hydra_otel run`` with ``env``; every process is killed on exit."""
    started: list[DaemonProcess] = []
    async with trio.open_nursery() as nursery:

        async def spawn() -> DaemonProcess:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "hydra_otel", "run"], env=dict(env), stderr=subprocess.PIPE
            )
            daemon = DaemonProcess(proc)
            started.append(daemon)
            nursery.start_soon(daemon.collect)
            return daemon

        try:
            yield spawn
        finally:
            with trio.CancelScope(shield=True):
                for daemon in started:
                    if daemon.process.returncode is None:
                        daemon.process.kill()
                        await daemon.process.wait()
