"""Smoke test of the shipped telemetry pipeline with the real processes.

OTLP from the OpenTelemetry SDK -> collector (collector-config/otelcol.yaml) -> Jaeger
(jaeger.yaml) and -> Prometheus (prometheus.yml, alert-rules.yml) -> Alertmanager
(alertmanager.yml) -> webhook. The metrics sent are the contract's instruments (DESIGN.md
section 3), so this also proves their Prometheus names and labels, the dashboard's queries and
an alert end to end, on both metrics paths: Prometheus scraping the collector's prometheus
exporter, and the collector pushing OTLP to Prometheus's receiver. Both must give the same
series.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.version import __version__ as sdk_version
from opentelemetry.trace import SpanKind, format_trace_id

from tests.e2e._infra import (
    METRICS_PATHS,
    Redis,
    TelemetryStack,
    UvicornApp,
    dashboard_queries,
    eventually,
    telemetry_stack,
)

pytestmark = pytest.mark.e2e

TASK = "send_email"
BUCKETS = (0.005, 0.05, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0)


INSTANCE = "smoke-instance-1"
ENVIRONMENT = "e2e"
HOST = "smoke-host"
SCOPE = "otel-bgtasks-smoke"
# The one difference between the paths: Prometheus 3 rewrites the `le` of a scraped classic
# histogram as a float ("1" -> "1.0"); its OTLP receiver writes the shortest form.
LE = {
    "scrape": ["0.005", "0.05", "0.5", "1.0", "5.0", "30.0", "60.0", "300.0", "+Inf"],
    "push": ["0.005", "0.05", "0.5", "1", "5", "30", "60", "300", "+Inf"],
}


@pytest.fixture(scope="module", params=sorted(METRICS_PATHS))
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TelemetryStack]:
    path = str(request.param)
    with telemetry_stack(tmp_path_factory.mktemp(f"stack-{path}"), metrics_path=path) as running:
        yield running


@dataclass(frozen=True)
class Sent:
    service: str
    trace_id: str


@pytest.fixture(scope="module")
def sent(stack: TelemetryStack) -> Sent:
    """A fresh service name whose span and contract metrics were sent once over OTLP/gRPC."""
    name = f"bgtasks-smoke-{uuid.uuid4().hex[:8]}"
    resource = Resource.create(
        {
            SERVICE_NAME: name,
            SERVICE_INSTANCE_ID: INSTANCE,
            "deployment.environment.name": ENVIRONMENT,
            "host.name": HOST,
        }
    )
    endpoint = stack.collector.otlp_grpc_endpoint

    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))
    )
    # Exports only when flushed: the test decides when data leaves the process.
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=endpoint, insecure=True), export_interval_millis=3_600_000
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    try:
        tracer = tracer_provider.get_tracer(SCOPE)
        with tracer.start_as_current_span(
            f"process {TASK}", kind=SpanKind.CONSUMER, attributes={"bgtasks.task.name": TASK}
        ) as span:
            trace_id = format_trace_id(span.get_span_context().trace_id)
        _record_contract_metrics(meter_provider)
        assert meter_provider.force_flush(timeout_millis=10_000)
    finally:
        meter_provider.shutdown()
        tracer_provider.shutdown()
    return Sent(service=name, trace_id=trace_id)


def _record_contract_metrics(meter_provider: MeterProvider) -> None:
    meter = meter_provider.get_meter(SCOPE, "1.0")
    task = {"bgtasks.task.name": TASK}
    duration = meter.create_histogram(
        "bgtasks.task.duration", unit="s", explicit_bucket_boundaries_advisory=BUCKETS
    )
    duration.record(0.2, {**task, "bgtasks.task.outcome": "success"})
    duration.record(
        1.5, {**task, "bgtasks.task.outcome": "failure", "error.type": "ConnectionError"}
    )
    wait = meter.create_histogram(
        "bgtasks.task.wait", unit="s", explicit_bucket_boundaries_advisory=BUCKETS
    )
    wait.record(0.01, task)
    meter.create_up_down_counter("bgtasks.task.active", unit="{task}").add(1, task)
    meter.create_up_down_counter("bgtasks.task.pending", unit="{task}").add(3, task)
    meter.create_counter("bgtasks.task.skipped", unit="{task}").add(
        2, {**task, "bgtasks.skip.reason": "request_failed"}
    )
    meter.create_counter("bgtasks.task.inlined", unit="{task}").add(4, task)
    meter.create_counter("bgtasks.task.retries", unit="{retry}").add(
        2, {**task, "error.type": "ConnectionError"}
    )
    circuit = {"bgtasks.circuit.name": "smtp"}
    meter.create_gauge("bgtasks.circuit.state", unit="{state}").set(2, circuit)
    meter.create_counter("bgtasks.circuit.transitions", unit="{transition}").add(
        1, {**circuit, "bgtasks.circuit.from": "closed", "bgtasks.circuit.to": "open"}
    )
    meter.create_counter("bgtasks.dlq.moves", unit="{entry}").add(
        1, {**task, "bgtasks.dlq.reason": "exhausted"}
    )
    meter.create_counter("bgtasks.dlq.replays", unit="{entry}").add(
        1, {**task, "bgtasks.task.outcome": "success"}
    )

    def depth(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1)]

    meter.create_observable_gauge("bgtasks.dlq.depth", callbacks=[depth], unit="{entry}")


def _series(stack: TelemetryStack, expr: str) -> list[dict[str, Any]]:
    return stack.prometheus.query(expr)


def test_span_reaches_jaeger(stack: TelemetryStack, sent: Sent) -> None:
    trace = eventually(
        lambda: stack.jaeger.trace(sent.trace_id), message=f"trace {sent.trace_id} in Jaeger"
    )

    (span,) = trace["spans"]
    assert span["operationName"] == f"process {TASK}"
    tags = {tag["key"]: tag["value"] for tag in span["tags"]}
    assert tags["bgtasks.task.name"] == TASK
    assert tags["span.kind"] == "consumer"
    assert trace["processes"][span["processID"]]["serviceName"] == sent.service
    assert [t["traceID"] for t in stack.jaeger.traces(sent.service)] == [sent.trace_id]
    assert sent.service in stack.jaeger.services()


def test_contract_metrics_reach_prometheus_with_their_names_and_labels(
    stack: TelemetryStack, sent: Sent
) -> None:
    selector = f'job="{sent.service}"'
    eventually(
        lambda: _series(stack, f"bgtasks_task_duration_seconds_count{{{selector}}}"),
        message="bgtasks_task_duration_seconds_count in Prometheus",
    )

    durations = {
        series["metric"]["bgtasks_task_outcome"]: series
        for series in _series(stack, f"bgtasks_task_duration_seconds_count{{{selector}}}")
    }
    assert set(durations) == {"success", "failure"}
    failure = durations["failure"]["metric"]
    assert failure["bgtasks_task_name"] == TASK
    assert failure["error_type"] == "ConnectionError"
    assert durations["failure"]["value"][1] == "1"
    buckets = _series(stack, f'bgtasks_task_duration_seconds_bucket{{{selector},le="+Inf"}}')
    assert len(buckets) == 2
    for name, labels, value in [
        ("bgtasks_task_wait_seconds_count", {"bgtasks_task_name": TASK}, "1"),
        ("bgtasks_task_active", {"bgtasks_task_name": TASK}, "1"),
        (
            "bgtasks_task_retries_total",
            {"bgtasks_task_name": TASK, "error_type": "ConnectionError"},
            "2",
        ),
        ("bgtasks_circuit_state", {"bgtasks_circuit_name": "smtp"}, "2"),
        (
            "bgtasks_circuit_transitions_total",
            {
                "bgtasks_circuit_name": "smtp",
                "bgtasks_circuit_from": "closed",
                "bgtasks_circuit_to": "open",
            },
            "1",
        ),
        (
            "bgtasks_dlq_moves_total",
            {"bgtasks_task_name": TASK, "bgtasks_dlq_reason": "exhausted"},
            "1",
        ),
        (
            "bgtasks_dlq_replays_total",
            {"bgtasks_task_name": TASK, "bgtasks_task_outcome": "success"},
            "1",
        ),
        ("bgtasks_dlq_depth", {}, "1"),
        ("bgtasks_task_pending", {"bgtasks_task_name": TASK}, "3"),
        (
            "bgtasks_task_skipped_total",
            {"bgtasks_task_name": TASK, "bgtasks_skip_reason": "request_failed"},
            "2",
        ),
        ("bgtasks_task_inlined_total", {"bgtasks_task_name": TASK}, "4"),
    ]:
        (series,) = _series(stack, f"{name}{{{selector}}}")
        assert series["metric"].items() >= labels.items(), name
        assert series["value"][1] == value, name


def test_series_carry_only_the_labels_queries_need(stack: TelemetryStack, sent: Sent) -> None:
    """The same labels on both paths: job and instance from service.name and
    service.instance.id, the promoted resource attribute, the scope, the metric's attributes.
    The other resource attributes are on target_info only."""
    job = f'job="{sent.service}"'
    eventually(lambda: _series(stack, f"target_info{{{job}}}"), message="target_info in Prometheus")
    common = {
        "job": sent.service,
        "instance": INSTANCE,
        "deployment_environment_name": ENVIRONMENT,
        "otel_scope_name": SCOPE,
        "otel_scope_version": "1.0",
    }

    (retries,) = _series(stack, f"bgtasks_task_retries_total{{{job}}}")
    (depth,) = _series(stack, f"bgtasks_dlq_depth{{{job}}}")
    (target,) = _series(stack, f"target_info{{{job}}}")
    buckets = _series(
        stack, f'bgtasks_task_duration_seconds_bucket{{{job},bgtasks_task_outcome="success"}}'
    )
    (joined,) = _series(
        stack,
        f"bgtasks_dlq_depth{{{job}}} * on (job, instance) group_left (host_name) target_info",
    )

    assert retries["metric"] == {
        "__name__": "bgtasks_task_retries_total",
        **common,
        "bgtasks_task_name": TASK,
        "error_type": "ConnectionError",
    }
    assert depth["metric"] == {"__name__": "bgtasks_dlq_depth", **common}
    assert target["metric"] == {
        "__name__": "target_info",
        "job": sent.service,
        "instance": INSTANCE,
        "deployment_environment_name": ENVIRONMENT,
        "host_name": HOST,
        "telemetry_sdk_language": "python",
        "telemetry_sdk_name": "opentelemetry",
        "telemetry_sdk_version": sdk_version,
    }
    ladder = sorted((series["metric"]["le"] for series in buckets), key=float)
    assert ladder == LE[stack.metrics_path]
    assert {key: value for key, value in joined["metric"].items() if key != "__name__"} == {
        **common,
        "host_name": HOST,
    }


def test_every_dashboard_query_returns_data(stack: TelemetryStack, sent: Sent) -> None:
    eventually(
        lambda: _series(stack, f'bgtasks_task_active{{job="{sent.service}"}}'),
        message="metrics in Prometheus",
    )

    for title, expr in dashboard_queries(task=TASK, rate_interval="1m"):
        eventually(
            lambda expr=expr: stack.prometheus.query(expr),
            message=f"data for panel {title!r}: {expr}",
        )


def test_circuit_open_alert_reaches_the_webhook(stack: TelemetryStack, sent: Sent) -> None:
    webhook = stack.webhook
    assert webhook is not None

    alerts = eventually(
        lambda: [
            alert
            for alert in webhook.alerts("BgTaskCircuitOpen", status="firing")
            if alert["labels"].get("job") == sent.service
        ],
        timeout=60,
        message="BgTaskCircuitOpen notification",
    )

    labels = alerts[0]["labels"]
    assert labels["bgtasks_circuit_name"] == "smtp"
    assert labels["severity"] == "critical"
    assert alerts[0]["annotations"]["runbook_url"] == (
        "collector-config/RUNBOOK.md#bgtaskcircuitopen"
    )


def test_collector_logs_no_deprecations_or_errors(stack: TelemetryStack, sent: Sent) -> None:
    eventually(lambda: stack.jaeger.trace(sent.trace_id), message="data through the collector")
    log = stack.collector.process.log_text()

    assert "deprecated" not in log.lower(), stack.collector.process.log_tail()
    assert "\terror\t" not in log, stack.collector.process.log_tail()


def test_demo_app_task_span_reaches_jaeger(stack: TelemetryStack, tmp_path: Path) -> None:
    """The harness serves the demo app with real uvicorn, exporting to the collector."""
    service = f"bgtasks-demo-{uuid.uuid4().hex[:8]}"
    app = UvicornApp(
        tmp_path, otlp_endpoint=stack.collector.otlp_grpc_endpoint, service_name=service
    )
    app.start()
    try:
        status, _ = app.get("/ok")
        assert status == 200
        operations = eventually(
            lambda: (
                {
                    span["operationName"]
                    for trace in stack.jaeger.traces(service)
                    for span in trace["spans"]
                }
                >= {"process send-welcome-email"}
            ),
            message=f"the demo's task span in Jaeger; app log:\n{app.process.log_tail()}",
        )
        assert operations
    finally:
        app.stop()


# Last in this module: the crash drops the collector's metric state.
def test_collector_comes_back_on_the_same_ports_after_a_crash(stack: TelemetryStack) -> None:
    before = (stack.collector.otlp_grpc_port, stack.collector.prometheus_target)

    stack.collector.restart(crash=True)

    assert (stack.collector.otlp_grpc_port, stack.collector.prometheus_target) == before
    eventually(
        lambda: stack.prometheus.query('up{job="otel-collector"} == 1'),
        message="Prometheus scrapes the restarted collector",
    )


def test_redis_harness(tmp_path: Path) -> None:
    redis = Redis(tmp_path)
    redis.start()
    try:
        assert redis.ping()
        assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    finally:
        redis.stop()
    assert not redis.process.running
