"""Notifiers against real loopback servers: JSON webhook, Slack Block Kit, SMTP (plain, AUTH,
STARTTLS and implicit TLS with a self-signed certificate made by the openssl CLI)."""

from __future__ import annotations

import logging
import ssl
from email.utils import parsedate_to_datetime

import pytest
from tests.integration.test_alerting_servers import (
    LOOPBACK,
    Authenticator,
    HangingServer,
    RecordingHTTPServer,
    make_self_signed,
    refused_url,
    smtp_server,
)

from otel_bgtasks.alerting import (
    Alert,
    AlertingConfig,
    AlertStatus,
    DeliveryError,
    EmailNotifier,
    Secret,
    Severity,
    SlackNotifier,
    TaskSignal,
    WebhookNotifier,
)

TASK = "make_app.<locals>.send_invoice"  # a nested function's __qualname__
TOKEN = "T0001/B0002/sl4ck-t0k3n"
PASSWORD = "smtp-pa55word"

SIGNAL = TaskSignal(
    task_name=TASK,
    outcome="failure",
    duration=1.25,
    started_at=1_700_000_000.0,
    ended_at=1_700_000_001.25,
    error_type="ConnectionError",
    error_category="connection",
    attempts=3,
    task_id="c0ffee",
    trace_id="0af7651916cd43dd8448eb211c80319c",
    span_id="b7ad6b7169203331",
    service="billing-api",
)
FIRING = Alert(
    rule="consecutive_failures",
    severity=Severity.ERROR,
    status=AlertStatus.FIRING,
    key=f"task:{TASK}",
    summary=f"Task {TASK} failed 3 times in a row",
    at=1_700_000_002.0,
    labels={"task": TASK, "service": "billing-api"},
    details={"consecutive_failures": 3, "threshold": 3, "error_type": "ConnectionError"},
    signal=SIGNAL,
)
RESOLVED = Alert(
    rule="consecutive_failures",
    severity=Severity.ERROR,
    status=AlertStatus.RESOLVED,
    key=f"task:{TASK}",
    summary=f"Task {TASK} succeeded again after 3 failures",
    at=1_700_000_100.0,
    labels={"task": TASK},
    details={"consecutive_failures": 3},
)


@pytest.fixture
def http():
    server = RecordingHTTPServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_self_signed(tmp_path_factory.mktemp("tls"))


# -- webhook -------------------------------------------------------------------------------------


def test_webhook_posts_the_alert_as_json(http):
    notifier = WebhookNotifier(
        http.url(f"/hooks/{TOKEN}"), headers={"Authorization": "Bearer h3ad3r-t0k3n"}
    )
    try:
        notifier.send(FIRING)
        notifier.send(RESOLVED)
    finally:
        notifier.close()
    first, second = http.wait_for(2)
    assert first.path == f"/hooks/{TOKEN}"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["authorization"] == "Bearer h3ad3r-t0k3n"
    assert first.headers["user-agent"].startswith("otel-bgtasks/")
    assert first.json() == {
        "version": "1",
        "source": "otel-bgtasks",
        "status": "firing",
        "rule": "consecutive_failures",
        "severity": "error",
        "key": f"task:{TASK}",
        "title": f"[FIRING] consecutive_failures: Task {TASK} failed 3 times in a row",
        "summary": f"Task {TASK} failed 3 times in a row",
        "at": "2023-11-14T22:13:22+00:00",
        "labels": {"task": TASK, "service": "billing-api"},
        "details": {"consecutive_failures": 3, "threshold": 3, "error_type": "ConnectionError"},
        "run": {
            "task_name": TASK,
            "task_id": "c0ffee",
            "outcome": "failure",
            "duration_seconds": 1.25,
            "attempts": 3,
            "error_type": "ConnectionError",
            "error_category": "connection",
            "trace_id": "0af7651916cd43dd8448eb211c80319c",
            "span_id": "b7ad6b7169203331",
            "service": "billing-api",
        },
    }
    assert second.json()["status"] == "resolved"
    assert second.json()["run"] is None


