"""Checks of the wiring of ``otel-collector.yaml``, the collector configuration shipped for users.

PyYAML is not a dependency, so the file is kept to a small YAML subset and read by ``parse_yaml``
below: block mappings, block sequences whose items are scalars or one ``key: value`` pair, one-line
flow sequences ``[a, b]``, plain unquoted scalars (read as strings) and ``#`` comments. Anything
else (quotes, anchors, tags, block scalars, flow mappings, tabs, duplicate keys, odd indentation)
is refused, so the subset cannot silently diverge from what a real YAML parser reads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeAlias

import pytest

CONFIG = Path(__file__).parent.parent / "otel-collector.yaml"

Node: TypeAlias = "str | list[Node] | dict[str, Node] | None"

_COMMENT = re.compile(r"(?:^|\s)#.*")
_ENTRY = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_./-]*):(?:\s+(.*))?\Z")
# A plain scalar: no leading indicator, no ": " or " #" inside (${env:X:-y} is fine).
_PLAIN = re.compile(r"(?![-?:,\[\]{}#&*!|>'\"%@`])(?:[^:\s]|:(?!\s|\Z)|\s(?!#))+(?<!\s)\Z")
_FLOW_INDICATORS = frozenset("[]{},")


class YamlSubsetError(ValueError):
    """The text is not in the YAML subset ``parse_yaml`` reads."""


def parse_yaml(text: str) -> Node:
    """Read the YAML subset described in the module docstring; scalars stay strings.

    Args:
        text: the document.

    Returns:
        Nested dicts, lists and strings (``None`` for a key with no value).

    Raises:
        YamlSubsetError: on anything outside the subset, naming the line.
    """
    lines: list[tuple[int, int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw:
            raise YamlSubsetError(f"line {number}: tab")
        body = _COMMENT.sub("", raw).rstrip()
        if body:
            lines.append((number, len(body) - len(body.lstrip(" ")), body.strip()))
    if not lines:
        return None
    node, end = _block(lines, 0, lines[0][1])
    if end != len(lines):
        raise YamlSubsetError(f"line {lines[end][0]}: indentation does not match any parent")
    return node


def _block(lines: list[tuple[int, int, str]], i: int, indent: int) -> tuple[Node, int]:
    """Read the mapping or sequence whose lines start at ``i`` with ``indent`` spaces."""
    is_sequence = lines[i][2].startswith("- ")
    result: list[Node] | dict[str, Node] = [] if is_sequence else {}
    while i < len(lines) and lines[i][1] == indent:
        number, _, body = lines[i]
        if body.startswith("- ") != is_sequence:
            raise YamlSubsetError(f"line {number}: mapping and sequence entries mixed")
        if isinstance(result, list):
            entry = _ENTRY.match(body[2:])
            result.append({entry[1]: _scalar(entry[2], number)} if entry else _scalar(body[2:], number))
            i += 1
            continue
        entry = _ENTRY.match(body)
        if entry is None or entry[1] in result:
            raise YamlSubsetError(f"line {number}: not a new `key: value` entry: {body!r}")
        i += 1
        if entry[2] is not None:
            result[entry[1]] = _scalar(entry[2], number)
        elif i < len(lines) and lines[i][1] > indent:
            result[entry[1]], i = _block(lines, i, lines[i][1])
        else:
            result[entry[1]] = None
    if i < len(lines) and lines[i][1] > indent:
        raise YamlSubsetError(f"line {lines[i][0]}: unexpected indentation")
    return result, i


def _scalar(text: str | None, number: int) -> Node:
    """A plain scalar or a one-line flow sequence of plain scalars."""
    if text is None:
        return None
    if text.startswith("[") and text.endswith("]"):
        items = [item.strip() for item in text[1:-1].split(",")] if text[1:-1].strip() else []
        return [_plain(item, number, flow=True) for item in items]
    return _plain(text, number, flow=False)


def _plain(text: str, number: int, *, flow: bool) -> str:
    """A plain scalar; inside ``[...]`` it may not contain ``[]{},`` either."""
    if not _PLAIN.match(text) or (flow and not _FLOW_INDICATORS.isdisjoint(text)):
        raise YamlSubsetError(f"line {number}: not a plain scalar: {text!r}")
    return text


# ---------------------------------------------------------------------------------------------
# The parser itself


def test_parser_reads_the_subset() -> None:
    """Nested mappings, both sequence forms, comments and env references are read as expected."""
    text = """
a:            # a comment
  b: 0.0.0.0:4317
  c: ${env:X:-true}
  list: [x, y/z]
  empty: []
  items:
    - name: k.v
    - plain
  none:
