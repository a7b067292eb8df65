"""The dispatch seam end to end, without Celery: a test `Dispatcher` publishes to a queue read
by a second thread running its own executor (tests/integration/apps/queue_engine.py).

Proves, on a real SQLite file and a real redis-server: per-task and default dispatchers, an
inline task beside them; `schedule()` outside a request; a durable task whose journal row
moves with it and is removed by the consumer; a consumer crash leaving a row that recovery
re-sends after its deadline (the clock injected: nothing sleeps); a task that could not be
sent dead-lettered as ``undeliverable``; a replay sent back through its dispatcher; a planted
message refused; a dispatcher whose ``submit`` raises. No task of a remote dispatcher ever
runs in the web process.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.exceptions import StarletteDeprecationWarning
from structlog.testing import capture_logs
from tests.conftest import Telemetry
from tests.integration.apps import seam_tasks
from tests.integration.apps.queue_engine import DEADLINE_AFTER, Consumer
from tests.integration.apps.seam_tasks import CLOCK, DEFAULT, PER_TASK, RAN, T0
from tests.support.redis import running_redis

from otel_bgtasks import BackgroundTasksInstrumentor, schedule
from otel_bgtasks._execution import Executor, active_executor
from otel_bgtasks.dispatch import dispatcher_for
from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.identity import process_identity
from otel_bgtasks.metrics import Instruments
from otel_bgtasks.records import DeadLetterReason, TaskMessage
from otel_bgtasks.recovery import recover_interrupted_tasks
from otel_bgtasks.replay import DeadLetters, run_dead_letter
from otel_bgtasks.stores import open_store
from otel_bgtasks.stores.base import DeadLetterStore

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)  # Starlette 1.10 wants httpx2
    from fastapi.testclient import TestClient


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeadLetterStore]:
    if request.param == "sqlite":
        with open_store(f"sqlite:///{tmp_path / 'seam.db'}") as opened:
            yield opened
        return
    with running_redis(tmp_path) as server, open_store(server.url) as opened:
        yield opened


class Worker:
    """The consumer side: its own providers, executor and thread."""

    def __init__(self, store: DeadLetterStore) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.executor = Executor(
            self.tracer_provider.get_tracer("worker"),
            Instruments(self.meter_provider.get_meter("worker")),
            dead_letter_store=store,
        )
        self.consumer = Consumer(seam_tasks.BROKER, self.executor)

    def spans(self, name: str) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]


@pytest.fixture
def web(telemetry: Telemetry, instrument: Any, store: DeadLetterStore) -> Executor:
    """The web process: instrumented with the queue as default dispatcher, the store given."""
    RAN.clear()
    CLOCK.now = T0
    for dispatcher in (PER_TASK, DEFAULT):
        dispatcher.unpublishable.clear()
        dispatcher.submit_error = None
        dispatcher.published.clear()
    while not seam_tasks.BROKER.empty():
        seam_tasks.BROKER.get_nowait()
    instrument(dispatch=DEFAULT, dead_letter_store=store)
    executor = active_executor()
    assert executor is not None
    return executor


@pytest.fixture
def worker(store: DeadLetterStore) -> Iterator[Worker]:
    worker = Worker(store)
    yield worker
    worker.consumer.stop()
    worker.tracer_provider.shutdown()
    worker.meter_provider.shutdown()


def make_app(tracer_provider: TracerProvider) -> FastAPI:
    app = FastAPI()
    tracer = tracer_provider.get_tracer("web")

    @app.post("/orders/{order}")
    async def order(order: str, tasks: BackgroundTasks) -> dict[str, str]:
        with tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER):
            tasks.add_task(seam_tasks.send_receipt, order)  # its own dispatcher
            tasks.add_task(seam_tasks.charge, order)  # the default one, durable
            tasks.add_task(seam_tasks.audit, order)  # inline: the response runs it
        return {"order": order}

    return app


def spans_named(telemetry: Telemetry, name: str) -> list[Any]:
    return [s for s in telemetry.spans() if s.name == name]


def moves(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    data = reader.get_metrics_data()
    found: dict[tuple[str, str], int] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "bgtasks.dlq.moves":
                    for point in metric.data.data_points:
                        attributes = point.attributes
                        key = (attributes["bgtasks.task.name"], attributes["bgtasks.dlq.reason"])
                        found[key] = point.value
    return found


def test_per_task_and_default_dispatchers_and_the_row_that_moves_with_its_task(
    telemetry: Telemetry, web: Executor, worker: Worker, store: DeadLetterStore
) -> None:
    with TestClient(make_app(telemetry.tracer_provider)) as client:
        assert client.post("/orders/o1").json() == {"order": "o1"}
        # the response ran the inline task; the others left the process, in their order
        assert RAN == [("audit", "o1")]
        PER_TASK.outbox.join()
        DEFAULT.outbox.join()
    receipt_id, charge_id = PER_TASK.published[0], DEFAULT.published[0]
    assert len(PER_TASK.published) == len(DEFAULT.published) == 1
    assert dispatcher_for("queue:receipts") is PER_TASK  # registered by the seam
    assert dispatcher_for("queue:default") is DEFAULT
    # the durable row moved to the route with its deadline (on the dispatcher's clock)
    (row,) = store.journal_list()
    assert (row.task_id, row.owner, row.deadline) == (
        charge_id,
        "route:queue:default",
        T0 + DEADLINE_AFTER,
    )
    assert store.journal_list(owner=process_identity()) == []  # recovery here never sees it
    assert web.inflight == {}
    assert web.pending_count() == 0

    worker.consumer.start()
    assert sorted([worker.consumer.next(), worker.consumer.next()]) == sorted(
        [(receipt_id, "success"), (charge_id, "success")]
    )
    assert RAN[0] == ("audit", "o1")  # two publishers: the worker's order is theirs
    assert sorted(RAN[1:]) == [("charge", "o1"), ("send_receipt", "o1")]
    assert store.journal_list() == []  # the consumer removed the row when the task ended
    # the web process ran only the inline task; the worker ran the others, same ids
    assert [s.name for s in telemetry.spans() if s.name.startswith("process ")] == [
        "process audit"
    ]
    (request,) = spans_named(telemetry, "POST /orders")
    (charged,) = worker.spans("process charge")
    (receipt,) = worker.spans("process send_receipt")
    for span, task_id, route in (
        (charged, charge_id, "queue:default"),
        (receipt, receipt_id, "queue:receipts"),
    ):
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is None  # a new trace (trace mode link) ...
        assert [link.context.span_id for link in span.links] == [request.context.span_id]
        attributes = dict(span.attributes)
        assert attributes["bgtasks.task.id"] == task_id
        assert attributes["bgtasks.task.outcome"] == "success"
        assert attributes["messaging.destination.name"] == route
        assert attributes["messaging.message.id"] == task_id
        assert attributes["bgtasks.task.wait"] >= 0  # the wall-clock (broker) wait


def test_schedule_outside_a_request_goes_to_its_dispatcher_at_once(
    web: Executor, worker: Worker, store: DeadLetterStore
) -> None:
    scheduled = schedule(seam_tasks.send_receipt, "o2")
    assert scheduled.handed  # no need to run it: it was handed over at scheduling
    PER_TASK.outbox.join()
    assert PER_TASK.published == [scheduled.state.task_id]
    worker.consumer.start()
    assert worker.consumer.next() == (scheduled.state.task_id, "success")
    assert RAN == [("send_receipt", "o2")]


async def test_a_consumer_crash_leaves_the_row_and_recovery_resends_it_after_its_deadline(
    telemetry: Telemetry, web: Executor, worker: Worker, store: DeadLetterStore
) -> None:
    scheduled = schedule(seam_tasks.charge, "o3")  # durable, default dispatcher
    task_id = scheduled.state.task_id
    DEFAULT.outbox.join()
    worker.consumer.crash_next = 1
    worker.consumer.start()
    assert worker.consumer.next() == (task_id, "crashed")  # taken, never run
    (row,) = store.journal_list()
    assert (row.owner, row.deadline) == ("route:queue:default", T0 + DEADLINE_AFTER)

    # before the deadline: nothing to do; the row is neither re-sent nor run here
    report = await recover_interrupted_tasks(store=store, now=T0 + DEADLINE_AFTER - 1)
    assert report.total == 0
    assert seam_tasks.BROKER.empty()
    # past it: re-sent through the route's dispatcher, handed off again with a new deadline
    CLOCK.now = T0 + DEADLINE_AFTER + 1
    report = await recover_interrupted_tasks(store=store, now=T0 + DEADLINE_AFTER + 1)
    assert report.resent == 1
    assert report.total == 1
    assert worker.consumer.next() == (task_id, "success")
    assert RAN == [("charge", "o3")]
    assert store.journal_list() == []
    assert [s.name for s in telemetry.spans() if s.name.startswith("process ")] == []
    (span,) = worker.spans("process charge")
    assert span.attributes["bgtasks.task.id"] == task_id


def test_a_task_that_could_not_be_sent_is_dead_lettered_and_a_replay_sends_it_back(
    telemetry: Telemetry, web: Executor, worker: Worker, store: DeadLetterStore
) -> None:
    PER_TASK.unpublishable.add("send_receipt")
    DEFAULT.unpublishable.add("charge")
    with TestClient(make_app(telemetry.tracer_provider)) as client:
        client.post("/orders/o4")
    (receipt, charged) = sorted(store.list(), key=lambda e: e.task_name, reverse=True)
    assert (receipt.task_name, receipt.reason, receipt.route) == (
        "send_receipt",
        DeadLetterReason.UNDELIVERABLE,
        "queue:receipts",
    )
    assert (charged.task_name, charged.reason, charged.route) == (
        "charge",
        DeadLetterReason.UNDELIVERABLE,
        "queue:default",
    )
    assert receipt.error_type == "ConnectionRefusedError"
    assert receipt.attempts == 0
    (request,) = spans_named(telemetry, "POST /orders")
    assert receipt.trace_id == format(request.context.trace_id, "032x")  # its request's trace
    assert store.journal_list() == []  # the dead letter is the durable task's record now
    assert moves(telemetry.reader) == {
        ("send_receipt", "undeliverable"): 1,
        ("charge", "undeliverable"): 1,
    }
    assert web.inflight == {}

    PER_TASK.unpublishable.clear()
    report = DeadLetters(store)
    outcomes = asyncio.run(report.replay([receipt.id], run_dead_letter))
    assert [(o.entry_id, o.status) for o in outcomes.outcomes] == [(receipt.id, "sent")]
    assert outcomes.ok
    assert store.get(receipt.id) is None  # deleted once published
    (resent_id,) = PER_TASK.published
    assert resent_id != receipt.id  # a replay is a new task
    worker.consumer.start()
    assert worker.consumer.next() == (resent_id, "success")
    assert RAN == [("audit", "o4"), ("send_receipt", "o4")]
    assert [s.name for s in telemetry.spans() if s.name.startswith("process ")] == [
        "process audit"
    ]


def test_a_planted_message_is_refused_and_dead_lettered(
    web: Executor, worker: Worker, store: DeadLetterStore
) -> None:
    planted = TaskMessage(
        task_id="f" * 32,
        task_name="innocent",
        func_ref="os:system",
        payload='{"args":["touch /tmp/pwned"],"kwargs":{}}',
        route="queue:default",
        enqueued_at=T0,
    )
    seam_tasks.BROKER.put(planted.to_json())
    worker.consumer.start()
    assert worker.consumer.next() == ("f" * 32, "refused")
    entry = store.get("f" * 32)
    assert entry is not None
    assert (entry.reason, entry.route, entry.func_ref) == (
        DeadLetterReason.REFUSED,
        "queue:default",
        "os:system",
    )
    assert entry.error_type == "otel_bgtasks.errors.UnregisteredTaskError"
    assert moves(worker.reader) == {("innocent", "refused"): 1}
    assert RAN == []


def test_a_dispatcher_whose_submit_raises_loses_nothing_and_stops_no_other(
    telemetry: Telemetry, web: Executor, worker: Worker, store: DeadLetterStore
) -> None:
    PER_TASK.submit_error = RuntimeError("engine misconfigured")
    with capture_logs() as logs, TestClient(make_app(telemetry.tracer_provider)) as client:
        client.post("/orders/o5")
        DEFAULT.outbox.join()
    failures = [e for e in logs if e["event"].startswith("dispatcher could not take")]
    assert len(failures) == 1  # the error, logged once
    assert failures[0]["dispatcher"] == "queue"
    assert failures[0]["route"] == "queue:receipts"
    assert failures[0]["error_type"] == "RuntimeError"
    (entry,) = store.list()
    assert (entry.task_name, entry.reason, entry.route) == (
        "send_receipt",
        DeadLetterReason.UNDELIVERABLE,
        "queue:receipts",
    )
    assert moves(telemetry.reader) == {("send_receipt", "undeliverable"): 1}
    assert web.inflight == {}
    # the response's other dispatcher got its task, and it ran at the worker
    (charge_id,) = DEFAULT.published
    worker.consumer.start()
    assert worker.consumer.next() == (charge_id, "success")
    assert RAN == [("audit", "o5"), ("charge", "o5")]


def test_the_protocol_is_checked_where_a_dispatcher_is_given(telemetry: Telemetry) -> None:
    class NoResend:
        name = "broken"
        route = "broken:1"
        remote = True

        def submit(self, executor: Any, states: Any) -> None: ...

    with pytest.raises(ConfigurationError, match="resend"):
        BackgroundTasksInstrumentor().instrument(
            dispatch=NoResend(),  # type: ignore[arg-type]
            dead_letter_store=None,
            tracer_provider=telemetry.tracer_provider,
        )
    assert dispatcher_for("broken:1") is None
