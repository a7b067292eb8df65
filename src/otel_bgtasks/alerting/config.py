"""Alerting configuration, in code or from `OTEL_BGTASKS_ALERT_*` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import get_args

from otel_bgtasks.alerting.notifiers import (
    EmailNotifier,
    LogNotifier,
    Notifier,
    SlackNotifier,
    SmtpTls,
    WebhookNotifier,
)
from otel_bgtasks.alerting.secret import Secret

__all__ = [
    "ENV_PREFIX",
    "AlertingConfig",
    "AlertingConfigError",
    "DeliveryOptions",
    "SmtpConfig",
]

ENV_PREFIX = "OTEL_BGTASKS_ALERT_"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


_TLS_MODES: dict[str, SmtpTls] = {"starttls": "starttls", "tls": "tls", "none": "none"}


def _smtp_tls(value: str) -> SmtpTls:
    mode = _TLS_MODES.get(value.strip().lower())
    if mode is not None:
        return mode
    raise AlertingConfigError(
        f"{ENV_PREFIX}SMTP_TLS={value!r} is not valid: use starttls, tls or none"
    )


class AlertingConfigError(ValueError):
    """The alerting configuration is invalid; the message names the setting to fix."""


@dataclass(frozen=True, slots=True)
class DeliveryOptions:
    """How notifications leave the process, off the task path.

    Attributes:
        queue_size: notifications waiting for delivery at most; more are dropped and counted
            (`bgtasks.alerts.sent{bgtasks.alert.outcome="dropped"}`).
        max_concurrency: deliveries in flight at once (delivery threads).
        max_attempts: tries per notification, the first included.
        backoff_initial, backoff_max: exponential backoff between tries, with jitter (s).
    """

    queue_size: int = 256
    max_concurrency: int = 4
    max_attempts: int = 3
    backoff_initial: float = 0.5
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        for name in ("queue_size", "max_concurrency", "max_attempts"):
            if getattr(self, name) < 1:
                raise AlertingConfigError(f"DeliveryOptions({name}=...) must be >= 1")
        if self.backoff_initial < 0 or self.backoff_max < self.backoff_initial:
            raise AlertingConfigError(
                "DeliveryOptions: need 0 <= backoff_initial <= backoff_max "
                f"(got {self.backoff_initial!r}, {self.backoff_max!r})"
            )


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where and how alert e-mails are sent; see `EmailNotifier` for the fields."""

    host: str
    sender: str
    recipients: tuple[str, ...]
    port: int | None = None
    tls: SmtpTls = "starttls"
    username: str | None = None
    password: Secret | None = None

    def __post_init__(self) -> None:
        if self.tls not in get_args(SmtpTls):
            raise AlertingConfigError(
                f"SMTP TLS mode {self.tls!r} is not valid: use starttls, tls or none "
                f"({ENV_PREFIX}SMTP_TLS)"
            )
        if not self.sender or not self.recipients:
            raise AlertingConfigError(
                f"SMTP alerting on {self.host!r} needs a sender and at least one recipient: "
                f"set {ENV_PREFIX}SMTP_FROM and {ENV_PREFIX}SMTP_TO (comma-separated)"
            )
        if self.password is not None and not self.username:
            raise AlertingConfigError(
                f"an SMTP password is set but no user: set {ENV_PREFIX}SMTP_USER"
            )


