"""Bounded, locals-free exception renderings (`otel_bgtasks._tracebacks`)."""

from __future__ import annotations

import pytest

from otel_bgtasks._tracebacks import (
    bounded_message,
    bounded_text,
    bounded_traceback,
    exception_fields,
)

SECRET = "hunter2"


def raise_chain() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        raise ValueError(f"password={SECRET} rejected") from exc


def deep(n: int) -> None:
    if n == 0:
        raise RuntimeError("bottom")
    deep(n - 1)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


def caught(fn: object, *args: object) -> BaseException:
    try:
        fn(*args)  # type: ignore[operator]
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def test_a_chain_renders_both_exceptions_without_locals() -> None:
    exc = caught(raise_chain)
    text = bounded_traceback(exc)
    lines = text.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "KeyError: 'missing'" in lines
    assert "The above exception was the direct cause of the following exception:" in lines
    assert lines[-1] == "ValueError: password=hunter2 rejected"
    assert all(not line.startswith("    ^") for line in lines)  # no caret lines
    redacted = bounded_traceback(exc, redact=True)
    assert "hunter2" not in redacted
    assert redacted.splitlines()[-1] == "ValueError: <redacted>"


def test_a_deep_stack_keeps_its_first_and_last_frames() -> None:
    exc = caught(deep, 500)
    text = bounded_traceback(exc)
    assert "  … [438 frames cut] …" in text  # 502 frames: 32 kept at each end
    assert text.count(", in deep\n") == 63
    assert len(text) <= 8_192


def test_limits_hold_whatever_the_exception() -> None:
    cut = bounded_message(ValueError("x" * 10_000))
    assert (len(cut), cut[-25:]) == (1_024, "xx… [8976 characters cut]")
    assert bounded_message(Unprintable()) == "<Unprintable message that cannot be shown>"
    assert len(bounded_traceback(ValueError("y" * 50_000), limit=2_000)) <= 2_000
    assert bounded_text("short", 10) == "short"


def test_exception_fields_are_the_log_line_fields() -> None:
    exc = caught(raise_chain)
    assert exception_fields(exc) == {
        "error_type": "ValueError",
        "error_message": "password=hunter2 rejected",
        "exception": bounded_traceback(exc),
    }
    assert exception_fields(exc, redact=True)["error_message"] == "<redacted>"
    assert exception_fields(exc, with_locals=True)["exc_info"] is exc
    assert exception_fields() == {}  # nothing being handled
    try:
        raise_chain()
    except ValueError:
        assert exception_fields()["error_type"] == "ValueError"


@pytest.mark.parametrize("redact", [False, True])
def test_the_last_rendering_is_reused(redact: bool) -> None:
    exc = caught(raise_chain)
    assert bounded_traceback(exc, redact=redact) is bounded_traceback(exc, redact=redact)
