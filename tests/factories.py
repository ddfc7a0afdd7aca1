"""Builders for tests: a typical ``builds`` row, ``buildsteps`` row and span, overridable field by field."""

from __future__ import annotations

from typing import Any

from hydra_otel.core.builds import BuildFacts, StepFacts
from hydra_otel.core.evals import RenderConfig
from hydra_otel.core.spans import Kind, SpanRecord

T0 = 1_700_000_000
DRV = f"/nix/store/{'0' * 32}-hello-2.12.drv"

_BUILD: dict[str, Any] = {
    "build_id": 100,
    "finished": True,
    "timestamp": T0,
    "jobset_id": 3,
    "project": "nixpkgs",
    "jobset": "trunk",
    "job": "hello.x86_64-linux",
    "nixname": "hello-2.12",
    "drvpath": DRV,
    "system": "x86_64-linux",
    "priority": 100,
    "global_priority": 0,
    "starttime": T0 + 80,
    "stoptime": T0 + 300,
    "cached": False,
    "status": 0,
    "size": 1_000,
    "closure_size": 5_000,
    "release_name": None,
    "eval_id": 42,
    "in_eval_trace": True,
}

_STEP: dict[str, Any] = {
    "build_id": 100,
    "stepnr": 1,
    "type": 0,
    "drvpath": DRV,
    "status": 0,
    "errormsg": None,
    "starttime": T0 + 80,
    "stoptime": T0 + 300,
    "machine": "",
    "system": "x86_64-linux",
    "propagated_from": None,
    "overhead_ms": None,
    "times_built": None,
    "nondeterministic": None,
    "resolved_drv_path": None,
}


def make_build(**overrides: Any) -> BuildFacts:
    """A finished, successful build of ``hello`` created by eval 42, with ``overrides`` applied."""
    return BuildFacts(**{**_BUILD, **overrides})


def make_step(**overrides: Any) -> StepFacts:
    """A finished, successful build step of ``hello``'s own derivation, with ``overrides`` applied."""
    return StepFacts(**{**_STEP, **overrides})


#: A rendering configuration with a small trace budget (10 builds) and two links at most.
RENDER_CONFIG = RenderConfig(
    instance="hydra",
    hydra_url="https://hydra.example.org",
    error_text_limit=100,
    max_builds_per_trace=10,
    max_links=2,
)

_SPAN: dict[str, Any] = {
    "trace_id": 0x0123456789ABCDEF0123456789ABCDEF,
    "span_id": 0x1122334455667788,
    "parent_span_id": None,
    "name": "build hello",
    "kind": Kind.INTERNAL,
    "start_ns": T0 * 1_000_000_000,
    "end_ns": (T0 + 300) * 1_000_000_000,
    "attributes": (("hydra.build.id", 100),),
}


def make_span(**overrides: Any) -> SpanRecord:
    """A finished root span of build 100, with ``overrides`` applied."""
    return SpanRecord(**{**_SPAN, **overrides})
