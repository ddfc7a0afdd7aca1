"""Waiting out an unreachable database (Trio-flavoured).

Work that only reads Hydra's tables can always be done later: while the
database is down it is held, not dropped, and retried with capped backoff.
A table hydra-otel may not read (a missing GRANT) is waited out the same way;
the database adapter has already logged the GRANT to run, once, and made
health unhealthy, so the retries are not logged again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from hydra_otel.adapters.db import while_unavailable
from hydra_otel.core.backoff import Backoff
from hydra_otel.errors import DbUnavailable, PermissionDenied

log = logging.getLogger("hydra_otel.retry")
T = TypeVar("T")


async def until_db_answers(step: Callable[[], Awaitable[T]], *, waiting: str) -> T:
    """Run ``step`` until it raises neither :class:`DbUnavailable` (``waiting`` is logged on each)
    nor :class:`PermissionDenied`."""
    backoff = Backoff.transient(30.0)

    def wait(exc: DbUnavailable, delay: float) -> None:
        log.warning(waiting, extra={"error": str(exc), "retry_in_s": round(delay, 2)})

    while True:
        try:
            return await while_unavailable(step, backoff, wait)
        except PermissionDenied:
            await trio.sleep(backoff.next_delay())
