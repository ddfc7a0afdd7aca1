"""Deterministic trace and span IDs.

Theory of operation: every ID is a slice of a SHA-256 digest over a versioned,
unambiguous encoding of (instance name, trace key, span kind, local key). The
same Hydra rows therefore always give the same IDs, whichever process derives
them: the live daemon, a restarted one, or a backfill. No state is stored.

Trace keys:

* ``eval_trace(instance, eval_id)``: an evaluation that produced a JobsetEval
  row. Later build spans find their parent from the eval ID alone.
* ``build_trace(instance, build_id)``: a build beyond its evaluation's trace
  budget (see docs/spans.md), in a trace of its own linked to the evaluation.
* ``attempt_trace(instance, jobset_id, correlation_id)``: an evaluation attempt
  with no JobsetEval row (cached, failed, abandoned). Hydra's correlation ID is
  unique per host boot only, so the jobset ID is part of the key.

Digests are never used as zero: an all-zero trace or span ID is invalid in
OpenTelemetry, so zero maps to one (a 2^-64 event, but the guarantee is exact).
The encoding and the golden vectors in ``tests/core/test_ids.py`` and
``docs/ids.md`` are a compatibility promise: changing them re-keys every trace.
"""

from __future__ import annotations

import functools
import hashlib
from typing import NamedTuple

#: Bumped only if the derivation must change; it is hashed into every ID.
SCHEME = "hydra-otel/1"

KeyPart = str | int


class TraceKey(NamedTuple):
    """What a trace is about, e.g. ``("eval", 42)`` for instance ``hydra``.

    A named tuple: it keys the caches below, and a tuple is hashed in C (a frozen dataclass
    hashes in Python, on every span ID derived).
    """

    instance: str
    parts: tuple[KeyPart, ...]


def eval_trace(instance: str, eval_id: int) -> TraceKey:
    """Key of the trace of JobsetEval ``eval_id``."""
    return TraceKey(instance, ("eval", eval_id))


def build_trace(instance: str, build_id: int) -> TraceKey:
    """Key of the trace of a build that does not fit its evaluation's trace budget."""
    return TraceKey(instance, ("build", build_id))


def attempt_trace(instance: str, jobset_id: int, correlation_id: str) -> TraceKey:
    """Key of an evaluation attempt that left no JobsetEval row."""
    return TraceKey(instance, ("attempt", jobset_id, correlation_id))


@functools.lru_cache(maxsize=65536, typed=True)  # span kinds and build IDs recur within a trace
def _encode(part: KeyPart) -> bytes:
    # Type-tagged and length-prefixed, so ("a", "bc") and ("ab", "c") differ, and 1 differs from "1".
    if isinstance(part, int):
        raw = str(part).encode()
        return b"i" + len(raw).to_bytes(4, "big") + raw
    raw = part.encode("utf-8", "surrogatepass")
    return b"s" + len(raw).to_bytes(4, "big") + raw


@functools.lru_cache(maxsize=4096)
def _prefix(purpose: str, key: TraceKey) -> bytes:
    # The encoded head shared by every ID of one trace: cached, since a trace has many spans.
    return b"".join(_encode(part) for part in (SCHEME, purpose, key.instance, *key.parts, "|"))


@functools.lru_cache(maxsize=4096)
def _hasher(purpose: str, key: TraceKey) -> hashlib._Hash:
    # SHA-256 with the shared head already fed in: copy() resumes from it, so a span ID hashes only
    # its local parts. The same bytes as one sha256() call over the whole encoding.
    return hashlib.sha256(_prefix(purpose, key))


def _digest(purpose: str, key: TraceKey, local: tuple[KeyPart, ...]) -> bytes:
    h = _hasher(purpose, key).copy()
    h.update(b"".join([_encode(part) for part in local]))  # a list is joined faster than a generator
    return h.digest()


def _nonzero(value: int) -> int:
    return value or 1


@functools.lru_cache(maxsize=4096)
def trace_id(key: TraceKey) -> int:
    """The 128-bit trace ID of ``key``; never zero."""
    return _nonzero(int.from_bytes(_digest("trace", key, ())[:16], "big"))


@functools.lru_cache(maxsize=256)
def _encoded_kind(kind: str) -> bytes:
    # Span kinds are a handful of names in the code ("step", "queued", "root"): encoded once each.
    return _encode(kind)


def span_id(key: TraceKey, kind: str, *local: KeyPart) -> int:
    """The 64-bit ID of span ``kind`` (plus ``local`` key parts) in trace ``key``; never zero."""
    h = _hasher("span", key).copy()
    h.update(b"".join([_encoded_kind(kind), *map(_encode, local)]))
    return int.from_bytes(h.digest()[:8], "big") or 1  # _nonzero, inline: this is the hot path


def root_span_id(key: TraceKey) -> int:
    """The ID of the root span of trace ``key``."""
    return span_id(key, "root")


def format_trace_id(value: int) -> str:
    """Lower-case 32-digit hex, as W3C traceparent and trace UIs show it."""
    return f"{value:032x}"


def format_span_id(value: int) -> str:
    """Lower-case 16-digit hex."""
    return f"{value:016x}"
