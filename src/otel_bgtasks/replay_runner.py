"""Re-run a dead letter's task under its policies, as a new span linked to the failed one."""

from __future__ import annotations

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanContext, TraceFlags

from otel_bgtasks import attributes as attr
from otel_bgtasks._execution import Executor
from otel_bgtasks._version import __version__
from otel_bgtasks.attributes import Outcome
from otel_bgtasks.deadletter import (
    DeadLetter,
    DeadLetterStore,
    ReplayResult,
    get_serializer,
    resolve,
)
from otel_bgtasks.metrics import Instruments

__all__ = ["run_dead_letter", "standalone_executor"]

_standalone: dict[int, Executor] = {}


def standalone_executor(store: DeadLetterStore | None = None) -> Executor:
    """An executor on the global providers, for runs outside an instrumented app (the CLI).

    With `store`, tasks that fail go to that store's dead letters (recovery re-runs).
    """
    key = id(store)
    executor = _standalone.get(key)
    if executor is None or executor.store is not store:
        executor = _standalone[key] = Executor(
            trace.get_tracer("otel_bgtasks", __version__),
            Instruments(metrics.get_meter("otel_bgtasks", __version__)),
            dead_letter_store=store,
        )
    return executor


def _span_context(trace_id: str, span_id: str) -> SpanContext | None:
    """The span context stored as hex ids, to link to (None when there was no span)."""
    if not trace_id or not span_id:
        return None
    return SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )


async def run_dead_letter(entry: DeadLetter, *, executor: Executor | None = None) -> ReplayResult:
    """Replay one dead letter; the entry itself is deleted or updated by the caller.

    The run is a `process {task}` span in a new trace linked to the original failed span; it
    counts in `bgtasks.dlq.replays` by outcome and is never dead-lettered again.

    Raises:
        TaskImportError: the task's function can no longer be imported (the entry is kept).
        ValueError: the payload cannot be decoded by its serializer.
    """
    if executor is None:
        from otel_bgtasks.instrumentor import current_executor

        executor = current_executor() or standalone_executor()
    func = resolve(entry.func_ref)
    args, kwargs = get_serializer(entry.serializer).loads(entry.payload)
    link = _span_context(entry.trace_id, entry.span_id)
    state = executor.prepare(func, tuple(args), kwargs, link=link)
    state.extra["replay"] = True
    state.extra["first_failure"] = entry.first_failure
    await executor.run(state, dead_letter=False)
    outcome = state.outcome or Outcome.FAILURE
    executor.instruments.dlq_replays.add(
        1, {attr.TASK_NAME: entry.task_name, attr.TASK_OUTCOME: outcome.value}
    )
    if outcome is Outcome.SUCCESS:
        return ReplayResult(ok=True)
    category = state.extra.get("category")
    return ReplayResult(
        ok=False,
        entry=entry.with_failure(
            state.exception,
            attempts=max(state.attempt, 1),
            category=str(category) if category is not None else None,
        ),
    )
