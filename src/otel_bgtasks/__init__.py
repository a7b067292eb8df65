"""Observable, resilient FastAPI background tasks through OpenTelemetry."""

from __future__ import annotations

from otel_bgtasks._execution import TaskHook, current_task
from otel_bgtasks._version import __version__
from otel_bgtasks.alerting import AlertingSpanProcessor, install_alerting
from otel_bgtasks.attributes import ErrorCategory, Outcome
from otel_bgtasks.circuit import CircuitBreaker, CircuitState, RedisCircuitBackend
from otel_bgtasks.deadletter import (
    DeadLetter,
    DeadLetterReason,
    DeadLetters,
    DeadLetterStore,
    JSONSerializer,
    Serializer,
    TaskImportError,
    open_store,
)
from otel_bgtasks.errors import BusinessError, CircuitOpenError, TaskTimeoutError, classify_error
from otel_bgtasks.instrumentor import BackgroundTasksInstrumentor, ScheduledTask, schedule
from otel_bgtasks.logs import TraceContextFilter, TraceContextProcessor, configure_structlog_json
from otel_bgtasks.recovery import recover_interrupted_tasks
from otel_bgtasks.retry import RetryPolicy
from otel_bgtasks.sampling import LinkAwareSampler
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.stores import RedisDeadLetterStore, SQLiteDeadLetterStore
from otel_bgtasks.task import TaskOptions, background_task
from otel_bgtasks.telemetry import Telemetry, configure_telemetry

__all__ = [
    "AlertingSpanProcessor",
    "BackgroundTasksInstrumentor",
    "BusinessError",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "DeadLetter",
    "DeadLetterReason",
    "DeadLetterStore",
    "DeadLetters",
    "ErrorCategory",
    "JSONSerializer",
    "LinkAwareSampler",
    "Outcome",
    "RedisCircuitBackend",
    "RedisDeadLetterStore",
    "RetryPolicy",
    "SQLiteDeadLetterStore",
    "ScheduledTask",
    "Serializer",
    "TaskCallState",
    "TaskHook",
    "TaskImportError",
    "TaskOptions",
    "TaskTimeoutError",
    "Telemetry",
    "TraceContextFilter",
    "TraceContextProcessor",
    "__version__",
    "background_task",
    "classify_error",
    "configure_structlog_json",
    "configure_telemetry",
    "current_task",
    "install_alerting",
    "open_store",
    "recover_interrupted_tasks",
    "schedule",
]
