"""Per-task options: the `background_task` decorator and how a task is named.

A decorated function stays an ordinary function (it can still be imported, pickled and called
directly); the decorator only attaches a `TaskOptions` that the instrumentation reads when the
function is scheduled as a background task.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, overload, runtime_checkable

from otel_bgtasks.circuit import CircuitBreaker
from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.registry import register_task
from otel_bgtasks.retry import RetryPolicy

__all__ = [
    "DISPATCH_MODES",
    "Dispatch",
    "DispatchMode",
    "DispatchTarget",
    "TaskOptions",
    "background_task",
    "check_dispatch",
    "check_timeout",
    "function_name",
    "is_async_callable",
    "task_name",
    "task_options",
]

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS_ATTR = "__bgtasks_options__"

DispatchMode = Literal["inline", "local"]
"""Where a task goes once its response is done (`otel_bgtasks.dispatch`)."""
DISPATCH_MODES: tuple[DispatchMode, ...] = ("inline", "local")


@runtime_checkable
class DispatchTarget(Protocol):
    """What a task's scheduling needs to know of a dispatcher object: its name, its route
    and whether tasks leave the process (then their call is encoded at scheduling, so bad
    arguments raise in the endpoint). The whole protocol is `otel_bgtasks.dispatch.Dispatcher`.
    """

    name: str
    route: str
    remote: bool


Dispatch = DispatchMode | DispatchTarget
"""A dispatch mode (``"inline"``, ``"local"``) or a dispatcher object."""


def check_dispatch(value: object, *, decorator: bool = False) -> Dispatch | None:
    """`value` as a dispatch mode or a dispatcher object; None (the instrumentor's default)
    only for the decorator.

    Raises:
        ConfigurationError: naming the option and the valid values.
    """
    if value is None and decorator:
        return None
    shown = f"background_task(dispatch={value!r})" if decorator else f"dispatch={value!r}"
    valid = f"use one of {', '.join(DISPATCH_MODES)} or a Dispatcher" + (
        " (or None: the instrumentor's default)" if decorator else ""
    )
    if isinstance(value, str):
        if value in DISPATCH_MODES:
            return value
        raise ConfigurationError(f"{shown} is not valid; {valid}")
    if isinstance(value, DispatchTarget) and callable(getattr(value, "submit", None)):
        return value
    raise ConfigurationError(
        f"{shown}: {valid}, an object with name, route, remote, submit(), drain() and"
        " resend() (see otel_bgtasks.dispatch)"
    )


def check_timeout(timeout: object, where: str) -> float | None:
    """`timeout` as seconds (> 0, finite) or None.

    Raises:
        ConfigurationError: naming `where` (e.g. ``timeout``), a `ValueError`.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigurationError(
            f"{where}={timeout!r}: must be a number of seconds or None, got"
            f" {type(timeout).__name__}"
        )
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigurationError(f"{where}={timeout!r}: must be > 0 seconds and finite, or None")
    return float(timeout)


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """What the instrumentation needs to know about one task function.

    Fields left as `None` fall back to the instrumentor's defaults.
    """

    name: str | None = None
    retry: RetryPolicy | None = None
    circuit: CircuitBreaker | None = None
    timeout: float | None = None
    durable: bool | None = None
    dispatch: Dispatch | None = None

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ConfigurationError("background_task(name=...) must be a non-empty string")
        check_timeout(self.timeout, "background_task(timeout)")
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError(
                f"background_task(retry={self.retry!r}): pass a RetryPolicy or None"
            )
        if self.circuit is not None and not isinstance(self.circuit, CircuitBreaker):
            raise ConfigurationError(
                f"background_task(circuit={self.circuit!r}): pass a CircuitBreaker or None"
            )
        if self.durable is not None and not isinstance(self.durable, bool):
            raise ConfigurationError(f"background_task(durable={self.durable!r}): True or False")
        check_dispatch(self.dispatch, decorator=True)


_NO_OPTIONS = TaskOptions()


@overload
def background_task(func: F, /) -> F: ...


@overload
def background_task(
    *,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    circuit: CircuitBreaker | None = None,
    timeout: float | None = None,
    durable: bool | None = None,
    dispatch: Dispatch | None = None,
) -> Callable[[F], F]: ...


def background_task(
    func: F | None = None,
    /,
    *,
    name: str | None = None,
    retry: RetryPolicy | None = None,
    circuit: CircuitBreaker | None = None,
    timeout: float | None = None,
    durable: bool | None = None,
    dispatch: Dispatch | None = None,
) -> F | Callable[[F], F]:
    """Give a background task a stable name and its policies.

    Usable bare (`@background_task`) or with arguments (`@background_task(name="send-mail")`).
    Options left out use the instrumentor's defaults. `dispatch` ("inline", "local" or a
    `Dispatcher` object, e.g. a distributed engine's) says where the task goes once its
    response is done, wherever it is scheduled (`otel_bgtasks.dispatch`). The function
    becomes one of the app's registered tasks: its dead letters and journal rows can be
    replayed and recovered (see `otel_bgtasks.registry`).

    Raises:
        ValueError: an option is invalid (empty name, non-positive timeout); raised here, at
            decoration time, not when the task first runs.
    """
    options = TaskOptions(
        name=name,
        retry=retry,
        circuit=circuit,
        timeout=timeout,
        durable=durable,
        dispatch=dispatch,
    )

    def decorate(f: F) -> F:
        if not callable(f):
            raise TypeError(f"background_task() decorates callables, got {type(f).__name__}")
        setattr(f, _OPTIONS_ATTR, options)
        register_task(f)  # replayable by its reference: one of the app's tasks
        return f

    return decorate(func) if func is not None else decorate


def _unwrap(func: Callable[..., Any]) -> Callable[..., Any]:
    while isinstance(func, functools.partial):
        func = func.func
    return func


def task_options(func: Callable[..., Any]) -> TaskOptions:
    """The options attached to `func` (or to the function a partial wraps)."""
    options = getattr(func, _OPTIONS_ATTR, None)
    if options is None:
        options = getattr(_unwrap(func), _OPTIONS_ATTR, None)
    return options if isinstance(options, TaskOptions) else _NO_OPTIONS


def task_name(func: Callable[..., Any], options: TaskOptions) -> str:
    """The task's name: the decorator's `name`, else the function's `__qualname__`."""
    if options.name is not None:
        return options.name
    target = _unwrap(func)
    qualname = getattr(target, "__qualname__", None)
    if not isinstance(qualname, str) or inspect.isclass(target):
        # A callable object: name it after its class, like upstream names it after __name__.
        return qualname if isinstance(qualname, str) else type(target).__qualname__
    return qualname


def function_name(func: Callable[..., Any]) -> str:
    """The module-qualified function name (`code.function.name`)."""
    target = _unwrap(func)
    qualname = getattr(target, "__qualname__", None)
    if not isinstance(qualname, str):
        target = type(target)
        qualname = target.__qualname__
    module = getattr(target, "__module__", None)
    return f"{module}.{qualname}" if module else qualname


def is_async_callable(func: Callable[..., Any]) -> bool:
    """True when calling `func` returns an awaitable (coroutine functions, async __call__)."""
    target = _unwrap(func)
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - an async __call__ counts too
    )
