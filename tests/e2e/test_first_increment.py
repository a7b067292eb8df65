"""Dashboard rate() panels show a counter born with its only increment (issue 19, item 7).

A CLI replay is a process of its own: its `bgtasks.dlq.replays` series starts at 1 and never
moves; a circuit's first opening creates `bgtasks.circuit.transitions` at 1. Without a sample
before that 1, `rate()` and `increase()` see one point and answer nothing. The fix is
Prometheus 3's, not a query workaround: with ``--enable-feature=created-timestamp-zero-
ingestion`` (shipped in docker-compose.yml, used by every e2e test) Prometheus writes a 0
sample at the counter's start time, which the collector's prometheus exporter exposes as the
created timestamp (protobuf scrape) and OTLP carries as ``start_time_unix_nano`` (push).
Proved here on both metrics paths with the dashboard's own queries.
"""

from __future__ import annotations

import time
import uuid

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource

from tests.e2e._infra import METRICS_PATHS, dashboard_queries, eventually, telemetry_stack

pytestmark = pytest.mark.e2e

def _next_millisecond(now_ns: int) -> int:
    """Spin until the wall clock's millisecond changes (an event, not a sleep)."""
    while (current := time.time_ns()) // 1_000_000 == now_ns // 1_000_000:
        pass
    return current


PANELS = {
    "Circuit transitions/s": "bgtasks_circuit_transitions_total",
    "Dead-letter moves and replays": "bgtasks_dlq_replays_total",
}


@pytest.mark.parametrize("metrics_path", sorted(METRICS_PATHS))
def test_a_counter_created_by_its_only_increment_shows_in_the_rate_panels(
    tmp_path, metrics_path
):
    with telemetry_stack(tmp_path, alerting=False, metrics_path=metrics_path) as stack:
        job = f"first-increment-{uuid.uuid4().hex[:8]}"
        resource = Resource.create({SERVICE_NAME: job, SERVICE_INSTANCE_ID: "replay-cli-1"})
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=stack.collector.otlp_grpc_endpoint, insecure=True),
            export_interval_millis=3_600_000,
        )
        provider = MeterProvider(resource=resource, metric_readers=[reader])
        try:
            meter = provider.get_meter("otel_bgtasks")
            # each counter's only increment, as in a CLI replay and a first opening
            meter.create_counter("bgtasks.dlq.replays", unit="{entry}").add(
                1, {"bgtasks.task.name": "charge-card", "bgtasks.task.outcome": "success"}
            )
            meter.create_counter("bgtasks.circuit.transitions", unit="{transition}").add(
                1,
                {
                    "bgtasks.circuit.name": "payments-api",
                    "bgtasks.circuit.from": "closed",
                    "bgtasks.circuit.to": "open",
                },
            )
            # Prometheus keeps milliseconds: the start time must be an earlier one than the
            # export's (in an app or the CLI, the export comes later anyway)
            _next_millisecond(_next_millisecond(time.time_ns()))
            assert provider.force_flush(timeout_millis=10_000)
        finally:
            provider.shutdown()  # the process ends: no second point will ever come
        prometheus = stack.prometheus
        for metric in PANELS.values():
            eventually(
                lambda metric=metric: prometheus.query(f'{metric}{{job="{job}"}}'),
                timeout=60,
                message=f"{metric} in Prometheus",
            )
            (series,) = prometheus.query(f'{metric}{{job="{job}"}}')
            assert series["value"][1] == "1"  # one point, holding the only increment
            # the 0 sample at the start time precedes it: increase() sees the increment
            (increase,) = prometheus.query(f'increase({metric}{{job="{job}"}}[5m])')
            assert float(increase["value"][1]) > 0

        queries = dashboard_queries(rate_interval="5m")
        for title, metric in PANELS.items():
            (expr,) = [q for t, q in queries if t == title and metric in q]
            results = prometheus.query(expr)
            assert results, f"{title!r} shows nothing: {expr}"
            assert all(float(r["value"][1]) > 0 for r in results), (title, results)
