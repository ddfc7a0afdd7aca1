"""Rendering is pinned byte for byte: optimising it must not change a single ID, name or attribute.

Renders a varied set of builds (failed, cached, own trace, restarted, substitutions, propagated
failures, error messages, budgets) and evaluations, and compares a digest of every field of every
span with the value the unoptimised code gave. A deliberate change to the output updates the
digest in the same commit (and, for IDs, docs/ids.md says why it must not happen).
"""

from __future__ import annotations

import dataclasses
import hashlib

from hydra_otel.core import ids
from hydra_otel.core.builds import Cause, build_spans, step_attempt, step_span
from hydra_otel.core.evals import RenderConfig
from hydra_otel.core.spans import SpanRecord
from tests.factories import RENDER_CONFIG, make_build, make_step

T0 = 1_700_000_000


def _builds() -> list[SpanRecord]:
    out: list[SpanRecord] = []
    small = dataclasses.replace(RENDER_CONFIG, max_spans_per_trace=40)
    for i in range(24):
        drv = f"/nix/store/{i:032d}-pkg{i}-1.{i}.drv"
        b = make_build(
            build_id=1000 + i,
            drvpath=drv,
            job=f"pkg{i}.x86_64-linux",
            nixname=None if i % 5 == 0 else f"pkg{i}",
            status=(0, 1, 2, 3, 4, 6, 7, 11, None)[i % 9] if i % 9 != 8 else 0,
            cached=i % 7 == 0,
            size=None if i % 3 else 10 * i,
            release_name="rel" if i == 4 else None,
            eval_id=None if i == 5 else 42 + i % 2,
            in_eval_trace=i % 4 != 0,
            trace_builds=1 + i % 3,
            starttime=T0 + 30,
            stoptime=T0 + 35 + i,
        )
        steps = [
            make_step(
                build_id=b.build_id,
                stepnr=k,
                type=1 if k == 1 and i % 2 else 0,
                drvpath=drv if k == 3 else f"/nix/store/{k:032d}-dep{k}.drv",
                status=b.status if k == 3 else (0 if k == 1 else (1 if i % 6 == 1 else 0)),
                errormsg="boom\nmore" if i % 6 == 1 and k == 2 else None,
                starttime=None if i % 8 == 3 and k == 2 else T0 + 10 * k,
                stoptime=None if i % 8 == 3 and k == 2 else T0 + 10 * k + 5 + (i if k == 3 else 0),
                machine="ssh://builder1" if k != 1 else "",
                propagated_from=999 if i % 10 == 9 and k == 2 else None,
                overhead_ms=12 if k == 3 else None,
                times_built=1 if k == 3 else None,
                nondeterministic=False if k == 3 else None,
                resolved_drv_path=drv if i == 7 else None,
            )
            for k in (1, 2, 3)
        ]
        if i % 6 == 2:  # restarted: an earlier attempt ended with a failed step 3, then steps 4-5
            steps[2] = steps[2]._replace(status=1, stoptime=T0 + 20)
            steps += [
                steps[1]._replace(stepnr=4),
                steps[2]._replace(stepnr=5, status=0),
            ]
        cause = Cause(build_id=999, trace_id=7, span_id=9) if i % 10 == 9 else None
        for cfg in (RENDER_CONFIG, small):
            for s in steps:
                out.append(step_span(cfg, b, s, step_attempt(b, steps, s.stepnr)))
            out += build_spans(cfg, b, steps, cause)
    return out


def _digest(spans: list[SpanRecord]) -> str:
    h = hashlib.sha256()
    for r in spans:
        h.update(repr(r).encode())
    return h.hexdigest()


def test_build_and_step_spans_are_unchanged() -> None:
    spans = _builds()
    assert len(spans) == 432
    assert _digest(spans) == "033edd43599335d4a505870cd08625c8a6c0542d7a6b0395b533222448491fa2"


def test_ids_are_unchanged() -> None:
    key = ids.attempt_trace("hydra", 3, "c0ffee")
    got = [
        ids.trace_id(key),
        ids.root_span_id(key),
        ids.span_id(key, "step", 1, 2),
        ids.span_id(key, "x", "y"),
    ]
    assert (
        hashlib.sha256(repr(got).encode()).hexdigest()
        == "8183e6860be5713ac87b986e8a77903c0f29ec84c283321b5d2e6c928e24bfbb"
    )


def test_render_config_is_used() -> None:
    other = RenderConfig(instance="other", hydra_url="https://h", error_text_limit=3)
    b = make_build()
    assert (
        build_spans(other, b, [make_step()])[0].trace_id
        != build_spans(RENDER_CONFIG, b, [make_step()])[0].trace_id
    )
