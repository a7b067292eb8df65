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
    "LOG_FRAMES",
    "LOG_TRACEBACK_LIMIT",
    "MESSAGE_LIMIT",
    "REDACTED",
    "TRACEBACK_LIMIT",
    "bounded_message",
    "bounded_text",
    "bounded_traceback",
    "exception_fields",
    "task_traceback",
]

MESSAGE_LIMIT = 1_024
"""Characters of an exception message in logs, spans and dead letters."""

TRACEBACK_LIMIT = 8_192
"""Characters of a traceback (its head and its tail are kept: where it started, where it broke)."""

REDACTED = "<redacted>"
"""What replaces an exception message when messages are redacted."""

_FRAMES = 64  # frames formatted at most: the first and last 32 (a RecursionError has 1,000)

LOG_FRAMES = 8
"""Frames of each exception in a failure's log line (the innermost: where it broke)."""

LOG_TRACEBACK_LIMIT = 2_048
"""Characters of the traceback in a failure's log line (the span and the dead letter keep the
whole, `TRACEBACK_LIMIT`)."""

# Frames every task's traceback starts with (this package's executor, tenacity's retry loop,
# Starlette's and anyio's thread pool, asyncio): the same for every failure, so a log line
# skips them; the app's frames (and the libraries they call) follow. The demo is app code.
_PLUMBING = (
    "/otel_bgtasks/",
    "/tenacity/",
    "/anyio/",
    "/starlette/",
    "/asyncio/",
    "/concurrent/futures/",
)
_APP = ("/otel_bgtasks/demo/",)


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


def _plumbing(frame: traceback.FrameSummary) -> bool:
    name = frame.filename.replace("\\", "/")
    return any(p in name for p in _PLUMBING) and not any(a in name for a in _APP)


def _task_frames(frames: list[traceback.FrameSummary]) -> tuple[list[traceback.FrameSummary], int]:
    """The frames from the task down, at most `LOG_FRAMES` (the innermost); how many were cut.

    The leading plumbing frames go; when every frame is plumbing (an error of the package's
    own, a circuit or timeout refusal) the last one stays, so the line says where.
    """
    start = 0
    while start < len(frames) - 1 and _plumbing(frames[start]):
        start += 1
    kept = frames[start:][-LOG_FRAMES:]
    return kept, len(frames) - len(kept)


def _format(
    exc: BaseException, redact: bool, depth: int, seen: set[int], brief: bool = False
) -> list[str]:
    seen.add(id(exc))
    parts: list[str] = []
    cause = exc.__cause__
    context = None if exc.__suppress_context__ else exc.__context__
    chained = cause if cause is not None else context
    if chained is not None and id(chained) not in seen and depth < 4:
        parts.extend(_format(chained, redact, depth + 1, seen, brief))
        parts.append(
            "\nThe above exception was the direct cause of the following exception:\n\n"
            if cause is not None
            else "\nDuring handling of the above exception, another exception occurred:\n\n"
        )
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        parts.append("Traceback (most recent call last):\n")
    if brief:
        kept, cut = _task_frames(list(frames))
        if cut:
            parts.append(f"  … [{cut} frames of the executor and the thread pool cut] …\n")
        parts.extend(_frames(kept))
    elif len(frames) > _FRAMES:
        half = _FRAMES // 2
        parts.extend(_frames(frames[:half]))
        parts.append(f"  … [{len(frames) - _FRAMES} frames cut] …\n")
        parts.extend(_frames(frames[-half:]))
    else:
        parts.extend(_frames(frames))
    name = _qualified(exc)
    message = REDACTED if redact else bounded_message(exc)
    parts.append(f"{name}: {message}\n" if message else f"{name}\n")
    return parts


def task_traceback(
    exc: BaseException, *, redact: bool = False, limit: int = LOG_TRACEBACK_LIMIT
) -> str:
    """The traceback of `exc` for a failure's log line: each exception of the chain with only
    its frames from the task down (at most `LOG_FRAMES`), without locals, at most `limit`
    characters (head and tail kept). Spans and dead letters keep `bounded_traceback`."""
    try:
        text = "".join(_format(exc, redact, depth=0, seen=set(), brief=True))
    except Exception:  # a traceback we cannot render must not lose the failure
        return f"{type(exc).__name__}: <traceback that cannot be shown>"
    if len(text) > limit:
        head = limit // 4
        tail = limit - head - 64
        text = f"{text[:head]}\n  … [{len(text) - head - tail} characters cut] …\n{text[-tail:]}"
    return text


def _qualified(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    if module in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def exception_fields(
    exc: BaseException | None = None,
    *,
    redact: bool = False,
    with_locals: bool = False,
    brief: bool = False,
) -> dict[str, Any]:
    """The log fields of `exc` (default: the exception being handled): ``error_type``, a
    bounded ``error_message`` and ``exception``, a bounded traceback string without locals
    (with `brief`, `task_traceback`: the task's frames only, 2 kB at most).

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
        "exception": task_traceback(exc, redact=redact)
        if brief
        else bounded_traceback(exc, redact=redact),
    }
    if with_locals:
        fields["exc_info"] = exc
    return fields
