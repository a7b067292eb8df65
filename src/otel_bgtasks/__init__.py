"""Observable, resilient FastAPI background tasks through OpenTelemetry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from otel_bgtasks._version import __version__
from otel_bgtasks.alerting import AlertingSpanProcessor, install_alerting
from otel_bgtasks.attributes import ErrorCategory, Outcome
from otel_bgtasks.calls import JSONSerializer, Serializer, register_serializer
from otel_bgtasks.circuit import CircuitBreaker, CircuitState, RedisCircuitBackend
from otel_bgtasks.dispatch import Dispatcher, dispatcher_for, register_dispatcher
from otel_bgtasks.errors import (
    BgTasksError,
    BusinessError,
    CircuitOpenError,
    ConfigurationError,
    CorruptEntryError,
    NotInstrumentedError,
    NotReplayableError,
    SerializationError,
    StoreUnavailableError,
    TaskImportError,
    TaskTimeoutError,
    UnregisteredTaskError,
    UntrustedEntryError,
    classify_error,
)
from otel_bgtasks.hooks import TaskHook
from otel_bgtasks.instrumentor import (
    BackgroundTasksInstrumentor,
    InstrumentOptions,
    ScheduledTask,
    schedule,
)
from otel_bgtasks.logs import TraceContextFilter, TraceContextProcessor, configure_structlog_json
from otel_bgtasks.options import EffectiveOptions
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry, TaskMessage
from otel_bgtasks.recovery import (
    RecoveryReport,
    RecoveryTask,
    recover_interrupted_tasks,
    start_recovery,
)
from otel_bgtasks.registry import declare_task_modules
from otel_bgtasks.replay import DeadLetters, ReplayReport, run_dead_letter
from otel_bgtasks.response_gate import JournalGate
from otel_bgtasks.retry import RetryPolicy, retry_if_category
from otel_bgtasks.sampling import LinkAwareSampler
from otel_bgtasks.signing import configure_signing
from otel_bgtasks.state import TaskCallState, current_task
from otel_bgtasks.stores import SQLiteDeadLetterStore, open_store
from otel_bgtasks.stores.base import DeadLetterStore
from otel_bgtasks.task import DispatchMode, TaskOptions, background_task
from otel_bgtasks.telemetry import Telemetry, configure_telemetry

if TYPE_CHECKING:
    from otel_bgtasks.stores.redis import RedisDeadLetterStore

__all__ = [
    "AlertingSpanProcessor",
    "BackgroundTasksInstrumentor",
    "BgTasksError",
    "BusinessError",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "ConfigurationError",
    "CorruptEntryError",
    "DeadLetter",
    "DeadLetterReason",
    "DeadLetterStore",
    "DeadLetters",
    "DispatchMode",
    "Dispatcher",
    "EffectiveOptions",
    "ErrorCategory",
    "InstrumentOptions",
    "JSONSerializer",
    "JournalEntry",
    "JournalGate",
    "LinkAwareSampler",
    "NotInstrumentedError",
    "NotReplayableError",
    "Outcome",
    "RecoveryReport",
    "RecoveryTask",
    "RedisCircuitBackend",
    "RedisDeadLetterStore",
    "ReplayReport",
    "RetryPolicy",
    "SQLiteDeadLetterStore",
    "ScheduledTask",
    "SerializationError",
    "Serializer",
    "StoreUnavailableError",
    "TaskCallState",
    "TaskHook",
    "TaskImportError",
    "TaskMessage",
    "TaskOptions",
    "TaskTimeoutError",
    "Telemetry",
    "TraceContextFilter",
    "TraceContextProcessor",
    "UnregisteredTaskError",
    "UntrustedEntryError",
    "__version__",
    "background_task",
    "classify_error",
    "configure_signing",
    "configure_structlog_json",
    "configure_telemetry",
    "current_task",
    "declare_task_modules",
    "dispatcher_for",
    "install_alerting",
    "open_store",
    "recover_interrupted_tasks",
    "register_dispatcher",
    "register_serializer",
    "retry_if_category",
    "run_dead_letter",
    "schedule",
    "start_recovery",
]


def __getattr__(name: str) -> Any:
    # The redis extra is imported when a Redis store is first used, not by `import otel_bgtasks`.
    if name == "RedisDeadLetterStore":
        from otel_bgtasks.stores.redis import RedisDeadLetterStore

        return RedisDeadLetterStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
