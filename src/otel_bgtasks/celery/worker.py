"""`install_worker`: run the tasks `CeleryDispatcher` sends, in Celery workers, through the
same executor, policies, signals and dead letters as in the web process.

    # the worker's module: celery -A shop.worker worker -Q bgtasks
    install_worker(celery_app, dead_letter_store="redis://store:6379/1")  # + instrument() keywords

It registers the Celery task ``otel_bgtasks.run`` (late acknowledgement, reject on worker
loss) and, per worker process (each prefork child, after the fork):

- telemetry: the global providers when the process has them (``opentelemetry-instrument``,
  or a ``worker_process_init`` handler of the app), otherwise `configure_telemetry()` from the
  ``OTEL_*`` variables; flushed when the child exits (``worker_process_shutdown``);
- one executor built from the given keywords, one dead-letter store connection, one event
  loop on which async task functions run (not a new loop per task);
- for each message: the header and body are checked (bounded; a malformed message is
  dead-lettered as ``refused``), the delivery counted (past ``max_deliveries``: dead-lettered
  as ``worker_lost``; a task that is not durable is dead-lettered at its first redelivery: at
  most once), a durable task's journal row claimed for this worker (none left: the task
  already ran, this copy is dropped), then the task runs as `Executor.run` runs it anywhere:
  one CONSUMER span ``process {task}`` linked to the producer span, with the messaging
  attributes, retries, breaker, timeout and dead letters; the row is removed when it ends.

Upstream's Celery instrumentation, when on, is filtered out for this task only: one producer
and one consumer span per message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from celery import Celery, Task, signals
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue

from otel_bgtasks import attributes as attr
from otel_bgtasks._execution import Executor, call_hook, set_active_executor
from otel_bgtasks._tracebacks import exception_fields
from otel_bgtasks._version import __version__
from otel_bgtasks.calls import UNREPLAYABLE
from otel_bgtasks.celery._deliveries import DeliveryCounter
from otel_bgtasks.celery._transport import messaging_system, visibility_timeout
from otel_bgtasks.celery._upstream import filter_upstream
from otel_bgtasks.celery._wire import (
    RUN_TASK,
    Body,
    Header,
    MessageError,
    decode_body,
    decode_header,
)
from otel_bgtasks.celery.dispatcher import DEFAULT_HAND_OFF_LEASE
from otel_bgtasks.config import Settings, resolve_settings
from otel_bgtasks.errors import (
    ConfigurationError,
    CorruptEntryError,
    TaskImportError,
    UntrustedEntryError,
    WorkerLostError,
)
from otel_bgtasks.identity import process_identity
from otel_bgtasks.records import DeadLetterReason, TaskMessage, route_owner
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.stores.base import DeadLetterStore
from otel_bgtasks.telemetry import Telemetry, configure_telemetry

__all__ = ["WorkerRuntime", "install_worker"]

_log = structlog.get_logger("otel_bgtasks")
_MAX_ID = 64
DEFAULT_MAX_DELIVERIES = 5
# What `Executor.receive` raises for a message it refuses (nothing of it ran or was imported);
# ConfigurationError: the task's options do not fit this broker (`check_options`).
REFUSED_ERRORS = (UntrustedEntryError, TaskImportError, CorruptEntryError, ConfigurationError)


def _short_id(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text[:_MAX_ID]


@dataclass(slots=True, eq=False)
class _Child:
    """What one worker process runs tasks with."""

    pid: int
    executor: Executor
    loop: asyncio.AbstractEventLoop
    counter: DeliveryCounter
    telemetry: Telemetry | None  # ours to shut down (None: the process's own providers)
    store: DeadLetterStore | None  # opened here from a URL: ours to close


class WorkerRuntime:
    """The worker side of one Celery app (`install_worker` returns it)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.system = messaging_system(app)
        visibility = visibility_timeout(app)
        self.lease = visibility if visibility is not None else DEFAULT_HAND_OFF_LEASE
        # Every child of one worker claims durable rows as the worker: a message requeued
        # after its child was killed is claimed again by a sibling at once.
        self.node = f"{process_identity()}/celery"
        self._child: _Child | None = None
        self._lock = threading.Lock()
        self._redelivered: dict[str, int] = {}  # task id -> delivery number, for the span
        self._user_start_hook = settings.start_hook

    # -- per process ------------------------------------------------------------------------

    def child(self) -> _Child:
        """This process's runtime, made at the first call after a fork."""
        child = self._child
        pid = os.getpid()
        if child is not None and child.pid == pid:
            return child
        with self._lock:
            child = self._child
            if child is None or child.pid != pid:
                child = self._child = self._start(pid)
        return child

    def _start(self, pid: int) -> _Child:
        settings = self.settings
        telemetry: Telemetry | None = None
        if settings.tracer_provider is None and settings.meter_provider is None:
            tracer_set = isinstance(trace.get_tracer_provider(), SDKTracerProvider)
            meter_set = isinstance(metrics.get_meter_provider(), SDKMeterProvider)
            if not (tracer_set and meter_set):
                # after the fork: its own service.instance.id, its own export threads
                telemetry = configure_telemetry(service_name="celery-worker")
        executor, owned = _build_executor(
            dataclasses.replace(settings, start_hook=self._start_hook, dispatch="inline")
        )
        set_active_executor(executor)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        return _Child(pid, executor, loop, DeliveryCounter(self.app), telemetry, owned)

    def stop(self) -> None:
        """This process is exiting: flush the store, the journal and telemetry."""
        child = self._child
        if child is None or child.pid != os.getpid():
            return
        self._child = None
        try:
            child.executor.close()
        except Exception:
            _log.error("worker executor close failed", **exception_fields())
        set_active_executor(None)
        child.counter.close()
        child.loop.close()
        if child.store is not None:
            child.store.close()
        if child.telemetry is not None:
            child.telemetry.shutdown()
        else:
            for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
                flush = getattr(provider, "force_flush", None)
                if flush is not None:
                    flush()

    def _start_hook(self, span: Span, state: TaskCallState) -> None:
        deliveries = self._redelivered.pop(state.task_id, None)
        if deliveries is not None and span.is_recording():
            span.add_event(attr.EVENT_REDELIVERED, {attr.MESSAGE_DELIVERIES: deliveries})
        call_hook(self._user_start_hook, span, state)

    # -- one message ------------------------------------------------------------------------

    def handle(self, request: Any, args: Any) -> None:
        """Run one message of ``otel_bgtasks.run`` (the Celery task's body); never raises for
        what the task or the message did: the message is then acknowledged."""
        child = self.child()
        executor = child.executor
        task_id = _short_id(getattr(request, "id", ""))
        try:
            header = decode_header(task_id, getattr(request, "headers", None))
            body = decode_body(task_id, args)
        except MessageError as exc:
            self._refuse_malformed(executor, task_id, request, exc)
            return
        delivery = getattr(request, "delivery_info", None) or {}
        headers = getattr(request, "headers", None) or {}
        redelivered = bool(
            delivery.get("redelivered")
            or headers.get("redelivered")
            or (getattr(request, "retries", 0) or 0) > 0
            or header.resent
        )
        attributes: dict[str, AttributeValue] = {
            attr.MESSAGING_SYSTEM: self.system,
            attr.MESSAGING_DESTINATION_NAME: str(delivery.get("routing_key") or "")[:200],
            attr.MESSAGING_OPERATION_TYPE: "process",
            attr.MESSAGING_MESSAGE_ID: task_id,
            attr.MESSAGING_CLIENT_ID: str(getattr(request, "hostname", "") or "")[:200],
        }
        try:
            message = _message(header, body)
        except ValueError as exc:
            self._refuse_malformed(executor, task_id, request, MessageError(task_id, str(exc)))
            return
        try:
            state = executor.receive(message, attributes=attributes)
        except REFUSED_ERRORS as exc:
            executor.dead_letter_message(message, DeadLetterReason.REFUSED, exc)
            return
        # A durable copy whose row is gone (it ran) or held by another worker: dropped,
        # before it counts as a delivery.
        if body.durable and not self._claim(executor, state, first=not redelivered):
            return
        deliveries = child.counter.count(task_id, redelivered)
        origin = state.origin
        if origin is not None:  # the delivery count, known once the copy is ours to run
            state.origin = dataclasses.replace(
                origin, attributes={**origin.attributes, attr.MESSAGE_DELIVERIES: deliveries}
            )
        max_deliveries = header.max_deliveries or DEFAULT_MAX_DELIVERIES
        if deliveries > max_deliveries or (redelivered and not body.durable):
            why = (
                f"delivered {deliveries} times (max_deliveries={max_deliveries}): its worker"
                " was lost each time"
                if body.durable
                else "its worker was lost while it ran (not durable: at most once)"
            )
            # never became a task here (`receive` does not schedule): dead-lettered as the
            # message it is, its journal row removed
            lost = WorkerLostError(why)
            executor.dead_letter_message(message, DeadLetterReason.WORKER_LOST, lost)
            if deliveries > 1:
                child.counter.forget(task_id)
            return
        if deliveries > 1:
            self._redelivered[task_id] = deliveries
        try:
            child.loop.run_until_complete(executor.run(state, inline=True))
        finally:
            self._redelivered.pop(task_id, None)
            if deliveries > 1:
                child.counter.forget(task_id)

    def _claim(self, executor: Executor, state: TaskCallState, *, first: bool) -> bool:
        """Claim a durable task's journal row for this worker. False: this copy is a
        duplicate (the row is gone: the task ran already; or another worker holds it).

        On a first delivery the row must be there (it was committed before the message was
        published): when it is missing, this worker's store is not the web app's. The task
        then runs (nothing is lost), with an error naming the fix; its row in the other store
        stays, and the copy recovery re-sends later is dropped as a duplicate."""
        store = executor.store
        if store is None:
            self._misconfigured(state, "has no dead_letter_store")
            return True
        row = store.journal_claim(state.task_id, self.node, lease=self.lease)
        if row is not None:
            return True
        route = state.origin.route if state.origin is not None else ""
        if first and not store.journal_list(owner=route_owner(route)):
            self._misconfigured(state, "holds no journal row of this route")
            return True
        _log.warning(
            "duplicate delivery of a durable task dropped (it ran already, or another worker"
            " runs it)",
            task_name=state.name,
            task_id=state.task_id,
        )
        return False

    def _misconfigured(self, state: TaskCallState, why: str) -> None:
        _log.error(
            f"durable task received, but this worker's store {why}: give install_worker the"
            " web app's dead_letter_store, or the task's row is never removed",
            task_name=state.name,
            task_id=state.task_id,
        )

    def _refuse_malformed(
        self, executor: Executor, task_id: str, request: Any, exc: MessageError
    ) -> None:
        shadow = getattr(request, "shadow", None)
        name = shadow[:200] if isinstance(shadow, str) and shadow else RUN_TASK
        # kept for inspection only: no call to replay
        unreadable = TaskMessage(
            task_id=task_id or uuid.uuid4().hex,
            task_name=name,
            func_ref="",
            payload=json.dumps({"unreplayable": exc.reason[:500]}),
            route="",
            enqueued_at=time.time(),
            serializer=UNREPLAYABLE,
        )
        executor.dead_letter_message(unreadable, DeadLetterReason.REFUSED, exc)


