"""The executor's side of the dispatch seam as pure steps: the message, receive, hand-off,
dead-lettering a task that never ran, recovery of handed-off rows, and per-process telemetry.

The end-to-end proof (a dispatcher, a broker, a worker thread) is
tests/integration/test_dispatch_seam.py; these pin each step's contract.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags
from structlog.testing import capture_logs

from otel_bgtasks import configure_telemetry
from otel_bgtasks._execution import Executor
from otel_bgtasks.errors import CorruptEntryError, SerializationError, UntrustedEntryError
from otel_bgtasks.metrics import Instruments
from otel_bgtasks.records import (
    MAX_MESSAGE_BYTES,
    DeadLetterReason,
    TaskMessage,
    decode_message,
)
from otel_bgtasks.recovery import recover_interrupted_tasks, start_recovery
from otel_bgtasks.routes import register_dispatcher, unregister_dispatcher
from otel_bgtasks.signing import SigningKeys, signing_override
from otel_bgtasks.testing import InMemoryDeadLetterStore
from tests.unit.tasks import CALLS, durable_invoice

KEY = "k" * 32
T0 = 1_800_000_000.0
PRODUCER = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=False,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
)


class Remote:
    """A remote dispatcher object (what scheduling needs to know of it)."""

    name = "remote"
    route = "remote:test"
    remote = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.fail: Exception | None = None

    def submit(self, executor: Any, states: Any) -> None:  # pragma: no cover - not submitted
        raise AssertionError

    async def drain(self, executor: Any, timeout: float) -> None:  # pragma: no cover
        return None

    def resend(self, executor: Executor, call: Any, *, task_id: str) -> float | None:
        if self.fail is not None:
            raise self.fail
        message = executor.message_from_call(call, task_id=task_id, route=self.route, durable=True)
        self.sent.append((task_id, message.to_json()))
        return T0 + 500


@pytest.fixture
def parts() -> Iterator[tuple[Executor, InMemorySpanExporter, InMemoryMetricReader]]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    store = InMemoryDeadLetterStore()
    executor = Executor(
        tracer_provider.get_tracer("t"),
        Instruments(meter_provider.get_meter("t")),
        dead_letter_store=store,
        dispatch=Remote(),
    )
    yield executor, exporter, reader
    tracer_provider.shutdown()
    meter_provider.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple[Any, ...], int]:
    data = reader.get_metrics_data()
    found: dict[tuple[Any, ...], int] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        found[tuple(sorted(point.attributes.items()))] = point.value
    return found


async def add(a: int, b: int) -> None:
    CALLS.append(("add", a + b))


def test_a_task_bound_for_another_process_is_encoded_at_scheduling(parts):
    executor, _, _ = parts
    state = executor.schedule(durable_invoice, ("o-1",), {})
    assert state.options.remote
    assert state.options.route == "remote:test"
    assert state.call is not None
    assert (state.call.func_ref, state.call.payload) == (
        "tests.unit.tasks:durable_invoice",
        '{"args":["o-1"],"kwargs":{}}',
    )
    with pytest.raises(SerializationError, match="argument 'order'"):
        executor.schedule(durable_invoice, (object(),), {})  # in the endpoint, naming it


def test_the_message_carries_the_call_the_ids_and_the_wall_clock(parts):
    executor, _, _ = parts
    state = executor.prepare(durable_invoice, ("o-2",), {}, PRODUCER, enqueued_wall=T0)
    with signing_override(SigningKeys.of(KEY)):
        message = executor.message_for(state, "remote:test")
    assert message.to_dict() == {
        "task_id": state.task_id,
        "task_name": "durable_invoice",
        "func_ref": "tests.unit.tasks:durable_invoice",
        "payload": '{"args":["o-2"],"kwargs":{}}',
        "route": "remote:test",
        "enqueued_at": T0,
        "serializer": "json",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "durable": False,
        "signature": message.signature,
    }
    assert message.signature.startswith("v1:")
    assert decode_message(message.to_json()) == message


async def test_receive_keeps_the_id_measures_the_broker_wait_and_links_the_producer(parts):
    executor, exporter, _ = parts
    CALLS.clear()
    now = time.time()
    message = TaskMessage(
        task_id="a" * 32,
        task_name="durable_invoice",
        func_ref="tests.unit.tasks:durable_invoice",
        payload='{"args":["o-3"],"kwargs":{}}',
        route="remote:test",
        enqueued_at=now - 30,  # published 30 s ago (another host's clock, the broker wait)
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    state = executor.receive(message, attributes={"messaging.system": "redis"})
    assert state.task_id == "a" * 32
    assert state.origin is not None
    assert state.origin.route == "remote:test"
    assert not state.journaled
    await executor.run(state)
    assert CALLS == [("o-3", 0)]
    (span,) = exporter.get_finished_spans()
    assert span.attributes["bgtasks.task.id"] == "a" * 32
    assert span.attributes["messaging.system"] == "redis"
    assert span.attributes["bgtasks.task.wait"] >= 30  # the wall-clock wait, not perf_counter's
    assert [link.context.span_id for link in span.links] == [PRODUCER.span_id]
    assert span.parent is None


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"func_ref": "os:system"}, UntrustedEntryError),  # not a registered task
        ({"payload": "{not json"}, CorruptEntryError),
        ({"serializer": "pickle"}, CorruptEntryError),  # never registered here
    ],
)
def test_receive_refuses_what_it_must_not_run(parts, change, error):
    executor, _, _ = parts
    fields: dict[str, Any] = {
        "task_id": "b" * 32,
        "task_name": "durable_invoice",
        "func_ref": "tests.unit.tasks:durable_invoice",
        "payload": '{"args":["o-4"],"kwargs":{}}',
        "route": "remote:test",
        "enqueued_at": T0,
        **change,
    }
    with pytest.raises(error):
        executor.receive(TaskMessage(**fields))


def test_a_message_signature_is_bound_to_the_kind_message(parts):
    executor, _, _ = parts
    state = executor.prepare(durable_invoice, ("o-5",), {})
    with signing_override(SigningKeys.of(KEY)):
        message = executor.message_for(state, "remote:test")
        executor.receive(message)  # verifies
        for forged in (
            TaskMessage(**{**message.to_dict(), "route": "elsewhere"}),
            TaskMessage(**{**message.to_dict(), "durable": True}),
            TaskMessage(**{**message.to_dict(), "signature": ""}),
        ):
            with pytest.raises(UntrustedEntryError):
                executor.receive(forged)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 200_000,  # deep nesting: the decoder's recursion, reported as corruption
        b"x" * (MAX_MESSAGE_BYTES + 1),
        b'{"task_id": "c", "durable": "yes"}',
        b'{"task_id": "", "task_name": "t", "func_ref": "m:f", "payload": "", "route": "r",'
        b' "enqueued_at": 1}',
        json.dumps({"task_id": "c", "task_name": "t", "func_ref": "m:f", "payload": "",
                    "route": "r", "enqueued_at": 1, "traceparent": "00-zz"}).encode(),
    ],
)
def test_a_message_that_cannot_be_decoded_is_corrupt(raw):
    with pytest.raises(CorruptEntryError):
        decode_message(raw)


def test_a_task_that_never_ran_is_dead_lettered_with_its_reason_and_route(parts):
    executor, exporter, reader = parts
    state = executor.schedule(durable_invoice, ("o-6",), {})
    entry = executor.dead_letter_unrun(
        state, DeadLetterReason.UNDELIVERABLE, ConnectionRefusedError("broker down")
    )
    assert entry is not None
    assert executor.store.get(state.task_id) == entry
    assert (entry.reason, entry.route, entry.attempts, entry.error_type) == (
        DeadLetterReason.UNDELIVERABLE,
        "remote:test",
        0,
        "ConnectionRefusedError",
    )
    assert exporter.get_finished_spans() == ()  # it never ran: no task span
    assert points(reader, "bgtasks.dlq.moves") == {
        (("bgtasks.dlq.reason", "undeliverable"), ("bgtasks.task.name", "durable_invoice")): 1
    }
    assert executor.inflight == {}
    # accounted once: a second report changes nothing
    assert executor.dead_letter_unrun(state, DeadLetterReason.WORKER_LOST) is None


def test_without_a_store_a_task_that_never_ran_is_counted_as_skipped(parts):
    executor, _, reader = parts
    executor.dead_letters = None
    state = executor.schedule(add, (1, 2), {})
    with capture_logs() as logs:
        assert executor.dead_letter_unrun(state, DeadLetterReason.REFUSED) is None
    assert points(reader, "bgtasks.task.skipped") == {
        (("bgtasks.skip.reason", "refused"), ("bgtasks.task.name", "add")): 1
    }
    assert [entry["event"] for entry in logs] == [
        "background task never ran and could not be dead-lettered"
    ]


def test_a_durable_task_needs_a_deadline_to_be_handed_off(parts):
    executor, _, _ = parts
    state = executor.schedule(durable_invoice, ("o-7",), {})
    assert state.journaled
    with pytest.raises(ValueError, match="needs the deadline"):
        executor.hand_off(state, "remote:test", None)


def test_recovery_resends_a_handed_off_row_after_its_deadline_never_here(parts):
    executor, exporter, _ = parts
    store = executor.store
    state = executor.schedule(durable_invoice, ("o-8",), {})
    assert state.journaled  # @background_task(durable=True)
    executor.hand_off(state, "remote:test", T0 + 60)
    (row,) = store.journal_list()
    assert (row.owner, row.deadline) == ("route:remote:test", T0 + 60)
    remote = executor.defaults.dispatch
    assert isinstance(remote, Remote)
    register_dispatcher(remote)
    try:
        early = asyncio.run(recover_interrupted_tasks(store=store, executor=executor, now=T0))
        assert early.total == 0
        remote.fail = ConnectionError("broker down")
        with capture_logs() as logs:
            failed = asyncio.run(
                recover_interrupted_tasks(store=store, executor=executor, now=T0 + 61)
            )
        assert failed.resent == 0
        assert [e["event"] for e in logs if "re-sent" in e["event"]] == [
            "handed-off durable task could not be re-sent; it stays journaled"
        ]
        assert store.journal_list() == [row]  # unchanged: the next pass tries again
        remote.fail = None
        report = asyncio.run(recover_interrupted_tasks(store=store, executor=executor, now=T0 + 61))
    finally:
        unregister_dispatcher(remote)
    assert report.resent == 1
    ((task_id, raw),) = remote.sent
    assert task_id == state.task_id
    assert json.loads(raw)["durable"] is True
    (again,) = store.journal_list()
    assert (again.owner, again.deadline) == ("route:remote:test", T0 + 500)
    assert exporter.get_finished_spans() == ()  # never run in this process


def test_without_a_dispatcher_for_its_route_a_row_waits_and_is_reported_once(parts):
    executor, _, _ = parts
    store = executor.store
    state = executor.schedule(durable_invoice, ("o-9",), {})
    executor.hand_off(state, "nowhere:1", T0)
    with capture_logs() as logs:
        for _ in range(2):
            report = asyncio.run(
                recover_interrupted_tasks(store=store, executor=executor, now=T0 + 1)
            )
            assert report.total == 0
    assert [e["route"] for e in logs if e.get("route") == "nowhere:1"] == ["nowhere:1"]
    assert len(store.journal_list()) == 1
    # the dead_letter mode moves it to the dead letters: its worker was lost
    moved = asyncio.run(
        recover_interrupted_tasks(mode="dead_letter", store=store, executor=executor, now=T0 + 1)
    )
    assert moved.dead_lettered == 1
    entry = store.get(state.task_id)
    assert entry is not None
    assert (entry.reason, entry.route) == (DeadLetterReason.WORKER_LOST, "nowhere:1")
    assert store.journal_list() == []


async def test_start_recovery_repeats_its_pass_every_interval(parts):
    executor, _, _ = parts
    passes: list[float] = []
    two = asyncio.Event()

    async def sleep(seconds: float) -> None:
        passes.append(seconds)
        if len(passes) == 2:
            two.set()
        await asyncio.sleep(0)

    task = start_recovery(store=executor.store, executor=executor, every=30, sleep=sleep)
    await two.wait()
    await task.stop()
    assert passes[:2] == [30, 30]


def test_each_process_gets_its_own_service_instance_id(monkeypatch):
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    first = configure_telemetry(set_global=False)
    again = configure_telemetry(set_global=False)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked worker child configures its own telemetry after the fork
        child = configure_telemetry(set_global=False)
        os.write(write, child.instance_id.encode())
        child.flush()
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        forked = pipe.read()
    os.waitpid(pid, 0)
    try:
        assert first.instance_id
        assert again.instance_id == first.instance_id  # one per process ...
        assert forked  # ... a forked child has its own
        assert forked != first.instance_id
        assert first.flush()
    finally:
        first.shutdown()
        again.shutdown()
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-7")
    pinned = configure_telemetry(set_global=False)
    try:
        assert pinned.instance_id == "pod-7"  # the environment's wins
    finally:
        pinned.shutdown()
