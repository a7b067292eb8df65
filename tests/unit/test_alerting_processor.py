"""`AlertingSpanProcessor` and `install_alerting` with a real SDK tracer and fake channels."""

from __future__ import annotations

import threading

import pytest
from opentelemetry import trace
from structlog.testing import capture_logs

from otel_bgtasks import attributes as attr
from otel_bgtasks._version import __version__
from otel_bgtasks.alerting import (
    Alert,
    AlertingConfig,
    AlertingSpanProcessor,
    AlertStatus,
    ConsecutiveFailures,
    DeadLetterMoves,
    LogNotifier,
    Notifier,
    Rule,
    Secret,
    Severity,
    SlackNotifier,
    install_alerting,
)


class Recording(Notifier):
    channel = "test"

    def __init__(self):
        self.alerts = []
        self.closed = False
        self._sent = threading.Condition()

    def send(self, alert):
        with self._sent:
            self.alerts.append(alert)
            self._sent.notify_all()

    def wait_for(self, count):
        """Block until `count` alerts were sent (a bound to fail with, not a decision)."""
        with self._sent:
            assert self._sent.wait_for(lambda: len(self.alerts) >= count, timeout=30), self.alerts

    def close(self):
        self.closed = True


class Stuck(Rule):
    """A rule that blocks the rules thread until released (a slow custom rule)."""

    default_name = "stuck"

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def _check(self, signal, now):
        self.entered.set()
        self.release.wait(30)
        return ()


@pytest.fixture
def providers(telemetry):
    return telemetry.tracer_provider, telemetry.meter_provider, telemetry.reader


def end_task_span(tracer_provider, name="send_invoice", outcome="failure", events=()):
    span = tracer_provider.get_tracer("test").start_span(
        f"process {name}", attributes={attr.TASK_NAME: name, attr.TASK_ID: "1"}
    )
    for event_name, event_attrs in events:
        span.add_event(event_name, event_attrs)
    span.set_attribute(attr.TASK_OUTCOME, outcome)
    span.end()


def test_task_spans_reach_the_rules_and_the_notifier(providers):
    tracer_provider, meter_provider, reader = providers
    notifier = Recording()
    processor = AlertingSpanProcessor(
        [ConsecutiveFailures(2)], [notifier], meter_provider=meter_provider
    )
    tracer_provider.add_span_processor(processor)
    with tracer_provider.get_tracer("test").start_as_current_span("GET /orders"):
        pass  # not a task span: ignored
    end_task_span(tracer_provider)
    end_task_span(tracer_provider)
    assert processor.force_flush(10_000)
    (alert,) = notifier.alerts
    assert (alert.rule, alert.status, alert.key) == (
        "consecutive_failures",
        AlertStatus.FIRING,
        "task:send_invoice",
    )
    assert alert.signal is not None
    assert alert.signal.outcome == "failure"
    (scope,) = reader.get_metrics_data().resource_metrics[0].scope_metrics
    assert (scope.scope.name, scope.scope.version) == ("otel_bgtasks", __version__)
    (metric,) = scope.metrics
    (point,) = metric.data.data_points
    assert (metric.name, metric.unit, point.value, dict(point.attributes)) == (
        "bgtasks.alerts.sent",
        "{notification}",
        1,
        {
            "bgtasks.alert.rule": "consecutive_failures",
            "bgtasks.alert.channel": "test",
            "bgtasks.alert.outcome": "sent",
        },
    )
    assert repr(processor) == "AlertingSpanProcessor(rules=[consecutive_failures], channels=[test])"


def test_on_end_never_blocks_and_the_span_queue_stays_bounded(providers):
    tracer_provider, meter_provider, _ = providers
    stuck = Stuck()
    processor = AlertingSpanProcessor(
        [stuck], [Recording()], meter_provider=meter_provider, queue_size=3
    )
    tracer_provider.add_span_processor(processor)
    end_task_span(tracer_provider)
    assert stuck.entered.wait(10)  # the rules thread now holds one span, stuck
    with capture_logs() as logs:
        for _ in range(10):
            end_task_span(tracer_provider)
            assert processor.pending_signals <= 3
    assert (processor.pending_signals, processor.signals_dropped) == (3, 7)
    assert [e["event"] for e in logs] == [
        "bgtasks alerting queue full: task spans skipped by the alert rules"
    ]
    assert not processor.force_flush(50)
    stuck.release.set()
    assert processor.force_flush(10_000)
    assert processor.pending_signals == 0


def test_time_windows_resolve_on_the_rules_thread_tick(providers):
    tracer_provider, meter_provider, _ = providers
    now = [1000.0]
    notifier = Recording()
    processor = AlertingSpanProcessor(
        [DeadLetterMoves(window_seconds=60, cooldown=0)],
        [notifier],
        meter_provider=meter_provider,
        tick_interval=0.01,
        clock=lambda: now[0],
    )
    tracer_provider.add_span_processor(processor)
    end_task_span(
        tracer_provider,
        outcome="dead_lettered",
        events=[(attr.EVENT_DLQ_MOVED, {attr.DLQ_ENTRY_ID: "e1", attr.DLQ_REASON: "exhausted"})],
    )
    assert processor.force_flush(10_000)
    assert [a.status for a in notifier.alerts] == [AlertStatus.FIRING]
    now[0] = 1061.0
    notifier.wait_for(2)  # the rules thread ticks on its own and sees the later time
    assert processor.force_flush(10_000)
    assert [(a.status, a.at) for a in notifier.alerts] == [
        (AlertStatus.FIRING, 1000.0),
        (AlertStatus.RESOLVED, 1061.0),
    ]