def _message(header: Header, body: Body) -> TaskMessage:
    """The seam's message from our header and body (both checked already).

    Raises:
        ValueError: the traceparent is not a valid W3C one.
    """
    return TaskMessage(
        task_id=header.task_id,
        task_name=body.task_name,
        func_ref=body.func_ref,
        payload=body.payload,
        route=body.route,
        enqueued_at=header.enqueued_at,
        serializer=body.serializer,
        traceparent=header.traceparent,
        durable=body.durable,
        signature=body.signature,
    )


def _build_executor(settings: Settings) -> tuple[Executor, DeadLetterStore | None]:
    """This process's executor on the worker's settings (the same `Settings` as
    `instrument()`'s); returns it and the store it opened from a URL (ours to close)."""
    store, opened = settings.open_store()
    try:
        executor = Executor.from_settings(
            settings, store, scope="otel_bgtasks", version=__version__
        )
    except Exception:
        if opened and store is not None:
            store.close()
        raise
    return executor, store if opened else None


def install_worker(celery_app: Celery, **instrument_keywords: Any) -> WorkerRuntime:
    """Run background tasks sent by `CeleryDispatcher` in this Celery app's workers.

    Call it in the module the worker imports (``celery -A module worker``). Keywords are
    those of ``BackgroundTasksInstrumentor().instrument()`` (``dead_letter_store``, ``retry``,
    ``trace_mode``, ...): pass a store URL, opened in each worker process after the fork.

    Raises:
        TypeError: an unknown keyword.
        ConfigurationError: a bad value (checked here, before the worker forks).
    """
    for key in ("dispatch", "max_concurrency", "max_queued", "drain_timeout"):
        if key in instrument_keywords:
            raise TypeError(f"install_worker({key}=...): a worker runs tasks, it does not dispatch")
    # checked now, in the main process, before the worker forks (a child applies them)
    settings = resolve_settings(instrument_keywords)
    runtime = WorkerRuntime(celery_app, settings)

    def run(self: Task, *args: Any, **kwargs: Any) -> None:
        runtime.handle(self.request, args)

    celery_app.task(
        name=RUN_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        typing=False,
        max_retries=None,
    )(run)

    def on_child_start(**_: Any) -> None:
        runtime.child()

    def on_child_stop(**_: Any) -> None:
        runtime.stop()

    signals.worker_process_init.connect(on_child_start, weak=False)
    signals.worker_process_shutdown.connect(on_child_stop, weak=False)
    signals.worker_shutdown.connect(on_child_stop, weak=False)  # solo / threads pools
    filter_upstream(RUN_TASK)
    return runtime
