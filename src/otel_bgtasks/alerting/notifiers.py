"""Notifiers: deliver one `Alert` to one channel (JSON webhook, Slack, e-mail, structlog).

A notifier's `send()` blocks and raises `DeliveryError`; it is only ever called from the
delivery threads (`_delivery.NotificationDelivery`), which add the queue, the retries with
backoff and the concurrency limit. Secrets (webhook URLs, SMTP passwords) stay in `Secret`
objects: they are not in any `repr`, error message or log line of this package, and the
`httpx` request log line has them masked.
"""

from __future__ import annotations

import logging
import ssl
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any, Literal

import structlog

from otel_bgtasks._version import __version__
from otel_bgtasks.alerting.alerts import Alert, AlertStatus, Severity
from otel_bgtasks.alerting.secret import MASK, Secret, reveal
from otel_bgtasks.errors import ConfigurationError

if TYPE_CHECKING:
    import httpx


def _httpx() -> Any:
    """httpx, imported with the webhook feature (the ``webhooks`` extra), not the package."""
    try:
        import httpx
    except ImportError as exc:  # pragma: no cover - installed with the dev extra
        raise ImportError(
            "Slack and webhook alerts need httpx: pip install 'otel-bgtasks[webhooks]'"
        ) from exc
    return httpx


__all__ = [
    "DeliveryError",
    "EmailNotifier",
    "LogNotifier",
    "Notifier",
    "SlackNotifier",
    "SmtpTls",
    "WebhookNotifier",
    "alert_text",
    "redact",
    "slack_payload",
    "webhook_payload",
]

SmtpTls = Literal["starttls", "tls", "none"]
"""How the SMTP connection is secured: STARTTLS upgrade, implicit TLS (SMTPS), or none."""

_USER_AGENT = f"otel-bgtasks/{__version__}"
_RETRYABLE_STATUS = frozenset({408, 425, 429})


