"""`Alert`: what a rule emits and a notifier delivers (a firing or a resolved notice)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType

from otel_bgtasks.alerting.signals import TaskSignal

__all__ = ["Alert", "AlertStatus", "DetailValue", "Severity"]

DetailValue = str | int | float | bool
"""A value in `Alert.details`: anything that renders in JSON, Slack and plain text."""


class Severity(StrEnum):
    """How urgent an alert is; notifiers show it and may pick a log level from it."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class AlertStatus(StrEnum):
    """`firing` when a rule's condition starts to hold, `resolved` when it clears."""

    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class Alert:
    """One notice from one rule about one dedup key.

    Attributes:
        rule: the rule's name (the `bgtasks.alert.rule` metric attribute).
        severity: the rule's severity.
        status: `firing` or `resolved`.
        key: the dedup key, e.g. `task:send_mail` or `circuit:smtp`.
        summary: one human sentence.
        at: Unix time (seconds) the rule decided, from the rule engine's clock.
        labels: what the alert is about (`task`, `circuit`, `service`), read-only.
        details: numbers and facts behind the decision, read-only.
        signal: the task run that triggered this notice (None for a time-based resolve).
    """

    rule: str
    severity: Severity
    status: AlertStatus
    key: str
    summary: str
    at: float
    labels: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, DetailValue] = field(default_factory=dict)
    signal: TaskSignal | None = None

    def __post_init__(self) -> None:
        # Frozen all the way down: an alert is shared by every notifier's delivery thread.
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    @property
    def title(self) -> str:
        """`[FIRING] rule: summary`, for subjects and fallbacks."""
        return f"[{self.status.upper()}] {self.rule}: {self.summary}"

    @property
    def timestamp(self) -> str:
        """`at` as an ISO 8601 UTC timestamp."""
        return datetime.fromtimestamp(self.at, UTC).isoformat(timespec="seconds")
