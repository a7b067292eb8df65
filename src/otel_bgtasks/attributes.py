"""Span, event and attribute names of the signal contract (DESIGN.md section 3).

Dashboards, alert rules, the README and the tests use these names: change one here and there
at once. Semantic-convention names come from `opentelemetry.semconv` where a convention exists.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from opentelemetry.semconv._incubating.attributes.code_attributes import CODE_FUNCTION_NAME
from opentelemetry.semconv._incubating.attributes.messaging_attributes import (
    MESSAGING_CLIENT_ID,
    MESSAGING_DESTINATION_NAME,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.exception_attributes import EXCEPTION_MESSAGE
from opentelemetry.semconv.schemas import Schemas

__all__ = [
    "ALERT_CHANNEL",
    "ALERT_OUTCOME",
    "ALERT_RULE",
    "CIRCUIT_FROM",
    "CIRCUIT_NAME",
    "CIRCUIT_TO",
    "CODE_FUNCTION_NAME",
    "DLQ_ENTRY_ID",
    "DLQ_REASON",
    "DLQ_STORE",
    "ERROR_CATEGORY",
    "ERROR_TYPE",
    "EVENT_CIRCUIT_REJECTED",
    "EVENT_CIRCUIT_STATE_CHANGE",
    "EVENT_DLQ_MOVED",
    "EVENT_ENQUEUED",
    "EVENT_PUBLISH_FAILED",
    "EVENT_REDELIVERED",
    "EVENT_RETRY",
    "EVENT_TIMEOUT",
    "EXCEPTION_MESSAGE",
    "MESSAGE_DELIVERIES",
    "MESSAGING_CLIENT_ID",
    "MESSAGING_DESTINATION_NAME",
    "MESSAGING_MESSAGE_ID",
    "MESSAGING_OPERATION_NAME",
    "MESSAGING_OPERATION_TYPE",
    "MESSAGING_SYSTEM",
    "PRODUCER_SPAN_PREFIX",
    "RETRY_ATTEMPT",
    "RETRY_DELAY",
    "SCHEMA_URL",
    "SKIP_REASON",
    "SPAN_NAME_PREFIX",
    "TASK_ATTEMPTS",
    "TASK_ID",
    "TASK_NAME",
    "TASK_OUTCOME",
    "TASK_WAIT",
    "ErrorCategory",
    "Outcome",
    "SkipReason",
]


def _schema_version(schema: Schemas) -> tuple[int, ...]:
    return tuple(int(part) for part in schema.value.rsplit("/", 1)[1].split("."))


SCHEMA_URL: Final = max(Schemas, key=_schema_version).value
"""The schema URL of our tracer and meter: the newest semantic-conventions version of the
installed `opentelemetry.semconv`, the package our convention names (`error.type`,
`code.function.name`, `exception.message`) come from."""

SPAN_NAME_PREFIX = "process "
PRODUCER_SPAN_PREFIX = "send "
"""A remote dispatcher's PRODUCER span: ``send {task_name}``."""

TASK_NAME = "bgtasks.task.name"
TASK_ID = "bgtasks.task.id"
TASK_ATTEMPTS = "bgtasks.task.attempts"
TASK_OUTCOME = "bgtasks.task.outcome"
TASK_WAIT = "bgtasks.task.wait"
ERROR_CATEGORY = "bgtasks.error.category"

RETRY_ATTEMPT = "bgtasks.retry.attempt"
RETRY_DELAY = "bgtasks.retry.delay"

CIRCUIT_NAME = "bgtasks.circuit.name"
CIRCUIT_FROM = "bgtasks.circuit.from"
CIRCUIT_TO = "bgtasks.circuit.to"

DLQ_ENTRY_ID = "bgtasks.dlq.entry_id"
DLQ_REASON = "bgtasks.dlq.reason"
DLQ_STORE = "bgtasks.dlq.store"
"""On `bgtasks.dlq.depth`: which store (`DeadLetterStore.identity`; one value per store, no
secret): replicas sharing a store report the same depth, so dashboards take the max per store."""

SKIP_REASON = "bgtasks.skip.reason"

ALERT_RULE = "bgtasks.alert.rule"
ALERT_CHANNEL = "bgtasks.alert.channel"
ALERT_OUTCOME = "bgtasks.alert.outcome"

EVENT_ENQUEUED = "bgtasks.enqueued"
EVENT_RETRY = "bgtasks.retry"
EVENT_CIRCUIT_STATE_CHANGE = "bgtasks.circuit.state_change"
EVENT_CIRCUIT_REJECTED = "bgtasks.circuit.rejected"
EVENT_DLQ_MOVED = "bgtasks.dlq.moved"
EVENT_TIMEOUT = "bgtasks.timeout"

# Remote dispatch (a broker, e.g. Celery): messaging conventions plus our own.
MESSAGE_DELIVERIES = "bgtasks.message.deliveries"
"""Times the broker delivered this message to a worker (1 on the first delivery)."""
EVENT_REDELIVERED = "bgtasks.message.redelivered"
"""On the consumer span: the message was delivered before (its worker was lost)."""
EVENT_PUBLISH_FAILED = "bgtasks.publish.failed"
"""On the producer span: one attempt to publish failed (retried until the deadline)."""


class SkipReason(StrEnum):
    """Why a scheduled task never ran (`bgtasks.skip.reason` on `bgtasks.task.skipped`)."""

    REQUEST_FAILED = "request_failed"
    PREVIOUS_TASK_FAILED = "previous_task_failed"
    SHUTDOWN = "shutdown"
    # A task that never ran and could not be dead-lettered (no store, or the store failed):
    # the dead-letter reason it would have had (`Executor.dead_letter_unrun`).
    UNDELIVERABLE = "undeliverable"
    REFUSED = "refused"
    WORKER_LOST = "worker_lost"


class Outcome(StrEnum):
    """Final outcome of one task execution (`bgtasks.task.outcome`)."""

    SUCCESS = "success"
    FAILURE = "failure"
    DEAD_LETTERED = "dead_lettered"
    REJECTED = "rejected"
    TIMEOUT = "timeout"


class ErrorCategory(StrEnum):
    """Coarse class of a task's final error (`bgtasks.error.category`)."""

    VALIDATION = "validation"
    CONNECTION = "connection"
    TIMEOUT = "timeout"
    BUSINESS = "business"
    SYSTEM = "system"
    UNKNOWN = "unknown"
