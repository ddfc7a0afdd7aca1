"""The span export process: encodes and sends the batches the daemon hands it through a pipe.

Run as ``python -m hydra_otel.adapters.export_worker IN_FD OUT_FD`` by
:class:`~hydra_otel.adapters.export_process.ProcessSink`, never by hand. It is a plain
synchronous program (no Trio): it reads one frame, exports, answers, and reads the
next. The export itself is :class:`~hydra_otel.adapters.otlp.OtlpSink`'s, called
directly, so request splitting, resuming an unfinished batch, isolating a refused span
and repairing impossible values (core/sanitize.py) behave exactly as in the daemon's
own thread.

Frames, both ways, are a 4-byte big-endian length and a body. From the parent: the
init frame (``I`` + pickle of the exporter settings, resource, request size limit,
log level and secrets to redact), then per export either ``B`` (a flag byte saying
whether to count repaired spans, then :func:`~hydra_otel.core.span_tuples.pack`'s
bytes) or ``R`` (resume the unfinished batch). To the parent: marshal of
``(done, refused (index, reason) pairs, repaired, example, reason, unsettled)``.

It exits when its input ends (the daemon closed the pipe, or died), so it never
outlives the daemon by more than one export's timeout. SIGINT and SIGTERM are
ignored: a Ctrl-C or a service manager's stop reaches the whole process group, and the
daemon still has to drain its last spans through this process.
"""

from __future__ import annotations

import logging
import marshal
import os
import pickle
import signal
import sys
from collections.abc import Sequence
from typing import BinaryIO

from opentelemetry.sdk.resources import Resource

from hydra_otel import log as logconf
from hydra_otel.adapters.otlp import Delivery, ExporterSettings, OtlpSink, make_exporter
from hydra_otel.core.span_tuples import unpack
from hydra_otel.core.spans import SpanRecord

INIT, BATCH, RESUME = b"I", b"B", b"R"
_LENGTH = 4
log = logging.getLogger("hydra_otel.export")


def frame(body: bytes) -> bytes:
    """``body`` with its length in front."""
    return len(body).to_bytes(_LENGTH, "big") + body


def read_frame(inp: BinaryIO) -> bytes | None:
    """The next frame's body, or None at the end of the input (a cut frame counts as the end)."""
    head = inp.read(_LENGTH)
    if len(head) < _LENGTH:
        return None
    size = int.from_bytes(head, "big")
    body = inp.read(size)
    return body if len(body) == size else None


def init_frame(
    settings: ExporterSettings, resource: Resource, max_request_bytes: int, level: str, secrets: Sequence[str]
) -> bytes:
    """The first frame the parent sends: everything the child needs to build its sink."""
    attributes = [
        (str(k), v) for k, v in resource.attributes.items() if isinstance(v, str | bool | int | float)
    ]
    # Pickled, once per child: the settings hold enums (StrEnum), which marshal does not take.
    init = (settings, attributes, max_request_bytes, str(level), [str(s) for s in secrets])
    return frame(INIT + pickle.dumps(init, protocol=pickle.HIGHEST_PROTOCOL))


def _sink(body: bytes) -> OtlpSink:
    settings, attributes, max_bytes, level, secrets = pickle.loads(body)  # the parent's own frame
    logconf.configure(level, secrets)
    resource = Resource(dict(attributes))
    return OtlpSink(make_exporter(settings), resource, max_request_bytes=max_bytes)


def answer(delivery: Delivery, batch: Sequence[SpanRecord], unsettled: int) -> bytes:
    """``delivery`` as the parent reads it back: refused spans as indexes into ``batch``."""
    refused: list[tuple[int, str]] = []
    if delivery.refused:
        index = {id(r): i for i, r in enumerate(batch)}
        refused = [(index[id(r)], reason) for r, reason in delivery.refused]
    plain = (delivery.done, refused, delivery.repaired, delivery.repair_example, delivery.reason, unsettled)
    return frame(marshal.dumps(plain))


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """Answer export frames from ``inp`` on ``out`` until ``inp`` ends."""
    first = read_frame(inp)
    if first is None or first[:1] != INIT:
        return
    sink = _sink(first[1:])
    batch: list[SpanRecord] = []
    try:
        while (body := read_frame(inp)) is not None:
            kind = body[:1]
            count_repairs = True
            extra_repaired: list[tuple[int, str]] = []
            if kind == BATCH:
                count_repairs = body[1] == 1
                batch, extra_repaired = unpack(body[2:])
            delivery = sink.send(batch)  # RESUME: the same list object, so the sink resumes it
            if extra_repaired:  # spans pack() repaired in the parent: counted here, as the encoder would
                delivery = Delivery(
                    done=delivery.done,
                    refused=delivery.refused,
                    repaired=delivery.repaired + len(extra_repaired),
                    repair_example=delivery.repair_example or extra_repaired[0][1],
                    reason=delivery.reason,
                )
            if not count_repairs:  # a batch sent again after a restart: its repairs were counted once
                delivery = Delivery(done=delivery.done, refused=delivery.refused, reason=delivery.reason)
            out.write(answer(delivery, batch, sink.unsettled()))
            out.flush()
    finally:
        sink.shutdown()


def main(argv: Sequence[str]) -> int:
    """Serve on the two inherited descriptors named in ``argv``; the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    in_fd, out_fd = int(argv[1]), int(argv[2])
    with os.fdopen(in_fd, "rb") as inp, os.fdopen(out_fd, "wb") as out:
        try:
            serve(inp, out)
        except BrokenPipeError:  # the daemon is gone: nobody to answer
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
