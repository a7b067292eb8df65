"""The one execution path every background task takes: span, metrics, logs, policies."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Literal

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from starlette.concurrency import run_in_threadpool

from otel_bgtasks import attributes as attr
from otel_bgtasks.attributes import Outcome
from otel_bgtasks.metrics import Instruments
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.task import function_name, is_async_callable, task_name, task_options

__all__ = ["TRACE_MODES", "Executor", "TaskHook", "TraceMode", "current_task"]

TraceMode = Literal["link", "child"]
TRACE_MODES: tuple[TraceMode, ...] = ("link", "child")

TaskHook = Callable[[Span, TaskCallState], None]
"""Called with the task span and state: at start (`start_hook`) and at the end (`end_hook`)."""

_log = structlog.get_logger("otel_bgtasks")

_current: ContextVar[TaskCallState | None] = ContextVar("otel_bgtasks_task", default=None)


def current_task() -> TaskCallState | None:
    """The state of the background task running in this context, if any."""
    return _current.get()


def _new_task_id() -> str:
    return f"{random.getrandbits(128):032x}"


def call_hook(hook: TaskHook | None, span: Span, state: TaskCallState) -> None:
    """Run a user hook; a hook that raises is logged and never breaks the task."""
    if hook is None:
        return
    try:
        hook(span, state)
    except Exception:  # a broken hook must not lose the task or its span
        _log.exception("bgtasks hook failed", hook=getattr(hook, "__qualname__", repr(hook)))


class Executor:
    """Schedules and runs tasks under one tracer, one set of instruments and one config."""

    def __init__(
        self,
        tracer: Tracer,
        instruments: Instruments,
        *,
        trace_mode: TraceMode = "link",
        propagate_exceptions: bool = False,
        start_hook: TaskHook | None = None,
        end_hook: TaskHook | None = None,
    ) -> None:
        if trace_mode not in TRACE_MODES:
            raise ValueError(
                f"trace_mode={trace_mode!r} is not valid; use one of {', '.join(TRACE_MODES)}"
            )
        self.tracer = tracer
        self.instruments = instruments
        self.trace_mode = trace_mode
        self.propagate_exceptions = propagate_exceptions
        self.start_hook = start_hook
        self.end_hook = end_hook

    # -- scheduling -------------------------------------------------------------------------

    def schedule(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        is_async: bool | None = None,
    ) -> TaskCallState:
        """Capture what is needed at scheduling time and mark the current span."""
        options = task_options(func)
        name = task_name(func, options)
        task_id = _new_task_id()
        current = trace.get_current_span()
        link = current.get_span_context()
        if current.is_recording():
            current.add_event(attr.EVENT_ENQUEUED, {attr.TASK_NAME: name, attr.TASK_ID: task_id})
        return TaskCallState(
            name=name,
            task_id=task_id,
            func=func,
            args=args,
            kwargs=kwargs,
            options=options,
            link=link if link.is_valid else None,
            enqueued_at=time.perf_counter(),
            enqueued_wall=time.time(),
            is_async=is_async_callable(func) if is_async is None else is_async,
        )

    # -- running ----------------------------------------------------------------------------

    def _start_span(self, state: TaskCallState) -> Span:
        link = state.link
        links = [Link(link)] if link is not None else None
        if self.trace_mode == "child" and link is not None:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(link))
        else:
            parent = otel_context.Context()  # a new trace, joined to the request by the link
        return self.tracer.start_span(
            attr.SPAN_NAME_PREFIX + state.name,
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={attr.TASK_NAME: state.name, attr.TASK_ID: state.task_id},
        )

    async def run(self, state: TaskCallState, *, inline: bool = False) -> None:
        """Run one scheduled task to its final outcome.

        Args:
            inline: call a sync function on this thread instead of the thread pool (used when
                the caller already is a worker thread).

        Raises:
            Exception: the task's final error, only when `propagate_exceptions` is set.
        """
        span = self._start_span(state)
        metric_attrs = {attr.TASK_NAME: state.name}
        started = time.perf_counter()
        wait = started - state.enqueued_at
        recording = span.is_recording()
        if recording:
            span.set_attribute(attr.CODE_FUNCTION_NAME, function_name(state.func))
            span.set_attribute(attr.TASK_WAIT, wait)
        self.instruments.wait.record(wait, metric_attrs)
        self.instruments.active.add(1, metric_attrs)
        token = otel_context.attach(trace.set_span_in_context(span))
        task_token = _current.set(state)
        call_hook(self.start_hook, span, state)
        error: BaseException | None = None
        try:
            state.attempt = 1
            await self._invoke(state, inline)
            state.outcome = Outcome.SUCCESS
        except Exception as exc:
            error = exc
            state.exception = exc
            state.outcome = Outcome.FAILURE
        except asyncio.CancelledError as exc:  # the server is shutting down mid-task
            error = exc
            state.exception = exc
            state.outcome = Outcome.FAILURE
        finally:
            _current.reset(task_token)
            otel_context.detach(token)
            self._finish(span, state, started, metric_attrs)
        if error is not None and (self.propagate_exceptions or not isinstance(error, Exception)):
            raise error

    async def _invoke(self, state: TaskCallState, inline: bool) -> None:
        if state.is_async:
            await state.func(*state.args, **state.kwargs)
            return
        if inline:
            result = state.func(*state.args, **state.kwargs)
        else:
            result = await run_in_threadpool(state.func, *state.args, **state.kwargs)
        if isinstance(result, Awaitable):  # a sync callable that returned a coroutine
            await result

    def _finish(
        self,
        span: Span,
        state: TaskCallState,
        started: float,
        metric_attrs: dict[str, str],
    ) -> None:
        duration = time.perf_counter() - started
        outcome = state.outcome or Outcome.FAILURE
        exc = state.exception
        self.instruments.active.add(-1, metric_attrs)
        result_attrs = {attr.TASK_NAME: state.name, attr.TASK_OUTCOME: outcome.value}
        if outcome is not Outcome.SUCCESS and exc is not None:
            result_attrs[attr.ERROR_TYPE] = _error_type(exc)
        self.instruments.duration.record(duration, result_attrs)
        if span.is_recording():
            span.set_attribute(attr.TASK_ATTEMPTS, state.attempt)
            span.set_attribute(attr.TASK_OUTCOME, outcome.value)
            if outcome is not Outcome.SUCCESS:
                if exc is not None:
                    span.set_attribute(attr.ERROR_TYPE, _error_type(exc))
                    span.record_exception(exc)
                    description = f"{type(exc).__name__}: {exc}"
                else:
                    description = outcome.value
                span.set_status(Status(StatusCode.ERROR, description))
        call_hook(self.end_hook, span, state)
        span.end()
        if outcome is not Outcome.SUCCESS:
            ctx = span.get_span_context()
            _log.error(
                "background task failed",
                task_name=state.name,
                task_id=state.task_id,
                outcome=outcome.value,
                attempts=state.attempt,
                trace_id=format(ctx.trace_id, "032x"),
                span_id=format(ctx.span_id, "016x"),
                exc_info=exc,
            )


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
