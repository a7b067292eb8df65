"""The delivery queue: retries with backoff, concurrency, drops counted, shutdown."""

from __future__ import annotations

import threading
import time

import pytest
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from structlog.testing import capture_logs

from otel_bgtasks.alerting import (
    Alert,
    AlertStatus,
    DeliveryError,
    DeliveryOptions,
    Notifier,
    Severity,
)
from otel_bgtasks.alerting._delivery import NotificationDelivery, create_sent_counter

FAST = {"backoff_initial": 0.0, "backoff_max": 0.0}


def alert(rule: str = "consecutive_failures", key: str = "task:send_invoice") -> Alert:
    return Alert(rule, Severity.ERROR, AlertStatus.FIRING, key, "Task send_invoice failed", 1.0)


class Scripted(Notifier):
    """Plays a script: each send takes the next item, raising it when it is an exception."""

    def __init__(self, script=(), channel="webhook", secret="s3cr3t-url"):
        self.script = list(script)
        self.channel = channel
        self.secret = secret
        self.calls: list[tuple[Alert, str, bool]] = []
        self.called = threading.Event()
        self.closed = 0

    def send(self, alert):
        self.calls.append((alert, threading.current_thread().name, is_instrumentation_enabled()))
        self.called.set()
        step = self.script.pop(0) if self.script else None
        if step is not None:
            raise step

    def close(self):
        self.closed += 1

    def secret_values(self):
        return (self.secret,)


class Blocking(Notifier):
    """Blocks in send until released: a channel that hangs."""

    channel = "slack"

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.sent: list[Alert] = []

    def send(self, alert):
        self.entered.release()
        self.release.wait(30)
        self.sent.append(alert)


@pytest.fixture
def reader():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    reader.counter = create_sent_counter(provider.get_meter("otel_bgtasks"))
    yield reader
    provider.shutdown()


def sent_counts(reader) -> dict[tuple[str, str, str], int]:
    counts = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                assert metric.name == "bgtasks.alerts.sent"
                assert metric.unit == "{notification}"
                for point in metric.data.data_points:
                    a = point.attributes
                    key = (
                        a["bgtasks.alert.rule"],
                        a["bgtasks.alert.channel"],
                        a["bgtasks.alert.outcome"],
                    )
                    counts[key] = point.value
    return counts


_threads: dict[int, list[threading.Thread]] = {}


def join_threads(delivery: NotificationDelivery) -> None:
    """Wait until `delivery`'s threads have ended (30 s to fail with)."""
    for thread in _threads[id(delivery)]:
        thread.join(30)
    assert delivery.threads_alive == 0


@pytest.fixture
def make(reader):
    made: list[NotificationDelivery] = []

    def make(notifiers, **options):
        before = set(threading.enumerate())
        delivery = NotificationDelivery(notifiers, reader.counter, DeliveryOptions(**options))
        _threads[id(delivery)] = [t for t in threading.enumerate() if t not in before]
        made.append(delivery)
        return delivery

    yield make
    for delivery in made:
        delivery.shutdown(time.monotonic() + 5)
        assert delivery.threads_alive == 0


