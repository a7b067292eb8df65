"""How a task's failure is reported: the span's exception event and status text, the log
line, and the recent-failures list of the health endpoint; all bounded, redacted on request,
never with the frames' locals unless asked.

The log line is one ERROR ``background task failed`` with what an operator acts on (task, ids,
outcome, attempts, category, error type and message, dead-letter reason and entry id) and
the task's own frames (`task_traceback`: at most 8 frames, 2 kB; the span and the dead letter
keep the whole traceback). A run an open circuit refused never ran: one WARNING
``background task rejected: circuit open`` naming the circuit, without a traceback.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from dataclasses import dataclass
from types import FrameType

from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import Span

from otel_bgtasks import attributes as attr
from otel_bgtasks._ids import span_id_hex, trace_id_hex
from otel_bgtasks._logger import log
from otel_bgtasks._tracebacks import REDACTED, bounded_message, bounded_traceback, exception_fields
from otel_bgtasks.attributes import Outcome
from otel_bgtasks.errors import CircuitOpenError, error_type
from otel_bgtasks.state import TaskCallState

__all__ = ["RECENT_FAILURES", "FailureRecord", "FailureReporter", "release_frames"]

RECENT_FAILURES = 50
"""How many failures the health endpoint can show (the newest)."""


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """One failed task as the health endpoint shows it (no arguments, no message)."""

    task_name: str
    task_id: str
    outcome: str
    attempts: int
    error_type: str | None
    at: float
    trace_id: str


class FailureReporter:
    """Renders failures for spans and logs under one executor's redaction settings."""

    def __init__(self, *, redact_exception_messages: bool, log_locals: bool) -> None:
        self.redact = redact_exception_messages
        self.log_locals = log_locals
        self.recent: deque[FailureRecord] = deque(maxlen=RECENT_FAILURES)
        self.quiet = False
        """No log line: a caller that reports each failure itself (``otel-bgtasks dlq
        replay`` prints one line per failure, tracebacks only with ``--traceback``)."""

    def message(self, exc: BaseException | None) -> str:
        """An exception message as spans carry it: bounded, or redacted on request."""
        if exc is None:
            return ""
        return REDACTED if self.redact else bounded_message(exc)

    def record_exception(self, span: Span, exc: BaseException) -> None:
        """The standard `exception` event, bounded and without locals (the SDK's own
        `record_exception` formats the whole traceback and the whole message)."""
        span.add_event(
            "exception",
            {
                EXCEPTION_TYPE: error_type(exc),
                attr.EXCEPTION_MESSAGE: self.message(exc),
                EXCEPTION_STACKTRACE: bounded_traceback(exc, redact=self.redact),
            },
        )

    def report(
        self, span: Span, state: TaskCallState, outcome: Outcome, exc: BaseException | None
    ) -> None:
        """Remember the failure (health) and log it once."""
        ctx = span.get_span_context()
        record = FailureRecord(
            task_name=state.name,
            task_id=state.task_id,
            outcome=outcome.value,
            attempts=state.attempt,
            error_type=error_type(exc) if exc is not None else None,
            at=time.time(),
            trace_id=trace_id_hex(ctx),
        )
        self.recent.append(record)
        if self.quiet:
            return
        fields: dict[str, object] = {
            "task_name": state.name,
            "task_id": state.task_id,
            "outcome": outcome.value,
            "attempts": state.attempt,
            "category": str(state.category or ""),
            "trace_id": record.trace_id,
            "span_id": span_id_hex(ctx),
        }
        if state.reason is not None:
            fields["dlq_reason"] = state.reason.value
        if state.dead_letter_id is not None:
            fields["dlq_entry_id"] = state.dead_letter_id  # `otel-bgtasks dlq show ID`
        if isinstance(exc, CircuitOpenError):
            # Never ran: the breaker's name says everything; a traceback would be ours alone.
            log.warning("background task rejected: circuit open", circuit=exc.circuit, **fields)
            return
        if exc is not None:
            fields.update(
                exception_fields(exc, redact=self.redact, with_locals=self.log_locals, brief=True)
            )
        log.error("background task failed", **fields)


def release_frames(exc: BaseException, caught_in: FrameType | None) -> None:
    """Free a handled failure's frames now (it was rendered, stored and logged already).

    Its traceback holds every frame from the executor down to the task, each with its locals
    (the arguments), and the executor's frame holds the state holding the exception: a cycle
    that keeps the arguments alive until the next cyclic collection (measured with a 900-deep
    list argument: twice the collector's time, gen-2 pauses over 100 ms). Dropping our own
    frame and clearing the others' locals lets reference counting free them at once; the
    traceback still shows every line (as on the span and in the dead letter).
    """
    current: BaseException | None = exc
    for _ in range(8):  # the exception and its causes
        if current is None:
            return
        tb = current.__traceback__
        if tb is not None and tb.tb_frame is caught_in:
            current.__traceback__ = tb = tb.tb_next
        if tb is not None:
            traceback.clear_frames(tb)
        current = current.__cause__ or current.__context__
