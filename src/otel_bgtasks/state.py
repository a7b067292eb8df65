"""The one state object passed to policies and hooks while a task runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import SpanContext

from otel_bgtasks.attributes import Outcome
from otel_bgtasks.task import TaskOptions

__all__ = ["TaskCallState"]


@dataclass(slots=True, eq=False)
class TaskCallState:
    """Everything known about one scheduled task, updated as it runs.

    Attributes:
        name: the task name (span `process {name}`, metric attribute).
        task_id: unique per scheduling (`bgtasks.task.id`).
        func, args, kwargs: what runs; `function` is its module-qualified name.
        options: the task's `TaskOptions` (decorator), before instrumentor defaults apply.
        link: the span context current when the task was scheduled (None outside any span).
        enqueued_at: `time.perf_counter()` at scheduling; `enqueued_wall`: `time.time()`.
        attempt: attempts made so far (1 during the first attempt).
        outcome, exception: the final result once known; `exception` is the last error.
        is_async: whether calling `func` returns an awaitable.
    """

    name: str
    task_id: str
    func: Callable[..., Any]
    function: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: TaskOptions
    link: SpanContext | None
    enqueued_at: float
    enqueued_wall: float
    is_async: bool
    attempt: int = 0
    outcome: Outcome | None = None
    exception: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)