class DeliveryError(Exception):
    """A notification could not be delivered.

    Attributes:
        retryable: whether trying again may help (timeouts, 5xx, 429) or not (a 4xx, a
            refused login or recipient, a certificate the client does not trust).
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Notifier(ABC):
    """Delivers alerts to one channel; subclasses implement `send`.

    Attributes:
        channel: the `bgtasks.alert.channel` metric attribute (`webhook`, `slack`, `email`,
            `log`, or a custom notifier's own).
    """

    channel: str = "custom"

    @abstractmethod
    def send(self, alert: Alert) -> None:
        """Deliver one alert, blocking up to the notifier's timeout.

        Raises:
            DeliveryError: the alert was not delivered.
        """

    def close(self) -> None:  # noqa: B027 - optional: most notifiers hold no connection
        """Release connections; called once when the alerting pipeline shuts down."""

    def secret_values(self) -> tuple[str, ...]:
        """Strings that must never appear in a log line (masked by the delivery log)."""
        return ()


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by `**********`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


class _RedactingFilter(logging.Filter):
    """Masks registered secrets in `httpx`'s own request log line (`HTTP Request: POST <url>`)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()

    def register(self, secrets: Iterable[str]) -> None:
        with self._lock:
            self._secrets = tuple(sorted({*self._secrets, *(s for s in secrets if s)}))

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self._secrets
        if secrets:
            message = record.getMessage()
            masked = redact(message, secrets)
            if masked != message:
                record.msg, record.args = masked, None
        return True


_httpx_filter = _RedactingFilter()
logging.getLogger("httpx").addFilter(_httpx_filter)


# -- rendering -------------------------------------------------------------------------------


def _run_info(alert: Alert) -> dict[str, Any] | None:
    signal = alert.signal
    if signal is None:
        return None
    return {
        "task_name": signal.task_name,
        "task_id": signal.task_id,
        "outcome": signal.outcome,
        "duration_seconds": round(signal.duration, 6),
        "attempts": signal.attempts,
        "error_type": signal.error_type,
        "error_category": signal.error_category,
        "trace_id": signal.trace_id,
        "span_id": signal.span_id,
        "service": signal.service,
    }


def webhook_payload(alert: Alert) -> dict[str, Any]:
    """The JSON body `WebhookNotifier` posts (schema version `1`)."""
    return {
        "version": "1",
        "source": "otel-bgtasks",
        "status": alert.status.value,
        "rule": alert.rule,
        "severity": alert.severity.value,
        "key": alert.key,
        "title": alert.title,
        "summary": alert.summary,
        "at": alert.timestamp,
        "labels": dict(alert.labels),
        "details": dict(alert.details),
        "run": _run_info(alert),
    }


def alert_text(alert: Alert) -> str:
    """A plain-text rendering: the title, then one `name: value` line per fact."""
    lines = [alert.title, "", f"severity: {alert.severity.value}", f"key: {alert.key}"]
    lines.append(f"at: {alert.timestamp}")
    lines.extend(f"{name}: {value}" for name, value in alert.labels.items())
    lines.extend(f"{name}: {value}" for name, value in alert.details.items())
    signal = alert.signal
    if signal is not None:
        if signal.task_id:
            lines.append(f"task_id: {signal.task_id}")
        if signal.trace_id:
            lines.append(f"trace_id: {signal.trace_id}")
            lines.append(f"span_id: {signal.span_id}")
    return "\n".join(lines) + "\n"


_SLACK_EMOJI = {
    Severity.CRITICAL: ":rotating_light:",
    Severity.ERROR: ":red_circle:",
    Severity.WARNING: ":warning:",
    Severity.INFO: ":information_source:",
}
_SLACK_MAX_FIELDS = 10  # Block Kit limits
_SLACK_HEADER_MAX = 150
_SLACK_FIELD_MAX = 2000
_SLACK_TEXT_MAX = 3000


def _slack_escape(text: str) -> str:
    # mrkdwn treats &, < and > as control characters (task names like `f.<locals>.g`).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slack_payload(alert: Alert) -> dict[str, Any]:
    """The Block Kit message `SlackNotifier` posts: header, section with fields, context."""
    if alert.status is AlertStatus.RESOLVED:
        emoji = ":white_check_mark:"
    else:
        emoji = _SLACK_EMOJI[alert.severity]
    header = f"{emoji} {alert.status.value.upper()}: {alert.rule}"
    facts: list[tuple[str, str]] = [("Severity", alert.severity.value)]
    facts.extend((name.capitalize(), value) for name, value in alert.labels.items())
    facts.extend((name, str(value)) for name, value in alert.details.items())
    fields = [
        {
            "type": "mrkdwn",
            "text": _truncate(f"*{_slack_escape(name)}*\n{_slack_escape(value)}", _SLACK_FIELD_MAX),
        }
        for name, value in facts[:_SLACK_MAX_FIELDS]
    ]
    context = [f"otel-bgtasks · {alert.timestamp}", f"key `{_slack_escape(alert.key)}`"]
    signal = alert.signal
    if signal is not None and signal.trace_id:
        context.append(f"trace `{signal.trace_id}`")
    return {
        "text": _truncate(alert.title, _SLACK_TEXT_MAX),  # notification fallback
        "blocks": [
            {
                "type": "header",
                "text": {"type": "plain_text", "text": _truncate(header, _SLACK_HEADER_MAX)},
            },
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": _truncate(_slack_escape(alert.summary), _SLACK_TEXT_MAX),
                },
                "fields": fields,
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]},
        ],
    }


# -- HTTP ------------------------------------------------------------------------------------


