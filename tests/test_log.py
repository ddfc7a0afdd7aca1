"""Log formatting: JSON and text lines, and the redactor that keeps secrets out of every line."""

from __future__ import annotations

import json
import logging

import pytest

from hydra_otel.log import JsonFormatter, RedactingFormatter, Redactor, TextFormatter

SECRET = 'p?a#s/s@"w\\rd'


def record(msg: str, *args: object, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("hydra_otel.test", logging.ERROR, __file__, 1, msg, args, None)
    if exc is not None:
        rec.exc_info = (type(exc), exc, exc.__traceback__)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


@pytest.mark.parametrize("inner", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
@pytest.mark.parametrize(
    "rec",
    [
        record("connecting to postgresql://u:%s@h/db", SECRET),
        record("starting", database=f"postgresql://u:{SECRET}@h/db"),
        record("failed", exc=ValueError(f"invalid DSN postgresql://u:{SECRET}@h/db")),
        record("repr %r", {"password": SECRET}),
        record("encoded %s", "p%3Fa%23s%2Fs%40%22w%5Crd"),
    ],
    ids=["message", "extra", "traceback", "repr", "percent-encoded"],
)
def test_secret_never_in_a_line(inner: logging.Formatter, rec: logging.LogRecord) -> None:
    """A secret is masked in the message, the extra fields and tracebacks, however the line escapes it."""
    line = RedactingFormatter(inner, Redactor([SECRET])).format(rec)
    assert "***" in line
    for fragment in ("s/s@", "w\\rd", "w\\\\rd", "%23s%2Fs"):
        assert fragment not in line, line


def test_json_stays_json() -> None:
    """Masking inside a JSON line keeps it valid JSON."""
    line = RedactingFormatter(JsonFormatter(), Redactor([SECRET])).format(record("x %s", SECRET))
    assert json.loads(line)["message"] == "x ***"


REDACTOR_CASES: list[tuple[list[str], str, str]] = [
    (["hunter2"], "pw=hunter2 and hunter2!", "pw=*** and ***!"),
    (["abc"], "abc is too short to mask", "abc is too short to mask"),
    ([], "nothing to mask", "nothing to mask"),
    (["secret", "secret-longer"], "secret-longer", "***"),
    (["a b"], "a b", "a b"),
    (["sp ace"], "sp%20ace / sp ace", "*** / ***"),
]


@pytest.mark.parametrize(("secrets", "text", "expected"), REDACTOR_CASES)
def test_redactor(secrets: list[str], text: str, expected: str) -> None:
    """Secrets of four characters or more are masked, longer ones first; shorter ones are left alone."""
    assert Redactor(secrets)(text) == expected
