"""The chaos run: a mixed Hydra workload, random faults, then the receiver checked against the database.

A private PostgreSQL server with Hydra's schema, an in-process OTLP/gRPC receiver and the real
daemon (``python -m hydra_otel run``, a subprocess) run while :mod:`tests.chaos.workload` plays
Hydra. At random moments drawn from one seeded generator, one fault at a time:

* ``pg_restart``: PostgreSQL fast-restarted (every session terminated, down for a moment);
* ``listen_killed``: the daemon's LISTEN backend terminated (``pg_terminate_backend``);
* ``backends_killed``: every backend of the daemon terminated;
* ``daemon_killed``: the daemon SIGKILLed, and started again a moment later;
* ``collector_unavailable``: the collector answering UNAVAILABLE for a few seconds.

Hydra keeps working through every fault except a PostgreSQL restart (its own connection waits
for the server). Afterwards every build still queued is finished, the daemon is given time to
export, stopped with SIGTERM (it must exit 0), and :mod:`tests.chaos.check` compares. The daemon
must never exit on its own (if it does, that is recorded, and it is started again so the run
goes on) nor log an error (a pipeline restarted in-process after an unexpected error is a bug
too). The report prints the seed and the fault log, so a failing run can be replayed
(the moments and the workload's choices replay; the machine's timing does not).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio_asyncio

from hydra_otel.demo.sandbox.pgcluster import PgCluster
from hydra_otel.demo.sandbox.receiver import GrpcOtlpReceiver
from tests.chaos import check
from tests.chaos.workload import Driver, Workload
from tests.integration.workload import DaemonProcess as LoggingDaemon

FAULTS = ("pg_restart", "listen_killed", "backends_killed", "daemon_killed", "collector_unavailable")
INSTANCE = "hydra"
#: Seconds after the end of the workload by which everything must have arrived: a gap is closed
#: by a follow-up scan 3 s after the recovery, not by the periodic scan (30 s). Later is a failure.
SLOW = 15.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """How big a run is."""

    seed: int
    faults: int = 20
    #: seconds between faults, drawn uniformly
    gap: tuple[float, float] = (1.0, 4.0)
    #: seconds between workload actions, drawn uniformly
    pace: tuple[float, float] = (0.02, 0.25)
    #: seconds the daemon gets to export everything at the end
    settle: float = 75.0
    #: the kinds of fault to draw from
    kinds: tuple[str, ...] = FAULTS


@dataclass
class Fault:
    """One injected fault, for the log."""

    at: float
    kind: str
    detail: str
    took: float


@dataclass
class Report:
    """What a run did and found; ``failures`` empty means it passed."""

    settings: Settings
    faults: list[Fault] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """The report: seed, fault log, figures, failures."""
        lines = [f"chaos run, seed {self.settings.seed}: {len(self.faults)} faults"]
        lines += [f"  {f.at:7.2f}s  {f.kind:<22} {f.detail} ({f.took:.2f}s)" for f in self.faults]
        lines += [f"  {k}: {v}" for k, v in self.stats.items()]
        if self.failures:
            lines.append(f"FAILED ({len(self.failures)} problems), replay with --seed {self.settings.seed}:")
            lines += [f"  - {f}" for f in self.failures[:60]]
            if len(self.failures) > 60:
                lines.append(f"  ... and {len(self.failures) - 60} more")
        else:
            lines.append("passed")
        return "\n".join(lines)


@dataclass
class DaemonProcess(LoggingDaemon):
    """One ``hydra-otel run`` process of the chaos run, its JSON log lines and whether we killed it."""

    killed: bool = False

    def said(self, message: str) -> bool:
        return any(line.get("message") == message for line in self.lines)

    def tail(self, n: int = 8) -> str:
        return " | ".join(
            f"{line.get('level')}: {line.get('message')}"
            + (f" [{line['exception'].splitlines()[-1]}]" if isinstance(line.get("exception"), str) else "")
            for line in self.lines[-n:]
        )


class Supervisor:
    """Starts the daemon, kills it on purpose, and notices when it ends on its own."""

    def __init__(self, env: dict[str, str], nursery: trio.Nursery, report: Report, t0: float) -> None:
        self._env, self._nursery, self._report, self._t0 = env, nursery, report, t0
        self.current: DaemonProcess | None = None
        self.every: list[DaemonProcess] = []
        self.starts = 0

    async def start(self) -> None:
        """Start a daemon and wait until it is ready."""
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "hydra_otel", "run"], env=self._env, stderr=subprocess.PIPE
        )
        daemon = DaemonProcess(proc)
        self.current = daemon
        self.every.append(daemon)
        self.starts += 1
        self._nursery.start_soon(daemon.collect)
        self._nursery.start_soon(self._watch, daemon)
        with trio.fail_after(60):
            while not daemon.said("ready"):
                if proc.returncode is not None:
                    return  # _watch records it and starts another
                await trio.sleep(0.02)

    async def _watch(self, daemon: DaemonProcess) -> None:
        code = await daemon.process.wait()
        if daemon.killed:
            return
        at = trio.current_time() - self._t0
        await trio.sleep(0.2)  # let the last log lines in
        self._report.failures.append(
            f"the daemon exited on its own with code {code} at {at:.2f}s; last log lines: {daemon.tail()}"
        )
        if self.current is daemon:
            await self.start()

    def listen_pid(self) -> int | None:
        """The backend PID of the current daemon's LISTEN connection (from its ``LISTEN active`` lines)."""
        assert self.current is not None
        pids = [
            line.get("backend_pid") for line in self.current.lines if line.get("message") == "LISTEN active"
        ]
        return pids[-1] if pids else None

    async def kill(self) -> None:
        """SIGKILL the current daemon and wait until it is gone."""
        assert self.current is not None
        self.current.killed = True
        self.current.process.send_signal(signal.SIGKILL)
        await self.current.process.wait()

    async def stop(self) -> int:
        """SIGTERM the current daemon; its exit code."""
        assert self.current is not None
        daemon = self.current
        daemon.killed = True  # an exit we asked for
        daemon.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(30):
            return await daemon.process.wait()
        daemon.process.kill()
        await daemon.process.wait()
        return -1