@dataclass(frozen=True, slots=True)
class AlertingConfig:
    """Which channels get alerts, and how they are delivered.

    Build it in code, or with `AlertingConfig.from_env()`; `notifiers()` builds the notifiers.
    Secrets are `Secret`s, so printing a config shows `**********` in their place.
    """

    webhook_url: Secret | None = None
    slack_webhook_url: Secret | None = None
    smtp: SmtpConfig | None = None
    log: bool = False
    timeout: float = 5.0
    delivery: DeliveryOptions = field(default_factory=DeliveryOptions)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise AlertingConfigError(f"alert timeout must be > 0 seconds, got {self.timeout!r}")

    def notifiers(self) -> list[Notifier]:
        """One notifier per configured channel (maybe none)."""
        notifiers: list[Notifier] = []
        if self.webhook_url is not None:
            notifiers.append(WebhookNotifier(self.webhook_url, timeout=self.timeout))
        if self.slack_webhook_url is not None:
            notifiers.append(SlackNotifier(self.slack_webhook_url, timeout=self.timeout))
        smtp = self.smtp
        if smtp is not None:
            notifiers.append(
                EmailNotifier(
                    smtp.host,
                    smtp.port,
                    sender=smtp.sender,
                    recipients=smtp.recipients,
                    tls=smtp.tls,
                    username=smtp.username,
                    password=smtp.password,
                    timeout=self.timeout,
                )
            )
        if self.log:
            notifiers.append(LogNotifier())
        return notifiers

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AlertingConfig:
        """Read the `OTEL_BGTASKS_ALERT_*` variables (default: `os.environ`).

        Variables: `WEBHOOK_URL`, `SLACK_WEBHOOK_URL`; `SMTP_HOST`, `SMTP_PORT`, `SMTP_USER`,
        `SMTP_PASSWORD`, `SMTP_FROM`, `SMTP_TO` (comma-separated), `SMTP_TLS` (`starttls` |
        `tls` | `none`); `LOG` (true: also log alerts); `TIMEOUT` (s per request);
        `QUEUE_SIZE`, `MAX_CONCURRENCY`, `MAX_ATTEMPTS`. Unset or empty means the default.

        Raises:
            AlertingConfigError: a value is malformed or a setting is incomplete.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name, "").strip()
            return value or None

        def secret(name: str) -> Secret | None:
            value = get(name)
            return Secret(value) if value is not None else None

        def number(name: str, kind: type[int] | type[float], default: float) -> float:
            value = get(name)
            if value is None:
                return default
            try:
                return kind(value)
            except ValueError:
                raise AlertingConfigError(
                    f"{ENV_PREFIX}{name}={value!r} is not a valid {kind.__name__}"
                ) from None

        for name in ("WEBHOOK_URL", "SLACK_WEBHOOK_URL"):
            value = get(name)
            if value is not None and not value.startswith(("http://", "https://")):
                # The value is not echoed: it carries the webhook's credentials.
                raise AlertingConfigError(f"{ENV_PREFIX}{name} must be an http:// or https:// URL")

        smtp: SmtpConfig | None = None
        host = get("SMTP_HOST")
        if host is not None:
            tls = _smtp_tls(get("SMTP_TLS") or "starttls")
            port = get("SMTP_PORT")
            smtp = SmtpConfig(
                host=host,
                port=int(number("SMTP_PORT", int, 0)) if port is not None else None,
                sender=get("SMTP_FROM") or "",
                recipients=tuple(r.strip() for r in (get("SMTP_TO") or "").split(",") if r.strip()),
                tls=tls,
                username=get("SMTP_USER"),
                password=secret("SMTP_PASSWORD"),
            )
        else:
            orphans = [
                n
                for n in ("SMTP_PORT", "SMTP_USER", "SMTP_PASSWORD", "SMTP_FROM", "SMTP_TO")
                if get(n) is not None
            ]
            if orphans:
                raise AlertingConfigError(
                    f"{', '.join(ENV_PREFIX + n for n in orphans)} set without "
                    f"{ENV_PREFIX}SMTP_HOST: set the host too, or unset them"
                )

        log_value = (get("LOG") or "").lower()
        if log_value not in _TRUE | _FALSE:
            raise AlertingConfigError(f"{ENV_PREFIX}LOG={log_value!r}: use true or false")
        defaults = DeliveryOptions()
        return cls(
            webhook_url=secret("WEBHOOK_URL"),
            slack_webhook_url=secret("SLACK_WEBHOOK_URL"),
            smtp=smtp,
            log=log_value in _TRUE,
            timeout=number("TIMEOUT", float, 5.0),
            delivery=DeliveryOptions(
                queue_size=int(number("QUEUE_SIZE", int, defaults.queue_size)),
                max_concurrency=int(number("MAX_CONCURRENCY", int, defaults.max_concurrency)),
                max_attempts=int(number("MAX_ATTEMPTS", int, defaults.max_attempts)),
            ),
        )
