"""`OTEL_BGTASKS_*` environment variables: every plain-valued `instrument()` option, no code.

Read by `BackgroundTasksInstrumentor.instrument()` (so by the ``opentelemetry-instrument``
entry point too); an argument given in code wins over its variable. An unset or empty
variable means "not set". A value that cannot work stops instrumentation with a
`ConfigurationError` naming the variable and the valid values.

| variable | option | values |
|---|---|---|
| ``OTEL_BGTASKS_TRACE_MODE`` | ``trace_mode`` | ``link``, ``child`` |
| ``OTEL_BGTASKS_PROPAGATE_EXCEPTIONS`` | ``propagate_exceptions`` | ``true``, ``false`` |
| ``OTEL_BGTASKS_RETRY_ATTEMPTS`` | ``retry=RetryPolicy(max_attempts=N)`` | integer >= 1 |
| ``OTEL_BGTASKS_RETRY_INITIAL_DELAY``, ``_MAX_DELAY``, ``_JITTER`` | backoff | seconds >= 0 |
| ``OTEL_BGTASKS_RETRY_MULTIPLIER`` | backoff growth | a number >= 1 |
| ``OTEL_BGTASKS_TIMEOUT`` | ``timeout`` | seconds > 0 |
| ``OTEL_BGTASKS_DURABLE`` | ``durable`` | ``true``, ``false`` |
| ``OTEL_BGTASKS_DLQ_URL`` | ``dead_letter_store`` | a store URL, or ``none`` |
| ``OTEL_BGTASKS_DISPATCH`` | ``dispatch`` | ``inline``, ``local`` |
| ``OTEL_BGTASKS_MAX_CONCURRENCY`` | ``max_concurrency`` | integer >= 1 |
| ``OTEL_BGTASKS_MAX_QUEUED`` | ``max_queued`` | integer >= 0 |
| ``OTEL_BGTASKS_DRAIN_TIMEOUT`` | ``drain_timeout`` | seconds >= 0 |
| ``OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES`` | ``redact_exception_messages`` | ``true``, ``false`` |
| ``OTEL_BGTASKS_LOG_LOCALS`` | ``log_locals`` | ``true``, ``false`` |
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.options import TRACE_MODES
from otel_bgtasks.retry import RetryPolicy
from otel_bgtasks.stores import DLQ_URL_ENV
from otel_bgtasks.task import DISPATCH_MODES

__all__ = ["ENV_PREFIX", "NO_STORE", "VARIABLES", "options_from_env"]

ENV_PREFIX = "OTEL_BGTASKS_"
NO_STORE = "none"
"""``OTEL_BGTASKS_DLQ_URL=none``: no dead-letter store (as ``dead_letter_store=None``)."""

_T = TypeVar("_T")

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})

_RETRY_BACKOFF = {
    "OTEL_BGTASKS_RETRY_INITIAL_DELAY": "initial_delay",
    "OTEL_BGTASKS_RETRY_MAX_DELAY": "max_delay",
    "OTEL_BGTASKS_RETRY_MULTIPLIER": "multiplier",
    "OTEL_BGTASKS_RETRY_JITTER": "jitter",
}

VARIABLES: tuple[str, ...] = (
    "OTEL_BGTASKS_TRACE_MODE",
    "OTEL_BGTASKS_PROPAGATE_EXCEPTIONS",
    "OTEL_BGTASKS_RETRY_ATTEMPTS",
    *_RETRY_BACKOFF,
    "OTEL_BGTASKS_TIMEOUT",
    "OTEL_BGTASKS_DURABLE",
    DLQ_URL_ENV,
    "OTEL_BGTASKS_DISPATCH",
    "OTEL_BGTASKS_MAX_CONCURRENCY",
    "OTEL_BGTASKS_MAX_QUEUED",
    "OTEL_BGTASKS_DRAIN_TIMEOUT",
    "OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES",
    "OTEL_BGTASKS_LOG_LOCALS",
)
"""Every variable this module reads (the README's table)."""


def _value(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return None
    return raw.strip()


def _parse(name: str, raw: str, convert: Callable[[str], _T], valid: str) -> _T:
    try:
        return convert(raw)
    except (ValueError, TypeError):
        shown = raw if len(raw) <= 60 else raw[:57] + "..."
        raise ConfigurationError(f"{name}={shown!r} is not valid; expected {valid}") from None


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(raw)


def _seconds(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError(raw)
    return value


def _attempts(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def _count(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _trace_mode(raw: str) -> str:
    lowered = raw.lower()
    if lowered not in TRACE_MODES:
        raise ValueError(raw)
    return lowered


def _dispatch(raw: str) -> str:
    lowered = raw.lower()
    if lowered not in DISPATCH_MODES:
        raise ValueError(raw)
    return lowered


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `instrument()` keyword arguments the ``OTEL_BGTASKS_*`` variables set.

    Raises:
        ConfigurationError: a variable has a value that cannot work (the message names it and
            lists the valid values); a `ValueError`.
    """
    env = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    if (raw := _value(env, "OTEL_BGTASKS_TRACE_MODE")) is not None:
        options["trace_mode"] = _parse(
            "OTEL_BGTASKS_TRACE_MODE", raw, _trace_mode, " or ".join(TRACE_MODES)
        )
    for name, key in (
        ("OTEL_BGTASKS_PROPAGATE_EXCEPTIONS", "propagate_exceptions"),
        ("OTEL_BGTASKS_DURABLE", "durable"),
        ("OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES", "redact_exception_messages"),
        ("OTEL_BGTASKS_LOG_LOCALS", "log_locals"),
    ):
        if (raw := _value(env, name)) is not None:
            options[key] = _parse(name, raw, _bool, "true or false")
    if (raw := _value(env, "OTEL_BGTASKS_TIMEOUT")) is not None:
        timeout = _parse("OTEL_BGTASKS_TIMEOUT", raw, _seconds, "a number of seconds > 0")
        if timeout == 0:
            raise ConfigurationError(
                f"OTEL_BGTASKS_TIMEOUT={raw!r} is not valid; expected a number of seconds > 0"
            )
        options["timeout"] = timeout
    retry = _retry(env)
    if retry is not None:
        options["retry"] = retry
    if (raw := _value(env, DLQ_URL_ENV)) is not None:
        options["dead_letter_store"] = None if raw.lower() == NO_STORE else raw
    if (raw := _value(env, "OTEL_BGTASKS_DISPATCH")) is not None:
        options["dispatch"] = _parse(
            "OTEL_BGTASKS_DISPATCH", raw, _dispatch, " or ".join(DISPATCH_MODES)
        )
    if (raw := _value(env, "OTEL_BGTASKS_MAX_CONCURRENCY")) is not None:
        options["max_concurrency"] = _parse(
            "OTEL_BGTASKS_MAX_CONCURRENCY", raw, _attempts, "an integer >= 1"
        )
    if (raw := _value(env, "OTEL_BGTASKS_MAX_QUEUED")) is not None:
        options["max_queued"] = _parse("OTEL_BGTASKS_MAX_QUEUED", raw, _count, "an integer >= 0")
    if (raw := _value(env, "OTEL_BGTASKS_DRAIN_TIMEOUT")) is not None:
        options["drain_timeout"] = _parse(
            "OTEL_BGTASKS_DRAIN_TIMEOUT", raw, _seconds, "a number of seconds >= 0"
        )
    return options


def _retry(env: Mapping[str, str]) -> RetryPolicy | None:
    backoff: dict[str, float] = {}
    for name, key in _RETRY_BACKOFF.items():
        if (raw := _value(env, name)) is not None:
            backoff[key] = _parse(name, raw, _seconds, "a number of seconds >= 0")
    attempts_raw = _value(env, "OTEL_BGTASKS_RETRY_ATTEMPTS")
    if attempts_raw is None and not backoff:
        return None
    attempts = 3
    if attempts_raw is not None:
        attempts = _parse("OTEL_BGTASKS_RETRY_ATTEMPTS", attempts_raw, _attempts, "an integer >= 1")
    try:
        return RetryPolicy(max_attempts=attempts, **cast(dict[str, Any], backoff))
    except ConfigurationError as exc:  # e.g. a multiplier below 1: name the variables
        names = ", ".join(["OTEL_BGTASKS_RETRY_ATTEMPTS", *_RETRY_BACKOFF])
        raise ConfigurationError(f"{exc} (set by {names})") from None
