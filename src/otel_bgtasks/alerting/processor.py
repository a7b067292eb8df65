"""`AlertingSpanProcessor`: feeds finished task spans to the rules, off the task path."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Sequence
from typing import Final

import structlog
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
from opentelemetry.trace import TracerProvider

from otel_bgtasks import attributes as attr
from otel_bgtasks._tracebacks import exception_fields
from otel_bgtasks._version import __version__
from otel_bgtasks.alerting._delivery import NotificationDelivery, create_sent_counter
from otel_bgtasks.alerting.alerts import Alert
from otel_bgtasks.alerting.config import AlertingConfig, DeliveryOptions, rules_from_env
from otel_bgtasks.alerting.notifiers import LogNotifier, Notifier
from otel_bgtasks.alerting.rules import Clock, Rule, RuleEngine, default_rules
from otel_bgtasks.alerting.signals import TaskSignal
from otel_bgtasks.errors import ConfigurationError

__all__ = ["AlertingSpanProcessor", "install_alerting"]

_SCOPE: Final = "otel_bgtasks"
_STOP: Final = object()

_log = structlog.get_logger("otel_bgtasks.alerting")


class AlertingSpanProcessor(SpanProcessor):
    """A span processor that evaluates alert rules on task spans and sends notifications.

    `on_end` only checks for `bgtasks.task.name` and puts the span on a bounded queue; a
    daemon thread turns it into a `TaskSignal` and runs the rules, and the delivery threads
    send the notifications. Nothing on the task path waits for a rule or a network call; when
    the queue is full the span is skipped for alerting (`signals_dropped`) and the task goes
    on. Works next to any exporter, or none.

    Args:
        rules: the rules, or a ready `RuleEngine`.
        notifiers: where alerts go; every alert goes to every notifier.
        meter_provider: for the `bgtasks.alerts.sent` counter (default: the global one).
        delivery: queue size, concurrency, retries of the notifications.
        queue_size: finished task spans waiting for the rules at most.
        tick_interval: seconds between re-checks of time windows and cooldowns.
        shutdown_timeout: seconds `shutdown()` waits for queued alerts to be delivered.
        clock: the rules' clock (Unix seconds), injectable for tests.
    """

    def __init__(
        self,
        rules: Sequence[Rule] | RuleEngine,
        notifiers: Sequence[Notifier],
        *,
        meter_provider: MeterProvider | None = None,
        delivery: DeliveryOptions | None = None,
        queue_size: int = 2048,
        tick_interval: float = 1.0,
        shutdown_timeout: float = 5.0,
        clock: Clock = time.time,
    ) -> None:
        if queue_size < 1:
            raise ConfigurationError(
                f"AlertingSpanProcessor(queue_size={queue_size!r}): must be >= 1"
            )
        if not tick_interval > 0:
            raise ConfigurationError(
                f"AlertingSpanProcessor(tick_interval={tick_interval!r}): must be > 0 seconds"
            )
        self.engine = rules if isinstance(rules, RuleEngine) else RuleEngine(rules, clock=clock)
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider, schema_url=attr.SCHEMA_URL)
        self.delivery = NotificationDelivery(
            notifiers, create_sent_counter(meter), delivery or DeliveryOptions()
        )
        self.queue_size = queue_size
        self.tick_interval = float(tick_interval)
        self.shutdown_timeout = float(shutdown_timeout)
        self._spans: queue.Queue[ReadableSpan | object] = queue.Queue(queue_size)
        self._drop_lock = threading.Lock()
        self._signals_dropped = 0
        self._closed = False
        self._stop = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="bgtasks-alerting", daemon=True)
        self._worker.start()

    def __repr__(self) -> str:
        rules = ", ".join(rule.name for rule in self.engine.rules)
        channels = ", ".join(n.channel for n in self.delivery.notifiers)
        return f"AlertingSpanProcessor(rules=[{rules}], channels=[{channels}])"

    @property
    def signals_dropped(self) -> int:
        """Task spans skipped by alerting because the queue was full."""
        return self._signals_dropped

    @property
    def pending_signals(self) -> int:
        """Task spans waiting for the rules."""
        return self._spans.qsize()

    # -- the task path --------------------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a finished task span for the rules; never blocks, never raises."""
        attributes = span.attributes
        if not attributes or attr.TASK_NAME not in attributes or self._closed:
            return
        try:
            self._spans.put_nowait(span)
        except queue.Full:
            with self._drop_lock:
                self._signals_dropped += 1
                first = self._signals_dropped == 1
            if first:  # later drops only count: this runs on the task path
                # The SDK does not guard on_end: a raising log handler would reach the task.
                with contextlib.suppress(Exception):
                    _log.warning(
                        "bgtasks alerting queue full: task spans skipped by the alert rules",
                        queue_size=self.queue_size,
                    )

    # -- the rules thread -----------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick_interval
        while not self._stop.is_set():
            try:
                item = self._spans.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = None
            try:
                if item is _STOP:
                    return
                if isinstance(item, ReadableSpan):
                    self._evaluate(item)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.tick_interval
                    self._deliver(self.engine.tick())
            except Exception:  # keep the thread alive whatever a span or rule holds
                _log.error("bgtasks alerting failed on a span", **exception_fields())
            finally:
                if item is not None:
                    self._spans.task_done()

    def _evaluate(self, span: ReadableSpan) -> None:
        signal = TaskSignal.from_span(span)
        if signal is not None:
            self._deliver(self.engine.observe(signal))

    def _deliver(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            self.delivery.submit(alert)

    # -- lifecycle ------------------------------------------------------------------------------

    def _join_spans(self, deadline: float) -> bool:
        spans = self._spans
        with spans.all_tasks_done:
            while spans.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                spans.all_tasks_done.wait(remaining)
        return True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Run the rules on every queued span and deliver the alerts; False on timeout."""
        deadline = time.monotonic() + timeout_millis / 1000
        return self._join_spans(deadline) and self.delivery.flush(deadline)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking spans, drain both queues for up to `timeout` s (default
        `shutdown_timeout`), then stop the threads; what is left is dropped and counted.
        Idempotent."""
        with self._shutdown_lock:
            if self._closed:
                return
            self._closed = True
        limit = self.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        drained = self._join_spans(deadline)
        self._stop.set()
        # A full queue means the rules thread is stuck; it sees `_stop` after its span.
        with contextlib.suppress(queue.Full):
            self._spans.put_nowait(_STOP)
        self._worker.join(max(0.0, deadline - time.monotonic()))
        delivered = self.delivery.shutdown(deadline)
        if not (drained and delivered):
            _log.warning(
                "bgtasks alerting shut down before every alert was delivered",
                timeout_seconds=limit,
            )


def install_alerting(
    tracer_provider: TracerProvider | None = None,
    *,
    rules: Sequence[Rule] | None = None,
    notifiers: Sequence[Notifier] | None = None,
    meter_provider: MeterProvider | None = None,
    config: AlertingConfig | None = None,
    delivery: DeliveryOptions | None = None,
    queue_size: int = 2048,
    tick_interval: float = 1.0,
    shutdown_timeout: float = 5.0,
    clock: Clock = time.time,
) -> AlertingSpanProcessor:
    """Add an `AlertingSpanProcessor` to an SDK tracer provider and return it.

    Args:
        tracer_provider: an SDK `TracerProvider` (default: the global one).
        rules: default: the rules of `config` (`OTEL_BGTASKS_ALERT_RULES` when `config` is
            not given), else `default_rules()`: 3 consecutive failures, circuit opened, each
            dead-letter move. Rules given here win over any configured ones.
        notifiers: default: the channels of `config`; with no channel configured, alerts go
            to the structlog log (`LogNotifier`).
        meter_provider: for the `bgtasks.alerts.sent` counter (default: the global one).
        config: channels, delivery options and rules; default `AlertingConfig.from_env()`
            when `notifiers` is not given. With `notifiers` and without `config` or `rules`,
            only `OTEL_BGTASKS_ALERT_RULES` is read.
        delivery: overrides `config.delivery`.
        queue_size, tick_interval, shutdown_timeout, clock: see `AlertingSpanProcessor`.

    Raises:
        TypeError: the tracer provider is not the SDK's (it cannot take span processors).
        AlertingConfigError: the environment configuration is invalid.
    """
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    if not isinstance(provider, SDKTracerProvider):
        raise TypeError(
            f"install_alerting needs an SDK TracerProvider, got {type(provider).__name__}: "
            "pass tracer_provider=..., or call configure_telemetry() first"
        )
    if config is None and notifiers is None:
        config = AlertingConfig.from_env()
    if notifiers is None:
        notifiers = config.notifiers() if config is not None else []
        if not notifiers:
            _log.info("bgtasks alerting: no alert channel configured, alerts go to the log")
            notifiers = [LogNotifier()]
    if delivery is None and config is not None:
        delivery = config.delivery
    if rules is None:
        if config is not None:
            rules = config.build_rules()
        else:  # notifiers in code, rules maybe from the environment
            specs = rules_from_env()
            rules = [spec.build() for spec in specs] if specs is not None else default_rules()
    processor = AlertingSpanProcessor(
        rules,
        notifiers,
        meter_provider=meter_provider,
        delivery=delivery,
        queue_size=queue_size,
        tick_interval=tick_interval,
        shutdown_timeout=shutdown_timeout,
        clock=clock,
    )
    provider.add_span_processor(processor)
    return processor
