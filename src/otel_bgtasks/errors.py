"""Error classification (`bgtasks.error.category`) and the package's own exceptions."""

from __future__ import annotations

import socket
from collections.abc import Callable

from otel_bgtasks.attributes import ErrorCategory

__all__ = [
    "BusinessError",
    "CircuitOpenError",
    "ErrorClassifier",
    "TaskTimeoutError",
    "classify_error",
    "error_type",
]

ErrorClassifier = Callable[[BaseException], ErrorCategory]
"""Maps a task's error to its category; replace the default with `error_classifier=`."""


class BusinessError(Exception):
    """Base for errors that are a decision of the domain (refused payment, unknown user).

    Subclass it in task code: such errors are never retried and go to the dead-letter store
    with reason `permanent`.
    """


class TaskTimeoutError(TimeoutError):
    """An async task attempt ran past its `timeout` and was cancelled."""


class CircuitOpenError(RuntimeError):
    """The task's circuit breaker refused the call; the task was not run."""


def _optional_types() -> dict[ErrorCategory, tuple[type[BaseException], ...]]:
    found: dict[ErrorCategory, list[type[BaseException]]] = {
        ErrorCategory.VALIDATION: [],
        ErrorCategory.CONNECTION: [],
        ErrorCategory.TIMEOUT: [],
    }
    try:
        import pydantic

        found[ErrorCategory.VALIDATION].append(pydantic.ValidationError)
    except ImportError:  # pragma: no cover - pydantic comes with FastAPI
        pass
    try:
        import httpx

        # TimeoutException subclasses TransportError: the timeout check runs first.
        found[ErrorCategory.TIMEOUT].append(httpx.TimeoutException)
        found[ErrorCategory.CONNECTION].append(httpx.TransportError)
    except ImportError:  # pragma: no cover - httpx is a dependency
        pass
    try:
        import redis.exceptions

        found[ErrorCategory.TIMEOUT].append(redis.exceptions.TimeoutError)
        found[ErrorCategory.CONNECTION].append(redis.exceptions.ConnectionError)
    except ImportError:  # pragma: no cover - redis is a dependency
        pass
    return {category: tuple(types) for category, types in found.items()}


_OPTIONAL = _optional_types()
_Types = tuple[type[BaseException], ...]
_TIMEOUT: _Types = (TimeoutError, socket.timeout, *_OPTIONAL[ErrorCategory.TIMEOUT])
_CONNECTION: _Types = (ConnectionError, socket.gaierror, *_OPTIONAL[ErrorCategory.CONNECTION])
_VALIDATION: _Types = (ValueError, UnicodeError, *_OPTIONAL[ErrorCategory.VALIDATION])
_SYSTEM = (MemoryError, OSError, SystemError, RecursionError, ImportError)


def classify_error(exc: BaseException) -> ErrorCategory:
    """The default classifier.

    timeout: `TimeoutError`, socket, httpx and redis timeouts; connection: `ConnectionError`,
    DNS errors, httpx transport errors, redis connection errors; business: `BusinessError`;
    validation: pydantic `ValidationError`, `ValueError`; system: `MemoryError`, other
    `OSError`s, `ImportError`; anything else: unknown. Only timeout and connection errors are
    retried by default (`RetryPolicy(retry_on=...)` changes that).
    """
    if isinstance(exc, BusinessError):
        return ErrorCategory.BUSINESS
    if isinstance(exc, CircuitOpenError):  # the downstream is known to be unavailable
        return ErrorCategory.CONNECTION
    if isinstance(exc, _TIMEOUT):
        return ErrorCategory.TIMEOUT
    if isinstance(exc, _CONNECTION):
        return ErrorCategory.CONNECTION
    if isinstance(exc, _VALIDATION):
        return ErrorCategory.VALIDATION
    if isinstance(exc, _SYSTEM):
        return ErrorCategory.SYSTEM
    return ErrorCategory.UNKNOWN


def error_type(exc: BaseException) -> str:
    """`error.type`: the exception's qualified class name (builtins unqualified)."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