class Chaos:
    """One run; see the module docstring."""

    def __init__(self, settings: Settings, cluster: PgCluster, receiver: GrpcOtlpReceiver, state_dir: Path):
        self.s = settings
        self.cluster = cluster
        self.receiver = receiver
        self.dsn = cluster.dsn("hydra")
        self.report = Report(settings)
        self.fault_rng = random.Random(f"{settings.seed}/faults")
        self.driver = Driver(self.dsn)
        self.workload = Workload(self.driver, random.Random(f"{settings.seed}/workload"))
        self.env = {
            **os.environ,
            "HYDRA_OTEL_DATABASE_URL": self.dsn,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}",
            "HYDRA_OTEL_STATE_DIR": str(state_dir),
            "HYDRA_OTEL_INSTANCE": INSTANCE,
            "HYDRA_OTEL_EXPORT_DELAY": "0.05",
            "HYDRA_OTEL_EXPORT_MAX_BACKOFF": "1",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1000",
        }

    async def run(self) -> Report:
        t0 = self.t0 = trio.current_time()
        async with self.driver.gate:
            await self.driver.connect()
        await self.workload.setup()
        async with trio.open_nursery() as nursery:
            daemon = Supervisor(self.env, nursery, self.report, t0)
            await daemon.start()
            stop_playing, played = trio.Event(), trio.Event()
            nursery.start_soon(self._play, stop_playing, played)
            await self._inject(daemon, t0)
            stop_playing.set()
            await played.wait()  # the action in progress ends first
            await self._settle_and_check(daemon)
            nursery.cancel_scope.cancel()
        await self.driver.close()
        self.report.stats["daemon starts"] = daemon.starts
        self.report.stats["seconds"] = round(trio.current_time() - t0, 1)
        return self.report

    async def _play(self, stop: trio.Event, played: trio.Event) -> None:
        counts: dict[str, int] = {}
        while not stop.is_set():
            name = await self.workload.step()
            counts[name] = counts.get(name, 0) + 1
            await trio.sleep(self.workload.rng.uniform(*self.s.pace))
        self.report.stats["workload actions"] = dict(sorted(counts.items()))
        played.set()

    def _kinds(self) -> list[str]:
        """Every kind once (shuffled) first, then random ones."""
        first = list(self.s.kinds)
        self.fault_rng.shuffle(first)
        rest = [self.fault_rng.choice(self.s.kinds) for _ in range(max(0, self.s.faults - len(first)))]
        return (first + rest)[: self.s.faults]

    async def _inject(self, daemon: Supervisor, t0: float) -> None:
        for kind in self._kinds():
            await trio.sleep(self.fault_rng.uniform(*self.s.gap))
            started = trio.current_time()
            detail = await getattr(self, f"_{kind}")(daemon)
            self.report.faults.append(Fault(started - t0, kind, detail, trio.current_time() - started))

    async def _pg_restart(self, daemon: Supervisor) -> str:
        down = self.fault_rng.uniform(0.2, 2.0)
        async with self.driver.gate:  # Hydra waits for its server; nothing of its in flight
            await trio.to_thread.run_sync(self.cluster.stop_server, "fast")
            await trio.sleep(down)
            await trio.to_thread.run_sync(self.cluster.start_server)
            await self.driver.connect()
        return f"down {down:.1f}s"

    async def _listen_killed(self, daemon: Supervisor) -> str:
        pid = daemon.listen_pid()
        if pid is None:
            return "no LISTEN connection to kill"
        rows = await self.driver.fetch("SELECT pg_terminate_backend($1) AS ok", pid)
        return f"backend {pid}: {rows[0]['ok']}"

    async def _backends_killed(self, daemon: Supervisor) -> str:
        rows = await self.driver.fetch(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
            "WHERE application_name = 'hydra-otel' AND pid <> pg_backend_pid()"
        )
        return f"{rows[0]['n']} backends"

    async def _daemon_killed(self, daemon: Supervisor) -> str:
        await daemon.kill()
        down = self.fault_rng.uniform(0.3, 3.0)
        await trio.sleep(down)
        await daemon.start()
        return f"down {down:.1f}s"

    async def _collector_unavailable(self, daemon: Supervisor) -> str:
        down = self.fault_rng.uniform(1.0, 5.0)
        self.receiver.set_down()
        await trio.sleep(down)
        self.receiver.set_up()
        return f"UNAVAILABLE for {down:.1f}s"

    async def _settle_and_check(self, daemon: Supervisor) -> None:
        await self.workload.finish_all()
        evals = await self.driver.fetch("SELECT id, timestamp, evaltime FROM jobsetevals ORDER BY id")
        builds = await self.driver.fetch("SELECT id, finished, buildstatus, stoptime FROM builds ORDER BY id")
        steps = await self.driver.fetch(
            "SELECT build, stepnr, status, starttime, stoptime FROM buildsteps ORDER BY build, stepnr"
        )
        expected, problems = check.expected_spans(INSTANCE, evals, builds, steps, self.workload.builds)
        self.report.failures += problems
        settle_start = trio.current_time()
        slow: list[str] = []
        with trio.move_on_after(self.s.settle):
            while lost := check.missing(expected, self.receiver.spans()):
                if not slow and trio.current_time() - settle_start > SLOW:
                    slow = [e.what for e in lost]
                await trio.sleep(0.25)
        if slow:
            self.report.failures.append(f"still missing {SLOW:g}s after the workload: {', '.join(slow[:20])}")
            for what in slow[:5]:
                build = self.workload.builds.get(int(what.split()[1].split(".")[0]))
                if build is not None:
                    self.report.stats[f"  build {build.build_id}"] = [
                        (a.status, a.stop, round(a.played_at - self.t0, 2)) for a in build.attempts
                    ]
        self.report.stats["settled in (s)"] = round(trio.current_time() - settle_start, 1)
        code = await daemon.stop()
        if code != 0:
            self.report.failures.append(
                f"SIGTERM: the daemon exited with {code}, not 0: {daemon.current and daemon.current.tail()}"
            )
        for n, process in enumerate(daemon.every, 1):
            self.report.failures += [
                f"daemon {n} logged an error: {line.get('message')}"
                + (
                    f" [{line['exception'].splitlines()[-1]}]"
                    if isinstance(line.get("exception"), str)
                    else ""
                )
                for line in process.lines
                # hydra-otel's own: the OTLP exporter library logs each refused export as an error
                if line.get("level") == "error" and str(line.get("logger", "")).startswith("hydra_otel")
            ]
        spans = self.receiver.spans()
        lost = check.missing(expected, spans)
        self.report.failures += [f"missing: {e.what}" for e in lost]
        self.report.failures += [f"orphan: {o}" for o in check.orphans(spans)]
        self.report.failures += [f"different content: {d}" for d in check.differing_duplicates(spans)]
        self.report.failures += check.mismatches(expected, spans)
        attempts = sum(len(b.attempts) for b in self.workload.builds.values())
        self.report.stats.update(
            {
                "evaluations": len(evals),
                "builds": len(builds),
                "build attempts": attempts,
                "steps": len(steps),
                "expected spans": len(expected),
                "spans received": len(spans),
                "distinct spans": len({(s.span.trace_id, s.span.span_id) for s in spans}),
            }
        )


