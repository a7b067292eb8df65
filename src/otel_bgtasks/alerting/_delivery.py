"""Delivery of notifications off the task path: bounded queue, worker threads, retries."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import structlog
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import Counter, Meter
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

from otel_bgtasks.alerting.alerts import Alert
from otel_bgtasks.alerting.config import DeliveryOptions
from otel_bgtasks.alerting.notifiers import DeliveryError, Notifier, redact
from otel_bgtasks.attributes import ALERT_CHANNEL, ALERT_OUTCOME, ALERT_RULE

__all__ = [
    "ALERTS_SENT",
    "ALERT_CHANNEL",
    "ALERT_OUTCOME",
    "ALERT_RULE",
    "NotificationDelivery",
    "create_sent_counter",
]

ALERTS_SENT: Final = "bgtasks.alerts.sent"

_log = structlog.get_logger("otel_bgtasks.alerting")


def create_sent_counter(meter: Meter) -> Counter:
    """The `bgtasks.alerts.sent` counter (outcome `sent` | `failed` | `dropped`)."""
    return meter.create_counter(
        ALERTS_SENT,
        unit="{notification}",
        description="Alert notifications by rule, channel and delivery outcome",
    )


@dataclass(frozen=True, slots=True)
class _Job:
    alert: Alert
    notifier: Notifier


def _retryable(exc: BaseException) -> bool:
    return not isinstance(exc, DeliveryError) or exc.retryable


class NotificationDelivery:
    """Sends each alert to every notifier on `max_concurrency` daemon threads.

    `submit` never blocks: a full queue drops the notification and counts it. Each delivery is
    retried with exponential backoff (tenacity) while its error is retryable; a shutdown stops
    the backoff waits at once.
    """

    def __init__(
        self, notifiers: Sequence[Notifier], counter: Counter, options: DeliveryOptions
    ) -> None:
        self.notifiers = tuple(notifiers)
        self.options = options
        self._counter = counter
        # One lock for the queue and the in-flight count, so that the bound is exact.
        self._jobs: deque[_Job] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._stopping = False
        self._dropping = False
        self._abort = threading.Event()
        self.high_water = 0
        """The most notifications ever waiting at once (never above `options.queue_size`)."""
        self._threads = [
            threading.Thread(target=self._work, name=f"bgtasks-alert-delivery-{i}", daemon=True)
            for i in range(options.max_concurrency)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        """Notifications waiting for a delivery thread."""
        return len(self._jobs)

    @property
    def in_flight(self) -> int:
        """Notifications being delivered (retries included) right now."""
        return self._in_flight

    @property
    def threads_alive(self) -> int:
        """Delivery threads still running (0 after a clean shutdown)."""
        return sum(thread.is_alive() for thread in self._threads)

    def submit(self, alert: Alert) -> None:
        """Queue `alert` for every notifier; drop (and count) what does not fit."""
        for notifier in self.notifiers:
            with self._lock:
                jobs = self._jobs
                accepted = not self._closed and len(jobs) < self.options.queue_size
                if accepted:
                    jobs.append(_Job(alert, notifier))
                    self.high_water = max(self.high_water, len(jobs))
                    self._work_ready.notify()
                first_drop = not accepted and not self._dropping
                self._dropping = not accepted
            if not accepted:
                self._record(alert, notifier, "dropped")
                if first_drop:
                    _log.warning(
                        "bgtasks alert dropped: delivery queue full or shut down",
                        alert_rule=alert.rule,
                        alert_channel=notifier.channel,
                        queue_size=self.options.queue_size,
                    )

    def flush(self, deadline: float) -> bool:
        """Wait until every queued notification is delivered or failed; False at `deadline`."""
        with self._idle:
            while self._jobs or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def shutdown(self, deadline: float) -> bool:
        """Refuse new alerts, deliver what is queued until `deadline`, then stop.

        What is still queued at the deadline is dropped and counted; a delivery stuck in a
        request ends at its own timeout, on a daemon thread nobody waits for.
        """
        with self._lock:
            self._closed = True
        flushed = self.flush(deadline)
        self._abort.set()  # ends backoff waits and retries at once
        with self._lock:
            # What no thread took yet is dropped now, not when a stuck thread frees up.
            left = list(self._jobs)
            self._jobs.clear()
            self._stopping = True
            self._work_ready.notify_all()
            self._idle.notify_all()
        for job in left:
            self._record(job.alert, job.notifier, "dropped")
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for notifier in self.notifiers:
            try:
                notifier.close()
            except Exception:  # closing one channel must not keep the others open
                _log.warning("bgtasks alert notifier close failed", channel=notifier.channel)
        return flushed

    # -- delivery threads ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._work_ready:
                while not self._jobs and not self._stopping:
                    self._work_ready.wait()
                if not self._jobs:  # stopping, and nothing left
                    return
                job = self._jobs.popleft()
                self._in_flight += 1
            try:
                self._deliver(job)
            except Exception:  # _deliver counts its own errors; this keeps the thread alive
                _log.warning("bgtasks alert delivery thread error", alert_rule=job.alert.rule)
            finally:
                with self._lock:
                    self._in_flight -= 1
                    if not self._jobs and not self._in_flight:
                        self._idle.notify_all()

    def _sleep(self, seconds: float) -> None:
        self._abort.wait(seconds)

    def _retrying(self) -> Retrying:
        options = self.options
        return Retrying(
            stop=stop_after_attempt(options.max_attempts) | stop_when_event_set(self._abort),
            # Exponential from backoff_initial, capped, plus up to backoff_initial of jitter.
            wait=wait_exponential(multiplier=options.backoff_initial, max=options.backoff_max)
            + wait_random(0, options.backoff_initial),
            retry=retry_if_exception(_retryable),
            sleep=self._sleep,
            reraise=True,
        )

    def _deliver(self, job: _Job) -> None:
        notifier = job.notifier
        errors: list[Exception] = []

        def attempt() -> None:
            if errors and self._abort.is_set():
                raise errors[-1]  # woken from a backoff wait by shutdown: no more tries
            try:
                notifier.send(job.alert)
            except Exception as exc:
                errors.append(exc)
                raise

        try:
            # No spans from the delivery itself: an instrumented httpx would put the secret
            # webhook URL on a span, and alerting must not feed on its own traffic.
            with suppress_instrumentation():
                self._retrying()(attempt)
        except Exception as exc:  # whatever a notifier raises, it is one failed delivery
            self._record(job.alert, notifier, "failed")
            # Never exc_info: tracebacks and their locals can hold the secrets.
            _log.warning(
                "bgtasks alert delivery failed",
                alert_rule=job.alert.rule,
                alert_channel=notifier.channel,
                attempts=len(errors),
                error=redact(f"{type(exc).__name__}: {exc}", notifier.secret_values()),
            )
        else:
            self._record(job.alert, notifier, "sent")

    def _record(self, alert: Alert, notifier: Notifier, outcome: str) -> None:
        self._counter.add(
            1,
            {ALERT_RULE: alert.rule, ALERT_CHANNEL: notifier.channel, ALERT_OUTCOME: outcome},
        )
