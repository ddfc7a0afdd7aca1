"""CPU cost of rendering a build burst, per span, against encoding the same spans.

Renders what the live path renders for the benchmark's build bursts (benchmarks/workload.py):
builds with three finished steps each, every step once at its ``step_finished`` and then the
whole build at its ``build_finished`` (build span, ``queued`` and the three steps). The same
spans are then encoded with the daemon's encoder (core/otlp_wire.py), whose cost in the same run
is the yardstick, so the ratio is comparable across machines and loads.

Run: ``.venv/bin/python benchmarks/render_bench.py [--builds N] [--rounds R] [--profile]``.
A single process, no I/O; ``--profile`` prints the top of a cProfile of the rendering.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.factories: the test rows

from tests.factories import make_build, make_step

from hydra_otel.core.builds import BuildFacts, StepFacts, build_spans, step_attempt, step_span
from hydra_otel.core.evals import RenderConfig
from hydra_otel.core.otlp_wire import SpanEncoder
from hydra_otel.core.spans import SpanRecord

CFG = RenderConfig(instance="hydra", hydra_url="https://hydra.example.org", error_text_limit=1024)
T0 = 1_700_000_000


def burst(n: int, first: int = 150_001) -> list[tuple[BuildFacts, list[StepFacts]]]:
    """``n`` finished builds of one evaluation, each with two dependency steps and its own step."""
    out = []
    for i in range(n):
        build_id = first + i
        drv = f"/nix/store/{i:032d}-pkg{i}-1.0.drv"
        b = make_build(
            build_id=build_id,
            drvpath=drv,
            job=f"pkg{i}.x86_64-linux",
            nixname=f"pkg{i}-1.0",
            eval_id=2,
            starttime=T0 + 30,
            stoptime=T0 + 35,  # Hydra gives a build its own step's stop time
        )
        steps = [
            make_step(
                build_id=build_id,
                stepnr=k,
                drvpath=drv if k == 3 else f"/nix/store/{k:032d}-dep{k}-{i}.drv",
                machine="ssh://builder1",
                starttime=T0 + 10 * k,
                stoptime=T0 + 10 * k + 5,
                overhead_ms=12,
                times_built=1,
            )
            for k in (1, 2, 3)
        ]
        out.append((b, steps))
    return out


def render(rows: list[tuple[BuildFacts, list[StepFacts]]]) -> list[SpanRecord]:
    """As the resolver does: each step at ``step_finished``, then the build at ``build_finished``."""
    out: list[SpanRecord] = []
    for b, steps in rows:
        for s in steps:
            out.append(step_span(CFG, b, s, step_attempt(b, steps, s.stepnr)))
        out += build_spans(CFG, b, steps)
    return out


def _best(fn: Callable[[int], object], rounds: int) -> float:
    best = float("inf")
    for k in range(rounds):
        t = time.perf_counter()
        fn(k)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builds", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    # Each round renders builds it has not seen, as a burst does: rendering caches per build, so
    # rendering the same rows again would measure warm caches.
    rounds = [burst(a.builds, first=150_001 + k * a.builds) for k in range(a.rounds + 1)]
    spans = render(rounds[-1])
    encoder = SpanEncoder((("service.name", "hydra-otel"),), "hydra-otel", "0")
    encoder.request(spans)  # warm the encoder's attribute cache, as a running daemon has it
    t_render = _best(lambda k: render(rounds[k]), a.rounds)
    t_encode = _best(lambda k: encoder.request(spans), a.rounds)
    n = len(spans)
    print(f"spans: {n} ({a.builds} builds), best of {a.rounds}")
    print(f"render: {t_render / n * 1e6:.2f} µs/span")
    print(f"encode: {t_encode / n * 1e6:.2f} µs/span")
    print(f"render/encode: {t_render / t_encode:.2f}")
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(render, burst(a.builds, first=1))
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