@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (503, True), (429, True), (404, False), (400, False)]
)
def test_http_errors_are_delivery_errors_that_say_whether_to_retry(status, retryable):
    server = RecordingHTTPServer(statuses=[status])
    notifier = WebhookNotifier(server.url(f"/hooks/{TOKEN}"))
    try:
        with pytest.raises(DeliveryError) as info:
            notifier.send(FIRING)
    finally:
        notifier.close()
        server.close()
    assert info.value.retryable is retryable
    assert str(info.value) == f"HTTP {status}: invalid_payload"
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_a_hanging_server_times_out_and_a_refused_port_fails_fast():
    hanging = HangingServer()
    try:
        notifier = WebhookNotifier(hanging.url(f"/hooks/{TOKEN}"), timeout=0.2)
        with pytest.raises(DeliveryError, match="ReadTimeout") as info:
            notifier.send(FIRING)
        assert info.value.retryable
        notifier.close()
    finally:
        hanging.close()
    with refused_url(f"/hooks/{TOKEN}") as url:
        notifier = WebhookNotifier(url)
        with pytest.raises(DeliveryError, match="ConnectError") as info:
            notifier.send(FIRING)
        notifier.close()
    assert info.value.retryable
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__  # the httpx error, which holds the URL, is cut off
    assert TOKEN not in str(info.value)


def test_the_webhook_url_is_masked_in_httpx_request_log(http, caplog):
    caplog.set_level(logging.INFO, logger="httpx")
    notifier = WebhookNotifier(Secret(http.url(f"/hooks/{TOKEN}")))
    try:
        notifier.send(FIRING)
    finally:
        notifier.close()
    (record,) = [r for r in caplog.records if r.name == "httpx"]
    assert record.getMessage() == 'HTTP Request: POST ********** "HTTP/1.0 200 OK"'
    assert TOKEN not in caplog.text


# -- Slack ---------------------------------------------------------------------------------------


def test_slack_gets_a_block_kit_message(http):
    notifier = SlackNotifier(Secret(http.url(f"/services/{TOKEN}")))
    try:
        notifier.send(FIRING)
        notifier.send(RESOLVED)
    finally:
        notifier.close()
    firing, resolved = (r.json() for r in http.wait_for(2))
    escaped = "make_app.&lt;locals&gt;.send_invoice"
    assert firing == {
        "text": f"[FIRING] consecutive_failures: Task {TASK} failed 3 times in a row",
        "blocks": [
            {
                "type": "header",
                "text": {"type": "plain_text", "text": ":red_circle: FIRING: consecutive_failures"},
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"Task {escaped} failed 3 times in a row"},
                "fields": [
                    {"type": "mrkdwn", "text": "*Severity*\nerror"},
                    {"type": "mrkdwn", "text": f"*Task*\n{escaped}"},
                    {"type": "mrkdwn", "text": "*Service*\nbilling-api"},
                    {"type": "mrkdwn", "text": "*consecutive_failures*\n3"},
                    {"type": "mrkdwn", "text": "*threshold*\n3"},
                    {"type": "mrkdwn", "text": "*error_type*\nConnectionError"},
                ],
            },
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"otel-bgtasks · 2023-11-14T22:13:22+00:00 · key `task:{escaped}`"
                        " · trace `0af7651916cd43dd8448eb211c80319c`",
                    }
                ],
            },
        ],
    }
    assert resolved["blocks"][0]["text"]["text"] == (
        ":white_check_mark: RESOLVED: consecutive_failures"
    )
    assert [b["type"] for b in resolved["blocks"]] == ["header", "section", "context"]


