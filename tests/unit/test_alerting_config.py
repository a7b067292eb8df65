"""Alerting configuration from code and environment; secrets never printed."""

from __future__ import annotations

import copy
import pickle

import pytest

from otel_bgtasks.alerting import (
    AlertingConfig,
    AlertingConfigError,
    DeliveryOptions,
    EmailNotifier,
    LogNotifier,
    Secret,
    SlackNotifier,
    SmtpConfig,
    WebhookNotifier,
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
