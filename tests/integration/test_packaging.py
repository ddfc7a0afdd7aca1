"""The distribution builds, carries its licence and metadata, and installs into a fresh venv.

``python -m build`` makes the sdist and, from it, the wheel (so the sdist is complete). The wheel
goes into a new virtualenv whose only other packages are this environment's dependencies, reached
through a ``.pth`` line (no registry needed, and no editable install of the work tree can shadow
the wheel); there ``hydra-otel --version``, ``check --help`` and ``demo --short`` run.
"""

from __future__ import annotations

import email
import re
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import hydra_otel

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build requirement (setuptools>=77) is in the test extra; no registry needed.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def only(directory: Path, pattern: str) -> Path:
    (found,) = directory.glob(pattern)
    return found


def test_wheel_metadata_has_the_one_version_the_licence_and_the_ranges(dist: Path) -> None:
    wheel = only(dist, "hydra_otel-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    assert meta["Version"] == hydra_otel.__version__
    assert meta["License-Expression"] == "MIT"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "hydra_otel/demo/sandbox/hydra-85.sql" in names
    assert "hydra_otel/py.typed" in names
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    runtime = {str(Requirement(r)) for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r}
    assert runtime == {str(Requirement(d)) for d in declared}


def test_sdist_carries_the_licence_changelog_and_lowest_constraints(dist: Path) -> None:
    sdist = only(dist, "hydra_otel-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "CHANGELOG.md", "pyproject.toml", "constraints/lowest.txt"} <= names


def test_the_wheel_runs_in_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    py = env / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    wheel = only(dist, "hydra_otel-*.whl")
    # First, before the dependencies are reachable: pip must not find this environment's own
    # hydra-otel (installed, when the suite runs from a non-editable install) and skip the wheel.
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True, timeout=120
    )
    # This environment's dependencies, after the venv's own site-packages (a plain path: the
    # editable install's finder, a .pth of its own, is not loaded there).
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    exe = env / "bin" / "hydra-otel"
    where = subprocess.run(
        [
            py,
            "-c",
            "import hydra_otel, importlib.metadata as m; print(hydra_otel.__file__, m.version('hydra-otel'))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert where[0].startswith(site), f"{where[0]} is not the installed wheel"
    assert where[1] == hydra_otel.__version__
    version = subprocess.run([exe, "--version"], check=True, capture_output=True, text=True).stdout
    assert version.strip() == f"hydra-otel {hydra_otel.__version__}"
    check = subprocess.run([exe, "check", "--help"], check=True, capture_output=True, text=True).stdout
    assert check.startswith("usage: hydra-otel check")
    demo = subprocess.run(
        [exe, "demo", "--short", "--ascii", "--width", "100", "--out", str(tmp_path / "traces")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert re.search(r"eval \S+", demo.stdout), demo.stdout


def test_lowest_constraints_match_the_declared_floors() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for spec in declared:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([^,]+)(,<.*)?", spec)
        assert match, f"{spec}: declare a floor as name>=version"
        floors[match[1].lower()] = match[2]
    pinned = {}
    for line in (ROOT / "constraints" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.strip().lower()] = version.strip()
    assert {k: v.removesuffix(".0") for k, v in pinned.items()} == {
        k: v.removesuffix(".0") for k, v in floors.items()
    }