d: 1s
"""
    assert parse_yaml(text) == {
        "a": {
            "b": "0.0.0.0:4317",
            "c": "${env:X:-true}",
            "list": ["x", "y/z"],
            "empty": [],
            "items": [{"name": "k.v"}, "plain"],
            "none": None,
        },
        "d": "1s",
    }


@pytest.mark.parametrize(
    "text",
    [
        "a:\n\tb: c",
        "a: 1\na: 2",
        "a:\n  b: 1\n c: 2",
        "a:\n  b: 1\n    c: 2",
        'a: "quoted"',
        "a: &anchor x",
        "a: |",
        "a: {b: c}",
        "a: b: c",
        "a:\n  - x\n  y: z",
        "- x\n- [a, 'b']",
        "a: [x, ${env:Y}]",
        "a: [x,, y]",
        "a:\n  - name: x\n    default: y",
    ],
    ids=[
        "tab",
        "duplicate key",
        "dedent",
        "indent",
        "quoted",
        "anchor",
        "block scalar",
        "flow mapping",
        "colon space",
        "mixed",
        "quoted in list",
        "braces in list",
        "empty in list",
        "multi-key item",
    ],
)
def test_parser_refuses_other_yaml(text: str) -> None:
    """Everything outside the subset is an error, not a guess."""
    with pytest.raises(YamlSubsetError):
        parse_yaml(text)


# ---------------------------------------------------------------------------------------------
# The configuration


@pytest.fixture(scope="module")
def config() -> dict[str, Node]:
    """The parsed configuration file."""
    parsed = parse_yaml(CONFIG.read_text(encoding="utf-8"))
    assert isinstance(parsed, dict)
    return parsed


def section(node: Node, *path: str) -> dict[str, Node]:
    """The mapping at ``path`` below ``node``."""
    for key in path:
        assert isinstance(node, dict), f"{key!r} under a non-mapping"
        node = node[key]
    assert isinstance(node, dict), f"{'.'.join(path)} is not a mapping"
    return node


def names(node: Node) -> list[str]:
    """A list of component names."""
    assert isinstance(node, list)
    assert all(isinstance(n, str) for n in node)
    return [n for n in node if isinstance(n, str)]


def pipelines(config: dict[str, Node]) -> dict[str, dict[str, Node]]:
    """Each pipeline's mapping, by pipeline ID."""
    return {pid: section(p) for pid, p in section(config, "service", "pipelines").items()}


def test_references_are_defined_and_definitions_used(config: dict[str, Node]) -> None:
    """Every component a pipeline names is defined, and every defined component is used."""
    connectors = set(section(config, "connectors"))
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for pipeline in pipelines(config).values():
        for kind, ids in used.items():
            ids.update(names(pipeline.get(kind, [])))
    assert used["processors"] == set(section(config, "processors"))
    for kind in ("receivers", "exporters"):
        assert used[kind] - connectors == set(section(config, kind))
    assert connectors <= used["receivers"] & used["exporters"]
    assert set(names(section(config, "service")["extensions"])) == set(section(config, "extensions"))


def test_pipeline_types(config: dict[str, Node]) -> None:
    """Pipeline IDs are a signal type, optionally with a /name."""
    assert {pid.split("/")[0] for pid in pipelines(config)} <= {"traces", "metrics", "logs"}


def test_memory_limiter_first(config: dict[str, Node]) -> None:
    """A pipeline fed by a network receiver has processors, and memory_limiter comes first."""
    connectors = set(section(config, "connectors"))
    for pid, pipeline in pipelines(config).items():
        if set(names(pipeline["receivers"])) - connectors:
            assert "processors" in pipeline, pid
        if "processors" in pipeline:
            assert names(pipeline["processors"])[0] == "memory_limiter", pid


def test_spanmetrics_connects_traces_to_metrics(config: dict[str, Node]) -> None:
    """spanmetrics is an exporter of a traces pipeline and a receiver of a metrics pipeline."""
    kinds = {
        (pid.split("/")[0], role)
        for pid, p in pipelines(config).items()
        for role in p
        if "spanmetrics" in names(p[role])
    }
    assert kinds == {("traces", "exporters"), ("metrics", "receivers")}


def test_every_signal_hydra_otel_sends_has_a_pipeline(config: dict[str, Node]) -> None:
    """Traces, hydra-otel's own metrics and its log records each have a pipeline from the receiver.

    Without one, the collector's OTLP receiver answers Unimplemented to that signal.
    """
    fed = {pid.split("/")[0] for pid, p in pipelines(config).items() if "otlp" in names(p["receivers"])}
    assert fed == {"traces", "metrics", "logs"}


