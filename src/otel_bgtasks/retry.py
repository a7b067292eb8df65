"""Retry policy: decides "again?" and "how long?", built on tenacity strategies.

    RetryPolicy(max_attempts=5, initial_delay=0.5, max_delay=30)      # exponential + jitter
    RetryPolicy(retry_on={ErrorCategory.CONNECTION, ErrorCategory.TIMEOUT, ErrorCategory.UNKNOWN})
    RetryPolicy(stop=stop_after_delay(60), wait=wait_fixed(2))      # tenacity strategies
    RetryPolicy(retry=retry_if_exception_type(KeyError))            # tenacity alone decides
    RetryPolicy(retry=retry_if_category(ErrorCategory.UNKNOWN) | retry_if_exception_type(KeyError))

"Again?" is one tenacity retry strategy (`RetryPolicy.retry`), asked in one place: error
categories are a strategy too (`retry_if_category`), composable with tenacity's own. A circuit
that refused the call is never retried, whatever the strategy says (the next attempt would be
refused as well; the task goes to the dead letters). Only a failed first attempt builds the
tenacity machinery, so a task that succeeds costs no more with a policy than without.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.retry import retry_any, retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from otel_bgtasks.attributes import ErrorCategory
from otel_bgtasks.errors import (
    CircuitOpenError,
    ConfigurationError,
    ErrorClassifier,
    classify_error,
)

__all__ = ["DEFAULT_RETRY_ON", "RetryPolicy", "retry_if_category"]

DEFAULT_RETRY_ON: frozenset[ErrorCategory] = frozenset(
    {ErrorCategory.CONNECTION, ErrorCategory.TIMEOUT}
)

BeforeSleep = Callable[[RetryCallState], Any]

_NOT_CIRCUIT_OPEN = retry_if_not_exception_type(CircuitOpenError)


class retry_if_category(retry_base):
    """A tenacity retry strategy: retry when the error's category is one of `categories`."""

    def __init__(
        self, *categories: ErrorCategory, classifier: ErrorClassifier = classify_error
    ) -> None:
        self.categories = frozenset(categories)
        self.classifier = classifier

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is None or not outcome.failed:
            return False
        exc = outcome.exception()
        return exc is not None and self.classifier(exc) in self.categories

    def __repr__(self) -> str:
        return f"retry_if_category({', '.join(sorted(self.categories))})"


class RetryPolicy:
    """How often and how long to wait before retrying a failed task.

    Args:
        max_attempts: attempts in all, the first included (1 = never retry).
        initial_delay, max_delay, multiplier, jitter: exponential backoff in seconds:
            `min(initial_delay * multiplier**(n-1) + uniform(0, jitter), max_delay)`.
        retry_on: error categories (see `classify_error`) or exception types that retry;
            ignored when `retry` is given.
        classifier: maps an error to its category; default `classify_error`.
        stop, wait, retry: tenacity strategies replacing the ones built from the numbers;
            `retry` alone then decides which errors retry.
        sleep: awaited with each delay before a retry (tenacity's ``sleep=``); default
            `anyio.sleep`, which never blocks the event loop, asyncio's or trio's. Tests pass
            their own.

    Raises:
        ConfigurationError: a value of the wrong type or out of range (attempts not an
            integer >= 1, negative or non-finite delays, multiplier < 1); a `ValueError`.
    """

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        multiplier: float = 2.0,
        jitter: float = 0.5,
        retry_on: Iterable[ErrorCategory | type[BaseException]] = DEFAULT_RETRY_ON,
        classifier: ErrorClassifier = classify_error,
        stop: stop_base | None = None,
        wait: wait_base | None = None,
        retry: retry_base | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy(max_attempts={max_attempts!r}): must be an integer >= 1"
            )
        for label, value, low in (
            ("initial_delay", initial_delay, 0.0),
            ("max_delay", max_delay, 0.0),
            ("jitter", jitter, 0.0),
            ("multiplier", multiplier, 1.0),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value >= low)
            ):
                unit = " seconds" if label != "multiplier" else ""
                raise ConfigurationError(
                    f"RetryPolicy({label}={value!r}): must be a finite number >= {low:g}{unit}"
                )
        kinds = tuple(retry_on)
        self.max_attempts = max_attempts
        self.max_delay = float(max_delay)  # the longest wait between attempts (built-in wait)
        self.classifier = classifier
        self.retry_categories = frozenset(k for k in kinds if isinstance(k, ErrorCategory))
        self.retry_types = tuple(k for k in kinds if isinstance(k, type))
        self.stop: stop_base = stop or stop_after_attempt(max_attempts)
        self.wait: wait_base = wait or wait_exponential_jitter(
            multiplier=initial_delay, max=max_delay, exp_base=multiplier, jitter=jitter
        )
        if retry is None:
            retry = retry_if_category(*self.retry_categories, classifier=classifier)
            if self.retry_types:
                retry = retry_any(retry, retry_if_exception_type(self.retry_types))
        self.retry: retry_base = retry
        self.sleep = sleep
        self._decide = _NOT_CIRCUIT_OPEN & retry

    def retries(self, exc: BaseException, *, attempt: int = 1) -> bool:
        """Whether this policy's strategy retries `exc` raised by attempt `attempt`
        (ignoring attempts left: that is `stop`'s call)."""
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        state.set_exception((type(exc), exc, exc.__traceback__))
        return bool(self._decide(state))

    def retrying(self, before_sleep: BeforeSleep | None = None) -> AsyncRetrying:
        """A tenacity `AsyncRetrying` for this policy; its sleeps never block the loop."""
        return AsyncRetrying(
            stop=self.stop,
            wait=self.wait,
            retry=self._decide,
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

    def __repr__(self) -> str:
        return f"RetryPolicy(stop={self.stop!r}, wait={self.wait!r}, retry={self.retry!r})"
