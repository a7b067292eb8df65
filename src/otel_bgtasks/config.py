"""One resolved configuration: `instrument()` keywords over ``OTEL_BGTASKS_*`` variables,
validated once (one validator per option), frozen, and handed to the executor, the dispatch
seam, replay, recovery, the CLI and any process that runs tasks without ``instrument()`` (a
worker), so they all share the same defaults.

    settings = resolve_settings(retry=RetryPolicy(max_attempts=4))   # code wins over the env
    store, owned = settings.open_store()
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from otel_bgtasks.calls import Serializer
from otel_bgtasks.circuit import CircuitBreaker
from otel_bgtasks.environment import options_from_env
from otel_bgtasks.errors import (
    ConfigurationError,
    ErrorClassifier,
    UnsafeConfigurationError,
    classify_error,
)
from otel_bgtasks.hooks import TaskHook
from otel_bgtasks.options import TaskDefaults, TraceMode, check_trace_mode
from otel_bgtasks.stores import DLQ_URL_ENV, default_store_url, open_store
from otel_bgtasks.stores.base import DeadLetterStore
from otel_bgtasks.task import Dispatch

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_STORE",
    "Settings",
    "check_drain_timeout",
    "check_max_concurrency",
    "check_max_queued",
    "resolve_settings",
]

DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_MAX_QUEUED = 1000
"""Task groups waiting for a slot of the local pool (per app and event loop, so per process):
about 0.7 kB each; beyond it a response runs its tasks inline (back-pressure)."""


class _DefaultStore:
    """`dead_letter_store` not given: the user's state directory, created at the first write."""

    def __repr__(self) -> str:
        return "DEFAULT_STORE"


DEFAULT_STORE: Final = _DefaultStore()


def check_max_concurrency(value: object, where: str = "max_concurrency") -> int:
    """`value` as an int >= 1. Raises `ConfigurationError` naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{where}={value!r}: must be an integer >= 1")
    return value


def check_max_queued(value: object, where: str = "max_queued") -> int:
    """`value` as an int >= 0 (0: never queue, run inline when every slot is busy).
    Raises `ConfigurationError` naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{where}={value!r}: must be an integer >= 0")
    return value


def check_drain_timeout(value: object, where: str = "drain_timeout") -> float:
    """`value` as seconds >= 0, finite. Raises `ConfigurationError` naming `where`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigurationError(f"{where}={value!r}: must be a finite number of seconds >= 0")
    return float(value)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name}={value!r}: must be True or False")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything an executor and the dispatch seam run with (README: configuration).

    Attributes are the `instrument()` keywords; `from_env` names the ones a variable set
    (error messages name the variable instead of the keyword).

    Raises:
        ConfigurationError: a value that cannot work, naming the option (a `ValueError`).
        TypeError: `dead_letter_store` is neither a store, a URL nor None.
    """

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    trace_mode: TraceMode = "link"
    propagate_exceptions: bool = False
    start_hook: TaskHook | None = None
    end_hook: TaskHook | None = None
    retry: Any = None  # RetryPolicy | None, checked by TaskDefaults
    circuit: CircuitBreaker | None = None
    timeout: float | None = None
    durable: bool = False
    dead_letter_store: DeadLetterStore | str | _DefaultStore | None = DEFAULT_STORE
    serializer: Serializer | None = None
    error_classifier: ErrorClassifier = classify_error
    # "inline" | "local" | a Dispatcher (otel_bgtasks.dispatch.Dispatcher)
    dispatch: Dispatch = "inline"
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    max_queued: int = DEFAULT_MAX_QUEUED
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    redact_exception_messages: bool = False
    log_locals: bool = False
    from_env: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        check_trace_mode(self.trace_mode)
        for name in ("propagate_exceptions", "durable", "redact_exception_messages", "log_locals"):
            _check_bool(name, getattr(self, name))
        # retry, circuit, timeout, durable, dispatch: one validator each, in TaskDefaults
        TaskDefaults(
            retry=self.retry,
            circuit=self.circuit,
            timeout=self.timeout,
            durable=self.durable,
            dispatch=self.dispatch,
        )
        check_max_concurrency(self.max_concurrency)
        check_max_queued(self.max_queued)
        check_drain_timeout(self.drain_timeout)
        if self.serializer is not None and not isinstance(self.serializer, Serializer):
            raise ConfigurationError(
                f"serializer={self.serializer!r}: pass an object with name, dumps() and loads()"
                " (see otel_bgtasks.Serializer)"
            )
        store = self.dead_letter_store
        if not (store is None or isinstance(store, str | DeadLetterStore | _DefaultStore)):
            raise TypeError(
                f"dead_letter_store={store!r}: pass a DeadLetterStore, a URL "
                "(sqlite:////absolute/path.db, redis://host:port/db) or None to disable dead"
                " letters"
            )
        if self.durable and store is None:
            raise ConfigurationError(
                "durable=True needs a dead_letter_store to journal tasks in"
                + (" (OTEL_BGTASKS_DLQ_URL=none)" if "dead_letter_store" in self.from_env else "")
            )

    @property
    def defaults(self) -> TaskDefaults:
        """The per-task defaults a decorator overrides."""
        return TaskDefaults(
            retry=self.retry,
            circuit=self.circuit,
            timeout=self.timeout,
            durable=self.durable,
            dispatch=self.dispatch,
        )

    def open_store(self) -> tuple[DeadLetterStore | None, bool]:
        """The dead-letter store, and whether it was opened here (the caller closes it).

        Raises:
            UnsafeConfigurationError: ``OTEL_BGTASKS_DLQ_URL`` names a store that cannot be
                opened (the process must not run without the dead letters it asked for).
            ConfigurationError: a URL given in code cannot be opened.
        """
        given = self.dead_letter_store
        if given is None or isinstance(given, DeadLetterStore):
            return given, False
        if isinstance(given, _DefaultStore):
            return open_store(default_store_url(), lazy=True), True
        try:
            return open_store(given), True
        except (ValueError, OSError, ImportError) as exc:
            if "dead_letter_store" in self.from_env:
                raise UnsafeConfigurationError(
                    f"{DLQ_URL_ENV}: {exc}. Refusing to start without the dead-letter store"
                    f" asked for; fix the URL, or set {DLQ_URL_ENV}=none to run without one"
                ) from None
            if isinstance(exc, ConfigurationError):
                raise
            raise ConfigurationError(f"dead_letter_store: {exc}") from None


_KEYWORDS = frozenset(f.name for f in fields(Settings)) - {"from_env"}


def resolve_settings(
    keywords: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """`Settings` from keywords given in code over the ``OTEL_BGTASKS_*`` variables.

    Raises:
        TypeError: an unknown keyword (the message lists the valid ones).
        UnsafeConfigurationError: a variable asking for a guarantee has an invalid value.
        ConfigurationError: a value that cannot work (see `Settings`).
    """
    given = dict(keywords or {})
    unknown = sorted(set(given) - _KEYWORDS)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(map(repr, unknown))};"
            f" valid ones: {', '.join(sorted(_KEYWORDS))}"
        )
    env = {k: v for k, v in options_from_env(environ).items() if k not in given}
    return Settings(**env, **given, from_env=frozenset(env))
