"""Capped exponential backoff with jitter, deterministic under a seeded RNG.

The delay before retry ``n`` (0-based) is ``min(cap, base * factor**n)``,
scaled by a uniform factor in ``[1 - jitter, 1 + jitter]`` drawn from the
injected :class:`random.Random`, so tests can assert exact retry times.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True, kw_only=True)
class Backoff:
    """Retry delays: ``next_delay()`` after a failure, ``reset()`` after a success."""

    base: float = 0.1
    factor: float = 2.0
    cap: float = 10.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """The delay to wait now; each call moves one step up the ladder."""
        raw = min(self.cap, self.base * self.factor**self.attempt)
        self.attempt += 1
        return min(self.cap, raw * self.rng.uniform(1 - self.jitter, 1 + self.jitter))

    def reset(self) -> None:
        """Start again from ``base`` (after a success)."""
        self.attempt = 0
