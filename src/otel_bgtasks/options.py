"""Effective options: a task function's decorator options merged with the instrumentor's
defaults, resolved once per function and passed down typed (never merged again per call)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from otel_bgtasks.circuit import CircuitBreaker
from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.retry import RetryPolicy
from otel_bgtasks.task import (
    Dispatch,
    check_dispatch,
    check_timeout,
    function_name,
    is_async_callable,
    task_name,
    task_options,
)

__all__ = [
    "TRACE_MODES",
    "EffectiveOptions",
    "TaskDefaults",
    "TraceMode",
    "check_trace_mode",
    "effective_options",
]

TraceMode = Literal["link", "child"]
TRACE_MODES: tuple[TraceMode, ...] = ("link", "child")


def check_trace_mode(trace_mode: object) -> None:
    """Raises `ConfigurationError` (a `ValueError`) naming the valid trace modes."""
    if trace_mode not in TRACE_MODES:
        raise ConfigurationError(
            f"trace_mode={trace_mode!r} is not valid; use one of {', '.join(TRACE_MODES)}"
        )


@dataclass(frozen=True, slots=True)
class TaskDefaults:
    """The instrumentor's defaults for every task (a decorator overrides each one)."""

    retry: RetryPolicy | None = None
    circuit: CircuitBreaker | None = None
    timeout: float | None = None
    durable: bool = False
    dispatch: Dispatch = "inline"

    def __post_init__(self) -> None:
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError(
                f"retry={self.retry!r}: pass a RetryPolicy (e.g. RetryPolicy(max_attempts=3))"
                " or None"
            )
        if self.circuit is not None and not isinstance(self.circuit, CircuitBreaker):
            raise ConfigurationError(
                f"circuit={self.circuit!r}: pass a CircuitBreaker (e.g."
                " CircuitBreaker('payments', failure_threshold=5)) or None"
            )
        check_timeout(self.timeout, "timeout")
        if not isinstance(self.durable, bool):
            raise ConfigurationError(f"durable={self.durable!r}: must be True or False")
        check_dispatch(self.dispatch)


@dataclass(frozen=True, slots=True)
class EffectiveOptions:
    """What one task function runs with, defaults applied.

    Attributes:
        name: the task name (span `process {name}`, metric attribute).
        function: module-qualified function name (`code.function.name`).
        is_async: calling the function returns an awaitable.
        retry: the retry policy, or None (runs once).
        breaker: the circuit breaker guarding it (resolved, shared by name), or None.
        timeout: seconds per attempt, or None.
        durable: journaled while scheduled or running.
        dispatch: where it goes (`otel_bgtasks.dispatch`): the decorator's mode or
            dispatcher, else the instrumentor's.
        inline: `dispatch` is ``"inline"`` (the response runs it, Starlette's way).
        remote: `dispatch` is a dispatcher whose tasks leave the process: the call is
            encoded at scheduling (`TaskCallState.call`).
        route: the route of a remote dispatcher (recorded on its dead letters), else None.
        encoded: the call is encoded at scheduling (durable or remote).
    """

    name: str
    function: str
    is_async: bool
    retry: RetryPolicy | None
    breaker: CircuitBreaker | None
    timeout: float | None
    durable: bool
    dispatch: Dispatch = "inline"
    inline: bool = True
    remote: bool = False
    route: str | None = None
    encoded: bool = False


def effective_options(
    func: Callable[..., Any],
    defaults: TaskDefaults,
    breaker_for: Callable[[CircuitBreaker, str], CircuitBreaker],
) -> EffectiveOptions:
    """Merge `func`'s decorator options with `defaults`; `breaker_for(template, task_name)`
    gives the breaker instance a task uses."""
    options = task_options(func)
    name = task_name(func, options)
    circuit = options.circuit or defaults.circuit
    durable = options.durable if options.durable is not None else defaults.durable
    dispatch = options.dispatch if options.dispatch is not None else defaults.dispatch
    remote = not isinstance(dispatch, str) and bool(dispatch.remote)
    return EffectiveOptions(
        name=name,
        function=function_name(func),
        is_async=is_async_callable(func),
        retry=options.retry or defaults.retry,
        breaker=breaker_for(circuit, name) if circuit is not None else None,
        timeout=options.timeout or defaults.timeout,
        durable=durable,
        dispatch=dispatch,
        inline=dispatch == "inline",
        remote=remote,
        route=dispatch.route if remote and not isinstance(dispatch, str) else None,
        encoded=durable or remote,
    )
