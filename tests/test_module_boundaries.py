"""The package's import rules (docs/architecture.md, "Layers"), checked on the source with ast.

* No module imports a private (underscore) name of another module of the project: what crosses
  a module boundary has a public name in its home.
* Only the CLI imports ``hydra_otel.service``, the live daemon's composition root; everything
  else builds from ``hydra_otel.pipeline``.
* Only ``adapters/`` imports asyncpg and trio-asyncio (asyncio stays behind the database adapter;
  others open the loop with ``adapters.db.open_loop``).
* SQL text lives only in ``adapters/``: the daemon's queries in ``queries.py``, the one-shot
  commands' in ``command_queries.py``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hydra_otel"

#: Modules allowed to import the composition root.
SERVICE_IMPORTERS = {"hydra_otel.cli"}
#: Folders (below the package) whose modules may hold SQL text: the adapters, and the demo's
#: scripted Hydra (demo/sandbox/), which plays Hydra's own writes into a throwaway database.
SQL_HOMES = ("adapters/", "demo/sandbox/")
#: Statements as they start; prose that starts with such a word ("LISTEN connections lost",
#: "SELECT privilege") does not look like this.
SQL = re.compile(
    r"""\s*(
        (SELECT|WITH)\s.*(\bFROM\b|\() | SELECT\s+\d+\s*$
      | INSERT\s+INTO\s | UPDATE\s+\w+\s+SET\s | DELETE\s+FROM\s
      | (CREATE|ALTER|DROP)\s+(TABLE|DATABASE|INDEX|VIEW|FUNCTION|TRIGGER|ROLE)\s
      | (LISTEN|UNLISTEN|NOTIFY)(\s+[\w"]*\s*[,;]?)?\s*$
    )""",
    re.VERBOSE | re.DOTALL,
)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield module_name(path), path, ast.parse(path.read_text(), str(path))


def imported(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def private_imports(name: str, path: Path, tree: ast.Module) -> list[str]:
    """``from hydra_otel.x import _y`` and ``x._y`` on an imported project module."""
    found: list[str] = []
    project_modules: set[str] = set()  # local names bound to modules of the project
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = imported(name, path, node)
            if source.split(".")[0] != "hydra_otel":
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{name}: from {source} import {alias.name}")
                project_modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hydra_otel":
                    if any(p.startswith("_") and not p.startswith("__") for p in alias.name.split(".")):
                        found.append(f"{name}: import {alias.name}")
                    project_modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in project_modules
        ):
            found.append(f"{name}: {node.value.id}.{node.attr}")
    return found


def imports_of(name: str, path: Path, tree: ast.Module) -> set[str]:
    """Every module ``tree`` imports, and every ``module.name`` it imports from one."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = imported(name, path, node)
            out.add(source)
            out |= {f"{source}.{a.name}" for a in node.names}
    return out


def sql_texts(tree: ast.Module) -> list[tuple[int, str]]:
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value)
    ]


def test_no_module_imports_a_private_name_of_another() -> None:
    found = [hit for name, path, tree in modules() for hit in private_imports(name, path, tree)]
    assert found == []


def test_only_the_cli_imports_the_composition_root() -> None:
    found = [
        name
        for name, path, tree in modules()
        if name not in SERVICE_IMPORTERS and "hydra_otel.service" in imports_of(name, path, tree)
    ]
    assert found == []


def test_only_adapters_import_asyncpg_and_trio_asyncio() -> None:
    found = [
        f"{name}: {module}"
        for name, path, tree in modules()
        if not name.startswith("hydra_otel.adapters.")
        for module in sorted(imports_of(name, path, tree))
        if module.split(".")[0] in {"asyncpg", "trio_asyncio"}
    ]
    assert found == []


def test_sql_text_only_in_adapters() -> None:
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {text.strip()[:40]!r}"
        for _, path, tree in modules()
        if not path.relative_to(PACKAGE).as_posix().startswith(SQL_HOMES)
        for line, text in sql_texts(tree)
    ]
    assert found == []


# --- the scans see what they must (and not prose) -------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "from hydra_otel.backfill.progress import _n\n",
            ["hydra_otel.tasks.x: from hydra_otel.backfill.progress import _n"],
        ),
        (
            "from .resolver import _Held\n",
            ["hydra_otel.tasks.x: from hydra_otel.tasks.resolver import _Held"],
        ),
        ("from hydra_otel import service\nservice._fatal(1)\n", ["hydra_otel.tasks.x: service._fatal"]),
        ("from hydra_otel.core.stitch import Stitcher\nfrom hydra_otel import __version__\n", []),
        ("import hashlib\nhashlib._private\n", []),
    ],
)
def test_the_private_name_scan(tmp_path: Path, source: str, expected: list[str]) -> None:
    path = tmp_path / "x.py"
    path.write_text(source)
    assert private_imports("hydra_otel.tasks.x", path, ast.parse(source)) == expected


def test_the_import_scan_sees_every_form(tmp_path: Path) -> None:
    path = tmp_path / "x.py"
    source = "import trio_asyncio\nfrom hydra_otel import service\nfrom asyncpg import Record\n"
    assert {"trio_asyncio", "hydra_otel.service", "asyncpg"} <= imports_of(
        "hydra_otel.x", path, ast.parse(source)
    )


@pytest.mark.parametrize(
    "text",
    [
        "\nSELECT e.id FROM jobsetevals e WHERE e.id = $1\n",
        "SELECT 1",
        "SELECT pg_notify($1, $2)",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "INSERT INTO jobsets (id) VALUES (1)",
        "UPDATE builds SET finished = 1",
        "NOTIFY ",
        "LISTEN build_finished",
    ],
)
def test_the_sql_heuristic_sees_statements(text: str) -> None:
    assert SQL.match(text)


@pytest.mark.parametrize(
    "text",
    [
        "LISTEN to Hydra's notifications and export traces over OTLP",
        "LISTEN connections lost or refused.",
        "SELECT privilege",
        "With HTTP the path becomes /v1/metrics",
    ],
)
def test_the_sql_heuristic_passes_prose(text: str) -> None:
    assert not SQL.match(text)
