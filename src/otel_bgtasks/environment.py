"""`OTEL_BGTASKS_*` environment variables: every plain-valued `instrument()` option, no code.

Read once into `otel_bgtasks.config.Settings` (by ``instrument()``, the
``opentelemetry-instrument`` entry point, the CLI and workers); an argument given in code wins
over its variable. An unset or empty variable means "not set".

An invalid value follows the OpenTelemetry SDK's convention: a warning naming the variable,
the value and the default used instead, and the rest applies. Except where the default is
weaker than what was asked (``OTEL_BGTASKS_DURABLE``, ``OTEL_BGTASKS_DLQ_URL``,
``OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES``, ``OTEL_BGTASKS_SIGNING_KEY``): there an
`UnsafeConfigurationError` names the variable, and the process refuses to start (under
``opentelemetry-instrument`` too).

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

import contextlib
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from otel_bgtasks._logger import log
from otel_bgtasks.errors import ConfigurationError, UnsafeConfigurationError
from otel_bgtasks.options import TRACE_MODES
from otel_bgtasks.retry import RetryPolicy
from otel_bgtasks.stores import DLQ_URL_ENV
from otel_bgtasks.task import DISPATCH_MODES

__all__ = ["ENV_PREFIX", "GUARANTEES", "NO_STORE", "VARIABLES", "options_from_env"]

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

GUARANTEES: frozenset[str] = frozenset(
    {
        "OTEL_BGTASKS_DURABLE",
        DLQ_URL_ENV,
        "OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES",
    }
)
"""Variables whose default is weaker than any value a user would set: an invalid value
refuses to start instead of falling back (``OTEL_BGTASKS_SIGNING_KEY`` too, in `signing`)."""


def _value(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return None
    return raw.strip()


class _Invalid(Exception):
    """A variable's value was rejected (and reported): the option keeps its default."""


def _parse(name: str, raw: str, convert: Callable[[str], _T], valid: str) -> _T:
    try:
        return convert(raw)
    except (ValueError, TypeError):
        _reject(name, raw, f"expected {valid}")
        raise _Invalid(name) from None


def _reject(name: str, raw: str, problem: str) -> None:
    """Refuse (a guarantee) or warn and fall back to the default (every other variable)."""
    shown = raw if len(raw) <= 60 else raw[:57] + "..."
    message = f"{name}={shown!r} is not valid; {problem}"
    if name in GUARANTEES:
        raise UnsafeConfigurationError(
            f"{message}. Refusing to start: the default would silently give a weaker"
            " guarantee than asked; fix or unset the variable"
        )
    log.warning(
        "invalid OTEL_BGTASKS_* variable ignored, using the default",
        variable=name,
        value=shown,
        problem=problem,
    )


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


def _positive_seconds(raw: str) -> float:
    value = _seconds(raw)
    if value == 0:
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

    An invalid value is logged as a warning naming the variable and left out (its default
    applies), except for the `GUARANTEES`.

    Raises:
        UnsafeConfigurationError: a variable of `GUARANTEES` has a value that cannot work (the
            message names it and lists the valid values); a `ConfigurationError`.
    """
    env = os.environ if environ is None else environ
    options: dict[str, Any] = {}

    def read(name: str, key: str, convert: Callable[[str], Any], valid: str) -> None:
        if (raw := _value(env, name)) is not None:
            with contextlib.suppress(_Invalid):
                options[key] = _parse(name, raw, convert, valid)

    read("OTEL_BGTASKS_TRACE_MODE", "trace_mode", _trace_mode, " or ".join(TRACE_MODES))
    for name, key in (
        ("OTEL_BGTASKS_PROPAGATE_EXCEPTIONS", "propagate_exceptions"),
        ("OTEL_BGTASKS_DURABLE", "durable"),
        ("OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES", "redact_exception_messages"),
        ("OTEL_BGTASKS_LOG_LOCALS", "log_locals"),
    ):
        read(name, key, _bool, "true or false")
    read("OTEL_BGTASKS_TIMEOUT", "timeout", _positive_seconds, "a number of seconds > 0")
    with contextlib.suppress(_Invalid):
        retry = _retry(env)
        if retry is not None:
            options["retry"] = retry
    if (raw := _value(env, DLQ_URL_ENV)) is not None:
        options["dead_letter_store"] = None if raw.lower() == NO_STORE else raw
    read("OTEL_BGTASKS_DISPATCH", "dispatch", _dispatch, " or ".join(DISPATCH_MODES))
    read("OTEL_BGTASKS_MAX_CONCURRENCY", "max_concurrency", _attempts, "an integer >= 1")
    read("OTEL_BGTASKS_MAX_QUEUED", "max_queued", _count, "an integer >= 0")
    read("OTEL_BGTASKS_DRAIN_TIMEOUT", "drain_timeout", _seconds, "a number of seconds >= 0")
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
        _reject(names, "(together)", f"{exc}")
        raise _Invalid(names) from None
