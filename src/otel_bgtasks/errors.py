"""The package's own exceptions, error classification (`bgtasks.error.category`) and `error.type`.

Every error the package raises for something a caller can fix derives from `BgTasksError` and
also from the built-in it always was (`except ValueError` code keeps working).
`BusinessError` is different: it is the base *task code* subclasses, not an error of ours.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable

from otel_bgtasks.attributes import ErrorCategory

__all__ = [
    "BgTasksError",
    "BusinessError",
    "CircuitOpenError",
    "ConfigurationError",
    "ConsumedEntryError",
    "CorruptEntryError",
    "ErrorClassifier",
    "NotInstrumentedError",
    "NotReplayableError",
    "SerializationError",
    "StoreUnavailableError",
    "TaskImportError",
    "TaskTimeoutError",
    "UndeliverableError",
    "UnregisteredTaskError",
    "UnsafeConfigurationError",
    "UntrustedEntryError",
    "WorkerLostError",
    "classify_error",
    "error_type",
]

ErrorClassifier = Callable[[BaseException], ErrorCategory]
"""Maps a task's error to its category; replace the default with `error_classifier=`."""


class BgTasksError(Exception):
    """Base of every error otel_bgtasks raises (each also keeps its built-in base)."""


class ConfigurationError(BgTasksError, ValueError):
    """An option, URL or environment variable has a value that cannot work; says which."""


class UnsafeConfigurationError(ConfigurationError):
    """A setting asked for a guarantee (durability, a store, signing, redaction) with a value
    that cannot work: falling back to the default would silently weaken it, so the process
    refuses to start (under ``opentelemetry-instrument`` too)."""


class BusinessError(Exception):
    """Base for errors that are a decision of the domain (refused payment, unknown user).

    Subclass it in task code: such errors are never retried and go to the dead-letter store
    with reason `permanent`.
    """


class NotInstrumentedError(BgTasksError, RuntimeError):
    """A call needs the instrumentation (`schedule()`): call
    ``BackgroundTasksInstrumentor().instrument()`` first, or run under
    ``opentelemetry-instrument``."""


class TaskTimeoutError(BgTasksError, TimeoutError):
    """An async task attempt ran past its `timeout` and was cancelled."""


class CircuitOpenError(BgTasksError, RuntimeError):
    """The task's circuit breaker refused the call; the task was not run.

    Attributes:
        circuit: the breaker's name (its `bgtasks.circuit.name`).
    """

    def __init__(self, message: str, *, circuit: str = "") -> None:
        super().__init__(message)
        self.circuit = circuit


class TaskImportError(BgTasksError, LookupError):
    """A stored call names a function that cannot be imported here; the entry is kept."""


class UntrustedEntryError(BgTasksError, LookupError):
    """A stored entry is refused: unsigned or tampered while a signing key is set, or it names
    a function that is not one of the app's tasks. Nothing of it ran; the entry is kept."""


class ConsumedEntryError(UntrustedEntryError):
    """A stored entry already ran: the store remembers its nonce (consumed by a successful
    replay or recovery). A copy planted again, or a backup restored, is refused and kept.

    Attributes:
        entry_id: the row's id.
        consumed_at: when its nonce was consumed (epoch seconds, the store's clock).
    """

    def __init__(self, entry_id: str, consumed_at: float) -> None:
        try:
            when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(consumed_at))
        except (OverflowError, OSError, ValueError):  # a time no date can show (untrusted)
            when = "an unknown time"
        super().__init__(
            f"refused: this entry already ran (its nonce was consumed at {when}): a copy was"
            " planted again, or a backup restored; delete it, or after review adopt it"
            " (`otel-bgtasks dlq adopt ID`) to run it once more"
        )
        self.entry_id = entry_id
        self.consumed_at = consumed_at


class UnregisteredTaskError(UntrustedEntryError, TaskImportError):
    """A stored call names a function that is not a registered task of this app."""


class NotReplayableError(BgTasksError, LookupError):
    """A stored call was kept for inspection only (its arguments could not be serialized)."""


class SerializationError(BgTasksError, TypeError):
    """A task argument cannot be serialized for a durable or replayable task.

    Attributes:
        position: index of the offending positional argument, or None.
        keyword: name of the offending keyword argument, or None.
        path: where inside the argument the bad value sits (e.g. ``["user"].address``), or "".
        value_type: the type name of the value that cannot be serialized, or what is wrong
            with it (``nested deeper than 64``, ``int too large``).
    """

    def __init__(
        self,
        message: str,
        *,
        position: int | None = None,
        keyword: str | None = None,
        path: str = "",
        value_type: str = "",
    ) -> None:
        super().__init__(message)
        self.position = position
        self.keyword = keyword
        self.path = path
        self.value_type = value_type