def test_shutdown_is_idempotent_closes_notifiers_and_ignores_later_spans(providers):
    tracer_provider, meter_provider, _ = providers
    notifier = Recording()
    processor = AlertingSpanProcessor(
        [ConsecutiveFailures(1)], [notifier], meter_provider=meter_provider
    )
    tracer_provider.add_span_processor(processor)
    end_task_span(tracer_provider)
    tracer_provider.shutdown()  # the provider shuts its processors down
    assert len(notifier.alerts) == 1  # drained before closing
    assert notifier.closed
    processor.shutdown()
    processor.on_end(tracer_provider.get_tracer("t").start_span("process x"))  # no error
    assert processor.pending_signals == 0
    assert processor.delivery.threads_alive == 0


@pytest.mark.parametrize("bad", [{"queue_size": 0}, {"tick_interval": 0}])
def test_processor_settings_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AlertingSpanProcessor([], [], **bad)


# -- install_alerting ----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_BGTASKS_ALERT_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_install_alerting_adds_the_processor_with_defaults(providers, clean_env):
    tracer_provider, meter_provider, _ = providers
    with capture_logs() as logs:
        processor = install_alerting(tracer_provider, meter_provider=meter_provider)
    assert [e["event"] for e in logs] == [
        "bgtasks alerting: no alert channel configured, alerts go to the log"
    ]
    assert [r.name for r in processor.engine.rules] == [
        "consecutive_failures",
        "circuit_opened",
        "dead_letter_moves",
    ]
    assert [type(n) for n in processor.delivery.notifiers] == [LogNotifier]
    with capture_logs() as logs:
        for _ in range(3):
            end_task_span(tracer_provider)
        assert processor.force_flush(10_000)
    (logged,) = logs
    assert logged["event"] == "bgtasks alert firing"
    assert logged["log_level"] == "error"
    assert logged["alert_rule"] == "consecutive_failures"
    assert logged["labels"] == {"task": "send_invoice", "service": "unknown_service:python"}


def test_install_alerting_reads_channels_from_the_environment(providers, clean_env):
    tracer_provider, meter_provider, _ = providers
    clean_env.setenv("OTEL_BGTASKS_ALERT_SLACK_WEBHOOK_URL", "https://hooks.slack.com/s/t0k3n")
    clean_env.setenv("OTEL_BGTASKS_ALERT_QUEUE_SIZE", "7")
    processor = install_alerting(tracer_provider, meter_provider=meter_provider)
    assert [type(n) for n in processor.delivery.notifiers] == [SlackNotifier]
    assert processor.delivery.options.queue_size == 7


def test_install_alerting_with_explicit_config_and_notifiers(providers, clean_env):
    tracer_provider, meter_provider, _ = providers
    clean_env.setenv("OTEL_BGTASKS_ALERT_LOG", "not-a-bool")  # never read
    config = AlertingConfig(slack_webhook_url=Secret("https://hooks.slack.com/s/t0k3n"))
    processor = install_alerting(tracer_provider, meter_provider=meter_provider, config=config)
    assert [n.channel for n in processor.delivery.notifiers] == ["slack"]
    notifier = Recording()
    processor = install_alerting(
        tracer_provider,
        meter_provider=meter_provider,
        rules=[ConsecutiveFailures(1)],
        notifiers=[notifier],
    )
    end_task_span(tracer_provider)
    assert processor.force_flush(10_000)
    assert len(notifier.alerts) == 1


def test_install_alerting_needs_an_sdk_tracer_provider():
    with pytest.raises(TypeError, match="needs an SDK TracerProvider, got NoOpTracerProvider"):
        install_alerting(trace.NoOpTracerProvider(), notifiers=[])


# -- LogNotifier ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("severity", "status", "level"),
    [
        ("critical", AlertStatus.FIRING, "critical"),
        ("warning", AlertStatus.FIRING, "warning"),
        ("info", AlertStatus.FIRING, "info"),
        ("critical", AlertStatus.RESOLVED, "info"),
    ],
)
def test_log_notifier_logs_at_the_severity_and_resolved_at_info(severity, status, level):
    alert = Alert(
        rule="circuit_opened",
        severity=Severity(severity),
        status=status,
        key="circuit:smtp",
        summary="Circuit smtp opened (task send_mail)",
        at=1.0,
        labels={"circuit": "smtp"},
        details={"from": "closed", "to": "open"},
    )
    with capture_logs() as logs:
        LogNotifier().send(alert)
    assert logs == [
        {
            "event": f"bgtasks alert {status.value}",
            "log_level": level,
            "alert_rule": "circuit_opened",
            "alert_severity": severity,
            "alert_status": status.value,
            "alert_key": "circuit:smtp",
            "summary": "Circuit smtp opened (task send_mail)",
            "labels": {"circuit": "smtp"},
            "details": {"from": "closed", "to": "open"},
            "trace_id": None,
            "span_id": None,
        }
    ]
