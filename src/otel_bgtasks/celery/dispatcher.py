"""`CeleryDispatcher`: the dispatch seam's remote engine for Celery (the web side).

    to_celery = CeleryDispatcher(celery_app, queue="bgtasks")

    @background_task(name="charge-card", dispatch=to_celery, durable=True, timeout=20)
    async def charge_card(order_id: str) -> None: ...

Tasks handed to it are encoded at scheduling (bad arguments raise in the endpoint), then, at
the end of the response, queued in a bounded outbox (`max_backlog`) that one thread publishes
from: the event loop never waits on the broker. Each publish attempt is bounded by
`publish_timeout` (socket timeouts of a connection of our own); a task not published within
`publish_deadline` seconds, or refused by a full outbox, is dead-lettered as
``undeliverable`` (a durable task instead stays journaled, handed to this route, and is re-sent
by recovery once the broker is back). A published task leaves this process (`hand_off`): a
durable task's journal row moves to the route with a deadline (the broker's visibility
timeout), after which recovery re-sends it if no worker finished it.

Signals: one PRODUCER span ``send {task}`` per message, child of the scheduling span, with
the messaging conventions (``messaging.system`` is the broker, e.g. ``redis``); metrics
``messaging.client.operation.duration`` and ``messaging.client.sent.messages`` per attempt,
``bgtasks.dispatch.backlog`` for what waits in the outbox.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from celery import Celery
from kombu import Connection
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Observation
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otel_bgtasks import attributes as attr
from otel_bgtasks._execution import Executor
from otel_bgtasks._ids import from_hex
from otel_bgtasks.calls import StoredCall
from otel_bgtasks.celery._outbox import Outbox
from otel_bgtasks.celery._transport import (
    messaging_system,
    publisher_connection,
    visibility_timeout,
)
from otel_bgtasks.celery._upstream import filter_upstream
from otel_bgtasks.celery._wire import (
    HEADER,
    MAX_DELIVERIES_LIMIT,
    RUN_TASK,
    Body,
    Header,
)
from otel_bgtasks.errors import ConfigurationError, UndeliverableError, error_type
from otel_bgtasks.options import EffectiveOptions
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry, TaskMessage
from otel_bgtasks.routes import dispatcher_for, register_dispatcher, unregister_dispatcher
from otel_bgtasks.state import TaskCallState

__all__ = ["DEFAULT_HAND_OFF_LEASE", "CeleryDispatcher"]

DEFAULT_HAND_OFF_LEASE = 3600.0
"""Seconds a handed-off durable row waits for its worker before recovery re-sends it, when
the broker has no visibility timeout (AMQP)."""

_log = structlog.get_logger("otel_bgtasks")
_propagator = TraceContextTextMapPropagator()


def _positive(name: str, value: object, *, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"CeleryDispatcher({name}={value!r}): must be a number")
    if integer and not isinstance(value, int):
        raise ConfigurationError(f"CeleryDispatcher({name}={value!r}): must be an integer")
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"CeleryDispatcher({name}={value!r}): must be > 0 and finite")
    return value


@dataclass(slots=True, eq=False)
class _Outgoing:
    """One task on its way to the broker."""

    executor: Executor
    state: TaskCallState
    span: Span | None = None
    attempts: int = 0
    first_attempt: float = field(default=0.0)


class CeleryDispatcher:
    """Sends background tasks to Celery workers (run there by `install_worker`).

    Args:
        celery_app: the Celery app whose broker carries the tasks.
        queue: the Celery queue (``celery worker -Q <queue>``); the route is
            ``celery:<queue>`` (stored on journal rows and dead letters).
        publish_timeout: seconds one publish attempt may take (connect, write, read).
        publish_deadline: seconds a task may wait to be published before it is
            dead-lettered as ``undeliverable`` (durable: left to recovery).
        max_backlog: tasks waiting to be published at most; beyond it, a task is not queued
            (dead-lettered as ``undeliverable``; durable: left to recovery).
        max_deliveries: deliveries of one message to a worker (redeliveries after a lost
            worker) before it is dead-lettered as ``worker_lost``.

    Raises:
        ConfigurationError: a value out of range, or a queue name that is not a plain name.
    """

    name = "celery"
    remote = True

    def __init__(
        self,
        celery_app: Celery,
        *,
        queue: str = "bgtasks",
        publish_timeout: float = 1.0,
        publish_deadline: float = 30.0,
        max_backlog: int = 10_000,
        max_deliveries: int = 5,
    ) -> None:
        if not isinstance(celery_app, Celery):
            raise ConfigurationError(
                f"CeleryDispatcher({celery_app!r}): pass the Celery app (celery.Celery)"
            )
        if not isinstance(queue, str) or not queue.strip() or len(queue) > 200:
            raise ConfigurationError(f"CeleryDispatcher(queue={queue!r}): a non-empty queue name")
        self.app = celery_app
        self.queue = queue
        self.publish_timeout = float(_positive("publish_timeout", publish_timeout))
        self.publish_deadline = float(_positive("publish_deadline", publish_deadline))
        self.max_backlog = int(_positive("max_backlog", max_backlog, integer=True))
        self.max_deliveries = int(_positive("max_deliveries", max_deliveries, integer=True))
        if self.max_deliveries > MAX_DELIVERIES_LIMIT:
            raise ConfigurationError(
                f"CeleryDispatcher(max_deliveries={max_deliveries!r}): at most"
                f" {MAX_DELIVERIES_LIMIT}"
            )
        if self.publish_timeout > self.publish_deadline:
            raise ConfigurationError(
                f"CeleryDispatcher: publish_timeout={publish_timeout} is longer than"
                f" publish_deadline={publish_deadline}; a task could never be retried"
            )
        self.route = f"celery:{queue}"
        self.system = messaging_system(celery_app)
        self.visibility_timeout = visibility_timeout(celery_app)
        visibility = self.visibility_timeout
        self.lease = visibility if visibility is not None else DEFAULT_HAND_OFF_LEASE
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._producer: Any = None
        self._pid = os.getpid()
        self._outbox: Outbox[_Outgoing] = Outbox(
            self._publish,
            self._unsent,
            capacity=self.max_backlog,
            deadline=self.publish_deadline,
            reset=self._reset,
            backoff=(0.05, min(1.0, self.publish_deadline / 4)),
            name=f"otel-bgtasks-outbox-{queue}",
        )
        self._metered: set[int] = set()
        self._attributes = {
            attr.MESSAGING_SYSTEM: self.system,
            attr.MESSAGING_DESTINATION_NAME: self.queue,
            attr.MESSAGING_OPERATION_NAME: "send",
        }
        filter_upstream(RUN_TASK)
        previous = dispatcher_for(self.route)
        if previous is not None:  # a new dispatcher for the same queue (tests, a reload)
            unregister_dispatcher(previous)
        register_dispatcher(self)

    def __repr__(self) -> str:
        return f"CeleryDispatcher(queue={self.queue!r}, broker={self.system!r})"

    # -- the seam ---------------------------------------------------------------------------

    def check_options(self, options: EffectiveOptions) -> None:
        """A durable task must finish within the broker's visibility timeout, else the broker
        delivers it again while it runs (called once per task function, at its first
        scheduling and on the worker). A durable task without a timeout has no known worst
        case: it is logged once (give it a timeout under the visibility timeout).

        Raises:
            ConfigurationError: a worst case (attempts x timeout + retry delays) longer than
                the visibility timeout; the message names the numbers.
        """
        visibility = self.visibility_timeout
        if not options.durable or visibility is None:
            return
        where = (
            f"durable task {options.name!r} sent to Celery queue {self.queue!r}: the broker"
            f" delivers an unacknowledged message again after visibility_timeout={visibility:g}s"
        )
        if options.timeout is None:
            _log.warning(
                f"{where}, and the task has no timeout: a run longer than that runs twice;"
                " give it timeout= (attempts x timeout + retry delays under the visibility"
                " timeout)",
                task_name=options.name,
            )
            return
        retry = options.retry
        attempts = retry.max_attempts if retry is not None else 1
        max_delay = retry.max_delay if retry is not None else 0.0
        worst = attempts * options.timeout + (attempts - 1) * max_delay
        if worst > visibility:
            raise ConfigurationError(
                f"{where}; its worst-case run is {worst:g}s ({attempts} attempts x timeout"
                f" {options.timeout:g}s + {attempts - 1} retry delays of up to {max_delay:g}s):"
                " lower timeout or retries, or raise"
                " broker_transport_options['visibility_timeout']"
            )

    @property
    def backlog(self) -> int:
        """Tasks handed to this dispatcher and not published yet."""
        return self._outbox.backlog

    def submit(self, executor: Executor, states: Sequence[TaskCallState]) -> None:
        """Queue a response's tasks for publishing (in order); never blocks the event loop."""
        if id(executor) not in self._metered:
            self._metered.add(id(executor))
            executor.instruments.add_backlog_source(self._observe_backlog)
        self._outbox.put_many([_Outgoing(executor, state) for state in states])

    async def drain(self, executor: Executor, timeout: float) -> None:
        """At shutdown: wait up to `timeout` s for the outbox to empty; what is left is
        dead-lettered as undeliverable (durable: left to recovery)."""
        empty = await asyncio.to_thread(self._outbox.join, timeout)
        if not empty:
            left = await asyncio.to_thread(self._outbox.close)
            for item in left:
                self._unsent(item, None)

    def resend(self, executor: Executor, call: StoredCall, *, task_id: str) -> float | None:
        """Publish an already-encoded call now, on this thread (recovery of an expired
        hand-off: durable, counted as a redelivery by the worker; replay of a dead letter
        routed here: not durable, deleted once sent).

        Returns:
            the re-sent row's new deadline (durable), else None.

        Raises:
            UntrustedEntryError, TaskImportError, NotReplayableError, LookupError: the call
                is refused (`Executor.message_from_call`); nothing is published.
            Exception: whatever the broker raised; the caller keeps the row or entry.
        """
        if not isinstance(call, DeadLetter | JournalEntry):
            raise TypeError(f"resend takes a journal row or a dead letter, not {call!r}")
        durable = isinstance(call, JournalEntry)
        # checked as a replay checks it (signature, registered task, serializer): a store
        # row is untrusted, and this process signs the message it publishes
        message = executor.message_from_call(
            call, task_id=task_id, route=self.route, durable=durable, enqueued_at=time.time()
        )
        task_name = message.task_name
        link = _stored_link(call)
        span = executor.tracer.start_span(
            attr.PRODUCER_SPAN_PREFIX + task_name,
            context=otel_context.Context(),
            kind=SpanKind.PRODUCER,
            links=[Link(link)] if link is not None else None,
            attributes=self._span_attributes(task_name, task_id),
        )
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=trace.set_span_in_context(span))
        # the worker's span links to this producer span (itself linked to the original);
        # the trace context is not part of what the signature covers
        message = dataclasses.replace(message, traceparent=carrier.get("traceparent", ""))
        body, header = self._wire(message, resent=durable)
        started = time.perf_counter()
        try:
            self._send(body, header, task_name)
        except Exception as exc:
            self._record_attempt(executor, task_name, started, exc)
            _end_failed(span, exc)
            self._reset()
            raise
        self._record_attempt(executor, task_name, started, None)
        span.end()
        return time.time() + self.lease if durable else None

    # -- publishing (the outbox thread) -----------------------------------------------------

    def _publish(self, item: _Outgoing) -> None:
        state, executor = item.state, item.executor
        span = self._span(item)
        item.attempts += 1
        with trace.use_span(span, end_on_exit=False):  # its trace context goes in the header
            message = executor.message_for(state, self.route)
        body, header = self._wire(message)
        started = time.perf_counter()
        try:
            self._send(body, header, state.name)
        except Exception as exc:
            self._record_attempt(executor, state.name, started, exc)
            if span.is_recording():
                span.add_event(
                    attr.EVENT_PUBLISH_FAILED,
                    {attr.ERROR_TYPE: error_type(exc), "bgtasks.publish.attempt": item.attempts},
                )
            raise
        self._record_attempt(executor, state.name, started, None)
        if span.is_recording() and item.attempts > 1:
            span.set_attribute("bgtasks.publish.attempts", item.attempts)
        span.end()
        executor.hand_off(state, self.route, time.time() + self.lease)

    def _span(self, item: _Outgoing) -> Span:
        """The message's one PRODUCER span, child of the scheduling span (made once)."""
        if item.span is None:
            state = item.state
            link = state.link
            parent = (
                trace.set_span_in_context(NonRecordingSpan(link))
                if link is not None
                else otel_context.Context()
            )
            item.span = item.executor.tracer.start_span(
                attr.PRODUCER_SPAN_PREFIX + state.name,
                context=parent,
                kind=SpanKind.PRODUCER,
                attributes=self._span_attributes(state.name, state.task_id),
            )
        return item.span

    def _unsent(self, item: _Outgoing, error: BaseException | None) -> None:
        """A task that will not be published: past its deadline, or the outbox was full."""
        state, executor = item.state, item.executor
        reason = (
            f"not published within publish_deadline={self.publish_deadline}s"
            f" ({item.attempts} attempts)"
            if error is not None
            else f"the outbox was full (max_backlog={self.max_backlog})"
        )
        failure = UndeliverableError(
            f"task {state.name!r} could not be sent to Celery queue {self.queue!r}: {reason};"
            " check the broker, then replay the dead letter"
        )
        if error is not None:
            failure.__cause__ = error
        _end_failed(self._span(item), failure)
        if state.options.durable:
            # Its row goes to the route, already due: recovery re-sends it when the broker
            # is back; never run here.
            executor.hand_off(state, self.route, time.time())
            _log.warning(
                "durable task not published; left to recovery",
                task_name=state.name,
                task_id=state.task_id,
                queue=self.queue,
                reason=reason,
            )
            return
        executor.dead_letter_unrun(state, DeadLetterReason.UNDELIVERABLE, failure)

    def _wire(self, message: TaskMessage, *, resent: bool = False) -> tuple[Body, Header]:
        """The seam's signed message as our Celery body (the call and its signature, which
        covers the enqueue time and the route too) and our header (trace context, enqueue
        time, task id)."""
        body = Body(
            task_name=message.task_name,
            func_ref=message.func_ref,
            serializer=message.serializer,
            payload=message.payload,
            signature=message.signature,
            durable=message.durable,
            route=message.route,
        )
        header = Header(
            task_id=message.task_id,
            enqueued_at=message.enqueued_at,
            traceparent=message.traceparent,
            max_deliveries=self.max_deliveries,
            resent=resent,
        )
        return body, header

    def _send(self, body: Body, header: Header, task_name: str) -> None:
        with self._lock:
            if self._producer is None or self._pid != os.getpid():
                # (again) in this process: a connection made before a fork is the parent's
                self._connection = publisher_connection(self.app, self.publish_timeout)
                self._producer = self._connection.Producer()
                self._pid = os.getpid()
            self.app.send_task(
                RUN_TASK,
                args=(body.to_json(),),
                task_id=header.task_id,
                shadow=task_name,
                queue=self.queue,
                headers={HEADER: header.to_json()},
                serializer="json",
                retry=False,
                ignore_result=True,
                producer=self._producer,
            )

    def _reset(self) -> None:
        with self._lock:
            connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            connection.release()

    def _record_attempt(
        self, executor: Executor, task_name: str, started: float, error: BaseException | None
    ) -> None:
        attributes: dict[str, str] = {**self._attributes, attr.TASK_NAME: task_name}
        if error is not None:
            attributes[attr.ERROR_TYPE] = error_type(error)
        instruments = executor.instruments
        instruments.publish_duration.record(time.perf_counter() - started, attributes)
        instruments.sent_messages.add(1, attributes)

    def _span_attributes(self, task_name: str, task_id: str) -> dict[str, Any]:
        return {
            **self._attributes,
            attr.MESSAGING_OPERATION_TYPE: "send",
            attr.MESSAGING_MESSAGE_ID: task_id,
            attr.TASK_NAME: task_name,
            attr.TASK_ID: task_id,
        }

    def _observe_backlog(self) -> list[Observation]:
        return [
            Observation(
                self._outbox.backlog,
                {attr.MESSAGING_SYSTEM: self.system, attr.MESSAGING_DESTINATION_NAME: self.queue},
            )
        ]

    def close(self) -> None:
        """Stop the outbox thread (tasks still waiting are dead-lettered) and the connection."""
        for item in self._outbox.close():
            self._unsent(item, None)
        self._reset()
        unregister_dispatcher(self)


def _stored_link(call: StoredCall) -> SpanContext | None:
    """The original task's span, for a re-sent call's producer span to link to."""
    trace_id = getattr(call, "trace_id", "")
    span_id = getattr(call, "span_id", "")
    try:
        return from_hex(trace_id, span_id)
    except ValueError:
        return None


def _end_failed(span: Span, exc: BaseException) -> None:
    if span.is_recording():
        span.set_attribute(attr.ERROR_TYPE, error_type(exc))
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    span.end()
