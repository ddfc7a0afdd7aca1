"""Remembering recently exported spans, so an identical re-export is skipped.

Step spans are exported when ``step_finished`` arrives and again with their
build; ``build_finished`` is at-least-once and comes in chunks that repeat the
build. Deterministic rendering makes those repeats *equal* records with the
same IDs; :class:`RecentSpans` drops them so backends do not see duplicate
span IDs. A record with the same IDs but different content (a restarted
build's new attempt never has the same IDs, but a row corrected by Hydra
might) is let through. Bounded: the oldest entries are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict

from hydra_otel.core.spans import SpanRecord


class RecentSpans:
    """An LRU of (trace ID, span ID) -> content hash."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._capacity = capacity
        self._seen: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.skipped = 0

    def known(self, trace_id: int, span_id: int) -> bool:
        """Was a span with these IDs exported recently, whatever its content?"""
        return (trace_id, span_id) in self._seen

    def fresh(self, record: SpanRecord) -> bool:
        """True if ``record`` should be exported (not an exact repeat of a recent one)."""
        key = (record.trace_id, record.span_id)
        digest = hash(record)
        seen = self._seen
        known = seen.get(key)
        if known == digest:
            seen.move_to_end(key)
            self.skipped += 1
            return False
        seen[key] = digest
        if known is not None:  # new content under known IDs: now the most recent entry
            seen.move_to_end(key)
        elif len(seen) > self._capacity:  # a new entry (appended last): the oldest goes
            seen.popitem(last=False)
        return True


class RecentKeys:
    """A bounded memory of keys already handled (oldest forgotten first).

    The catch-up and the resolver share one: a build the live path rendered is
    not queued again by the next catch-up scan of the same window, and a build the
    catch-up queued is not rendered again from a late notification.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._keys: OrderedDict[object, None] = OrderedDict()
        self._capacity = capacity

    def __contains__(self, key: object) -> bool:
        """Is ``key`` remembered? (A look-up only: nothing is recorded or refreshed.)"""
        return key in self._keys

    def add(self, key: object) -> bool:
        """Remember ``key``; True if it is new."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self._capacity:
            self._keys.popitem(last=False)
        return True
