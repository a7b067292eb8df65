"""Celery through the real pipeline: the web side (this process) and a prefork worker of 2
children export OTLP to the real collector; Jaeger shows the worker span linked to the
producer span (FOLLOWS_FROM) with its retry events, Prometheus the worker children's series
(one `instance` per child) and every panel of the dashboard's Queue row returns data.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otel_bgtasks import BackgroundTasksInstrumentor, schedule
from tests.celery_worker import running_worker
from tests.e2e._infra import (
    QUEUE_ROW,
    TelemetryStack,
    dashboard_queries,
    eventually,
    telemetry_stack,
)
from tests.support.redis import running_redis

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

WAIT = 60.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TelemetryStack]:
    with telemetry_stack(tmp_path_factory.mktemp("stack"), alerting=False) as running:
        yield running


@pytest.fixture(scope="module")
def ran(
    stack: TelemetryStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Tasks sent from this process to a worker, everything exported and the worker stopped."""
    web = f"bgtasks-celery-web-{uuid.uuid4().hex[:6]}"
    worker_service = f"bgtasks-celery-worker-{uuid.uuid4().hex[:6]}"
    endpoint = stack.collector.otlp_grpc_endpoint
    with (
        running_redis(tmp_path_factory.mktemp("broker")) as broker,
        running_redis(tmp_path_factory.mktemp("store")) as store,
    ):
        from tests.integration.apps import celery_app
        from tests.integration.apps.celery_tasks import flaky, record, record_once, rendezvous

        env = {
            "BGTASKS_TEST_BROKER": broker.url,
            "BGTASKS_TEST_STORE": f"redis://127.0.0.1:{store.port}/1",
        }
        celery_app.configure(env["BGTASKS_TEST_BROKER"], env["BGTASKS_TEST_STORE"])
        results = celery_app.results()
        resource = Resource.create({SERVICE_NAME: web, SERVICE_INSTANCE_ID: "web-1"})
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))
        )
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=endpoint, insecure=True), export_interval_millis=3_600_000
        )
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        instrumentor = BackgroundTasksInstrumentor()
        instrumentor.instrument(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            dead_letter_store=env["BGTASKS_TEST_STORE"],
        )
        worker_env = {
            **env,
            "BGTASKS_TEST_OTLP": "1",
            "OTEL_SERVICE_NAME": worker_service,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        try:
            with running_worker(
                worker_env, results, tmp_path_factory.mktemp("worker")
            ) as worker:
                flaky_id = schedule(flaky, "e2e").state.task_id
                for _ in range(2):  # one on each child: both children report series
                    schedule(rendezvous, "e2e-both", 2)
                for index in range(8):
                    schedule(record, "e2e-durable", index)
                    schedule(record_once, "e2e-once", index)
                _plant_refused(celery_app.app)
                for key, count in (
                    ("ran:e2e", 1),
                    ("ran:e2e-durable", 8),
                    ("ran:e2e-once", 8),
                    ("ran:e2e-both", 2),
                ):
                    for _ in range(count):
                        assert results.blpop([key], timeout=WAIT) is not None, key
                worker.stop()  # warm shutdown: each child flushes its telemetry as it exits
            assert meter_provider.force_flush(timeout_millis=10_000)
        finally:
            instrumentor.uninstrument()
            meter_provider.shutdown()
            tracer_provider.shutdown()
        yield {"web": web, "worker": worker_service, "flaky_id": flaky_id}


def _plant_refused(app: Any) -> None:
    """A message naming a function that is not one of the app's tasks: refused."""
    from otel_bgtasks.celery import HEADER, RUN_TASK

    task_id = uuid.uuid4().hex
    app.send_task(
        RUN_TASK,
        args=({"task_name": "flaky", "func_ref": "os:system", "serializer": "json",
               "payload": json.dumps({"args": ["id"], "kwargs": {}}), "durable": False},),
        task_id=task_id,
        queue="bgtasks",
        headers={HEADER: {"task_id": task_id, "enqueued_at": time.time()}},
        serializer="json",
    )  # fmt: skip


def test_the_worker_span_is_linked_to_the_producer_span_with_its_retries(
    stack: TelemetryStack, ran: dict[str, Any]
) -> None:
    traces = eventually(
        lambda: [
            t for t in stack.jaeger.traces(ran["worker"])
            if any(s["operationName"] == "process flaky" for s in t["spans"])
        ],
        message="the worker's flaky trace in Jaeger",
    )  # fmt: skip
    [consumer] = [s for s in traces[0]["spans"] if s["operationName"] == "process flaky"]
    tags = {t["key"]: t["value"] for t in consumer["tags"]}
    assert tags["span.kind"] == "consumer"
    assert tags["bgtasks.task.id"] == ran["flaky_id"]
    assert tags["messaging.system"] == "redis"
    assert tags["messaging.destination.name"] == "bgtasks"
    assert tags["bgtasks.task.attempts"] == 3
    retries = [
        log for log in consumer["logs"]
        if any(f["key"] == "event" and f["value"] == "bgtasks.retry" for f in log["fields"])
    ]  # fmt: skip
    assert len(retries) == 2
    (ref,) = consumer["references"]
    assert ref["refType"] == "FOLLOWS_FROM"
    producer_trace = eventually(
        lambda: stack.jaeger.trace(ref["traceID"]), message="the producer's trace in Jaeger"
    )
    [producer] = [s for s in producer_trace["spans"] if s["spanID"] == ref["spanID"]]
    assert producer["operationName"] == "send flaky"
    assert {t["key"]: t["value"] for t in producer["tags"]}["span.kind"] == "producer"


def test_the_worker_childrens_series_reach_prometheus(
    stack: TelemetryStack, ran: dict[str, Any]
) -> None:
    selector = f'job="{ran["worker"]}"'
    series = eventually(
        lambda: stack.prometheus.query(f"bgtasks_task_duration_seconds_count{{{selector}}}"),
        message="the worker's task durations in Prometheus",
    )
    assert {s["metric"]["bgtasks_task_name"] for s in series} >= {"flaky", "record", "record-once"}
    both = [s for s in series if s["metric"]["bgtasks_task_name"] == "rendezvous"]
    instances = {s["metric"]["instance"] for s in both}
    assert len(instances) == 2, instances  # ran on both children: one instance each
    refused = eventually(
        lambda: stack.prometheus.query(
            f'bgtasks_dlq_moves_total{{{selector},bgtasks_dlq_reason="refused"}}'
        ),
        message="the refused message's dead-letter move",
    )
    assert refused


def test_every_queue_panel_returns_data(stack: TelemetryStack, ran: dict[str, Any]) -> None:
    queries = dashboard_queries(rows=[QUEUE_ROW], skip_rows=(), rate_interval="5m")
    assert len(queries) >= 4
    for title, expr in queries:
        eventually(
            lambda expr=expr: stack.prometheus.query(expr),
            message=f"data for panel {title!r}: {expr}",
        )
