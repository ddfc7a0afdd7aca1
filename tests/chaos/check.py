"""The chaos run's verdict: the receiver's spans against Hydra's database (and the workload's record).

Every evaluation, build and step with a row must have its span, under a parent that was
delivered, with the database's times and status; no span ID may arrive twice with different
content. Span IDs are computed with the core ID functions from the rows; attempt numbers come
from the workload's own record of what it played, and are checked against the rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from hydra_otel.core import ids
from hydra_otel.core.spans import Status
from hydra_otel.core.status import status_info
from hydra_otel.demo.sandbox.receiver import ReceivedSpan, attributes_dict
from tests.chaos.workload import Build

S = 1_000_000_000
Key = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Expected:
    """One span that must be there, with what it must say."""

    key: Key
    what: str
    parent: Key | None
    end_s: int | None = None
    start_s: int | None = None
    status: int | None = None  # hydra.build.status / hydra.step.status
    status_key: str = ""


def key(trace: ids.TraceKey, span_id: int) -> Key:
    return ids.trace_id(trace).to_bytes(16, "big"), span_id.to_bytes(8, "big")


def expected_spans(
    instance: str,
    evals: Sequence[asyncpg.Record],
    builds: Sequence[asyncpg.Record],
    steps: Sequence[asyncpg.Record],
    played: dict[int, Build],
) -> tuple[list[Expected], list[str]]:
    """What the rows require, and any disagreement between the rows and what the workload played."""
    out: list[Expected] = []
    problems: list[str] = []
    for e in evals:
        trace = ids.eval_trace(instance, e["id"])
        root = key(trace, ids.root_span_id(trace))
        out.append(Expected(root, f"eval {e['id']}", None, end_s=None))
        evaluate_end = e["timestamp"] - e["evaltime"] + e["evaltime"]
        out.append(
            Expected(
                key(trace, ids.span_id(trace, "evaluate")),
                f"eval {e['id']} evaluate",
                root,
                end_s=evaluate_end,
            )
        )
        out.append(Expected(key(trace, ids.span_id(trace, "checkout")), f"eval {e['id']} checkout", root))
    steps_of: dict[int, list[asyncpg.Record]] = {}
    for s in steps:
        steps_of.setdefault(s["build"], []).append(s)
    for b in builds:
        p = played.get(b["id"])
        if p is None:
            problems.append(f"build {b['id']}: a row the workload did not create")
            continue
        if not b["finished"]:
            problems.append(f"build {b['id']}: not finished at the end")
            continue
        trace = ids.eval_trace(instance, p.eval_id)
        root = key(trace, ids.root_span_id(trace))
        last = p.attempts[-1]
        if (b["buildstatus"], b["stoptime"]) != (last.status, last.stop):
            problems.append(
                f"build {b['id']}: row status/stop {b['buildstatus']}/{b['stoptime']}, played {last.status}/{last.stop}"
            )
        attempt_of: dict[int, int] = {}
        for a, attempt in enumerate(p.attempts):
            stop = b["stoptime"] if a == len(p.attempts) - 1 else attempt.stop
            out.append(
                Expected(
                    key(trace, ids.span_id(trace, "build", b["id"], a)),
                    f"build {b['id']} attempt {a}",
                    root,
                    end_s=stop,
                    status=attempt.status,
                    status_key="hydra.build.status",
                )
            )
            attempt_of.update(dict.fromkeys(attempt.steps, a))
        for s in steps_of.get(b["id"], []):
            if s["status"] is None:
                problems.append(f"step {b['id']}.{s['stepnr']}: never finished")
                continue
            found = attempt_of.get(s["stepnr"])
            if found is None:
                problems.append(f"step {b['id']}.{s['stepnr']}: a row the workload did not write")
                continue
            parent = key(trace, ids.span_id(trace, "build", b["id"], found))
            start = s["starttime"] if s["starttime"] is not None else (s["stoptime"] or b["stoptime"])
            end = s["stoptime"] if s["stoptime"] is not None else start
            out.append(
                Expected(
                    key(trace, ids.span_id(trace, "step", b["id"], s["stepnr"])),
                    f"step {b['id']}.{s['stepnr']}",
                    parent,
                    end_s=end,
                    start_s=start,
                    status=s["status"],
                    status_key="hydra.step.status",
                )
            )
    return out, problems


def differing_duplicates(spans: Iterable[ReceivedSpan]) -> list[str]:
    """Span IDs that arrived more than once with different content."""
    seen: dict[Key, set[bytes]] = {}
    names: dict[Key, str] = {}
    for s in spans:
        k = (bytes(s.span.trace_id), bytes(s.span.span_id))
        seen.setdefault(k, set()).add(s.span.SerializeToString(deterministic=True))
        names[k] = s.span.name
    return sorted(f"{names[k]} {k[1].hex()} ({len(v)} versions)" for k, v in seen.items() if len(v) > 1)


def orphans(spans: Iterable[ReceivedSpan]) -> list[str]:
    """Spans whose parent no delivered span is."""
    spans = list(spans)
    have = {(bytes(s.span.trace_id), bytes(s.span.span_id)) for s in spans}
    return sorted(
        {
            f"{s.span.name} {s.span.span_id.hex()} (parent {s.span.parent_span_id.hex()})"
            for s in spans
            if s.span.parent_span_id and (bytes(s.span.trace_id), bytes(s.span.parent_span_id)) not in have
        }
    )


def missing(expected: Sequence[Expected], spans: Iterable[ReceivedSpan]) -> list[Expected]:
    """Expected spans not delivered."""
    have = {(bytes(s.span.trace_id), bytes(s.span.span_id)) for s in spans}
    return [e for e in expected if e.key not in have]


def mismatches(expected: Sequence[Expected], spans: Iterable[ReceivedSpan]) -> list[str]:
    """Delivered expected spans whose parent, times or status differ from the rows (last version wins)."""
    latest: dict[Key, ReceivedSpan] = {}
    for s in spans:
        latest[(bytes(s.span.trace_id), bytes(s.span.span_id))] = s
    out: list[str] = []
    for e in expected:
        got = latest.get(e.key)
        if got is None:
            continue
        span = got.span
        parent = (e.key[0], bytes(span.parent_span_id)) if span.parent_span_id else None
        if parent != e.parent:
            out.append(
                f"{e.what}: parent {span.parent_span_id.hex() or '-'}, expected {e.parent and e.parent[1].hex()}"
            )
        if e.end_s is not None and span.end_time_unix_nano != e.end_s * S:
            out.append(f"{e.what}: ends at {span.end_time_unix_nano // S}, the row says {e.end_s}")
        if e.start_s is not None and span.start_time_unix_nano != e.start_s * S:
            out.append(f"{e.what}: starts at {span.start_time_unix_nano // S}, the row says {e.start_s}")
        if e.status_key:
            attrs = attributes_dict(span.attributes)
            got_status = attrs.get(e.status_key)
            if got_status != e.status:
                out.append(f"{e.what}: {e.status_key} {got_status!r}, the row says {e.status}")
            error = span.status.code == 2  # STATUS_CODE_ERROR
            if error != (status_info(e.status).span_status is Status.ERROR):
                out.append(f"{e.what}: span status {span.status.code} for Hydra status {e.status}")
    return out
