"""`TaskSignal.from_span` over spans made by a real SDK tracer with the contract names."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_bgtasks import attributes as attr
from otel_bgtasks.alerting import CircuitChange, DeadLetterMove, TaskSignal


@pytest.fixture
def tracing():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "billing-api"}), shutdown_on_exit=False
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def test_a_failed_task_span_with_circuit_and_dlq_events(tracing):
    tracer, exporter = tracing
    span = tracer.start_span(
        "process send_invoice",
        kind=SpanKind.CONSUMER,
        start_time=1_000_000_000_000,
        attributes={attr.TASK_NAME: "send_invoice", attr.TASK_ID: "ab12"},
    )
    span.add_event(
        attr.EVENT_RETRY,
        {attr.RETRY_ATTEMPT: 1, attr.RETRY_DELAY: 0.5},
        timestamp=1_000_500_000_000,
    )
    span.add_event(
        attr.EVENT_CIRCUIT_STATE_CHANGE,
        {attr.CIRCUIT_NAME: "smtp", attr.CIRCUIT_FROM: "Closed", attr.CIRCUIT_TO: "OPEN"},
        timestamp=1_001_000_000_000,
    )
    span.add_event(
        attr.EVENT_DLQ_MOVED,
        {attr.DLQ_ENTRY_ID: "e-1", attr.DLQ_REASON: "retries_exhausted"},
        timestamp=1_002_000_000_000,
    )
    span.set_attributes(
        {
            attr.TASK_ATTEMPTS: 3,
            attr.TASK_OUTCOME: "dead_lettered",
            attr.ERROR_TYPE: "ConnectionError",
            attr.ERROR_CATEGORY: "connection",
        }
    )
    span.set_status(Status(StatusCode.ERROR, "ConnectionError: down"))
    span.end(end_time=1_002_500_000_000)
    (finished,) = exporter.get_finished_spans()
    ctx = finished.context

    signal = TaskSignal.from_span(finished)

    assert signal == TaskSignal(
        task_name="send_invoice",
        outcome="dead_lettered",
        duration=pytest.approx(2.5),
        started_at=pytest.approx(1000.0),
        ended_at=pytest.approx(1002.5),
        error_type="ConnectionError",
        error_category="connection",
        attempts=3,
        circuit_changes=(CircuitChange("smtp", "closed", "open", pytest.approx(1001.0)),),
        dlq_moves=(DeadLetterMove("e-1", "retries_exhausted", pytest.approx(1002.0)),),
        task_id="ab12",
        trace_id=format(ctx.trace_id, "032x"),
        span_id=format(ctx.span_id, "016x"),
        service="billing-api",
    )
    assert signal.failed


def test_a_successful_task_span(tracing):
    tracer, exporter = tracing
    with tracer.start_as_current_span(
        "process ping", attributes={attr.TASK_NAME: "ping", attr.TASK_OUTCOME: "success"}
    ):
        pass
    signal = TaskSignal.from_span(exporter.get_finished_spans()[0])
    assert signal is not None
    assert (signal.task_name, signal.outcome, signal.failed) == ("ping", "success", False)
    assert (signal.error_type, signal.circuit_changes, signal.dlq_moves) == (None, (), ())
    assert signal.duration >= 0


def test_other_spans_are_not_signals(tracing):
    tracer, exporter = tracing
    with tracer.start_as_current_span("GET /orders", attributes={"http.route": "/orders"}):
        pass
    with tracer.start_as_current_span("bare"):
        pass
    assert [TaskSignal.from_span(s) for s in exporter.get_finished_spans()] == [None, None]


@pytest.mark.parametrize(
    ("status", "outcome"), [(StatusCode.ERROR, "failure"), (StatusCode.UNSET, "success")]
)
def test_without_an_outcome_attribute_the_status_decides(tracing, status, outcome):
    tracer, exporter = tracing
    with tracer.start_as_current_span(
        "process x", attributes={attr.TASK_NAME: "x"}, set_status_on_exception=False
    ) as span:
        span.set_status(Status(status))
    signal = TaskSignal.from_span(exporter.get_finished_spans()[0])
    assert signal is not None
    assert signal.outcome == outcome