def test_slack_payload_respects_block_kit_limits(http):
    many = Alert(
        rule="r" * 200,
        severity=Severity.CRITICAL,
        status=AlertStatus.FIRING,
        key="task:x",
        summary="s" * 5000,
        at=0.0,
        labels={"task": "x"},
        details={f"d{i}": "v" * 3000 for i in range(20)},
    )
    notifier = SlackNotifier(http.url("/services/x"))
    try:
        notifier.send(many)
    finally:
        notifier.close()
    (body,) = (r.json() for r in http.wait_for(1))
    header, section, _ = body["blocks"]
    assert len(header["text"]["text"]) == 150
    assert header["text"]["text"].startswith(":rotating_light: FIRING: rrr")
    assert len(section["text"]["text"]) == 3000
    assert len(section["fields"]) == 10
    assert max(len(f["text"]) for f in section["fields"]) == 2000


# -- e-mail --------------------------------------------------------------------------------------


def test_email_over_plain_smtp_has_the_headers_and_body():
    with smtp_server() as (handler, port):
        notifier = EmailNotifier(
            LOOPBACK,
            port,
            sender="bgtasks@example.com",
            recipients=["oncall@example.com", "lead@example.com"],
            tls="none",
        )
        notifier.send(FIRING)
        (envelope,) = handler.wait_for(1)
    assert envelope.mail_from == "bgtasks@example.com"
    assert envelope.rcpt_tos == ["oncall@example.com", "lead@example.com"]
    assert handler.sessions == [(False, False)]
    message = handler.parse(envelope)
    assert message["From"] == "bgtasks@example.com"
    assert message["To"] == "oncall@example.com, lead@example.com"
    assert message["Subject"] == (
        f"[FIRING][error] consecutive_failures: Task {TASK} failed 3 times in a row"
    )
    assert parsedate_to_datetime(message["Date"]).timestamp() == 1_700_000_002.0
    assert message["Message-ID"].endswith("@example.com>")
    assert message["X-Bgtasks-Alert-Key"] == f"task:{TASK}"
    assert message["X-Bgtasks-Alert-Status"] == "firing"
    assert message.get_content_type() == "text/plain"
    assert message.get_content().replace("\r\n", "\n") == (
        f"[FIRING] consecutive_failures: Task {TASK} failed 3 times in a row\n"
        "\n"
        "severity: error\n"
        f"key: task:{TASK}\n"
        "at: 2023-11-14T22:13:22+00:00\n"
        f"task: {TASK}\n"
        "service: billing-api\n"
        "consecutive_failures: 3\n"
        "threshold: 3\n"
        "error_type: ConnectionError\n"
        "task_id: c0ffee\n"
        "trace_id: 0af7651916cd43dd8448eb211c80319c\n"
        "span_id: b7ad6b7169203331\n"
    )


# AUTH over plain SMTP is deliberate here (STARTTLS + AUTH is tested below); aiosmtpd warns.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_email_logs_in_and_a_wrong_password_is_a_permanent_error():
    auth = Authenticator("bgtasks", PASSWORD)
    with smtp_server(authenticator=auth, auth_required=True, auth_require_tls=False) as (
        handler,
        port,
    ):
        good = EmailNotifier(
            LOOPBACK,
            port,
            sender="a@example.com",
            recipients=["b@example.com"],
            tls="none",
            username="bgtasks",
            password=Secret(PASSWORD),
        )
        good.send(RESOLVED)
        (envelope,) = handler.wait_for(1)
        bad = EmailNotifier(
            LOOPBACK,
            port,
            sender="a@example.com",
            recipients=["b@example.com"],
            tls="none",
            username="bgtasks",
            password="wrong-pa55word",
        )
        with pytest.raises(DeliveryError, match="SMTPAuthenticationError") as info:
            bad.send(RESOLVED)
    assert handler.sessions == [(False, True)]
    assert handler.parse(envelope)["Subject"] == (
        f"[RESOLVED][error] consecutive_failures: Task {TASK} succeeded again after 3 failures"
    )
    # smtplib tries each mechanism the server offers (PLAIN, then LOGIN) before giving up.
    assert auth.attempts == [("bgtasks", PASSWORD)] + [("bgtasks", "wrong-pa55word")] * 2
    assert info.value.retryable is False
    assert "pa55word" not in str(info.value)


