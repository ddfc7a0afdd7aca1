"""Child processes of the benchmark (receiver, baselines, daemon) and what /proc says about them.

Every child is started in a session of its own, so a Ctrl-C reaches only the benchmark,
which then stops each child itself (``Child.stop``: SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_TICK = os.sysconf("SC_CLK_TCK")


class Child:
    """A child process speaking JSON lines on stdout (and, optionally, commands on stdin)."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, stderr: Any = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.proc.args!r} exited (code {self.proc.wait()}) without answering")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, line: str) -> dict[str, Any]:
        self.send(line)
        return self.read()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def script(name: str, *args: str) -> list[str]:
    """The command line that runs benchmarks/NAME with this Python."""
    return [sys.executable, str(HERE / name), *args]


class Receiver(Child):
    """The OTLP receiver process (otlp_sink.py)."""

    def __init__(self) -> None:
        super().__init__(script("otlp_sink.py"))
        self.port = int(self.read()["port"])
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def expect(self, path: Path, span_ids: list[int]) -> dict[str, Any]:
        path.write_bytes(b"".join(i.to_bytes(8, "big") for i in span_ids))
        return self.ask(f"expect {path}")

    def wait_expected(self, *, stall: float, limit: float) -> dict[str, Any]:
        """Poll until every expected span arrived, or none came for ``stall`` s, or ``limit`` s passed."""
        start = time.monotonic()
        last_got, last_change = -1, start
        while True:
            st = self.ask("stats")
            now = time.monotonic()
            if st["got"] >= st["expected"]:
                return st
            if st["got"] != last_got:
                last_got, last_change = st["got"], now
            if now - last_change > stall or now - start > limit:
                return st
            time.sleep(0.02)

    def settle(self, quiet: float = 1.5, limit: float = 60.0) -> None:
        """Wait until no span arrived for ``quiet`` seconds."""
        start = time.monotonic()
        spans, since = -1, start
        while time.monotonic() - start < limit:
            n = self.ask("stats")["spans"]
            if n != spans:
                spans, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.1)

    def arrivals(self, path: Path) -> dict[int, float]:
        self.ask(f"dump {path}")
        raw = path.read_bytes()
        return dict(struct.iter_unpack(">Qd", raw))

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        super().stop(timeout)


class Daemon:
    """``python -m hydra_otel run`` as a subprocess; its JSON log lines are collected from stderr."""

    def __init__(self, env: dict[str, str], *, cprofile: Path | None = None) -> None:
        argv = [sys.executable]
        if cprofile is not None:
            argv += ["-m", "cProfile", "-o", str(cprofile)]
        argv += ["-m", "hydra_otel", "run"]
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"message": line.rstrip(), "level": "raw"}
            with self._cond:
                self.lines.append(entry)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, message: str, timeout: float) -> dict[str, Any]:
        """The first log line with this message; raises if the daemon exits or time runs out first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for entry in self.lines:
                    if entry.get("message") == message:
                        return entry
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(str(e) for e in self.lines[-15:])
                    raise RuntimeError(
                        f"the daemon did not log {message!r} (exit {self.proc.poll()}):\n{tail}"
                    )
                self._cond.wait(min(left, 0.5))

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the daemon drains and logs "stopped"), then SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def _stat_fields(stat: str) -> list[str]:
    """The fields of a /proc ``stat`` line after the command name (which may hold spaces and ")");
    index 1 is the parent ID, 11 and 12 utime and stime, 13 and 14 those of waited-for children."""
    return stat.rsplit(")", 1)[1].split()


def family(pid: int) -> list[int]:
    """``pid`` and its live descendants (the daemon's span export process), from /proc's parent IDs."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields((entry / "stat").read_text())[1])
        except (OSError, IndexError, ValueError):  # it ended meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` and of its children (live ones and reaped ones) so far."""
    total = 0
    for i, p in enumerate(family(pid)):
        try:
            fields = _stat_fields(Path(f"/proc/{p}/stat").read_text())
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
        if i == 0:  # cutime + cstime: children that ended and were waited for
            total += int(fields[13]) + int(fields[14])
    return total / _TICK


def cpu_by_thread(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``pid`` (summed by thread name), and of its live children.

    Names as the kernel has them: "python" for the Trio thread (the main one), "Trio thread N"
    for trio's worker threads (the export worker), gRPC's own threads by theirs; a child
    process counts as one entry, "child <name>". Python before 3.14 gives the kernel no name
    for its own threads, so the read pacer's watch thread counts as "python" too (a look at the
    socket every 50 ms while reads are paused, about 90 µs each here: some 0.2 % of a core).
    """
    out: dict[str, float] = {}
    for i, p in enumerate(family(pid)):
        tasks = Path(f"/proc/{p}/task")
        try:
            stats = (
                [(t / "stat").read_text() for t in tasks.iterdir()]
                if i == 0
                else [Path(f"/proc/{p}/stat").read_text()]
            )
        except OSError:
            continue
        for stat in stats:
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = _stat_fields(stat)
            key = name if i == 0 else f"child {name}"
            out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
    return out


def thread_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Each thread's share of the CPU spent between two :func:`cpu_by_thread` readings, largest first."""
    spent = {k: v - before.get(k, 0.0) for k, v in after.items()}
    total = sum(spent.values()) or 1.0
    return dict(sorted(((k, v / total) for k, v in spent.items() if v > 0), key=lambda kv: -kv[1]))


def memory_kb(pid: int, pids: list[int] | None = None) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in kB, summed over ``pid`` and its live descendants (or ``pids``)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in family(pid) if pids is None else pids:
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] += int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS of ``pid`` and its descendants (Linux >= 4.0, needs the right)."""
    try:
        for p in family(pid):
            Path(f"/proc/{p}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; ``peak()`` since the last mark."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval, self.max_kb = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pids, n = [self.pid], 0
        while not self._stop.wait(self.interval):
            if n % 50 == 0:  # scanning /proc for the family costs more than reading two status files
                pids = family(self.pid)
            n += 1
            try:
                rss = memory_kb(self.pid, pids)["VmRSS"]
            except (OSError, KeyError):
                return
            self.max_kb = max(self.max_kb, rss)

    def mark(self) -> None:
        self.max_kb = 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
