"""adapters/export_worker.py's framing: whole frames are read, a cut one ends the input."""

from __future__ import annotations

import io

from hydra_otel.adapters.export_worker import BATCH, frame, read_frame, serve


def test_frames_are_read_back_in_order() -> None:
    """Each frame's body comes back whole, then None at the end of the input."""
    data = io.BytesIO(frame(b"first") + frame(b"") + frame(b"x" * 70_000))
    assert [read_frame(data), read_frame(data), read_frame(data), read_frame(data)] == [
        b"first",
        b"",
        b"x" * 70_000,
        None,
    ]


def test_a_cut_frame_is_the_end_of_the_input() -> None:
    """A parent that died mid-write leaves part of a frame: the child stops, it does not guess."""
    assert read_frame(io.BytesIO(frame(b"whole body")[:-3])) is None
    assert read_frame(io.BytesIO(b"\x00\x00")) is None


def test_serve_without_an_init_frame_answers_nothing() -> None:
    """A child whose first frame is not the init frame exits without writing to its parent."""
    out = io.BytesIO()
    serve(io.BytesIO(frame(BATCH + b"\x01")), out)
    assert out.getvalue() == b""