def test_email_with_starttls_and_auth(cert):
    auth = Authenticator("bgtasks", PASSWORD)
    with smtp_server(
        tls_context=cert.server_context(),
        require_starttls=True,
        authenticator=auth,
        auth_required=True,
    ) as (handler, port):
        notifier = EmailNotifier(
            LOOPBACK,
            port,
            sender="a@example.com",
            recipients=["b@example.com"],
            tls="starttls",
            username="bgtasks",
            password=Secret(PASSWORD),
            ssl_context=cert.client_context(),
        )
        notifier.send(FIRING)
        (envelope,) = handler.wait_for(1)
    assert handler.sessions == [(True, True)]
    assert handler.parse(envelope)["To"] == "b@example.com"


def test_email_with_implicit_tls(cert):
    with smtp_server(ssl_context=cert.server_context()) as (handler, port):
        notifier = EmailNotifier(
            LOOPBACK,
            port,
            sender="a@example.com",
            recipients=["b@example.com"],
            tls="tls",
            ssl_context=cert.client_context(),
        )
        notifier.send(FIRING)
        (envelope,) = handler.wait_for(1)
    assert handler.sessions == [(True, False)]
    assert handler.parse(envelope)["X-Bgtasks-Alert-Status"] == "firing"


def test_an_untrusted_certificate_is_a_permanent_error(cert):
    with smtp_server(tls_context=cert.server_context(), require_starttls=True) as (_, port):
        notifier = EmailNotifier(
            LOOPBACK,
            port,
            sender="a@example.com",
            recipients=["b@example.com"],
            ssl_context=ssl.create_default_context(),  # the system CAs do not know our cert
        )
        with pytest.raises(DeliveryError, match="SSLCertVerificationError") as info:
            notifier.send(FIRING)
    assert info.value.retryable is False


def test_an_smtp_server_that_is_down_is_a_retryable_error():
    with smtp_server() as (_, port):
        pass  # stopped: nothing listens on the port now
    notifier = EmailNotifier(
        LOOPBACK, port, sender="a@example.com", recipients=["b@example.com"], tls="none"
    )
    with pytest.raises(DeliveryError, match="ConnectionRefusedError") as info:
        notifier.send(FIRING)
    assert info.value.retryable


# -- configured from the environment ---------------------------------------------------------


def test_channels_configured_from_the_environment_deliver(http):
    with smtp_server() as (handler, port):
        env = {
            "OTEL_BGTASKS_ALERT_WEBHOOK_URL": http.url("/generic"),
            "OTEL_BGTASKS_ALERT_SLACK_WEBHOOK_URL": http.url(f"/services/{TOKEN}"),
            "OTEL_BGTASKS_ALERT_SMTP_HOST": LOOPBACK,
            "OTEL_BGTASKS_ALERT_SMTP_PORT": str(port),
            "OTEL_BGTASKS_ALERT_SMTP_TLS": "none",
            "OTEL_BGTASKS_ALERT_SMTP_FROM": "bgtasks@example.com",
            "OTEL_BGTASKS_ALERT_SMTP_TO": "oncall@example.com",
        }
        notifiers = AlertingConfig.from_env(env).notifiers()
        try:
            for notifier in notifiers:
                notifier.send(FIRING)
        finally:
            for notifier in notifiers:
                notifier.close()
        (envelope,) = handler.wait_for(1)
    generic, slack = http.wait_for(2)
    assert (generic.path, generic.json()["rule"]) == ("/generic", "consecutive_failures")
    assert (slack.path, slack.json()["blocks"][0]["type"]) == (f"/services/{TOKEN}", "header")
    assert envelope.rcpt_tos == ["oncall@example.com"]