class _HttpNotifier(Notifier):
    def __init__(
        self,
        url: str | Secret,
        *,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        self._url = url if isinstance(url, Secret) else Secret(url)
        plain = self._url.get_secret_value()
        if not plain.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"{type(self).__name__}: the URL must start with http:// or https:// "
                "(the value is not shown because webhook URLs carry credentials)"
            )
        if not timeout > 0:
            raise ConfigurationError(
                f"{type(self).__name__}(timeout={timeout!r}): must be > 0 seconds"
            )
        self.timeout = float(timeout)
        self._headers = {"User-Agent": _USER_AGENT, **(headers or {})}
        self._own_client = client is None
        self._client = client if client is not None else _httpx().Client(timeout=self.timeout)
        _httpx_filter.register(self.secret_values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self._url!r}, timeout={self.timeout!r})"

    def secret_values(self) -> tuple[str, ...]:
        # Header values (Authorization, tokens) are treated as secrets too.
        return (self._url.get_secret_value(), *self._headers.values())

    @abstractmethod
    def payload(self, alert: Alert) -> dict[str, Any]:
        """The JSON body for one alert."""

    def send(self, alert: Alert) -> None:
        try:
            response = self._client.post(
                self._url.get_secret_value(),
                json=self.payload(alert),
                headers=self._headers,
                timeout=self.timeout,
            )
        except _httpx().HTTPError as exc:
            # Not chained: httpx errors carry the request, and with it the secret URL.
            message = redact(f"{type(exc).__name__}: {exc}", self.secret_values())
            raise DeliveryError(message, retryable=True) from None
        status = response.status_code
        if 200 <= status < 300:
            return
        body = redact(response.text[:200], self.secret_values())
        retryable = status >= 500 or status in _RETRYABLE_STATUS
        raise DeliveryError(f"HTTP {status}: {body}".rstrip(": "), retryable=retryable)

    def close(self) -> None:
        if self._own_client:
            self._client.close()


class WebhookNotifier(_HttpNotifier):
    """POSTs each alert as JSON (`webhook_payload`) to a URL.

    Args:
        url: the endpoint; a `Secret` (or a str, wrapped) since such URLs often carry tokens.
        timeout: seconds per request (connect, write, read, each).
        headers: extra headers, e.g. `Authorization`; their values are masked like secrets.
        client: an `httpx.Client` to use (proxies, mTLS); closed by its owner, not here.
    """

    channel = "webhook"

    def payload(self, alert: Alert) -> dict[str, Any]:
        """The JSON body for one alert (`webhook_payload`)."""
        return webhook_payload(alert)


class SlackNotifier(_HttpNotifier):
    """Posts each alert to a Slack incoming webhook as a Block Kit message (`slack_payload`).

    Args:
        url: the incoming-webhook URL (`https://hooks.slack.com/services/...`), a secret.
        timeout, headers, client: as for `WebhookNotifier`.
    """

    channel = "slack"

    def payload(self, alert: Alert) -> dict[str, Any]:
        """The Block Kit body for one alert (`slack_payload`)."""
        return slack_payload(alert)


# -- e-mail ----------------------------------------------------------------------------------

_SMTP_DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "tls": 465, "none": 25}


def _one_line(text: str) -> str:
    return " ".join(text.split())


