"""One-call setup, link-aware sampling, and log correlation inside tasks."""

from __future__ import annotations

import logging

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind
from starlette.background import BackgroundTask

from otel_bgtasks import (
    BackgroundTasksInstrumentor,
    LinkAwareSampler,
    TraceContextFilter,
    TraceContextProcessor,
    configure_telemetry,
)


def test_configure_telemetry_without_endpoint_exports_nothing(monkeypatch):
    for var in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    telemetry = configure_telemetry(service_name="default-name", set_global=False)
    try:
        resource = telemetry.tracer_provider.resource
        assert resource.attributes["service.name"] == "from-env"
        assert telemetry.tracer_provider._active_span_processor._span_processors == ()
        assert isinstance(telemetry.tracer_provider.sampler, LinkAwareSampler)
    finally:
        telemetry.shutdown()
        telemetry.shutdown()  # idempotent


@pytest.mark.parametrize(
    ("protocol", "module"),
    [
        ("grpc", "opentelemetry.exporter.otlp.proto.grpc"),
        ("http/protobuf", "opentelemetry.exporter.otlp.proto.http"),
    ],
)
def test_configure_telemetry_uses_the_standard_protocol_variable(monkeypatch, protocol, module):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    telemetry = configure_telemetry(set_global=False)
    try:
        (processor,) = telemetry.tracer_provider._active_span_processor._span_processors
        assert type(processor._batch_processor._exporter).__module__.startswith(module)
    finally:
        # nothing listens on port 9: shutting down must still return promptly
        telemetry.tracer_provider.shutdown()


async def test_link_aware_sampler_keeps_tasks_of_sampled_requests(telemetry):
    exporter = InMemorySpanExporter()
    # A ratio sampler that samples nothing new: only the link can keep the task.
    provider = TracerProvider(sampler=LinkAwareSampler(ParentBased(TraceIdRatioBased(0.0))))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    request_provider = TracerProvider()  # the request itself is sampled upstream
    instrumentor = BackgroundTasksInstrumentor()
    instrumentor.instrument(
        tracer_provider=provider, meter_provider=telemetry.meter_provider, dead_letter_store=None
    )
    try:
        with request_provider.get_tracer("t").start_as_current_span("req", kind=SpanKind.SERVER):
            task = BackgroundTask(len, "abc")
        await task()
        untraced = BackgroundTask(len, "abc")  # scheduled outside any sampled span
        await untraced()
    finally:
        instrumentor.uninstrument()
    assert [s.name for s in exporter.get_finished_spans()] == ["process len"]
    assert "LinkAwareSampler" in provider.sampler.get_description()


def test_link_aware_sampler_defers_non_task_spans():
    sampler = LinkAwareSampler(ALWAYS_OFF)
    provider = TracerProvider(sampler=sampler)
    assert not provider.get_tracer("t").start_span("plain").is_recording()


async def test_structlog_and_stdlib_logs_in_a_task_carry_trace_and_task_ids(
    telemetry, instrument, caplog
):
    instrument()
    seen: list[dict] = []

    def capture(logger, method, event_dict):
        seen.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[TraceContextProcessor(), capture])
    stdlib = logging.getLogger("test.task")
    handler_filter = TraceContextFilter()
    stdlib.addFilter(handler_filter)

    def work() -> None:
        structlog.get_logger().info("inside")
        stdlib.warning("inside stdlib")

    try:
        with caplog.at_level(logging.WARNING, logger="test.task"):
            await BackgroundTask(work)()
    finally:
        structlog.reset_defaults()
        stdlib.removeFilter(handler_filter)
    span = telemetry.span(f"process {work.__qualname__}")
    ids = {
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "task_name": work.__qualname__,
        "task_id": span.attributes["bgtasks.task.id"],
    }
    assert seen == [{"event": "inside", **ids}]
    (record,) = [r for r in caplog.records if r.name == "test.task"]
    assert {k: getattr(record, k) for k in ids} == ids


def test_log_fields_are_empty_outside_spans():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    TraceContextFilter().filter(record)
    assert (record.trace_id, record.task_name) == ("", "")
    assert TraceContextProcessor()(None, "info", {"event": "e"}) == {"event": "e"}


async def test_a_raising_log_processor_never_breaks_a_task(telemetry, instrument):
    def broken(logger, method, event_dict):
        raise RuntimeError("processor bug")

    instrument()
    structlog.configure(processors=[broken])
    ran: list[int] = []

    def fails() -> None:
        ran.append(1)
        raise ValueError("task error")  # the executor logs this through the broken chain

    try:
        await BackgroundTask(fails)()
        await BackgroundTask(ran.append, 2)()
    finally:
        structlog.reset_defaults()
    assert ran == [1, 2]
    assert (
        telemetry.span(f"process {fails.__qualname__}").attributes["bgtasks.task.outcome"]
        == "failure"
    )
