"""``hydra-otel backfill``: export past evaluations, with their builds and steps, from Hydra's tables.

Theory of operation. The backfill is the daemon's own pipeline without the
live half: a producer selects the JobsetEvals whose ``timestamp`` lies in
``[since, until)`` (optionally of some jobsets), in ID order, a bounded page
(``--batch`` evaluations) at a time, and turns each page into the work items
the catch-up sends: one :class:`~hydra_otel.core.evals.AddedEval` per
evaluation (``started_ns=None``: no ``evaluator run`` span, which only the live
notifications know) and one :class:`~hydra_otel.core.events.BuildFinished` per
finished build the evaluation created (``jobsetevalmembers.isnew = 1``), then a
:class:`~hydra_otel.core.catchup.Checkpoint`. The daemon's
:class:`~hydra_otel.tasks.resolver.Resolver` renders them and
:func:`~hydra_otel.tasks.exporter.run_exporter` exports them, started by the
same :func:`~hydra_otel.pipeline.tail.start_tail` as ``hydra-otel run``, so the
spans are the live path's spans, byte for byte, with the same IDs
(docs/backfill.md says which live spans a backfill cannot rebuild).

Progress is the backfill's own: ``<state dir>/backfill.json`` holds, per
selection (since, until, jobsets), the last evaluation ID whose page the OTLP
endpoint acknowledged. The exporter's ``commit`` writes it only after that
acknowledgement, so a run that is interrupted (Ctrl-C, ``kill``, a crash)
resumes after the last acknowledged page when started again with the same
arguments; whatever it re-exports is identical. The daemon's
``progress.sqlite3`` is never touched.

Load is bounded three ways: pages of ``--batch`` evaluations and
:data:`BUILD_PAGE` builds per query, bounded channels between the stages
(backpressure reaches the producer, so the database is read no faster than
the endpoint takes spans), and a :class:`TokenBucket` of ``--rate`` spans per
second in front of the sink.

The async functions are **Trio-flavoured** and need ``trio_asyncio.open_loop()``
(``adapters.db.open_loop``) around them. :func:`run_backfill` is the
synchronous entry point for ``cli.py``.
"""

from hydra_otel.backfill.options import (
    DEFAULT_BATCH,
    DEFAULT_RATE,
    LOCK_FILE,
    PROGRESS_FILE,
    BackfillError,
    BackfillOptions,
    add_backfill_command,
    options_from_args,
    parse_time,
)
from hydra_otel.backfill.progress import BackfillProgressFile, PacedSink, Tally, TokenBucket, progress_text
from hydra_otel.backfill.run import Backfill, BackfillResult, backfill, run_backfill

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_RATE",
    "LOCK_FILE",
    "PROGRESS_FILE",
    "Backfill",
    "BackfillError",
    "BackfillOptions",
    "BackfillProgressFile",
    "BackfillResult",
    "PacedSink",
    "Tally",
    "TokenBucket",
    "add_backfill_command",
    "backfill",
    "options_from_args",
    "parse_time",
    "progress_text",
    "run_backfill",
]
