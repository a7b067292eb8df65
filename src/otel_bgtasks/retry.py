"""Retry policy: decides "again?" and "how long?", built on tenacity strategies.

    RetryPolicy(max_attempts=5, initial_delay=0.5, max_delay=30)      # exponential + jitter
    RetryPolicy(retry_on={ErrorCategory.CONNECTION, ErrorCategory.TIMEOUT, ErrorCategory.UNKNOWN})
    RetryPolicy(stop=stop_after_delay(60), wait=wait_fixed(2))      # tenacity strategies

Only a failed first attempt builds the tenacity machinery, so a task that succeeds costs no
more with a policy than without.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from otel_bgtasks.attributes import ErrorCategory
from otel_bgtasks.errors import CircuitOpenError, ErrorClassifier, classify_error

__all__ = ["DEFAULT_RETRY_ON", "RetryPolicy"]

DEFAULT_RETRY_ON: frozenset[ErrorCategory] = frozenset(
    {ErrorCategory.CONNECTION, ErrorCategory.TIMEOUT}
)

BeforeSleep = Callable[[RetryCallState], Any]


class RetryPolicy:
    """How often and how long to wait before retrying a failed task.

    Args:
        max_attempts: attempts in all, the first included (1 = never retry).
        initial_delay, max_delay, multiplier, jitter: exponential backoff in seconds:
            `min(initial_delay * multiplier**(n-1) + uniform(0, jitter), max_delay)`.
        retry_on: error categories (see `classify_error`) or exception types that retry.
        classifier: maps an error to its category; default `classify_error`.
        stop, wait, retry: tenacity strategies replacing the ones built from the numbers.

    Raises:
        ValueError: a value out of range (attempts < 1, negative delays, multiplier < 1).
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
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"RetryPolicy(max_attempts={max_attempts}): must be >= 1")
        for label, value in (
            ("initial_delay", initial_delay),
            ("max_delay", max_delay),
            ("jitter", jitter),
        ):
            if value < 0:
                raise ValueError(f"RetryPolicy({label}={value}): must be >= 0 seconds")
        if multiplier < 1:
            raise ValueError(f"RetryPolicy(multiplier={multiplier}): must be >= 1")
        kinds = tuple(retry_on)
        self.max_attempts = max_attempts
        self.classifier = classifier
        self.retry_categories = frozenset(k for k in kinds if isinstance(k, ErrorCategory))
        self.retry_types = tuple(k for k in kinds if isinstance(k, type))
        self.stop: stop_base = stop or stop_after_attempt(max_attempts)
        self.wait: wait_base = wait or wait_exponential_jitter(
            multiplier=initial_delay, max=max_delay, exp_base=multiplier, jitter=jitter
        )
        self.retry: retry_base = retry or retry_if_exception(self.is_retryable)

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether `exc` is of a kind this policy retries (ignoring attempts left).

        A circuit that refused the call is never retried: the task goes to the dead letters.
        """
        if isinstance(exc, CircuitOpenError):
            return False
        return isinstance(exc, self.retry_types) or self.classifier(exc) in self.retry_categories

    def retrying(self, before_sleep: BeforeSleep | None = None) -> AsyncRetrying:
        """A tenacity `AsyncRetrying` for this policy; async sleeps never block the loop."""
        return AsyncRetrying(
            stop=self.stop,
            wait=self.wait,
            retry=self.retry,
            sleep=asyncio.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(stop={self.stop!r}, wait={self.wait!r}, "
            f"retry_on={sorted(self.retry_categories)}{list(self.retry_types) or ''})"
        )
