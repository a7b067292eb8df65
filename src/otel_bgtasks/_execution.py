"""The executor: the one path every background task takes (span, metrics, logs, policies),
from scheduling to its final outcome.

Its parts live in their own modules: accounting (in flight, pending, skipped), the breaker
registry, dead-lettering, failure reporting, the journal. Also here: the registry of the
active executor (`active_executor`), which modules that run tasks outside Starlette (replay,
recovery, the health router) read, below the instrumentor that sets it.
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from types import FunctionType, MethodType
from typing import Any

import anyio
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue
from starlette.concurrency import run_in_threadpool
from tenacity import RetryCallState

from otel_bgtasks import attributes as attr
from otel_bgtasks._ids import from_hex, to_traceparent
from otel_bgtasks._logger import log
from otel_bgtasks._version import __version__
from otel_bgtasks.accounting import Accounting
from otel_bgtasks.attributes import ErrorCategory, Outcome, SkipReason
from otel_bgtasks.breakers import BreakerRegistry
from otel_bgtasks.calls import (
    EncodedCall,
    JSONSerializer,
    Serializer,
    check_replayable,
    decode_call,
    encode_call,
)
from otel_bgtasks.circuit import CircuitBreaker
from otel_bgtasks.config import Settings, resolve_settings
from otel_bgtasks.dead_lettering import DeadLetterWriter, NeverRanError
from otel_bgtasks.errors import (
    CircuitOpenError,
    ConfigurationError,
    CorruptEntryError,
    ErrorClassifier,
    TaskImportError,
    TaskTimeoutError,
    UntrustedEntryError,
    classify_error,
    error_type,
)
from otel_bgtasks.failures import FailureReporter, release_frames
from otel_bgtasks.hooks import TaskHook, call_hook
from otel_bgtasks.journal import Journal
from otel_bgtasks.metrics import Instruments
from otel_bgtasks.options import (
    TRACE_MODES,
    EffectiveOptions,
    TaskDefaults,
    TraceMode,
    check_trace_mode,
    effective_options,
)
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry, TaskMessage
from otel_bgtasks.registry import note_scheduled
from otel_bgtasks.retry import RetryPolicy
from otel_bgtasks.signing import signing_keys
from otel_bgtasks.state import Origin, TaskCallState, current_task
from otel_bgtasks.state import current as _current
from otel_bgtasks.stores.base import DeadLetterStore
from otel_bgtasks.task import Dispatch

__all__ = [
    "TRACE_MODES",
    "Executor",
    "TaskHook",
    "TraceMode",
    "active_executor",
    "call_hook",
    "check_trace_mode",
    "current_task",
    "set_active_executor",
    "standalone_executor",
]

# Errors that say nothing about the downstream's health do not trip a breaker.
_NOT_BREAKER_FAILURES = frozenset({ErrorCategory.VALIDATION, ErrorCategory.BUSINESS})
# Without a policy a task runs once; its dead letter's reason still says whether a retry could
# have helped (`exhausted`: a connection or timeout error) or not (`permanent`).
_TRANSIENT = RetryPolicy()
_DESCRIBED_MAX = 1024  # functions whose options are cached per executor

_active: Executor | None = None
_getrandbits = random.getrandbits
_OUTCOME_VALUE = {outcome: outcome.value for outcome in Outcome}  # `.value` is a call
# Enum classes have a Python-level __getattr__ hook (3.11): module constants on the hot path.
_SUCCESS = Outcome.SUCCESS
_FAILURE = Outcome.FAILURE
_CONSUMER = SpanKind.CONSUMER



def _received_attributes(state: TaskCallState, wait: float) -> dict[str, AttributeValue]:
    """The span attributes of a task received from another process: ours, then its origin's
    (``messaging.*``)."""
    assert state.origin is not None
    return {
        attr.TASK_NAME: state.name,
        attr.TASK_ID: state.task_id,
        attr.CODE_FUNCTION_NAME: state.function,
        attr.TASK_WAIT: wait,
        **state.origin.attributes,
    }


def active_executor() -> Executor | None:
    """The executor of the active instrumentation (None when not instrumented)."""
    return _active


def set_active_executor(executor: Executor | None) -> None:
    """Make `executor` the active one (the instrumentor does, at instrument/uninstrument)."""
    global _active
    _active = executor


_standalone: dict[int, Executor] = {}


def standalone_executor(store: DeadLetterStore | None = None) -> Executor:
    """An executor on the global providers for runs outside an instrumented app (the CLI,
    replay and recovery from a script, a worker), with the defaults ``instrument()`` would
    give this process: every ``OTEL_BGTASKS_*`` variable applies (retry, circuit, timeout,
    trace mode, redaction...).

    With `store`, tasks that fail go to that store's dead letters (recovery re-runs); without,
    none.
    """
    key = id(store)
    executor = _standalone.get(key)
    if executor is None or executor.store is not store:
        settings = resolve_settings({"dead_letter_store": store, "durable": False})
        executor = _standalone[key] = Executor.from_settings(
            settings, store, scope="otel_bgtasks", version=__version__
        )
    return executor


class Executor:
    """Schedules and runs tasks under one tracer, one set of instruments and one config."""

    def __init__(
        self,
        tracer: Tracer,
        instruments: Instruments,
        *,
        trace_mode: TraceMode = "link",
        propagate_exceptions: bool = False,
        start_hook: TaskHook | None = None,
        end_hook: TaskHook | None = None,
        retry: RetryPolicy | None = None,
        circuit: CircuitBreaker | None = None,
        timeout: float | None = None,
        durable: bool = False,
        dead_letter_store: DeadLetterStore | None = None,
        serializer: Serializer | None = None,
        error_classifier: ErrorClassifier = classify_error,
        redact_exception_messages: bool = False,
        log_locals: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        dispatch: Dispatch = "inline",
    ) -> None:
        check_trace_mode(trace_mode)
        signing_keys()  # a bad OTEL_BGTASKS_SIGNING_KEY fails here, not in a task's failure path
        self.defaults = TaskDefaults(
            retry=retry, circuit=circuit, timeout=timeout, durable=durable, dispatch=dispatch
        )
        if durable and dead_letter_store is None:
            raise ConfigurationError("durable=True needs a dead_letter_store to journal tasks in")
        if serializer is not None and not isinstance(serializer, Serializer):
            raise ConfigurationError(
                f"serializer={serializer!r}: pass an object with name, dumps() and loads()"
                " (see otel_bgtasks.Serializer)"
            )
        self.tracer = tracer
        self.instruments = instruments
        self.trace_mode = trace_mode
        self.propagate_exceptions = bool(propagate_exceptions)
        self.start_hook = start_hook
        self.end_hook = end_hook
        self.store = dead_letter_store
        self.serializer: Serializer = serializer if serializer is not None else JSONSerializer()
        # Monotonic seconds for waits, durations and sync-timeout overruns; a test passes a
        # fake so that no test waits for a timer.
        self.clock = clock
        self.classify = error_classifier
        self.failures = FailureReporter(
            redact_exception_messages=bool(redact_exception_messages), log_locals=bool(log_locals)
        )
        self.journal = Journal(dead_letter_store, self.serializer) if dead_letter_store else None
        self.dead_letters = (
            DeadLetterWriter(dead_letter_store, self.serializer, instruments)
            if dead_letter_store is not None
            else None
        )
        self.breakers = BreakerRegistry(instruments)
        self.accounting = Accounting(instruments, self.journal)
        # The accounting's containers, read and written inline on the hot path.
        self.inflight = self.accounting.inflight
        self._unstarted = self.accounting.unstarted
        self._ran = self.accounting.ran
        self._scheduled = self.accounting.scheduled
        self._described: dict[Any, EffectiveOptions] = {}

    @classmethod
    def from_settings(
        cls, settings: Settings, store: DeadLetterStore | None, *, scope: str, version: str
    ) -> Executor:
        """An executor on `settings` (its providers, or the global ones), writing to `store`
        (opened by the caller: `Settings.open_store`); tracer and meter named `scope`."""
        schema = attr.SCHEMA_URL
        return cls(
            trace.get_tracer(scope, version, settings.tracer_provider, schema_url=schema),
            Instruments(
                metrics.get_meter(scope, version, settings.meter_provider, schema_url=schema)
            ),
            trace_mode=settings.trace_mode,
            propagate_exceptions=settings.propagate_exceptions,
            start_hook=settings.start_hook,
            end_hook=settings.end_hook,
            retry=settings.retry,
            circuit=settings.circuit,
            timeout=settings.timeout,
            durable=settings.durable,
            dead_letter_store=store,
            serializer=settings.serializer,
            error_classifier=settings.error_classifier,
            redact_exception_messages=settings.redact_exception_messages,
            log_locals=settings.log_locals,
            dispatch=settings.dispatch,
        )

    @property
    def redact_exception_messages(self) -> bool:
        return self.failures.redact

    # -- scheduling -------------------------------------------------------------------------

    def schedule(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        is_async: bool | None = None,
    ) -> TaskCallState:
        """Capture what is needed at scheduling time and mark the current span.

        Raises:
            TypeError: a durable task's, or a task bound for another process, whose function
                is not importable or an argument cannot be serialized (the message names it):
                it raises here, in the endpoint that schedules it.
        """
        current = trace.get_current_span()
        link = current.get_span_context()
        recording = current.is_recording()  # a recording span's context is valid
        state = self._state(
            func, args, kwargs, link if recording or link.is_valid else None, is_async
        )
        if state.options.encoded:
            self._encode(state)
        if recording:
            current.add_event(
                attr.EVENT_ENQUEUED, {attr.TASK_NAME: state.name, attr.TASK_ID: state.task_id}
            )
        self.inflight[state.task_id] = state
        self._unstarted.add(state.task_id)
        if state.name not in self._scheduled:  # pending counts are made at collection
            self._scheduled.add(state.name)
        return state

    def prepare(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        link: SpanContext | None = None,
        is_async: bool | None = None,
        *,
        task_id: str | None = None,
        enqueued_wall: float | None = None,
    ) -> TaskCallState:
        """The state of a task about to be scheduled or run, without side effects (replay,
        recovery and `receive` run it as it is; `schedule` accounts for it).

        Args:
            link: the span context to link to (the scheduling span).
            task_id: keep this `bgtasks.task.id` (a task received from another process, a
                re-sent one); default: a fresh one.
            enqueued_wall: when the task was scheduled, wall clock (epoch seconds), for a task
                scheduled in another process: its `bgtasks.task.wait` is then measured on the
                wall clock from that moment (the broker wait); default: now.
        """
        state = self._state(
            func, args, kwargs, link if link is not None and link.is_valid else None, is_async
        )
        if task_id is not None:
            state.task_id = task_id
        if enqueued_wall is not None:
            # run() measures the wait on the monotonic clock: start it that long ago (a task
            # from another process: its wall-clock wait, the broker's), never ahead
            state.enqueued_at -= max(state.enqueued_wall - enqueued_wall, 0.0)
            state.enqueued_wall = enqueued_wall
        return state

    def _state(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        link: SpanContext | None,
        is_async: bool | None,
    ) -> TaskCallState:
        try:  # `options_for`'s cache, read here: one call less per task
            options = self._described[func]
        except (KeyError, TypeError):
            options = self.options_for(func)
        clock = self.clock
        return TaskCallState(
            task_id=f"{_getrandbits(128):032x}",  # `new_task_id()`, inline
            func=func,
            args=args,
            kwargs=kwargs,
            options=options,
            name=options.name,
            function=options.function,
            link=link,
            enqueued_at=clock(),
            enqueued_wall=time.time(),
            is_async=options.is_async if is_async is None else is_async,
        )

    def options_for(self, func: Callable[..., Any]) -> EffectiveOptions:
        """`func`'s effective options, resolved once per function.

        Functions are cached by identity; the cache is bounded because closures made per
        request are functions too (a million of them must not be retained).
        """
        try:
            return self._described[func]
        except (KeyError, TypeError):  # TypeError: an unhashable callable object
            pass
        options = effective_options(func, self.defaults, self.breakers.get)
        check = getattr(options.dispatch, "check_options", None)
        if check is not None:  # e.g. a durable task's worst case against a broker's timeout
            check(options)
        note_scheduled(func)  # this app's own task: its dead letters stay replayable here
        if isinstance(func, FunctionType | MethodType):
            if len(self._described) >= _DESCRIBED_MAX:
                self._described.clear()
            self._described[func] = options
        return options

    def _encode(self, state: TaskCallState) -> None:
        """Encode the call of a durable task or one bound for another process (raising on bad
        arguments, at scheduling), and journal a durable one."""
        if state.options.durable:
            if self.journal is None:
                raise ConfigurationError(
                    f"task {state.name!r} is durable but no dead_letter_store is configured; "
                    "pass dead_letter_store= to the instrumentor"
                )
            self.journal.add(state)  # encodes it (`state.call`)
        else:
            state.call = encode_call(
                self.serializer, state.func, state.args, state.kwargs, task_name=state.name
            )

    # -- accounting (otel_bgtasks.accounting) -----------------------------------------------

    def skip(self, state: TaskCallState, reason: SkipReason) -> None:
        """Account for a scheduled task that will never run (`Accounting.skip`)."""
        self.accounting.skip(state, reason)

    def hand_off(self, state: TaskCallState, route: str, deadline: float | None) -> None:
        """A scheduled task was published to another process (a remote dispatcher, route
        `route`): it leaves `inflight` and `bgtasks.task.pending` here, no span. A durable
        task's journal row MOVES to the route (owner ``route:<route>``) until `deadline`
        (epoch seconds, the store's clock): the consumer removes it when the task ends, and
        recovery re-sends it through the route's dispatcher after the deadline, never runs it
        here. Thread-safe; never blocks the event loop. Handing off twice counts once.

        Raises:
            ValueError: a durable task without a deadline.
        """
        if not self.accounting.leave(state):
            return
        if state.journaled and self.journal is not None:
            if deadline is None:
                raise ValueError(
                    f"task {state.name!r} is durable: hand_off needs the deadline after which"
                    " recovery re-sends it"
                )
            self.journal.hand_off(state, route, deadline)

    def dead_letter_unrun(
        self, state: TaskCallState, reason: DeadLetterReason, error: BaseException | None = None
    ) -> DeadLetter | None:
        """Dead-letter a scheduled task that never ran: ``undeliverable`` (it could not be
        published in time, or its dispatcher raised), ``refused`` (the consumer refused it),
        ``worker_lost`` (it lost its worker too often). No task span: counted in
        `bgtasks.dlq.moves` (`bgtasks.dlq.reason`), one log line, and it leaves `inflight`.

        The entry's id is the task id (a second report of the same task replaces it); its
        route is the task's dispatcher's (a replay sends it back there). A durable task's
        journal row is removed once the entry is stored (the entry is the record now).
        Without a store, or when the store fails, the task is counted as skipped with the
        same reason (`bgtasks.task.skipped`) and logged. Blocking: call it off the event loop.
        Returns the stored entry, or None.
        """
        if not self.accounting.leave(state):
            return None
        stored = self._dead_letter_unrun(
            self.dead_letters.unrun_entry(state, reason, error, self.classify)
            if self.dead_letters is not None
            else None,
            state.name,
            reason,
            error,
        )
        if state.journaled and self.journal is not None:
            self.journal.finished(state, keep=stored is None)
        return stored

    def dead_letter_message(
        self, message: TaskMessage, reason: DeadLetterReason, error: BaseException | None = None
    ) -> DeadLetter | None:
        """`dead_letter_unrun` for a message that never became a task here (`receive`
        refused it, or it was delivered too many times): the entry keeps the message's call
        and signature as they are (a tampered one stays refused at replay), its route and its
        task id; a durable message's journal row is removed once the entry is stored."""
        entry = (
            DeadLetter.from_exception(
                error if error is not None else NeverRanError(reason),
                entry_id=message.task_id,
                task_name=message.task_name,
                func_ref=message.func_ref,
                payload=message.payload,
                serializer=message.serializer,
                reason=reason,
                attempts=0,
                category=(
                    self.classify(error) if error is not None else ErrorCategory.SYSTEM
                ).value,
                route=message.route,
            ).replace(signature=message.signature)
            if self.dead_letters is not None
            else None
        )
        stored = self._dead_letter_unrun(entry, message.task_name, reason, error)
        if message.durable and stored is not None and self.store is not None:
            try:
                self.store.journal_remove(message.task_id)
            except Exception:  # recovery re-sends it; its consumer refuses it again
                log.exception("journal row of a dead-lettered message not removed")
        return stored

    def _dead_letter_unrun(
        self,
        entry: DeadLetter | None,
        task_name: str,
        reason: DeadLetterReason,
        error: BaseException | None,
    ) -> DeadLetter | None:
        stored = entry is not None and self.dead_letters is not None and self.dead_letters.put(
            entry
        )
        fields: dict[str, Any] = {
            "task_name": task_name,
            "reason": reason.value,
            "error_type": error_type(error) if error is not None else None,
        }
        if stored and entry is not None:
            self.instruments.dlq_moves.add(
                1, {attr.TASK_NAME: task_name, attr.DLQ_REASON: reason.value}
            )
            log.warning(
                "background task dead-lettered without running",
                task_id=entry.id,
                route=entry.route,
                **fields,
            )
            return entry
        self.instruments.skipped.add(1, {attr.TASK_NAME: task_name, attr.SKIP_REASON: reason.value})
        log.error(
            "background task never ran and could not be dead-lettered",
            task_id=entry.id if entry is not None else None,
            hint="no dead-letter store: configure dead_letter_store= to keep such tasks",
            **fields,
        )
        return None

    # -- across processes (a remote dispatcher and its worker) ------------------------------

    def message_for(self, state: TaskCallState, route: str) -> TaskMessage:
        """The signed message a remote dispatcher publishes for `state` (encoded at
        scheduling): the call, the task id, the wall-clock enqueue time, `route`, the trace
        context of the current span (the producer's ``send`` span, else the scheduling
        span) and whether its journal row travels with it."""
        call = state.call
        if call is None:  # scheduled before its dispatcher was known to be remote
            call = state.call = encode_call(
                self.serializer, state.func, state.args, state.kwargs, task_name=state.name
            )
        current = trace.get_current_span().get_span_context()
        return TaskMessage(
            task_id=state.task_id,
            task_name=state.name,
            func_ref=call.func_ref,
            payload=call.payload,
            serializer=call.serializer,
            route=route,
            enqueued_at=state.enqueued_wall,
            traceparent=to_traceparent(current if current.is_valid else state.link),
            durable=state.journaled,
        ).signed()

    def message_from_call(
        self,
        call: DeadLetter | JournalEntry,
        *,
        task_id: str,
        route: str,
        durable: bool,
        enqueued_at: float | None = None,
    ) -> TaskMessage:
        """The signed message a remote dispatcher's `resend` publishes for a stored call (a
        journal row past its deadline, a dead letter replayed to its route), after checking
        it as a replay does: its signature (with a key set), its function among the app's
        registered tasks, its serializer. A store row is untrusted: this process never signs
        a message for a call it would not run itself.

        Args:
            enqueued_at: wall-clock enqueue time (default: the row's, for a journal row;
                now for a dead letter).

        Raises:
            UntrustedEntryError, TaskImportError, NotReplayableError, LookupError: as
                `check_replayable`; nothing is published.
        """
        check_replayable(call)
        if enqueued_at is None:
            enqueued_at = call.enqueued_at if isinstance(call, JournalEntry) else time.time()
        return TaskMessage(
            task_id=task_id,
            task_name=call.task_name,
            func_ref=call.func_ref,
            payload=call.payload,
            serializer=call.serializer,
            route=route,
            enqueued_at=enqueued_at,
            traceparent=to_traceparent(from_hex(call.trace_id, call.span_id)),
            durable=durable,
        ).signed()

    def receive(
        self, message: TaskMessage, *, attributes: Mapping[str, AttributeValue] | None = None
    ) -> TaskCallState:
        """The task a message received from another process runs as here (any process: no
        `instrument()` call needed): signature verified, function looked up among the app's
        registered tasks, call decoded once; the ORIGINAL task id; `bgtasks.task.wait` from
        the message's wall-clock enqueue time (the broker wait); linked to (or, trace mode
        ``child``, a child of) the producer's span; `attributes` (e.g. ``messaging.*``)
        added to its span. A durable message's journal row is removed when the task ends.
        Then ``await executor.run(state)``, exactly as in-process.

        Raises:
            UntrustedEntryError: unsigned or tampered while a signing key is set, or not a
                registered task (nothing was imported or decoded).
            TaskImportError: no function reference.
            CorruptEntryError: the call cannot be decoded here (unknown serializer, bad
                payload, kept for inspection only).
            The caller dead-letters the message as ``refused`` (`dead_letter_message`).
        """
        try:
            func, args, kwargs = decode_call(message)
        except (UntrustedEntryError, TaskImportError):
            raise
        except (LookupError, ValueError) as exc:
            raise CorruptEntryError(message.task_id, f"{type(exc).__name__}: {exc}") from exc
        state = self.prepare(
            func,
            args,
            kwargs,
            message.link(),
            task_id=message.task_id,
            enqueued_wall=message.enqueued_at,
        )
        state.call = EncodedCall(message.func_ref, message.payload, message.serializer)
        state.origin = Origin(message.route, dict(attributes or {}))
        if message.durable and self.journal is not None:
            state.journaled = True  # the row is the route's: removed when the task ends
        return state

    def active_counts(self) -> dict[str, int]:
        """Tasks running now by task name (`Accounting.active_counts`)."""
        return self.accounting.active_counts()

    def pending_counts(self) -> dict[str, int]:
        """Tasks scheduled and not started by task name (`Accounting.pending_counts`)."""
        return self.accounting.pending_counts()

    def pending_count(self) -> int:
        """Tasks scheduled and not started yet."""
        return len(self._unstarted)

    def is_pending(self, state: TaskCallState) -> bool:
        """`state` was scheduled here and has not started (nor been skipped)."""
        return state.task_id in self._unstarted

    def report_pending(self, *, sample: int = 5) -> None:
        """Log one summary of the tasks still scheduled or running (`Accounting`)."""
        self.accounting.report_pending(sample=sample)

    # -- shutdown ---------------------------------------------------------------------------

    def flush_store(self) -> None:
        """At shutdown: let the journal's queued writes finish, then flush the store's buffer
        within a bounded time, logging whole what it could not write (never silently)."""
        if self.journal is not None:
            self.journal.close()
        if self.store is not None:
            try:
                self.store.flush_or_log()
            except Exception:  # shutdown goes on; the buffer logs what it holds
                log.exception("dead-letter buffer flush at shutdown failed")

    def close(self) -> None:
        """Detach from breakers, flush the store's buffer and report tasks that never
        finished (never silently)."""
        self.flush_store()
        self.breakers.detach()
        self.report_pending()

    # -- running ----------------------------------------------------------------------------

    async def run(
        self, state: TaskCallState, *, inline: bool = False, dead_letter: bool = True
    ) -> TaskCallState:
        """Run one scheduled task to its final outcome; returns its state.

        Args:
            inline: call a sync function on this thread instead of the thread pool (used when
                the caller already is a worker thread).
            dead_letter: move a final failure to the dead-letter store (replays do not).

        Raises:
            Exception: the task's final error, only when `propagate_exceptions` is set.
        """
        clock = self.clock  # a local: cheaper to call than the attribute (instruction counts)
        started = clock()
        wait = started - state.enqueued_at
        self._unstarted.discard(state.task_id)  # no longer pending (`bgtasks.task.pending`)
        name = state.name
        link = state.link
        if self.trace_mode == "child" and link is not None and not state.replay:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(link))
        else:
            parent = otel_context.Context()  # a new trace, joined to the request by the link
        span = self.tracer.start_span(
            attr.SPAN_NAME_PREFIX + name,
            context=parent,
            kind=_CONSUMER,
            links=[Link(link)] if link is not None else None,
            attributes={
                attr.TASK_NAME: name,
                attr.TASK_ID: state.task_id,
                attr.CODE_FUNCTION_NAME: state.function,
                attr.TASK_WAIT: wait,
            }
            if state.origin is None
            else _received_attributes(state, wait),
        )
        span_context = trace.set_span_in_context(span)
        # Recorded in the task span's context: exemplars point at the task's trace.
        self.instruments.wait.record(wait, {attr.TASK_NAME: name}, span_context)
        # Running from here to `_finish` (`bgtasks.task.active`); replays are not scheduled.
        state.started_at = started
        self.inflight[state.task_id] = state
        if name not in self._ran:
            self._ran.add(name)
        token = otel_context.attach(span_context)
        task_token = _current.set(state)
        if self.start_hook is not None:
            call_hook(self.start_hook, span, state)
        options = state.options
        error: BaseException | None = None
        try:
            try:
                if options.breaker is None and options.timeout is None:
                    # The common case, and every retry policy's first attempt: no layer between
                    # the span and the task (`_attempt` for a breaker or a timeout).
                    state.attempt += 1
                    if state.is_async:
                        await state.func(*state.args, **state.kwargs)
                    else:
                        await self._invoke(state, inline)
                else:
                    await self._attempt(state, span, options.breaker, options.timeout, inline)
            except Exception as first:
                if options.retry is None:
                    raise
                await self._retry(state, span, options.retry, first, inline)
            state.outcome = _SUCCESS
        except Exception as exc:
            error = exc
            await self._fail(state, span, exc, dead_letter)
        except BaseException as exc:  # cancelled (any backend): the server is shutting down
            error = exc
            state.exception = exc
            state.outcome = Outcome.FAILURE
        finally:
            _current.reset(task_token)
            otel_context.detach(token)
            self._finish(span, span_context, state, started)
        if error is not None and (self.propagate_exceptions or not isinstance(error, Exception)):
            raise error
        if error is not None:
            release_frames(error, inspect.currentframe())
        return state

    async def _retry(
        self,
        state: TaskCallState,
        span: Span,
        policy: RetryPolicy,
        first: Exception,
        inline: bool,
    ) -> None:
        breaker, timeout = state.options.breaker, state.options.timeout

        def before_sleep(retry_state: RetryCallState) -> None:
            failure = retry_state.outcome.exception() if retry_state.outcome else None
            delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
            kind = error_type(failure) if failure is not None else "unknown"
            if span.is_recording():
                span.add_event(
                    attr.EVENT_RETRY,
                    {
                        attr.RETRY_ATTEMPT: retry_state.attempt_number + 1,
                        attr.RETRY_DELAY: delay,
                        attr.ERROR_TYPE: kind,
                        attr.EXCEPTION_MESSAGE: self.failures.message(failure),
                    },
                )
            self.instruments.retries.add(1, {attr.TASK_NAME: state.name, attr.ERROR_TYPE: kind})

        pending: Exception | None = first
        # tenacity drives the whole loop and alone decides "again?"; the first attempt (already
        # run by `run`, outside it so a successful task pays nothing for the policy) is its
        # attempt 1.
        async for attempt in policy.retrying(before_sleep):
            with attempt:
                if pending is not None:
                    failed, pending = pending, None
                    raise failed
                await self._attempt(state, span, breaker, timeout, inline)

    async def _attempt(
        self,
        state: TaskCallState,
        span: Span,
        breaker: CircuitBreaker | None,
        timeout: float | None,
        inline: bool,
    ) -> None:
        allowed = True
        if breaker is not None:
            allowed = await breaker.allow_async()
            if breaker.blocking:  # shared state: another replica may have changed it
                self.breakers.observed(breaker)
        if breaker is not None and not allowed:
            if span.is_recording():
                span.add_event(attr.EVENT_CIRCUIT_REJECTED, {attr.CIRCUIT_NAME: breaker.key})
            raise CircuitOpenError(
                f"circuit {breaker.key!r} is open; the task was not run (see the dead letters)",
                circuit=breaker.key,
            )
        state.attempt += 1
        try:
            if timeout is not None:
                await self._invoke_with_timeout(state, span, timeout, inline)
            else:
                await self._invoke(state, inline)
        except Exception as exc:
            if breaker is not None and self.classify(exc) not in _NOT_BREAKER_FAILURES:
                # a task counts once, however many attempts (failure_threshold counts tasks)
                await breaker.record_failure_async(retry=state.attempt > 1)
            elif breaker is not None:
                await breaker.record_success_async()  # the downstream answered; the input was bad
            raise
        if breaker is not None:
            await breaker.record_success_async()

    async def _invoke_with_timeout(
        self, state: TaskCallState, span: Span, timeout: float, inline: bool
    ) -> None:
        if state.is_async:
            # anyio's scope: asyncio or trio, whichever runs the app
            with anyio.move_on_after(timeout) as scope:
                await state.func(*state.args, **state.kwargs)
            if scope.cancelled_caught:
                if span.is_recording():
                    span.add_event(
                        attr.EVENT_TIMEOUT,
                        {attr.RETRY_ATTEMPT: state.attempt, "bgtasks.timeout.seconds": timeout},
                    )
                raise TaskTimeoutError(
                    f"task {state.name!r} attempt {state.attempt} exceeded its {timeout}s timeout"
                )
            return
        # A thread cannot be killed: a sync task runs to its end and the overrun is reported.
        begin = self.clock()
        try:
            await self._invoke(state, inline)
        finally:
            elapsed = self.clock() - begin
            if elapsed > timeout and span.is_recording():
                span.add_event(
                    attr.EVENT_TIMEOUT,
                    {
                        attr.RETRY_ATTEMPT: state.attempt,
                        "bgtasks.timeout.seconds": timeout,
                        "bgtasks.timeout.elapsed": elapsed,
                    },
                )

    async def _invoke(self, state: TaskCallState, inline: bool) -> None:
        if state.is_async:
            await state.func(*state.args, **state.kwargs)
            return
        if inline:
            result = state.func(*state.args, **state.kwargs)
        else:
            result = await run_in_threadpool(state.func, *state.args, **state.kwargs)
        if isinstance(result, Awaitable):  # a sync callable that returned a coroutine
            await result

    # -- failure and the end ----------------------------------------------------------------

    async def _fail(
        self, state: TaskCallState, span: Span, exc: Exception, dead_letter: bool
    ) -> None:
        state.exception = exc
        category = state.category = self.classify(exc)
        if isinstance(exc, CircuitOpenError):
            outcome, reason = Outcome.REJECTED, DeadLetterReason.CIRCUIT_OPEN
        elif isinstance(exc, TaskTimeoutError):
            outcome, reason = Outcome.TIMEOUT, DeadLetterReason.TIMEOUT
        else:
            outcome = Outcome.FAILURE
            policy = state.options.retry or _TRANSIENT
            retryable = policy.retries(exc, attempt=state.attempt)
            reason = DeadLetterReason.EXHAUSTED if retryable else DeadLetterReason.PERMANENT
        state.reason = reason
        writer = self.dead_letters
        if dead_letter and writer is not None:
            entry = writer.entry(state, span, exc, category, reason)
            stored = await run_in_threadpool(writer.put, entry)
            if stored:
                state.dead_letter_id = entry.id
                if outcome is Outcome.FAILURE:
                    outcome = Outcome.DEAD_LETTERED
                if span.is_recording():
                    span.add_event(
                        attr.EVENT_DLQ_MOVED, {attr.DLQ_ENTRY_ID: entry.id, attr.DLQ_REASON: reason}
                    )
                self.instruments.dlq_moves.add(
                    1, {attr.TASK_NAME: state.name, attr.DLQ_REASON: reason.value}
                )
        state.outcome = outcome
        if span.is_recording():
            span.set_attribute(attr.ERROR_CATEGORY, category.value)

    def _finish(
        self,
        span: Span,
        span_context: otel_context.Context,
        state: TaskCallState,
        started: float,
    ) -> None:
        clock = self.clock
        duration = clock() - started
        outcome = state.outcome or _FAILURE
        exc = state.exception
        value = _OUTCOME_VALUE[outcome]
        result_attrs = {attr.TASK_NAME: state.name, attr.TASK_OUTCOME: value}
        kind = error_type(exc) if outcome is not _SUCCESS and exc is not None else None
        if kind is not None:
            result_attrs[attr.ERROR_TYPE] = kind
        self.instruments.duration.record(duration, result_attrs, span_context)
        if span.is_recording():
            # Two set_attribute calls: set_attributes costs more (its mapping goes through the
            # SDK's Sequence/Mapping checks), about 25k instructions against 20k.
            span.set_attribute(attr.TASK_ATTEMPTS, state.attempt)
            span.set_attribute(attr.TASK_OUTCOME, value)
            if outcome is not _SUCCESS:
                if exc is not None and kind is not None:
                    span.set_attribute(attr.ERROR_TYPE, kind)
                    self.failures.record_exception(span, exc)
                    description = f"{type(exc).__name__}: {self.failures.message(exc)}"
                else:
                    description = outcome.value
                span.set_status(Status(StatusCode.ERROR, description))
        if self.end_hook is not None:
            call_hook(self.end_hook, span, state)
        span.end()
        self.inflight.pop(state.task_id, None)
        if state.journaled and self.journal is not None:
            # cancelled (shutdown; asyncio's or trio's): the row stays for recovery
            self.journal.finished(
                state, keep=exc is not None and not isinstance(exc, Exception)
            )
        if outcome is not _SUCCESS:
            self.failures.report(span, state, outcome, exc)
