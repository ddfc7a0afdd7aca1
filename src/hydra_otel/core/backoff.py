"""Capped exponential backoff with jitter, deterministic under a seeded RNG.

The delay before retry ``n`` (0-based) is ``min(cap, base * factor**n)``,
scaled by a uniform factor in ``[1 - jitter, 1 + jitter]`` drawn from the
injected :class:`random.Random`, so tests can assert exact retry times.

The presets name the ladders the daemon uses, by what is waited for:
:meth:`Backoff.transient` (a database or endpoint that is away for now),
:meth:`Backoff.restart` (a crash or a missing grant: not over in a second) and
:meth:`Backoff.interactive` (someone waits at a terminal).
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

    @classmethod
    def transient(cls, cap: float = 10.0) -> Backoff:
        """0.5 s doubling up to ``cap``: a database or endpoint that is away for now."""
        return cls(base=0.5, factor=2.0, cap=cap, jitter=0.2)

    @classmethod
    def restart(cls) -> Backoff:
        """1 s doubling up to 30 s: after a crash, or for a grant someone has to give."""
        return cls(base=1.0, factor=2.0, cap=30.0, jitter=0.2)

    @classmethod
    def interactive(cls) -> Backoff:
        """0.2 s doubling up to 1 s: a one-shot command whose operator waits for the answer."""
        return cls(base=0.2, factor=2.0, cap=1.0, jitter=0.2)

    def next_delay(self) -> float:
        """The delay to wait now; each call moves one step up the ladder."""
        raw = min(self.cap, self.base * self.factor**self.attempt)
        self.attempt += 1
        return min(self.cap, raw * self.rng.uniform(1 - self.jitter, 1 + self.jitter))

    def reset(self) -> None:
        """Start again from ``base`` (after a success)."""
        self.attempt = 0
