"""The one state object passed to policies and hooks while a task runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanContext
from opentelemetry.util.types import AttributeValue

from otel_bgtasks.attributes import ErrorCategory, Outcome
from otel_bgtasks.calls import EncodedCall
from otel_bgtasks.options import EffectiveOptions
from otel_bgtasks.records import DeadLetterReason

__all__ = ["Origin", "TaskCallState", "current_task"]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a task received from another process came from.

    Attributes:
        route: the route of the dispatcher that published it (its dead letters record it).
        attributes: extra attributes of its span (e.g. ``messaging.*``).
    """

    route: str
    attributes: Mapping[str, AttributeValue]


@dataclass(slots=True, eq=False)
class TaskCallState:
    """Everything known about one scheduled task, updated as it runs.

    Attributes:
        task_id: unique per scheduling (`bgtasks.task.id`).
        func, args, kwargs: what runs.
        options: the task's `EffectiveOptions` (decorator options, defaults applied).
        name: the task name (span `process {name}`, metric attribute), `options.name`.
        function: the module-qualified function name (`code.function.name`),
            `options.function`.
        link: the span context current when the task was scheduled (None outside any span).
        enqueued_at: the executor's clock (`Executor.clock`, `time.perf_counter` unless a
            test injects one) at scheduling; `enqueued_wall`: `time.time()`.
        started_at: the executor's clock when its span started (None until it runs); a task
            with `started_at` set that is still in `Executor.inflight` counts as running
            (`bgtasks.task.active`).
        is_async: whether calling `func` returns an awaitable.
        attempt: attempts made so far (1 during the first attempt).
        outcome, exception: the final result once known; `exception` is the last error.
        category: the last error's `bgtasks.error.category`.
        reason: why the task went to the dead letters, when it did.
        dead_letter_id: the id of its dead letter, once stored.
        journaled: the task has a journal row (durable).
        replay: the run replays a dead letter (never parented under the old request).
        first_failure: epoch seconds of the first failure of a replayed dead letter.
        call: the encoded call (function reference, serialized arguments), set at scheduling
            for a durable task or one bound for another process, and for a received message;
            None otherwise.
        origin: for a task received from another process (`Executor.receive`), the route it
            came through and its extra span attributes; None for a task scheduled here (its
            dispatcher's route is `options.route`).
    """

    task_id: str
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: EffectiveOptions
    name: str
    function: str
    link: SpanContext | None
    enqueued_at: float
    enqueued_wall: float
    is_async: bool
    started_at: float | None = None
    attempt: int = 0
    outcome: Outcome | None = None
    exception: BaseException | None = None
    category: ErrorCategory | None = None
    reason: DeadLetterReason | None = None
    dead_letter_id: str | None = None
    journaled: bool = False
    replay: bool = False
    first_failure: float | None = None
    call: EncodedCall | None = None
    origin: Origin | None = None


current: ContextVar[TaskCallState | None] = ContextVar("otel_bgtasks_task", default=None)
"""The state of the task running in this context (set by the executor around a run)."""


def current_task() -> TaskCallState | None:
    """The state of the background task running in this context, if any."""
    return current.get()