def chaos(settings: Settings) -> Report:
    """Run one chaos run in its own PostgreSQL server and receiver (blocking)."""
    with PgCluster() as cluster, GrpcOtlpReceiver() as receiver, tempfile.TemporaryDirectory() as tmp:
        cluster.createdb("hydra")

        async def main() -> Report:
            async with trio_asyncio.open_loop():
                return await Chaos(settings, cluster, receiver, Path(tmp)).run()

        return trio.run(main)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.chaos [--seed N] [--faults N] [--runs N]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="just chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, help="replay this seed (default: a new one)")
    parser.add_argument("--faults", type=int, default=20, help="faults per run (default 20)")
    parser.add_argument("--runs", type=int, default=1, help="runs, with seeds seed, seed+1, ...")
    parser.add_argument(
        "--only",
        default=",".join(FAULTS),
        help=f"comma-separated kinds of fault (default: all of {', '.join(FAULTS)})",
    )
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.only.split(",") if k)
    if unknown := set(kinds) - set(FAULTS):
        parser.error(f"unknown kinds of fault: {', '.join(sorted(unknown))}")
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    failed = 0
    for n in range(args.runs):
        report = chaos(Settings(seed=seed + n, faults=args.faults, kinds=kinds))
        print(report.text(), flush=True)
        failed += bool(report.failures)
    return 1 if failed else 0
