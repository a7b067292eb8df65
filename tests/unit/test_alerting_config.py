"""Alerting configuration from code and environment; secrets never printed."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from otel_bgtasks.alerting import (
    AlertingConfig,
    AlertingConfigError,
    AlertingSpanProcessor,
    CircuitOpened,
    ConsecutiveFailures,
    DeadLetterMoves,
    DeliveryOptions,
    EmailNotifier,
    FailureRatio,
    LogNotifier,
    RuleEngine,
    RuleSpec,
    Secret,
    Severity,
    SlackNotifier,
    SlowTask,
    SmtpConfig,
    WebhookNotifier,
    default_rules,
    install_alerting,
    parse_rules,
    rules_from_env,
)

SLACK_URL = "https://hooks.slack.com/services/T0001/B0002/sl4ck-t0k3n"
HOOK_URL = "https://ops.example.com/hooks/bgtasks?token=w3bh00k-t0k3n"
PASSWORD = "smtp-pa55word"
SECRETS = ("sl4ck-t0k3n", "w3bh00k-t0k3n", PASSWORD)

FULL_ENV = {
    "OTEL_BGTASKS_ALERT_WEBHOOK_URL": HOOK_URL,
    "OTEL_BGTASKS_ALERT_SLACK_WEBHOOK_URL": SLACK_URL,
    "OTEL_BGTASKS_ALERT_SMTP_HOST": "smtp.example.com",
    "OTEL_BGTASKS_ALERT_SMTP_PORT": "2525",
    "OTEL_BGTASKS_ALERT_SMTP_USER": "bgtasks",
    "OTEL_BGTASKS_ALERT_SMTP_PASSWORD": PASSWORD,
    "OTEL_BGTASKS_ALERT_SMTP_FROM": "bgtasks@example.com",
    "OTEL_BGTASKS_ALERT_SMTP_TO": "oncall@example.com, lead@example.com",
    "OTEL_BGTASKS_ALERT_SMTP_TLS": "TLS",
    "OTEL_BGTASKS_ALERT_LOG": "true",
    "OTEL_BGTASKS_ALERT_TIMEOUT": "2.5",
    "OTEL_BGTASKS_ALERT_QUEUE_SIZE": "32",
    "OTEL_BGTASKS_ALERT_MAX_CONCURRENCY": "2",
    "OTEL_BGTASKS_ALERT_MAX_ATTEMPTS": "5",
    "OTEL_BGTASKS_ALERT_RULES": "consecutive_failures:2, slow_task:60@critical",
    "UNRELATED": "x",
}


def assert_hidden(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def test_secret_hides_its_value_everywhere_but_get_secret_value():
    secret = Secret(PASSWORD)
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{secret:>30}"):
        assert_hidden(shown)
        assert "**********" in shown
    assert secret.get_secret_value() == PASSWORD
    assert secret == Secret(PASSWORD)
    assert secret != Secret("other")
    assert secret != PASSWORD
    assert hash(secret) == hash(Secret(PASSWORD))
    assert copy.deepcopy(secret).get_secret_value() == PASSWORD
    assert pickle.loads(pickle.dumps(secret)).get_secret_value() == PASSWORD
    assert not Secret("")
    with pytest.raises(TypeError, match="takes a str"):
        Secret(123)  # type: ignore[arg-type]


def test_from_env_reads_every_variable():
    config = AlertingConfig.from_env(FULL_ENV)
    assert config == AlertingConfig(
        webhook_url=Secret(HOOK_URL),
        slack_webhook_url=Secret(SLACK_URL),
        smtp=SmtpConfig(
            host="smtp.example.com",
            port=2525,
            sender="bgtasks@example.com",
            recipients=("oncall@example.com", "lead@example.com"),
            tls="tls",
            username="bgtasks",
            password=Secret(PASSWORD),
        ),
        log=True,
        timeout=2.5,
        delivery=DeliveryOptions(queue_size=32, max_concurrency=2, max_attempts=5),
        rules=(
            RuleSpec("consecutive_failures", (2,)),
            RuleSpec("slow_task", (60.0,), Severity.CRITICAL),
        ),
    )
    assert_hidden(repr(config))
    assert_hidden(str(config))


def test_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("OTEL_BGTASKS_ALERT_SLACK_WEBHOOK_URL", SLACK_URL)
    assert AlertingConfig.from_env().slack_webhook_url == Secret(SLACK_URL)


def test_empty_environment_means_no_channel_and_defaults():
    config = AlertingConfig.from_env({"OTEL_BGTASKS_ALERT_WEBHOOK_URL": "  "})
    assert config == AlertingConfig()
    assert config.notifiers() == []


def test_notifiers_from_config_are_built_per_channel_and_hide_secrets():
    notifiers = AlertingConfig.from_env(FULL_ENV).notifiers()
    try:
        assert [type(n) for n in notifiers] == [
            WebhookNotifier,
            SlackNotifier,
            EmailNotifier,
            LogNotifier,
        ]
        assert [n.channel for n in notifiers] == ["webhook", "slack", "email", "log"]
        webhook, slack, email, _ = notifiers
        assert isinstance(webhook, WebhookNotifier)
        assert isinstance(email, EmailNotifier)
        assert webhook.timeout == 2.5
        assert (email.host, email.port, email.tls, email.timeout) == (
            "smtp.example.com",
            2525,
            "tls",
            2.5,
        )
        assert email.recipients == ("oncall@example.com", "lead@example.com")
        for notifier in notifiers:
            assert_hidden(repr(notifier))
        assert repr(email) == (
            "EmailNotifier(host='smtp.example.com', port=2525, tls='tls', "
            "sender='bgtasks@example.com', recipients=['oncall@example.com', "
            "'lead@example.com'], username='bgtasks', password=Secret('**********'))"
        )
        assert repr(slack) == "SlackNotifier(url=Secret('**********'), timeout=2.5)"
    finally:
        for notifier in notifiers:
            notifier.close()


@pytest.mark.parametrize(("tls", "port"), [("starttls", 587), ("tls", 465), ("none", 25)])
def test_smtp_port_defaults_by_tls_mode(tls, port):
    env = {
        "OTEL_BGTASKS_ALERT_SMTP_HOST": "mx",
        "OTEL_BGTASKS_ALERT_SMTP_FROM": "a@example.com",
        "OTEL_BGTASKS_ALERT_SMTP_TO": "b@example.com",
        "OTEL_BGTASKS_ALERT_SMTP_TLS": tls,
    }
    (email,) = AlertingConfig.from_env(env).notifiers()
    assert isinstance(email, EmailNotifier)
    assert (email.port, email.tls) == (port, tls)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_BGTASKS_ALERT_SMTP_HOST": "mx"},
            "OTEL_BGTASKS_ALERT_SMTP_FROM and OTEL_BGTASKS_ALERT_SMTP_TO",
        ),
        (
            {
                "OTEL_BGTASKS_ALERT_SMTP_HOST": "mx",
                "OTEL_BGTASKS_ALERT_SMTP_FROM": "a@x",
                "OTEL_BGTASKS_ALERT_SMTP_TO": "b@x",
                "OTEL_BGTASKS_ALERT_SMTP_TLS": "ssl",
            },
            "SMTP_TLS='ssl' is not valid: use starttls, tls or none",
        ),
        (
            {
                "OTEL_BGTASKS_ALERT_SMTP_HOST": "mx",
                "OTEL_BGTASKS_ALERT_SMTP_FROM": "a@x",
                "OTEL_BGTASKS_ALERT_SMTP_TO": "b@x",
                "OTEL_BGTASKS_ALERT_SMTP_PORT": "smtp",
            },
            "OTEL_BGTASKS_ALERT_SMTP_PORT='smtp' is not a valid int",
        ),
        (
            {
                "OTEL_BGTASKS_ALERT_SMTP_HOST": "mx",
                "OTEL_BGTASKS_ALERT_SMTP_FROM": "a@x",
                "OTEL_BGTASKS_ALERT_SMTP_TO": "b@x",
                "OTEL_BGTASKS_ALERT_SMTP_PASSWORD": PASSWORD,
            },
            "no user: set OTEL_BGTASKS_ALERT_SMTP_USER",
        ),
        (
            {"OTEL_BGTASKS_ALERT_SMTP_TO": "b@x", "OTEL_BGTASKS_ALERT_SMTP_PASSWORD": PASSWORD},
            "OTEL_BGTASKS_ALERT_SMTP_PASSWORD, OTEL_BGTASKS_ALERT_SMTP_TO set without "
            "OTEL_BGTASKS_ALERT_SMTP_HOST",
        ),
        (
            {"OTEL_BGTASKS_ALERT_SLACK_WEBHOOK_URL": "hooks.slack.com/sl4ck-t0k3n"},
            "SLACK_WEBHOOK_URL must be an http",
        ),
        ({"OTEL_BGTASKS_ALERT_TIMEOUT": "soon"}, "TIMEOUT='soon' is not a valid float"),
        ({"OTEL_BGTASKS_ALERT_TIMEOUT": "0"}, "timeout must be > 0"),
        ({"OTEL_BGTASKS_ALERT_QUEUE_SIZE": "0"}, r"queue_size=\.\.\.\) must be >= 1"),
        ({"OTEL_BGTASKS_ALERT_LOG": "maybe"}, "LOG='maybe': use true or false"),
    ],
)
def test_bad_environment_raises_a_message_naming_the_variable(env, message):
    with pytest.raises(AlertingConfigError, match=message) as info:
        AlertingConfig.from_env(env)
    assert_hidden(str(info.value))
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("raw", "log"), [("", False), ("  ", False), ("TRUE", True), (" on ", True), ("0", False)]
)
def test_boolean_variables_read_empty_as_unset_like_the_instrument_variables(raw, log):
    # empty or blank is unset (the default applies), as for the OTEL_BGTASKS_* variables
    assert AlertingConfig.from_env({"OTEL_BGTASKS_ALERT_LOG": raw}).log is log


def test_bad_delivery_options():
    with pytest.raises(AlertingConfigError, match="backoff_initial <= backoff_max"):
        DeliveryOptions(backoff_initial=5, backoff_max=1)


@pytest.mark.parametrize("make", [WebhookNotifier, SlackNotifier])
def test_http_notifiers_refuse_a_non_http_url_without_echoing_it(make):
    with pytest.raises(ValueError, match="must start with http") as info:
        make("ftp://sl4ck-t0k3n")
    assert_hidden(str(info.value))
    with pytest.raises(ValueError, match="timeout=0"):
        make(SLACK_URL, timeout=0)


def test_email_notifier_validation():
    with pytest.raises(ValueError, match="use one of starttls, tls, none"):
        EmailNotifier("mx", sender="a@x", recipients=["b@x"], tls="ssl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one recipient"):
        EmailNotifier("mx", sender="a@x", recipients=[])
    email = EmailNotifier("mx", sender="a@x", recipients="b@x, c@x", password=PASSWORD)
    assert email.recipients == ("b@x", "c@x")
    assert email.secret_values() == (PASSWORD,)
    assert_hidden(repr(email))


# -- rules from OTEL_BGTASKS_ALERT_RULES ---------------------------------------------------------

RULES = "OTEL_BGTASKS_ALERT_RULES"
EXAMPLE_RULES = (
    "consecutive_failures:3, failure_ratio:0.5/300/10, circuit_opened, dead_letter_moves, "
    "dead_letter_moves:5, slow_task:30@warning"
)


def rules_of(value: str) -> tuple[RuleSpec, ...] | None:
    return AlertingConfig.from_env({RULES: value}).rules


def test_from_env_reads_each_rule_kind_with_its_values():
    specs = rules_of(EXAMPLE_RULES)
    assert specs == (
        RuleSpec("consecutive_failures", (3,)),
        RuleSpec("failure_ratio", (0.5, 300.0, 10)),
        RuleSpec("circuit_opened"),
        RuleSpec("dead_letter_moves", name="dead_letter_moves"),
        RuleSpec("dead_letter_moves", (5,), name="dead_letter_moves:5"),
        RuleSpec("slow_task", (30.0,), Severity.WARNING),
    )
    consecutive, ratio, circuit, each_move, more_than, slow = AlertingConfig(
        rules=specs
    ).build_rules()
    assert isinstance(consecutive, ConsecutiveFailures)
    assert consecutive.n == 3
    assert isinstance(ratio, FailureRatio)
    assert (ratio.threshold, ratio.window_seconds, ratio.min_runs) == (0.5, 300.0, 10)
    assert isinstance(circuit, CircuitOpened)
    assert isinstance(each_move, DeadLetterMoves)
    assert each_move.more_than is None
    assert isinstance(more_than, DeadLetterMoves)
    assert (more_than.more_than, more_than.window_seconds) == (5, 300.0)
    assert isinstance(slow, SlowTask)
    assert slow.threshold_seconds == 30.0
    assert [
        (r.name, r.severity) for r in (consecutive, ratio, circuit, each_move, more_than, slow)
    ] == [
        ("consecutive_failures", Severity.ERROR),
        ("failure_ratio", Severity.WARNING),
        ("circuit_opened", Severity.CRITICAL),
        ("dead_letter_moves", Severity.ERROR),  # a kind listed twice: named after each spec
        ("dead_letter_moves:5", Severity.ERROR),
        ("slow_task", Severity.WARNING),
    ]
    RuleEngine(AlertingConfig(rules=specs).build_rules())  # the names are unique


def test_omitted_rule_values_take_the_constructor_defaults():
    ratio, moves, consecutive = AlertingConfig(
        rules=rules_of("failure_ratio:0.2, dead_letter_moves:0, consecutive_failures")
    ).build_rules()
    assert isinstance(ratio, FailureRatio)
    assert (ratio.threshold, ratio.window_seconds, ratio.min_runs) == (0.2, 300.0, 10)
    assert isinstance(moves, DeadLetterMoves)
    assert (moves.more_than, moves.window_seconds) == (0, 300.0)
    assert isinstance(consecutive, ConsecutiveFailures)
    assert consecutive.n == 3
    (ratio,) = AlertingConfig(rules=rules_of("failure_ratio:1/60")).build_rules()
    assert isinstance(ratio, FailureRatio)
    assert (ratio.threshold, ratio.window_seconds, ratio.min_runs) == (1.0, 60.0, 10)


@pytest.mark.parametrize(
    ("value", "severity"),
    [
        ("slow_task:30@info", Severity.INFO),
        ("slow_task:30@warning", Severity.WARNING),
        ("slow_task:30@error", Severity.ERROR),
        ("slow_task:30@critical", Severity.CRITICAL),
        ("  Slow_Task : 30 @ WARNING  ", Severity.WARNING),
        ("slow_task:30", None),
    ],
)
def test_rule_severity_suffix(value, severity):
    (spec,) = rules_of(value) or ()
    assert spec == RuleSpec("slow_task", (30.0,), severity)
    (rule,) = AlertingConfig(rules=(spec,)).build_rules()
    assert rule.severity == (severity or SlowTask.default_severity)


def test_rule_list_ignores_whitespace_newlines_and_empty_items():
    specs = rules_of("\n  circuit_opened ,, failure_ratio : 0.25 / 120 / 4 ,\n\tslow_task:1.5e1, ")
    assert specs == (
        RuleSpec("circuit_opened"),
        RuleSpec("failure_ratio", (0.25, 120.0, 4)),
        RuleSpec("slow_task", (15.0,)),
    )


@pytest.mark.parametrize("env", [{}, {RULES: ""}, {RULES: "   "}, {RULES: "\n\t"}])
def test_unset_or_empty_rules_variable_means_the_default_rules(env):
    config = AlertingConfig.from_env(env)
    assert config.rules is None
    assert config == AlertingConfig()
    assert rules_from_env(env) is None
    assert [r.name for r in config.build_rules()] == [r.name for r in default_rules()]


VALID_FORMS = (
    "Valid forms: consecutive_failures[:N], failure_ratio[:RATIO[/WINDOW_S[/MIN_RUNS]]], "
    "circuit_opened, dead_letter_moves[:MORE_THAN[/WINDOW_S]], slow_task:SECONDS; each "
    "optionally followed by @info, @warning, @error or @critical"
)


@pytest.mark.parametrize(
    ("value", "spec", "reason"),
    [
        # unknown or missing rule name
        ("bogus", "bogus", "unknown rule 'bogus'"),
        ("circuit_opened, slow_tasks:30", "slow_tasks:30", "unknown rule 'slow_tasks'"),
        ("consecutive-failures:3", "consecutive-failures:3", "unknown rule"),
        (":3", ":3", "no rule name"),
        ("@warning", "@warning", "no rule name"),
        # wrong arity
        ("slow_task", "slow_task", "slow_task takes 1 value(s) (threshold_seconds), got 0"),
        ("slow_task:1/2", "slow_task:1/2", "slow_task takes 1 value(s)"),
        ("circuit_opened:1", "circuit_opened:1", "circuit_opened takes no value, got 1"),
        ("consecutive_failures:1/2", "consecutive_failures:1/2", "takes 0 to 1 value(s) (n)"),
        (
            "failure_ratio:0.5/300/10/1",
            "failure_ratio:0.5/300/10/1",
            "failure_ratio takes 0 to 3 value(s) (threshold/window_seconds/min_runs), got 4",
        ),
        ("dead_letter_moves:1/60/2", "dead_letter_moves:1/60/2", "takes 0 to 2 value(s)"),
        ("consecutive_failures:", "consecutive_failures:", "a value is empty"),
        ("failure_ratio:0.5//10", "failure_ratio:0.5//10", "a value is empty"),
        # not a number, or not an integer where one is needed
        ("consecutive_failures:three", "consecutive_failures:three", "n must be an integer"),
        ("consecutive_failures:3.0", "consecutive_failures:3.0", "n must be an integer, got '3.0'"),
        ("slow_task:30s", "slow_task:30s", "threshold_seconds must be a number, got '30s'"),
        ("failure_ratio:half", "failure_ratio:half", "threshold must be a number"),
        ("failure_ratio:0.5/300/ten", "failure_ratio:0.5/300/ten", "min_runs must be an integer"),
        ("dead_letter_moves:5/5m", "dead_letter_moves:5/5m", "window_seconds must be a number"),
        ("slow_task:inf", "slow_task:inf", "threshold_seconds must be a finite number"),
        ("slow_task:nan", "slow_task:nan", "threshold_seconds must be a finite number"),
        ("slow_task:30 warning", "slow_task:30 warning", "must be a number"),
        # negative, zero or out of range: the rule's own check
        (
            "consecutive_failures:-1",
            "consecutive_failures:-1",
            r"ConsecutiveFailures(n=-1): must be >= 1",
        ),
        ("consecutive_failures:0", "consecutive_failures:0", "must be >= 1"),
        ("slow_task:-5", "slow_task:-5", "SlowTask(threshold_seconds=-5.0): must be > 0"),
        ("slow_task:0", "slow_task:0", "must be > 0"),
        ("dead_letter_moves:-1", "dead_letter_moves:-1", "DeadLetterMoves(more_than=-1)"),
        ("dead_letter_moves:1/-60", "dead_letter_moves:1/-60", "window_seconds=-60.0"),
        ("failure_ratio:-0.5", "failure_ratio:-0.5", "threshold=-0.5): must be in (0, 1]"),
        ("failure_ratio:1.5", "failure_ratio:1.5", "must be in (0, 1]"),
        ("failure_ratio:0.5/-300", "failure_ratio:0.5/-300", "window_seconds=-300.0"),
        ("failure_ratio:0.5/300/-1", "failure_ratio:0.5/300/-1", "min_runs=-1): must be >= 1"),
        # severity
        ("slow_task:30@urgent", "slow_task:30@urgent", "unknown severity 'urgent'"),
        ("slow_task:30@", "slow_task:30@", "unknown severity ''"),
        ("slow_task:30@warning@error", "slow_task:30@warning@error", "unknown severity"),
    ],
)
def test_bad_rule_spec_names_the_spec_and_lists_the_valid_forms(value, spec, reason):
    env = {RULES: f"circuit_opened, {value}", "OTEL_BGTASKS_ALERT_LOG": "true"}
    with pytest.raises(AlertingConfigError) as info:
        AlertingConfig.from_env(env)  # raises: no config with the valid rules only
    message = str(info.value)
    assert message.startswith(f"OTEL_BGTASKS_ALERT_RULES: alert rule {spec!r} is not valid: ")
    assert reason in message
    assert message.endswith(VALID_FORMS)
    with pytest.raises(AlertingConfigError, match=re.escape(reason)):
        parse_rules(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "slow_task:30, circuit_opened, slow_task:30@critical",
            "alert rules 'slow_task:30' and 'slow_task:30@critical' are the same rule "
            "(both named 'slow_task:30'): list each rule once",
        ),
        ("circuit_opened,circuit_opened", "(both named 'circuit_opened')"),
        ("failure_ratio:0.5, failure_ratio:0.50", "(both named 'failure_ratio:0.5')"),
        (" , ,", "lists no alert rule. Valid forms: consecutive_failures[:N]"),
    ],
)
def test_the_same_rule_twice_or_no_rule_at_all_is_refused(value, message):
    with pytest.raises(AlertingConfigError, match=re.escape(message)) as info:
        rules_from_env({RULES: value})
    assert str(info.value).startswith("OTEL_BGTASKS_ALERT_RULES: ")


def test_rule_specs_in_code():
    spec = RuleSpec("failure_ratio", [0.25, 60, 5], "CRITICAL")  # type: ignore[arg-type]
    assert spec == RuleSpec("failure_ratio", (0.25, 60, 5), Severity.CRITICAL)
    assert str(spec) == "failure_ratio:0.25/60/5@critical"
    assert RuleSpec.parse(str(spec)) == RuleSpec("failure_ratio", (0.25, 60.0, 5), "critical")
    assert str(RuleSpec("slow_task", (2.5,), name="slow")) == "slow_task:2.5"
    assert RuleSpec("slow_task", (2.5,), name="slow").build().name == "slow"
    first, second = spec.build(), spec.build()
    assert first is not second  # rules keep state: a new one each time
    config = AlertingConfig(rules=[spec])  # type: ignore[arg-type]
    assert config.rules == (spec,)
    assert hash(config) == hash(AlertingConfig(rules=(spec,)))
    assert parse_rules("") is None
    with pytest.raises(AlertingConfigError, match="unknown severity 'loud'"):
        RuleSpec("slow_task", (1,), "loud")  # type: ignore[arg-type]
    with pytest.raises(AlertingConfigError, match=r"n must be an integer, got 2\.5"):
        RuleSpec("consecutive_failures", (2.5,))
    with pytest.raises(AlertingConfigError, match="n must be an integer, got True"):
        RuleSpec("consecutive_failures", (True,))
    with pytest.raises(AlertingConfigError, match="alert rule 'slow_task:-1' is not valid"):
        RuleSpec("slow_task", (-1,))
    with pytest.raises(AlertingConfigError, match="unknown rule 'nope'"):
        RuleSpec("nope")
    with pytest.raises(AlertingConfigError, match="both named 'slow_task'"):
        AlertingConfig(rules=(RuleSpec("slow_task", (1,)), RuleSpec("slow_task", (2,))))
    with pytest.raises(AlertingConfigError, match="takes RuleSpecs"):
        AlertingConfig(rules=(ConsecutiveFailures(),))  # type: ignore[arg-type]


# -- install_alerting picks the rules: code, then config / environment, then defaults -----------


@pytest.fixture
def tracer_provider():
    provider = TracerProvider(shutdown_on_exit=False)
    yield provider
    provider.shutdown()  # stops the alerting processors


@pytest.fixture
def meter_provider():
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    yield provider
    provider.shutdown()


def rule_names(processor: AlertingSpanProcessor) -> list[str]:
    return [rule.name for rule in processor.engine.rules]


def test_install_alerting_uses_the_environment_rules_when_rules_are_omitted(
    tracer_provider, meter_provider
):
    config = AlertingConfig.from_env({RULES: "consecutive_failures:1@critical, slow_task:30"})
    processor = install_alerting(
        tracer_provider, meter_provider=meter_provider, config=config, notifiers=[LogNotifier()]
    )
    assert rule_names(processor) == ["consecutive_failures", "slow_task"]
    consecutive, _ = processor.engine.rules
    assert isinstance(consecutive, ConsecutiveFailures)
    assert (consecutive.n, consecutive.severity) == (1, Severity.CRITICAL)
    again = install_alerting(tracer_provider, meter_provider=meter_provider, config=config)
    assert all(a is not b for a, b in zip(processor.engine.rules, again.engine.rules, strict=True))


def test_install_alerting_rules_in_code_win_over_the_environment(tracer_provider, meter_provider):
    config = AlertingConfig.from_env({RULES: "slow_task:30"})
    processor = install_alerting(
        tracer_provider,
        meter_provider=meter_provider,
        config=config,
        notifiers=[LogNotifier()],
        rules=[ConsecutiveFailures(5)],
    )
    assert rule_names(processor) == ["consecutive_failures"]


def test_install_alerting_without_configured_rules_keeps_the_defaults(
    tracer_provider, meter_provider
):
    processor = install_alerting(
        tracer_provider,
        meter_provider=meter_provider,
        config=AlertingConfig.from_env({RULES: " "}),
        notifiers=[LogNotifier()],
    )
    assert rule_names(processor) == ["consecutive_failures", "circuit_opened", "dead_letter_moves"]


# install_alerting takes no environ: these two read os.environ, so they set it.


def test_install_alerting_with_notifiers_in_code_still_reads_the_rules_variable(
    tracer_provider, meter_provider, monkeypatch
):
    monkeypatch.setenv(RULES, "circuit_opened, dead_letter_moves:2@warning")
    monkeypatch.setenv("OTEL_BGTASKS_ALERT_LOG", "not-a-bool")  # channels: not read
    processor = install_alerting(
        tracer_provider, meter_provider=meter_provider, notifiers=[LogNotifier()]
    )
    assert rule_names(processor) == ["circuit_opened", "dead_letter_moves"]
    monkeypatch.setenv(RULES, "bogus")
    with pytest.raises(AlertingConfigError, match="OTEL_BGTASKS_ALERT_RULES: alert rule 'bogus'"):
        install_alerting(tracer_provider, meter_provider=meter_provider, notifiers=[LogNotifier()])


def test_install_alerting_with_rules_in_code_never_reads_the_rules_variable(
    tracer_provider, meter_provider, monkeypatch
):
    monkeypatch.setenv(RULES, "bogus")
    processor = install_alerting(
        tracer_provider,
        meter_provider=meter_provider,
        notifiers=[LogNotifier()],
        rules=[SlowTask(1.0)],
    )
    assert rule_names(processor) == ["slow_task"]