class EmailNotifier(Notifier):
    """Sends each alert as a plain-text e-mail over SMTP (`smtplib`).

    Args:
        host, port: the SMTP server; the port defaults to 587 (`starttls`), 465 (`tls`) or
            25 (`none`).
        sender: the `From` address; recipients: the `To` addresses.
        tls: `starttls` (upgrade, the default), `tls` (implicit TLS) or `none`.
        username, password: log in when a username is given (password: a `Secret`).
        timeout: socket timeout in seconds for each SMTP operation.
        ssl_context: trust and protocol settings (default: the system's trusted CAs).
    """

    channel = "email"

    def __init__(
        self,
        host: str,
        port: int | None = None,
        *,
        sender: str,
        recipients: Sequence[str],
        tls: SmtpTls = "starttls",
        username: str | None = None,
        password: str | Secret | None = None,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if tls not in _SMTP_DEFAULT_PORTS:
            raise ConfigurationError(f"EmailNotifier(tls={tls!r}): use one of starttls, tls, none")
        if isinstance(recipients, str):
            recipients = [r.strip() for r in recipients.split(",")]
        recipients = [r for r in recipients if r]
        if not host or not sender or not recipients:
            raise ConfigurationError(
                "EmailNotifier needs a host, a sender and at least one recipient"
            )
        if not timeout > 0:
            raise ConfigurationError(f"EmailNotifier(timeout={timeout!r}): must be > 0 seconds")
        self.host = host
        self.port = port if port is not None else _SMTP_DEFAULT_PORTS[tls]
        self.sender = sender
        self.recipients = tuple(recipients)
        self.tls: SmtpTls = tls
        self.username = username
        self._password = Secret(password) if isinstance(password, str) else password
        self.timeout = float(timeout)
        self._ssl_context = ssl_context

    def __repr__(self) -> str:
        password = repr(self._password) if self._password is not None else None
        return (
            f"EmailNotifier(host={self.host!r}, port={self.port!r}, tls={self.tls!r}, "
            f"sender={self.sender!r}, recipients={list(self.recipients)!r}, "
            f"username={self.username!r}, password={password})"
        )

    def secret_values(self) -> tuple[str, ...]:
        value = reveal(self._password)
        return (value,) if value else ()

    def message(self, alert: Alert) -> EmailMessage:
        """The e-mail for one alert: From, To, Subject, Date, Message-ID, a text body."""
        message = EmailMessage()
        subject = f"[{alert.status.value.upper()}][{alert.severity.value}] {alert.rule}"
        message["Subject"] = _one_line(f"{subject}: {alert.summary}")
        message["From"] = self.sender
        message["To"] = ", ".join(self.recipients)
        message["Date"] = formatdate(alert.at, usegmt=True)
        domain = self.sender.rpartition("@")[2] or "localhost"
        message["Message-ID"] = make_msgid("bgtasks-alert", domain=domain)
        message["X-Bgtasks-Alert-Key"] = _one_line(alert.key)
        message["X-Bgtasks-Alert-Status"] = alert.status.value
        message.set_content(alert_text(alert))
        return message

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def send(self, alert: Alert) -> None:
        import smtplib  # loaded with the e-mail feature, not with the package

        permanent = (
            smtplib.SMTPAuthenticationError,
            smtplib.SMTPNotSupportedError,
            smtplib.SMTPRecipientsRefused,
            smtplib.SMTPSenderRefused,
            ssl.SSLCertVerificationError,
        )
        message = self.message(alert)
        try:
            smtp: smtplib.SMTP
            if self.tls == "tls":
                smtp = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=self.timeout, context=self._context()
                )
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            with smtp:
                smtp.ehlo()
                if self.tls == "starttls":
                    smtp.starttls(context=self._context())
                    smtp.ehlo()
                if self.username:
                    smtp.login(self.username, reveal(self._password) or "")
                refused = smtp.send_message(message)
        except permanent as exc:
            raise DeliveryError(self._describe(exc), retryable=False) from None
        except smtplib.SMTPResponseException as exc:
            raise DeliveryError(self._describe(exc), retryable=exc.smtp_code < 500) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(self._describe(exc), retryable=True) from None
        if refused:
            structlog.get_logger("otel_bgtasks.alerting").warning(
                "bgtasks alert e-mail refused for some recipients",
                recipients=sorted(refused),
                rule=alert.rule,
            )

    def _describe(self, exc: BaseException) -> str:
        return redact(f"{type(exc).__name__}: {exc}", self.secret_values())


# -- structlog -------------------------------------------------------------------------------

_LEVELS = {
    Severity.CRITICAL: "critical",
    Severity.ERROR: "error",
    Severity.WARNING: "warning",
    Severity.INFO: "info",
}


class LogNotifier(Notifier):
    """Logs each alert through structlog: firing at the severity's level, resolved at info.

    Args:
        logger: a structlog logger (default `structlog.get_logger("otel_bgtasks.alerting")`).
    """

    channel = "log"

    def __init__(self, logger: Any = None) -> None:
        self._logger = (
            logger if logger is not None else structlog.get_logger("otel_bgtasks.alerting")
        )

    def __repr__(self) -> str:
        return "LogNotifier()"

    def send(self, alert: Alert) -> None:
        level = "info" if alert.status is AlertStatus.RESOLVED else _LEVELS[alert.severity]
        signal = alert.signal
        getattr(self._logger, level)(
            f"bgtasks alert {alert.status.value}",
            alert_rule=alert.rule,
            alert_severity=alert.severity.value,
            alert_status=alert.status.value,
            alert_key=alert.key,
            summary=alert.summary,
            labels=dict(alert.labels),
            details=dict(alert.details),
            trace_id=signal.trace_id if signal is not None else None,
            span_id=signal.span_id if signal is not None else None,
        )
