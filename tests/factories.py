"""Row builders for tests: a typical ``builds`` row and ``buildsteps`` row, overridable field by field."""

from __future__ import annotations

from typing import Any

from hydra_otel.core.builds import BuildFacts, StepFacts

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
