"""Bounded, locals-free renderings of an exception: what logs, spans and dead letters carry.

A failing task's exception is rendered once per failure, whatever it holds: a message of
megabytes, a `__str__` that raises, a RecursionError 1,000 frames deep. Every rendering here
has a fixed upper bound in characters and never includes local variables.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

from otel_bgtasks.errors import error_type

__all__ = [
    "MESSAGE_LIMIT",
    "REDACTED",
    "TRACEBACK_LIMIT",
    "bounded_message",
    "bounded_text",
    "bounded_traceback",
    "describe",
    "exception_fields",
]

MESSAGE_LIMIT = 1_024
"""Characters of an exception message in logs, spans and dead letters."""

TRACEBACK_LIMIT = 8_192
"""Characters of a traceback (its head and its tail are kept: where it started, where it broke)."""

REDACTED = "<redacted>"
"""What replaces an exception message when messages are redacted."""

_FRAMES = 64  # frames formatted at most: the first and last 32 (a RecursionError has 1,000)
_GROUP_MEMBERS = 4  # exceptions of an ExceptionGroup rendered at most


def bounded_text(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    note = f"… [{len(text) - limit} characters cut]"
    return text[: max(limit - len(note), 0)] + note


def bounded_message(exc: BaseException, limit: int = MESSAGE_LIMIT) -> str:
    """``str(exc)`` cut to `limit` characters; a `__str__` that raises gives a placeholder."""
    try:
        text = str(exc)
    except Exception:  # an exception whose __str__ raises (or an int too long to print)
        return f"<{type(exc).__name__} message that cannot be shown>"
    return bounded_text(text, limit)


def bounded_traceback(
    exc: BaseException, *, redact: bool = False, limit: int = TRACEBACK_LIMIT
) -> str:
    """The traceback of `exc` (and its causes) without locals, at most `limit` characters.

    With `redact`, exception messages are replaced by ``<redacted>``. A failure is rendered
    for its dead letter, its span and its log line: the last rendering is reused.
    """
    key = (redact, limit)
    last = _last.value
    if last is not None and last[0] is exc and last[1] == key:
        return last[2]
    try:
        parts = _format(exc, redact, depth=0, seen=set())
    except Exception:  # a traceback we cannot render must not lose the failure
        return f"{type(exc).__name__}: <traceback that cannot be shown>"
    text = "".join(parts)
    if len(text) > limit:
        head = limit // 4
        tail = limit - head - 64
        text = f"{text[:head]}\n  … [{len(text) - head - tail} characters cut] …\n{text[-tail:]}"
    _last.value = (exc, key, text)
    return text


class _Last(threading.local):
    """The last rendering of this thread (one exception kept alive at most per thread)."""

    value: tuple[BaseException, tuple[bool, int], str] | None = None


_last = _Last()


def _frames(frames: Sequence[traceback.FrameSummary]) -> list[str]:
    # Plain lines, no 3.11 carets: computing them parses each line's source (costly per frame).
    out = []
    for frame in frames:
        line = (frame.line or "").strip()
        where = f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n'
        out.append(f"{where}    {line}\n" if line else where)
    return out


def _format(exc: BaseException, redact: bool, depth: int, seen: set[int]) -> list[str]:
    seen.add(id(exc))
    parts: list[str] = []
    cause = exc.__cause__
    context = None if exc.__suppress_context__ else exc.__context__
    chained = cause if cause is not None else context
    if chained is not None and id(chained) not in seen and depth < 4:
        parts.extend(_format(chained, redact, depth + 1, seen))
        parts.append(
            "\nThe above exception was the direct cause of the following exception:\n\n"
            if cause is not None
            else "\nDuring handling of the above exception, another exception occurred:\n\n"
        )
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        parts.append("Traceback (most recent call last):\n")
    if len(frames) > _FRAMES:
        half = _FRAMES // 2
        parts.extend(_frames(frames[:half]))
        parts.append(f"  … [{len(frames) - _FRAMES} frames cut] …\n")
        parts.extend(_frames(frames[-half:]))
    else:
        parts.extend(_frames(frames))
    name = _qualified(exc)
    message = REDACTED if redact else bounded_message(exc)
    parts.append(f"{name}: {message}\n" if message else f"{name}\n")
    if isinstance(exc, BaseExceptionGroup) and depth < 4:  # a TaskGroup's failures
        members = exc.exceptions
        for number, member in enumerate(members[:_GROUP_MEMBERS], 1):
            if id(member) in seen:
                continue
            parts.append(f"+---------------- {number} of {len(members)} ----------------\n")
            parts.extend(_format(member, redact, depth + 1, seen))
        if len(members) > _GROUP_MEMBERS:
            parts.append(
                f"+---------------- {len(members) - _GROUP_MEMBERS} more ----------------\n"
            )
    return parts


def _qualified(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    if module in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def describe(exc: BaseException, *, redact: bool = False) -> str:
    """``"Type: message"`` for an outcome or a report line: the message bounded, or
    ``<redacted>`` with `redact` (``redact_exception_messages``)."""
    message = REDACTED if redact else bounded_message(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def exception_fields(
    exc: BaseException | None = None, *, redact: bool = False, with_locals: bool = False
) -> dict[str, Any]:
    """The log fields of `exc` (default: the exception being handled): ``error_type``, a
    bounded ``error_message`` and ``exception``, a bounded traceback string without locals.

    The package's log lines use these instead of ``exc_info``: structlog's default console
    renderer and ``dict_tracebacks`` render every frame's locals (task arguments, secrets),
    at a cost without bound. `with_locals` adds ``exc_info`` (an explicit opt-in).
    """
    if exc is None:
        exc = sys.exc_info()[1]
        if exc is None:
            return {}
    fields: dict[str, Any] = {
        "error_type": error_type(exc),
        "error_message": REDACTED if redact else bounded_message(exc),
        "exception": bounded_traceback(exc, redact=redact),
    }
    if with_locals:
        fields["exc_info"] = exc
    return fields
