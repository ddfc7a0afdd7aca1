"""Deterministic IDs: golden vectors (a compatibility promise) and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hydra_otel.core import ids

# (instance, key, trace id, root span id). Also listed in docs/ids.md: changing one re-keys every trace.
GOLDEN = [
    ("hydra", ids.eval_trace("hydra", 1), "4525ad9192d1f3ea7f66c615f45f49cc", "0846140944f64a65"),
    ("hydra", ids.eval_trace("hydra", 320000000), "f8c5264be8dcde83fe704127f7309c5f", "635c1e7301f11cf5"),
    ("staging", ids.eval_trace("staging", 1), "f5dd676a402fad9ab4b8b43d0c1bd74b", "8e1777c3e7647495"),
    (
        "hydra",
        ids.attempt_trace("hydra", 7, "4112.262815283.16494"),
        "065d226233e811e505d6abe3cbf408c9",
        "9c8fb27c1742cff5",
    ),
]


@pytest.mark.parametrize(("instance", "key", "trace_hex", "root_hex"), GOLDEN)
def test_golden_vectors(instance: str, key: ids.TraceKey, trace_hex: str, root_hex: str) -> None:
    """The documented vectors are what the code derives."""
    assert key.instance == instance
    assert ids.format_trace_id(ids.trace_id(key)) == trace_hex
    assert ids.format_span_id(ids.root_span_id(key)) == root_hex


def test_child_span_vectors() -> None:
    """The eval children's IDs are fixed too."""
    key = ids.eval_trace("hydra", 1)
    assert ids.format_span_id(ids.span_id(key, "checkout")) == "a8997cd9fe32efb9"
    assert ids.format_span_id(ids.span_id(key, "evaluate")) == "8832baef6acd7f86"
    assert (
        ids.format_span_id(ids.span_id(key, "evaluator-run", 7, "4112.262815283.16494")) == "26d07ca61a194fd9"
    )


def test_encoding_is_unambiguous() -> None:
    """Key parts that concatenate to the same text, or an int and its string, give different IDs."""
    a = ids.TraceKey("hydra", ("ab", "c"))
    b = ids.TraceKey("hydra", ("a", "bc"))
    c = ids.TraceKey("hydra", ("eval", "1"))
    assert (
        len({ids.trace_id(a), ids.trace_id(b), ids.trace_id(c), ids.trace_id(ids.eval_trace("hydra", 1))})
        == 4
    )


def test_instance_separates_traces() -> None:
    """Two Hydra instances never share a trace for the same eval ID."""
    assert ids.trace_id(ids.eval_trace("a", 5)) != ids.trace_id(ids.eval_trace("b", 5))


def test_eval_and_attempt_keys_differ() -> None:
    """An eval keyed by ID and an attempt keyed by jobset and correlation ID never collide by construction."""
    assert ids.trace_id(ids.eval_trace("hydra", 7)) != ids.trace_id(ids.attempt_trace("hydra", 7, "7"))


@given(st.text(min_size=1, max_size=20), st.integers(min_value=1, max_value=2**63 - 1), st.text(max_size=10))
def test_ids_are_stable_and_in_range(instance: str, number: int, kind: str) -> None:
    """IDs are deterministic, non-zero and fit their widths."""
    key = ids.eval_trace(instance, number)
    tid, sid = ids.trace_id(key), ids.span_id(key, kind)
    assert tid == ids.trace_id(ids.eval_trace(instance, number))
    assert sid == ids.span_id(key, kind)
    assert 0 < tid < 2**128
    assert 0 < sid < 2**64


def test_zero_digest_maps_to_one() -> None:
    """The never-zero guard holds for the degenerate value itself."""
    assert ids._nonzero(0) == 1
    assert ids._nonzero(5) == 5
