"""Moving a failed task to the dead-letter store: the entry built from the task's state
(its call described, signed), written with a log fallback, and the store's gauges."""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.metrics import Observation
from opentelemetry.trace import Span

from otel_bgtasks._ids import span_id_hex, trace_id_hex
from otel_bgtasks._logger import log
from otel_bgtasks.attributes import DLQ_STORE, ErrorCategory
from otel_bgtasks.calls import Serializer, describe_call
from otel_bgtasks.metrics import Instruments
from otel_bgtasks.records import DeadLetter, DeadLetterReason
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = ["DeadLetterWriter", "NeverRanError"]


class NeverRanError(Exception):
    """The error recorded on the dead letter of a task that never ran, when no exception
    says why (e.g. it was delivered too many times)."""

    def __init__(self, reason: DeadLetterReason) -> None:
        super().__init__(f"the task never ran ({reason.value})")


class DeadLetterWriter:
    """Writes one executor's dead letters to `store` and observes its gauges."""

    def __init__(
        self, store: DeadLetterStore, serializer: Serializer, instruments: Instruments
    ) -> None:
        self.store = store
        self.serializer = serializer
        self._identity = store.identity  # `bgtasks.dlq.store`: resolved once
        instruments.add_depth_source(self._observe_depth)
        if store.status() is not None:  # a buffering store: its failed and dropped writes
            instruments.add_write_error_source(self._observe_write_errors)
            instruments.add_dropped_source(self._observe_dropped)

    def entry(
        self,
        state: TaskCallState,
        span: Span,
        exc: BaseException,
        category: ErrorCategory,
        reason: DeadLetterReason,
    ) -> DeadLetter:
        """The dead letter of a failed task, signed when a signing key is set (replay
        verifies it before decoding anything). A task of a remote dispatcher keeps its route
        (a replay sends it back there) and its call as it travelled."""
        ctx = span.get_span_context()
        call = state.call or describe_call(
            self.serializer, state.func, state.args, state.kwargs, task_name=state.name
        )
        # received from another process: its origin's route; else its own dispatcher's
        route = state.origin.route if state.origin is not None else state.options.route
        return DeadLetter.from_exception(
            exc,
            task_name=state.name,
            func_ref=call.func_ref,
            payload=call.payload,
            serializer=call.serializer,
            reason=reason,
            attempts=state.attempt,
            first_failure=state.first_failure,
            category=category.value,
            trace_id=trace_id_hex(ctx),
            span_id=span_id_hex(ctx),
            route=route or None,
        ).signed()

    def unrun_entry(
        self,
        state: TaskCallState,
        reason: DeadLetterReason,
        error: BaseException | None,
        classify: Callable[[BaseException], ErrorCategory],
    ) -> DeadLetter:
        """The dead letter of a task that never ran (`Executor.dead_letter_unrun`): its id
        is the task id, its trace the scheduling span's, its route its dispatcher's."""
        call = state.call or describe_call(
            self.serializer, state.func, state.args, state.kwargs, task_name=state.name
        )
        return DeadLetter.from_exception(
            error if error is not None else NeverRanError(reason),
            entry_id=state.task_id,
            task_name=state.name,
            func_ref=call.func_ref,
            payload=call.payload,
            serializer=call.serializer,
            reason=reason,
            attempts=0,
            category=(classify(error) if error is not None else ErrorCategory.SYSTEM).value,
            trace_id=trace_id_hex(state.link),
            span_id=span_id_hex(state.link),
            route=state.origin.route if state.origin is not None else state.options.route,
        ).signed()

    def put(self, entry: DeadLetter) -> bool:
        """Store `entry` (in a worker thread); False when even the store's buffer failed,
        in which case the log line keeps the whole entry."""
        try:
            self.store.put(entry)
        except Exception:
            log.exception("dead letter could not be stored", entry=entry.to_json())
            return False
        return True

    def _observe_write_errors(self) -> list[Observation]:
        return [Observation(self.store.write_errors)]

    def _observe_dropped(self) -> list[Observation]:
        return [Observation(self.store.dropped)]

    def _observe_depth(self) -> list[Observation]:
        try:
            return [Observation(self.store.count(), {DLQ_STORE: self._identity})]
        except Exception:  # a store that is down reports nothing rather than a wrong zero
            return []
