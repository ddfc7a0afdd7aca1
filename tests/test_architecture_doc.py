"""docs/architecture.md's folder diagram (section "Layers") is the package's import graph.

Each arrow ``A --> B`` says that something in A imports something in B. Every import between the
package's parts must follow a path of arrows (no import upwards or sideways), and every arrow must
be an import the source makes (no stale arrow). The base modules that everything may use are
left out of the diagram.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "hydra_otel"
DOC = ROOT / "docs" / "architecture.md"
#: Importable by every part, and drawn nowhere: errors, logging, DSN parsing, the version.
BASE = {"errors", "log", "dsn", "hydra_otel", "__main__"}
ARROW = re.compile(r"^\s*(\w+)(?:\[[^\]]*\])?\s*-->\s*(\w+)(?:\[[^\]]*\])?\s*$")


def part(module: str) -> str:
    """The diagram node of a module: its folder below the package, or its own name at the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def import_graph() -> set[tuple[str, str]]:
    edges: set[tuple[str, str]] = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
        source = part(".".join(rel[:-1] if rel[-1] == "__init__" else rel))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hydra_otel":
                module = node.module or ""
                targets = [f"{module}.{a.name}" for a in node.names] if module == "hydra_otel" else [module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "hydra_otel"]
            edges |= {(source, part(t)) for t in targets}
    return {(a, b) for a, b in edges if a != b and a not in BASE and b not in BASE}


def diagram() -> set[tuple[str, str]]:
    text = DOC.read_text()
    layers = text[text.index("## Layers") :]
    block = layers[layers.index("```mermaid") : layers.index("```", layers.index("```mermaid") + 3)]
    return {(m[1], m[2]) for line in block.splitlines() if (m := ARROW.match(line))}


def closure(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    reach = set(edges)
    while True:
        more = {(a, d) for a, b in reach for c, d in reach if b == c} - reach
        if not more:
            return reach
        reach |= more


def test_the_diagram_has_arrows() -> None:
    assert len(diagram()) >= 10


def test_every_import_follows_the_arrows() -> None:
    allowed = closure(diagram())
    assert sorted(import_graph() - allowed) == []


def test_every_arrow_is_an_import() -> None:
    assert sorted(diagram() - import_graph()) == []
