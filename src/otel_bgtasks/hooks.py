"""User hooks: typed, and always called through one helper that contains their failures."""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.trace import Span

from otel_bgtasks._logger import log
from otel_bgtasks.state import TaskCallState

__all__ = ["TaskHook", "call_hook"]

TaskHook = Callable[[Span, TaskCallState], None]
"""Called with the task span and state: at start (`start_hook`) and at the end (`end_hook`)."""


def call_hook(hook: TaskHook | None, span: Span, state: TaskCallState) -> None:
    """Run a user hook; a hook that raises is logged and never breaks the task."""
    if hook is None:
        return
    try:
        hook(span, state)
    except Exception:  # a broken hook must not lose the task or its span
        log.exception("bgtasks hook failed", hook=getattr(hook, "__qualname__", repr(hook)))
