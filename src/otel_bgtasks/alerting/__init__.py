"""In-process alerting on background-task spans: rules, then Slack, webhook, e-mail or logs.

Usage::

    from opentelemetry.sdk.trace import TracerProvider
    from otel_bgtasks.alerting import (
        CircuitOpened, ConsecutiveFailures, DeadLetterMoves, FailureRatio, SlowTask,
        SlackNotifier, EmailNotifier, WebhookNotifier, LogNotifier, Secret, install_alerting,
    )

    alerting = install_alerting(
        tracer_provider,                          # the SDK TracerProvider tasks are traced with
        meter_provider=meter_provider,            # for the bgtasks.alerts.sent counter
        rules=[
            ConsecutiveFailures(3),               # 3 failed runs in a row, per task
            FailureRatio(0.1, window_seconds=300, min_runs=10),  # the defaults
            CircuitOpened(),                      # fires on to=open, resolves on to=closed
            DeadLetterMoves(),                    # each move; DeadLetterMoves(more_than=5)
            SlowTask(30.0, tasks={"build_report"}),
        ],
        notifiers=[
            SlackNotifier(Secret("https://hooks.slack.com/services/T000/B000/XXXX")),
            WebhookNotifier("https://ops.example.com/hooks/bgtasks"),
            EmailNotifier("smtp.example.com", sender="bgtasks@example.com",
                          recipients=["oncall@example.com"], username="bgtasks",
                          password=Secret("..."), tls="starttls"),
            LogNotifier(),
        ],
    )
    ...
    alerting.shutdown()        # or tracer_provider.shutdown(): drains queued alerts (5 s)

Without `notifiers=`, the channels come from the environment (`AlertingConfig.from_env()`):
`OTEL_BGTASKS_ALERT_WEBHOOK_URL`, `OTEL_BGTASKS_ALERT_SLACK_WEBHOOK_URL`,
`OTEL_BGTASKS_ALERT_SMTP_HOST` / `_PORT` / `_USER` / `_PASSWORD` / `_FROM` / `_TO` /
`_TLS` (`starttls` | `tls` | `none`), `OTEL_BGTASKS_ALERT_LOG`, `OTEL_BGTASKS_ALERT_TIMEOUT`,
`OTEL_BGTASKS_ALERT_QUEUE_SIZE`, `OTEL_BGTASKS_ALERT_MAX_CONCURRENCY`,
`OTEL_BGTASKS_ALERT_MAX_ATTEMPTS`; with none set, alerts are logged through structlog.

Without `rules=`, the rules come from `OTEL_BGTASKS_ALERT_RULES` (or `config.rules`), else
`default_rules()`. It is a comma-separated list of rule specs, each with an optional
`@info` / `@warning` / `@error` / `@critical` severity; omitted values take the defaults::

    consecutive_failures[:N]                      # ConsecutiveFailures(N), N default 3
    failure_ratio[:RATIO[/WINDOW_S[/MIN_RUNS]]]   # FailureRatio, default 0.1/300/10
    circuit_opened                                # CircuitOpened()
    dead_letter_moves[:MORE_THAN[/WINDOW_S]]      # each move; or more than N in WINDOW_S (300)
    slow_task:SECONDS                             # SlowTask(SECONDS)

    OTEL_BGTASKS_ALERT_RULES="consecutive_failures:3, failure_ratio:0.5/300/10@critical,
                              circuit_opened, dead_letter_moves:5, slow_task:30@warning"

A kind listed twice is named after each spec (`dead_letter_moves`, `dead_letter_moves:5`).
A bad spec raises `AlertingConfigError` naming it and listing the valid forms. Code wins:
`rules=` ignores the variable. `parse_rules("slow_task:30")` reads the same grammar in code.

How it works: `AlertingSpanProcessor.on_end` keeps only task spans (`bgtasks.task.name`) and
puts them on a bounded queue; nothing else happens on the task path. A daemon thread turns
each span into a `TaskSignal` (name, outcome, duration, error type and category, circuit
state changes, dead-letter moves) and feeds the rules. Each rule keeps a state per dedup key
(`task:{name}` or `circuit:{name}`): a condition that starts to hold fires once, at most once
per `cooldown`, and sends one `resolved` notice when it clears. Every outcome other than
`success` counts as a failure. Alerts go to every notifier through a bounded delivery queue,
`max_concurrency` threads, per-request timeouts and retries with backoff; a full queue drops
and counts. The counter `bgtasks.alerts.sent` ({notification}) has the attributes
`bgtasks.alert.rule`, `bgtasks.alert.channel` and `bgtasks.alert.outcome`
(`sent` | `failed` | `dropped`).

Secrets (webhook URLs, SMTP passwords) are held in `Secret`: no `repr`, log line or span of
this package shows them, and deliveries run with instrumentation suppressed so an
instrumented HTTP client does not record the URL.

Rules are plain objects: `rule.observe(signal, now)` and `rule.tick(now)` return the alerts,
so they are tested with built `TaskSignal`s and chosen times, no threads, no sleeps. A custom
rule subclasses `Rule` and yields `Condition`s from `_check`; a custom channel subclasses
`Notifier` and implements `send`.
"""

from __future__ import annotations

from otel_bgtasks.alerting.alerts import Alert, AlertStatus, DetailValue, Severity
from otel_bgtasks.alerting.config import (
    AlertingConfig,
    AlertingConfigError,
    DeliveryOptions,
    RuleSpec,
    SmtpConfig,
    parse_rules,
    rules_from_env,
)
from otel_bgtasks.alerting.notifiers import (
    DeliveryError,
    EmailNotifier,
    LogNotifier,
    Notifier,
    SlackNotifier,
    SmtpTls,
    WebhookNotifier,
    alert_text,
    slack_payload,
    webhook_payload,
)
from otel_bgtasks.alerting.processor import AlertingSpanProcessor, install_alerting
from otel_bgtasks.alerting.rules import (
    DEFAULT_FAILURE_RATIO,
    CircuitOpened,
    Clock,
    Condition,
    ConsecutiveFailures,
    DeadLetterMoves,
    FailureRatio,
    Rule,
    RuleEngine,
    SlowTask,
    default_rules,
)
from otel_bgtasks.alerting.secret import Secret
from otel_bgtasks.alerting.signals import CircuitChange, DeadLetterMove, TaskSignal

__all__ = [
    "DEFAULT_FAILURE_RATIO",
    "Alert",
    "AlertStatus",
    "AlertingConfig",
    "AlertingConfigError",
    "AlertingSpanProcessor",
    "CircuitChange",
    "CircuitOpened",
    "Clock",
    "Condition",
    "ConsecutiveFailures",
    "DeadLetterMove",
    "DeadLetterMoves",
    "DeliveryError",
    "DeliveryOptions",
    "DetailValue",
    "EmailNotifier",
    "FailureRatio",
    "LogNotifier",
    "Notifier",
    "Rule",
    "RuleEngine",
    "RuleSpec",
    "Secret",
    "Severity",
    "SlackNotifier",
    "SlowTask",
    "SmtpConfig",
    "SmtpTls",
    "TaskSignal",
    "WebhookNotifier",
    "alert_text",
    "default_rules",
    "install_alerting",
    "parse_rules",
    "rules_from_env",
    "slack_payload",
    "webhook_payload",
]
