"""py-spy, attached to the daemon during the bursts, and a summary of what it saw."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME_LINE = re.compile(r":\d+\)$")


def find_py_spy() -> str | None:
    """py-spy next to this Python (a venv), else on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class PySpy:
    """``py-spy record`` in raw (collapsed stacks) format; stopped with SIGINT, which writes the file."""

    def __init__(self, exe: str, pid: int, out: Path, rate: int = 200) -> None:
        self.out = out
        argv = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
        argv += ["--output", str(out), "--nonblocking", "--threads"]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )

    def stop(self) -> str:
        """Stop recording; returns py-spy's messages."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        err = ""
        if self.proc.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                err = self.proc.stderr.read()
                self.proc.stderr.close()
        return err


def _function(frame: str) -> str:
    """``fetch (hydra_otel/adapters/db.py:107)`` -> ``fetch (hydra_otel/adapters/db.py)``."""
    frame = _FRAME_LINE.sub(")", frame)
    return frame.replace("/site-packages/", "/…/").split("/lib/python3", 1)[-1]


def _package(frame: str) -> str:
    """The library a frame belongs to (``trio``, ``asyncpg``, ``opentelemetry``, ...)."""
    inside = frame[frame.rfind("(") + 1 :].rstrip(")")
    return inside.split("/", 1)[0] if "/" in inside else inside.split(".", 1)[0]


#: Pipeline stages: (stage, substrings that must all be on the stack); first match wins.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("export thread: OTLP protobuf encoding", ("worker_fn", "_translate_data")),
    ("export thread: gRPC call", ("worker_fn", "grpc/")),
    ("export thread: other", ("worker_fn",)),
    ("listener: sink (asyncpg -> raw channel)", ("adapters/db.py", "sink")),
    ("listener: asyncpg protocol", ("asyncpg/",)),
    ("intake (parse, count)", ("run_intake",)),
    ("stitcher", ("run_stitcher",)),
    ("resolver: queries and row conversion", ("run_resolver", "adapters/queries.py")),
    ("resolver: duplicate filter", ("run_resolver", "core/dedup.py")),
    ("resolver: rendering spans (core)", ("run_resolver", "hydra_otel/core/")),
    ("resolver: other", ("run_resolver",)),
    ("exporter: to_readable (SDK objects)", ("run_exporter", "to_readable")),
    ("exporter: other", ("run_exporter",)),
    ("catch-up", ("tasks/catchup_task.py",)),
    ("trio-asyncio loop", ("trio_asyncio/",)),
    ("asyncio (transports, callbacks)", ("asyncio/",)),
    ("trio scheduler and I/O", ("trio/",)),
)


def stage(frames: list[str]) -> str:
    """The pipeline stage a stack belongs to (see STAGES)."""
    stack = ";".join(frames)
    for name, needles in STAGES:
        if all(n in stack for n in needles):
            return name
    return "other"


def summarize(path: Path, top: int = 20) -> dict[str, Any]:
    """Where a raw py-spy file's samples went.

    * ``stages_pct``: the pipeline stage (``STAGES``);
    * ``self_pct``: the function on top of the stack;
    * ``daemon_pct``: the innermost hydra_otel function on the stack (its callees included),
      or, with none, the thread and the library on top;
    * ``library_pct``: the package of the function on top of the stack.
    """
    self_counts: Counter[str] = Counter()
    daemon: Counter[str] = Counter()
    library: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        n, frames = int(m["count"]), m["stack"].split(";")
        total += n
        thread = frames[0].split(": ", 1)[-1]
        threads[thread] += n
        names = [_function(f) for f in frames[1:]] or [frames[0]]
        self_counts[names[-1]] += n
        stages[stage(frames)] += n
        library[_package(names[-1])] += n
        ours = [f for f in names if "hydra_otel/" in f and "__main__" not in f and "cli.py" not in f]
        daemon[ours[-1] if ours else f"[{thread}] {_package(names[-1])}"] += n

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * k / total, 1)] for name, k in c.most_common(top)] if total else []

    return {
        "samples": total,
        "threads_pct": share(threads),
        "stages_pct": share(stages),
        "self_pct": share(self_counts),
        "daemon_pct": share(daemon),
        "library_pct": share(library),
    }