def test_traces_go_to_jaeger_and_tempo(config: dict[str, Node]) -> None:
    """Both trace backends are OTLP exporters with their endpoint and TLS choice from the environment."""
    for exporter, prefix in (("otlp/jaeger", "JAEGER"), ("otlp/tempo", "TEMPO")):
        assert exporter in names(pipelines(config)["traces"]["exporters"])
        settings = section(config, "exporters", exporter)
        assert settings["endpoint"] == f"${{env:{prefix}_OTLP_ENDPOINT}}"
        assert section(settings, "tls")["insecure"] == f"${{env:{prefix}_OTLP_INSECURE:-false}}"


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(duration: str) -> float:
    """A Go duration of one number and unit, such as ``30s`` or ``2h``, in seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert match, f"not a simple duration: {duration!r}"
    return int(match[1]) * _UNITS[match[2]]


def test_histogram_buckets_fit_hydra(config: dict[str, Node]) -> None:
    """Buckets are strictly increasing and span seconds to hours."""
    histogram = section(config, "connectors", "spanmetrics", "histogram")
    buckets = [seconds(b) for b in names(section(histogram, "explicit")["buckets"])]
    assert buckets == sorted(set(buckets))
    assert buckets[0] <= 1
    assert buckets[-1] >= 4 * 3600
    assert histogram["unit"] == "s"


def test_dimensions_have_low_cardinality(config: dict[str, Node]) -> None:
    """The extra dimensions are the bounded Hydra ones; no IDs."""
    dimensions = section(config, "connectors", "spanmetrics")["dimensions"]
    assert isinstance(dimensions, list)
    keys = [section(d)["name"] for d in dimensions]
    assert keys == [
        "hydra.span.type",
        "cicd.pipeline.name",
        "cicd.pipeline.result",
        "cicd.pipeline.task.run.result",
        "hydra.system",
        "cicd.worker.name",
    ]
    assert not any(isinstance(k, str) and k.endswith((".id", "_id", ".url.full")) for k in keys)
    # Span names carry job and derivation names (unbounded on nixpkgs): not a dimension.
    assert section(config, "connectors", "spanmetrics")["exclude_dimensions"] == ["span.name"]


def test_receivers_listen_on_the_otlp_ports(config: dict[str, Node]) -> None:
    """OTLP comes in on the standard ports, gRPC 4317 and HTTP 4318."""
    protocols = section(config, "receivers", "otlp", "protocols")
    assert section(protocols, "grpc")["endpoint"] == "0.0.0.0:4317"
    assert section(protocols, "http")["endpoint"] == "0.0.0.0:4318"


# ---------------------------------------------------------------------------------------------
# docs/collector.md says what the file does

DOCS = CONFIG.parent / "docs" / "collector.md"
#: The spanmetrics connector's labels before ``exclude_dimensions``.
_DEFAULT_DIMENSIONS = {"service.name", "span.name", "span.kind", "status.code"}


def test_docs_labels_and_dimensions_match(config: dict[str, Node]) -> None:
    """The page lists exactly the labels the connector produces, and its dimension table in order."""
    docs = DOCS.read_text(encoding="utf-8")
    connector = docs[docs.index("### Connector: `spanmetrics`") : docs.index("### Exporters")]
    spanmetrics = section(config, "connectors", "spanmetrics")
    labelled = re.search(r"labelled by (.*?), plus:", connector, re.S)
    assert labelled, "the sentence naming the labels"
    excluded = set(names(spanmetrics["exclude_dimensions"]))
    assert set(re.findall(r"`([a-z.]+)`", labelled[1])) == _DEFAULT_DIMENSIONS - excluded
    dimensions = spanmetrics["dimensions"]
    assert isinstance(dimensions, list)
    table = re.findall(r"^\| `([a-z_.]+)` \|", connector, re.M)
    assert table == [section(d)["name"] for d in dimensions]


def test_docs_batch_sizes_match(config: dict[str, Node]) -> None:
    """The page's batch timeout and sizes are the file's."""
    docs = DOCS.read_text(encoding="utf-8")
    batch = section(config, "processors", "batch")
    assert (
        f"`batch` sends after {seconds(str(batch['timeout']))} s or {batch['send_batch_size']} spans" in docs
    )
    assert f"never more\nthan {batch['send_batch_max_size']} spans in one export" in docs
    assert not re.search(r"capped at \d+ spans", docs)