class CorruptEntryError(BgTasksError, ValueError):
    """A stored row cannot be decoded (bad JSON, too big or too deep, missing or invalid
    fields).

    Attributes:
        entry_id: the row's id in the store.
        reason: what is wrong with it (at most 500 characters: the row is untrusted).
        what: the kind of row ("dead-letter entry", "journal entry").
    """

    def __init__(self, entry_id: str, reason: str, *, what: str = "dead-letter entry") -> None:
        shown_id = entry_id if len(entry_id) <= 200 else entry_id[:199] + "…"
        reason = reason if len(reason) <= 500 else reason[:499] + "…"
        super().__init__(f"{what} {shown_id!r} is corrupt: {reason}")
        self.entry_id = entry_id
        self.reason = reason
        self.what = what


class StoreUnavailableError(BgTasksError, RuntimeError):
    """The backing store cannot be reached (raised by reads; writes are buffered)."""


class UndeliverableError(BgTasksError, ConnectionError):
    """A task could not be handed to its remote engine (broker down past the publish
    deadline, or the outbox full): dead-lettered as ``undeliverable``, replayable."""


class WorkerLostError(BgTasksError, RuntimeError):
    """A task's message lost its worker (a killed process) more often than allowed, or a
    task that is not durable lost its worker once: dead-lettered as ``worker_lost``."""


_Types = tuple[type[BaseException], ...]

# Exceptions of libraries we classify without importing them: an exception of a module that
# was never imported cannot exist, so each is looked up only once its module is loaded.
_OPTIONAL: tuple[tuple[str, str, ErrorCategory], ...] = (
    # httpx: TimeoutException subclasses TransportError, so timeouts are checked first.
    ("httpx", "TimeoutException", ErrorCategory.TIMEOUT),
    ("httpx", "TransportError", ErrorCategory.CONNECTION),
    ("redis.exceptions", "TimeoutError", ErrorCategory.TIMEOUT),
    ("redis.exceptions", "ConnectionError", ErrorCategory.CONNECTION),
    ("pydantic", "ValidationError", ErrorCategory.VALIDATION),
)
_found: dict[ErrorCategory, _Types] = {}
_pending = list(_OPTIONAL)
_pending_lock = threading.Lock()

_TIMEOUT: _Types = (TimeoutError, socket.timeout)
_CONNECTION: _Types = (ConnectionError, socket.gaierror)
_VALIDATION: _Types = (ValueError, UnicodeError)
_SYSTEM: _Types = (MemoryError, OSError, SystemError, RecursionError, ImportError)


def _optional(category: ErrorCategory) -> _Types:
    if _pending:
        with _pending_lock:
            for item in list(_pending):
                module_name, attribute, found_category = item
                module = sys.modules.get(module_name)
                if module is None:
                    continue
                _pending.remove(item)
                kind = getattr(module, attribute, None)
                if isinstance(kind, type) and issubclass(kind, BaseException):
                    _found[found_category] = (*_found.get(found_category, ()), kind)
    return _found.get(category, ())


def classify_error(exc: BaseException) -> ErrorCategory:
    """The default classifier.

    timeout: `TimeoutError`, socket, httpx and redis timeouts; connection: `ConnectionError`,
    DNS errors, httpx transport errors, redis connection errors, an open circuit; business:
    `BusinessError`; validation: pydantic `ValidationError`, `ValueError`; system:
    `MemoryError`, other `OSError`s, `ImportError`; anything else: unknown. Only timeout and
    connection errors are retried by default (`RetryPolicy(retry_on=...)` changes that).
    """
    if isinstance(exc, BusinessError):
        return ErrorCategory.BUSINESS
    if isinstance(exc, CircuitOpenError):  # the downstream is known to be unavailable
        return ErrorCategory.CONNECTION
    if isinstance(exc, (*_TIMEOUT, *_optional(ErrorCategory.TIMEOUT))):
        return ErrorCategory.TIMEOUT
    if isinstance(exc, (*_CONNECTION, *_optional(ErrorCategory.CONNECTION))):
        return ErrorCategory.CONNECTION
    if isinstance(exc, (*_VALIDATION, *_optional(ErrorCategory.VALIDATION))):
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
