"""One producer and one consumer span per message: upstream's Celery signal handlers are
filtered out for our task.

``opentelemetry-instrumentation-celery`` connects its handlers to six Celery signals with
``sender=None`` (every task) and has no per-task opt-out. For the messages of our task it
would add a second producer span (``apply_async/otel_bgtasks.run``), a second consumer span
(``run/otel_bgtasks.run``) parented under the request, and write its own ``traceparent`` into
the message headers. `filter_upstream` wraps the live-receiver lookup of those six signals so
that, for our task only, receivers defined in upstream's package are not called; every other
task keeps upstream's spans. The filter works at send time, so the order in which the two
instrumentations are installed does not matter, and `unfilter_upstream` is its exact inverse.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.utils.dispatch.signal import Signal

__all__ = ["UPSTREAM_MODULE", "filter_upstream", "filtered", "unfilter_upstream"]

UPSTREAM_MODULE = "opentelemetry.instrumentation.celery"
"""Receivers whose ``__module__`` starts with this are upstream's."""

# Publishing signals name the task by its name (a str); running signals pass the task object.
_SIGNALS: tuple[Signal, ...] = (
    signals.before_task_publish,
    signals.after_task_publish,
    signals.task_prerun,
    signals.task_postrun,
    signals.task_failure,
    signals.task_retry,
)

_lock = threading.Lock()
_names: dict[str, int] = {}  # our task names -> number of filter_upstream calls


def _sender_name(sender: Any) -> str | None:
    if isinstance(sender, str):
        return sender
    name = getattr(sender, "name", None)
    return name if isinstance(name, str) else None


def _is_upstream(receiver: Any) -> bool:
    module = getattr(receiver, "__module__", None) or ""
    return isinstance(module, str) and module.startswith(UPSTREAM_MODULE)


def _filtering(original: Callable[[Any], list[Any]]) -> Callable[[Any], list[Any]]:
    def _live_receivers(sender: Any) -> list[Any]:
        receivers = original(sender)
        if _names and _sender_name(sender) in _names:
            return [r for r in receivers if not _is_upstream(r)]
        return receivers

    _live_receivers.__bgtasks_filter__ = True  # type: ignore[attr-defined]
    return _live_receivers


def filter_upstream(task_name: str) -> None:
    """Stop upstream's Celery handlers for messages of `task_name` (counted: call
    `unfilter_upstream` as often)."""
    with _lock:
        _names[task_name] = _names.get(task_name, 0) + 1
        for signal in _SIGNALS:
            if not getattr(signal.__dict__.get("_live_receivers"), "__bgtasks_filter__", False):
                signal._live_receivers = _filtering(signal._live_receivers)


def unfilter_upstream(task_name: str) -> None:
    """Undo one `filter_upstream(task_name)`; the signals are restored when no name is left."""
    with _lock:
        left = _names.get(task_name, 0) - 1
        if left > 0:
            _names[task_name] = left
            return
        _names.pop(task_name, None)
        if _names:
            return
        for signal in _SIGNALS:
            if "_live_receivers" in signal.__dict__:
                del signal._live_receivers


def filtered(task_name: str) -> bool:
    """Upstream's handlers are filtered out for `task_name`."""
    return task_name in _names