def deadline(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def test_retryable_errors_are_retried_on_a_delivery_thread_with_instrumentation_off(make, reader):
    notifier = Scripted([DeliveryError("HTTP 503"), DeliveryError("ReadTimeout")])
    delivery = make([notifier], max_attempts=3, **FAST)
    delivery.submit(alert())
    assert delivery.flush(deadline())
    assert len(notifier.calls) == 3
    for sent, thread, instrumented in notifier.calls:
        assert sent == alert()
        assert thread.startswith("bgtasks-alert-delivery-")
        assert instrumented is False  # no client spans that could carry the URL
    assert is_instrumentation_enabled()  # only the delivery was suppressed
    assert sent_counts(reader) == {("consecutive_failures", "webhook", "sent"): 1}


def test_a_permanent_error_is_not_retried_and_its_log_line_hides_the_secret(make, reader):
    notifier = Scripted([DeliveryError("HTTP 404 for https://x/s3cr3t-url", retryable=False)])
    delivery = make([notifier], max_attempts=5, **FAST)
    with capture_logs() as logs:
        delivery.submit(alert())
        assert delivery.flush(deadline())
    assert len(notifier.calls) == 1
    assert sent_counts(reader) == {("consecutive_failures", "webhook", "failed"): 1}
    assert logs == [
        {
            "event": "bgtasks alert delivery failed",
            "alert_rule": "consecutive_failures",
            "alert_channel": "webhook",
            "attempts": 1,
            "error": "DeliveryError: HTTP 404 for https://x/**********",
            "log_level": "warning",
        }
    ]


def test_attempts_are_bounded_and_any_exception_is_one_failed_delivery(make, reader):
    notifier = Scripted([ValueError("bug"), ValueError("bug"), ValueError("bug")])
    delivery = make([notifier], max_attempts=3, **FAST)
    delivery.submit(alert())
    assert delivery.flush(deadline())
    assert len(notifier.calls) == 3
    delivery.submit(alert(rule="slow_task"))  # the thread survived
    assert delivery.flush(deadline())
    assert sent_counts(reader) == {
        ("consecutive_failures", "webhook", "failed"): 1,
        ("slow_task", "webhook", "sent"): 1,
    }


def test_every_alert_goes_to_every_notifier(make, reader):
    a, b = Scripted(channel="webhook"), Scripted(channel="email")
    delivery = make([a, b], **FAST)
    delivery.submit(alert())
    assert delivery.flush(deadline())
    assert [c[0] for c in a.calls] == [c[0] for c in b.calls] == [alert()]
    assert sent_counts(reader) == {
        ("consecutive_failures", "webhook", "sent"): 1,
        ("consecutive_failures", "email", "sent"): 1,
    }


def test_a_full_queue_drops_and_counts_and_never_grows_past_its_bound(make, reader):
    hanging = Blocking()
    delivery = make([hanging], queue_size=2, max_concurrency=1, **FAST)
    with capture_logs() as logs:
        delivery.submit(alert(key="task:0"))
        assert hanging.entered.acquire(timeout=10)  # one in flight, stuck
        for i in range(1, 7):
            delivery.submit(alert(key=f"task:{i}"))
            assert delivery.queued <= 2
    assert (delivery.in_flight, delivery.queued, delivery.high_water) == (1, 2, 2)
    assert sent_counts(reader) == {("consecutive_failures", "slack", "dropped"): 4}
    # One warning per run of drops, not one per drop.
    assert [e["event"] for e in logs] == ["bgtasks alert dropped: delivery queue full or shut down"]
    assert not delivery.flush(time.monotonic())  # not flushed now, nor ever while it hangs
    hanging.release.set()
    assert delivery.flush(deadline())
    assert [a.key for a in hanging.sent] == ["task:0", "task:1", "task:2"]
    assert sent_counts(reader) == {
        ("consecutive_failures", "slack", "dropped"): 4,
        ("consecutive_failures", "slack", "sent"): 3,
    }


def test_concurrency_is_limited(make):
    hanging = Blocking()
    delivery = make([hanging], queue_size=10, max_concurrency=3, **FAST)
    for i in range(6):
        delivery.submit(alert(key=f"task:{i}"))
    for _ in range(3):
        assert hanging.entered.acquire(timeout=10)
    assert (delivery.in_flight, delivery.queued) == (3, 3)  # three threads, all taken
    hanging.release.set()
    assert delivery.flush(deadline())


def test_shutdown_drops_what_is_queued_refuses_new_alerts_and_closes_notifiers(make, reader):
    hanging = Blocking()
    closer = Scripted(channel="email")
    delivery = make([hanging], queue_size=5, max_concurrency=1, **FAST)
    delivery.notifiers = (hanging, closer)
    delivery.submit(alert())
    assert hanging.entered.acquire(timeout=10)
    assert not delivery.shutdown(time.monotonic())  # one stuck in flight
    assert delivery.queued == 0
    assert closer.closed == 1
    delivery.submit(alert(rule="late"))
    hanging.release.set()
    join_threads(delivery)
    assert sent_counts(reader) == {
        ("consecutive_failures", "email", "dropped"): 1,  # queued behind the stuck one
        ("consecutive_failures", "slack", "sent"): 1,  # the stuck one, finished late
        ("late", "slack", "dropped"): 1,
        ("late", "email", "dropped"): 1,
    }


def test_shutdown_cuts_a_backoff_wait_short(make, reader):
    notifier = Scripted([DeliveryError("HTTP 503")] * 5)
    delivery = make([notifier], max_attempts=5, backoff_initial=60.0, backoff_max=60.0)
    with capture_logs() as logs:
        delivery.submit(alert())
        assert notifier.called.wait(30)  # the first try failed: a 60 s backoff wait begins
        # The drain gives the retry until the deadline, then the 60 s wait is cut short.
        assert not delivery.shutdown(time.monotonic())
        join_threads(delivery)
    assert len(notifier.calls) == 1  # no try after the shutdown
    assert sent_counts(reader) == {("consecutive_failures", "webhook", "failed"): 1}
    assert [(e["attempts"], e["error"]) for e in logs] == [(1, "DeliveryError: HTTP 503")]
