"""`TaskSignal`: what the alert rules see of one finished task span."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME
from opentelemetry.trace import StatusCode

from otel_bgtasks import attributes as attr
from otel_bgtasks.attributes import Outcome

__all__ = ["CircuitChange", "DeadLetterMove", "TaskSignal"]

_NS = 1e-9


@dataclass(frozen=True, slots=True)
class CircuitChange:
    """One `bgtasks.circuit.state_change` event: circuit `name` went `from_state` -> `to_state`.

    States are normalised to lower case with `_` (`closed`, `open`, `half_open`).
    """

    name: str
    from_state: str
    to_state: str
    at: float
    """Unix time of the event, in seconds."""


@dataclass(frozen=True, slots=True)
class DeadLetterMove:
    """One `bgtasks.dlq.moved` event: the task was moved to the dead-letter store."""

    entry_id: str | None
    reason: str | None
    at: float
    """Unix time of the event, in seconds."""


@dataclass(frozen=True, slots=True)
class TaskSignal:
    """An immutable summary of one task execution span (`process {task_name}`).

    Attributes:
        task_name: `bgtasks.task.name`.
        outcome: `bgtasks.task.outcome` (`success`, `failure`, `dead_lettered`, `rejected`,
            `timeout`); every outcome but `success` counts as a failure (`failed`).
        duration: seconds from span start to end, all attempts included.
        started_at, ended_at: Unix times in seconds.
        error_type, error_category: `error.type` and `bgtasks.error.category` on failure.
        attempts: `bgtasks.task.attempts`, when set.
        circuit_changes, dlq_moves: the span's circuit and dead-letter events, in order.
        task_id, trace_id, span_id, service: where to look the run up (Jaeger, logs).
    """

    task_name: str
    outcome: str
    duration: float
    started_at: float
    ended_at: float
    error_type: str | None = None
    error_category: str | None = None
    attempts: int | None = None
    circuit_changes: tuple[CircuitChange, ...] = ()
    dlq_moves: tuple[DeadLetterMove, ...] = ()
    task_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    service: str | None = None

    @property
    def failed(self) -> bool:
        """True for every outcome other than `success`."""
        return self.outcome != Outcome.SUCCESS

    @classmethod
    def from_span(cls, span: ReadableSpan) -> TaskSignal | None:
        """The signal of a task span, or None for any other span (no `bgtasks.task.name`)."""
        attributes = span.attributes or {}
        name = attributes.get(attr.TASK_NAME)
        if name is None:
            return None
        start_ns = span.start_time
        end_ns = span.end_time
        ended_at = end_ns * _NS if end_ns is not None else 0.0
        started_at = start_ns * _NS if start_ns is not None else ended_at
        outcome = _text(attributes, attr.TASK_OUTCOME)
        if outcome is None:  # a span that ended without the executor's final attributes
            failed = span.status.status_code is StatusCode.ERROR
            outcome = Outcome.FAILURE.value if failed else Outcome.SUCCESS.value
        attempts = attributes.get(attr.TASK_ATTEMPTS)
        circuit: list[CircuitChange] = []
        moves: list[DeadLetterMove] = []
        for event in span.events:
            event_attrs = event.attributes or {}
            at = event.timestamp * _NS
            if event.name == attr.EVENT_CIRCUIT_STATE_CHANGE:
                circuit.append(
                    CircuitChange(
                        name=_text(event_attrs, attr.CIRCUIT_NAME) or "",
                        from_state=_state(_text(event_attrs, attr.CIRCUIT_FROM)),
                        to_state=_state(_text(event_attrs, attr.CIRCUIT_TO)),
                        at=at,
                    )
                )
            elif event.name == attr.EVENT_DLQ_MOVED:
                moves.append(
                    DeadLetterMove(
                        entry_id=_text(event_attrs, attr.DLQ_ENTRY_ID),
                        reason=_text(event_attrs, attr.DLQ_REASON),
                        at=at,
                    )
                )
        ctx = span.context
        resource = span.resource.attributes if span.resource is not None else {}
        return cls(
            task_name=str(name),
            outcome=outcome,
            duration=max(0.0, ended_at - started_at),
            started_at=started_at,
            ended_at=ended_at,
            error_type=_text(attributes, attr.ERROR_TYPE),
            error_category=_text(attributes, attr.ERROR_CATEGORY),
            attempts=attempts if isinstance(attempts, int) else None,
            circuit_changes=tuple(circuit),
            dlq_moves=tuple(moves),
            task_id=_text(attributes, attr.TASK_ID),
            trace_id=format(ctx.trace_id, "032x") if ctx is not None else None,
            span_id=format(ctx.span_id, "016x") if ctx is not None else None,
            service=_text(resource, SERVICE_NAME),
        )


def _text(attributes: Mapping[str, Any], key: str) -> str | None:
    value = attributes.get(key)
    return None if value is None else str(value)


def _state(value: str | None) -> str:
    return (value or "").strip().lower().replace("-", "_")
