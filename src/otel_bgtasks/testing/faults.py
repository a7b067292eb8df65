"""`fail_on`: make a task fail on chosen attempts, to test retry policies and dead letters."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Collection
from typing import Any, ParamSpec, TypeVar, cast

from otel_bgtasks import current_task

__all__ = ["fail_on"]

P = ParamSpec("P")
R = TypeVar("R")


def _is_async(func: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - an async __call__ counts too
    )


def fail_on(
    func: Callable[P, R],
    /,
    attempts: int | Collection[int] = 1,
    *,
    exc: BaseException | type[BaseException] = ConnectionError,
) -> Callable[P, R]:
    """`func`, raising `exc` instead of running on the given attempts.

    The attempt is the running task's (`current_task().attempt`: 1 for the first try, 2 for
    the first retry), so a task scheduled twice fails on its first attempt both times; called
    outside a task, the wrapper counts its own calls. The wrapper keeps the function's name,
    module and `@background_task` options, so it runs as the same task, under the same
    policies. The default `ConnectionError` is retried by the default retry policy.

    Args:
        attempts: the attempt number, or numbers, that fail (``fail_on(f, {1, 2})``: fails
            twice, then runs `f`).
        exc: an exception class (instantiated with a message naming the attempt) or instance.

    Example::

        flaky = fail_on(send_mail, attempts=[1, 2], exc=ConnectionResetError)
        background_tasks.add_task(flaky, "a@example.com")
    """
    failing = frozenset([attempts] if isinstance(attempts, int) else attempts)
    if not failing or min(failing) < 1:
        raise ValueError(f"fail_on(attempts={attempts!r}): attempts are numbered from 1")
    calls = 0
    lock = threading.Lock()
    label = getattr(func, "__qualname__", repr(func))

    def check() -> None:
        nonlocal calls
        state = current_task()
        with lock:
            calls += 1
            attempt = state.attempt if state is not None else calls
        if attempt in failing:
            if isinstance(exc, BaseException):
                raise exc.with_traceback(None)
            raise exc(f"injected failure of {label} on attempt {attempt}")

    if _is_async(func):

        @functools.wraps(func)
        async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            check()
            return await cast(Callable[..., Any], func)(*args, **kwargs)

        return cast(Callable[P, R], async_wrapper)

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        check()
        return func(*args, **kwargs)

    return wrapper
