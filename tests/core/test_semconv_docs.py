"""docs/spans.md's semantic-conventions table against the code and the registry package.

The registry status is computed from the ``opentelemetry-semantic-conventions``
package the SDK installs (stable names live in ``opentelemetry.semconv.attributes``
and ``.metrics``, incubating ones under ``_incubating``), so neither the names
nor their status can drift from what the code emits.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from hydra_otel.core import semconv as sc
from hydra_otel.core.cicd_metrics import INSTRUMENTS

DOC = Path(__file__).parents[2] / "docs" / "spans.md"
VALUE_PREFIXES = ("RESULT_", "ACTION_", "STATE_", "COMPONENT_")


def _names(package: str) -> set[str]:
    pkg = importlib.import_module(package)
    out: set[str] = set()
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{package}.{m.name}")
        out |= {v for k, v in vars(mod).items() if k.isupper() and isinstance(v, str)}
    return out


STABLE = _names("opentelemetry.semconv.attributes") | _names("opentelemetry.semconv.metrics")
INCUBATING = _names("opentelemetry.semconv._incubating.attributes") | _names(
    "opentelemetry.semconv._incubating.metrics"
)


def registry_status(name: str) -> str:
    if name in STABLE:
        return "stable"
    return "development" if name in INCUBATING else "not in the registry"


def semconv_keys() -> set[str]:
    """Every attribute key (and event name) in core/semconv.py."""
    return {v for k, v in vars(sc).items() if k.isupper() and not k.startswith(VALUE_PREFIXES)}


def doc_table() -> dict[str, str]:
    """name -> registry status, from the rows between the semconv-table markers."""
    text = DOC.read_text(encoding="utf-8")
    body = text.split("<!-- semconv-table -->", 1)[1].split("<!-- /semconv-table -->", 1)[0]
    rows = [line for line in body.strip().splitlines()[2:] if line.startswith("|")]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4, row
        table[cells[0].strip("`")] = cells[2]
    return table


def test_table_lists_every_registry_name_the_code_emits() -> None:
    """Every non-``hydra.*`` key of core/semconv.py and every metric is a row, and nothing else."""
    expected = {k for k in semconv_keys() if not k.startswith("hydra.")} | set(INSTRUMENTS)
    assert set(doc_table()) == expected


def test_table_registry_status_matches_the_registry() -> None:
    """The status column is what the registry package says; ``hydra.*`` names are not in it."""
    table = doc_table()
    installed = {name: registry_status(name) for name in table}
    # The table follows the newest registry. An older registry package (the lowest declared
    # opentelemetry release installs one) may still list as incubating a name since made stable.
    promoted = {n for n in table if table[n] == "stable" and installed[n] == "development"}
    assert table == {**installed, **dict.fromkeys(promoted, "stable")}
    for name in table:
        if not name.startswith("hydra."):
            assert registry_status(name) != "not in the registry", name


def test_every_key_has_a_documented_row() -> None:
    """docs/spans.md documents every attribute key and event name in core/semconv.py."""
    docs = DOC.read_text(encoding="utf-8")
    assert sorted(k for k in semconv_keys() if f"| `{k}` |" not in docs) == []


def test_no_deprecated_names() -> None:
    """The deprecated ``deployment.environment`` is used nowhere in the docs or the deployment files."""
    root = Path(__file__).parents[2]
    files = [*root.joinpath("docs").rglob("*.md"), *root.joinpath("deploy").rglob("*.nix")]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"deployment\.environment(?!\.name)[ =]", text), path
