"""The Nix expressions: package.nix agrees with pyproject.toml and imports every module.

Without ``nix-instantiate`` only the text is checked; with it (CI installs Debian's nix-bin, see
.ci/nix-check) every .nix file is parsed and package.nix's import check is evaluated and compared
with the modules Python itself finds.
"""

from __future__ import annotations

import json
import os
import pkgutil
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import hydra_otel

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = (ROOT / "package.nix").read_text()
NIX = shutil.which("nix-instantiate")
needs_nix = pytest.mark.skipif(NIX is None, reason="nix-instantiate is not installed")

#: package.nix called with stand-ins: buildPythonApplication returns its arguments.
STUBBED = """
import ./package.nix {
  lib = { fileset = { toSource = x: x; unions = x: x; }; licenses.mit = 1; platforms.linux = 1; };
  python3Packages = builtins.listToAttrs (map (n: { name = n; value = n; }) [
    "setuptools" "asyncpg" "opentelemetry-exporter-otlp-proto-grpc" "opentelemetry-exporter-otlp-proto-http"
    "opentelemetry-sdk" "trio" "trio-asyncio" "grpcio" "hypothesis" "pytest-trio" "pytestCheckHook"
  ]) // { buildPythonApplication = a: a; };
}
"""


def test_package_declares_the_dependencies_of_pyproject_and_relaxes_none() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    block = re.search(r"dependencies = with python3Packages; \[(.*?)\];", PACKAGE, re.S)
    assert block
    assert sorted(block[1].split()) == sorted(Requirement(d).name for d in declared)
    assert not re.search(r"pythonRelaxDeps\s*=", PACKAGE)


def nix_eval(expr: str) -> object:
    env = {**os.environ, "NIX_STATE_DIR": "/nonexistent-nix-state"}  # evaluation only: no store
    out = subprocess.run(
        [NIX or "nix-instantiate", "--eval", "--strict", "--json", "-E", expr],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    return json.loads(out.stdout)


@needs_nix
def test_every_nix_file_parses() -> None:
    files = sorted(ROOT.glob("*.nix")) + sorted((ROOT / "nix").glob("*.nix"))
    assert {f.name for f in files} >= {"package.nix", "flake.nix", "default.nix", "module.nix"}
    for f in files:
        subprocess.run([NIX or "", "--parse", str(f)], capture_output=True, check=True, timeout=60)


@needs_nix
def test_the_import_check_covers_every_module_python_finds() -> None:
    found = {"hydra_otel"} | {
        m.name
        for m in pkgutil.walk_packages(hydra_otel.__path__, "hydra_otel.")
        if m.name != "hydra_otel.__main__"
    }
    listed = nix_eval(f"({STUBBED}).pythonImportsCheck")
    assert isinstance(listed, list)
    assert set(listed) == found


@needs_nix
def test_the_nix_version_is_the_python_version() -> None:
    assert nix_eval(f"({STUBBED}).version") == hydra_otel.__version__


@needs_nix
def test_nix_check_evaluates() -> None:
    summary = nix_eval("import ./nix/check.nix")
    assert isinstance(summary, dict)
    assert summary["flake"] == ["checks", "formatter", "nixosModules", "overlays", "packages"]
