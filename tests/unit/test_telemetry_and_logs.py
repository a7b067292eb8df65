"""One-call setup, link-aware sampling, and log correlation inside tasks."""

from __future__ import annotations

import logging
import threading

import pytest
import structlog
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.testclient import TestClient

from otel_bgtasks import (
    BackgroundTasksInstrumentor,
    LinkAwareSampler,
    TraceContextFilter,
    TraceContextProcessor,
    configure_telemetry,
    dispatch,
)
from otel_bgtasks.telemetry import flush_providers


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


class _HeldExporter(SpanExporter):
    """Records what it exports; `hold` blocks exports until released (a stalled collector)."""

    def __init__(self) -> None:
        self.spans: list[str] = []
        self.hold = threading.Event()
        self.hold.set()

    def export(self, spans):
        self.hold.wait()
        self.spans.extend(s.name for s in spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.hold.set()


class _BrokenProvider:
    def force_flush(self, timeout_millis: int = 0) -> bool:
        raise RuntimeError("exporter bug")


def test_flush_providers_exports_what_the_batch_processors_hold():
    exporter = _HeldExporter()
    tracer_provider = TracerProvider()
    # A schedule delay longer than any test: only the flush can export the span.
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=3.6e6))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    meter_provider.get_meter("t").create_counter("c").add(1)
    try:
        tracer_provider.get_tracer("t").start_span("last").end()
        assert exporter.spans == []
        providers = {
            "traces": tracer_provider,
            "metrics": meter_provider,
            "none": object(),  # the API's no-op providers have no force_flush: skipped
        }
        assert flush_providers(providers) is True
        assert exporter.spans == ["last"]
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()


def test_flush_providers_is_bounded(capsys):
    exporter = _HeldExporter()
    exporter.hold.clear()  # the collector never answers
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=3.6e6))
    try:
        tracer_provider.get_tracer("t").start_span("stuck").end()
        assert flush_providers({"traces": tracer_provider}, timeout=0.05) is False
    finally:
        exporter.hold.set()
        tracer_provider.shutdown()
    out = capsys.readouterr().out
    assert "telemetry flush at shutdown incomplete" in out
    assert "signal=traces" in out


def test_flush_providers_never_raises(capsys):
    assert flush_providers({"broken": _BrokenProvider()}) is False
    out = capsys.readouterr().out
    assert "telemetry flush at shutdown failed" in out
    assert "signal=broken" in out
    assert "exporter bug" in out


def test_lifespan_shutdown_flushes_the_global_providers(monkeypatch, instrument):
    """The seam calls flush_global_providers at lifespan shutdown (zero-code has no other
    chance under uvicorn's SIGTERM); the e2e test proves it against the real collector."""
    flushed: list[float] = []
    monkeypatch.setattr(
        dispatch, "flush_global_providers", lambda timeout=5.0: flushed.append(timeout)
    )
    instrument()
    app = Starlette()
    with TestClient(app):
        assert flushed == []
    assert flushed == [5.0]
