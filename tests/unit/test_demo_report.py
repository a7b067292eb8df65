"""The demo report renders each instrument in its own unit and puts the task metrics first."""

from __future__ import annotations

import io

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from rich.console import Console

from otel_bgtasks.demo.report import (
    MetricRow,
    format_quantity,
    http_summary,
    metric_rows,
    render_report,
)


def _metrics() -> MetricsData:
    """Upstream's HTTP histograms (ms, By) recorded before ours (s), as in the demo."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    http = provider.get_meter("opentelemetry.instrumentation.fastapi")
    duration = http.create_histogram("http.server.duration", unit="ms")
    size = http.create_histogram("http.server.response.size", unit="By")
    ours = provider.get_meter("otel_bgtasks")
    task = ours.create_histogram("bgtasks.task.duration", unit="s")
    retries = ours.create_counter("bgtasks.task.retries", unit="{retry}")
    state = ours.create_gauge("bgtasks.circuit.state", unit="{state}")
    for ms in (18, 22):
        duration.record(ms, {"http.status_code": 200, "http.target": "/ok"})
    duration.record(160, {"http.status_code": 500, "http.target": "/flaky"})
    size.record(2048, {"http.status_code": 200})
    task.record(0.25, {"bgtasks.task.name": "send-mail", "bgtasks.task.outcome": "success"})
    task.record(0.75, {"bgtasks.task.name": "send-mail", "bgtasks.task.outcome": "success"})
    retries.add(2, {"bgtasks.task.name": "send-mail"})
    state.set(2, {"bgtasks.circuit.name": "smtp"})
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None
    return data


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (18.0, "ms", "18.0 ms"),
        (18_000.0, "ms", "18.00 s"),
        (0.018, "s", "18.0 ms"),
        (0.0004, "s", "400 µs"),
        (2.5, "s", "2.50 s"),
        (600.0, "s", "10.0 min"),
        (0.0, "s", "0 ms"),
        (51.0, "By", "51 B"),
        (2048.0, "By", "2.0 KiB"),
        (3 * 1024**2, "By", "3.0 MiB"),
        (5.0, "{task}", "5"),
        (0.5, "1", "0.5"),
        (7.0, "", "7"),
        (3.0, "W", "3 W"),
    ],
)
def test_format_quantity_uses_the_unit(value: float, unit: str, text: str) -> None:
    assert format_quantity(value, unit) == text


def test_rows_use_each_instruments_unit_and_put_ours_first() -> None:
    rows = metric_rows(_metrics(), include_http=True)
    assert rows == [
        MetricRow(
            "bgtasks.task.duration",
            "s",
            "name=send-mail, outcome=success",
            "count=2 mean=500.0 ms max=750.0 ms",
        ),
        MetricRow("bgtasks.task.retries", "{retry}", "name=send-mail", "2"),
        MetricRow("bgtasks.circuit.state", "{state}", "circuit.name=smtp", "2 (open)"),
        MetricRow(
            "http.server.duration",
            "ms",
            "http.status_code=200, http.target=/ok",
            "count=2 mean=20.0 ms max=22.0 ms",
        ),
        MetricRow(
            "http.server.duration",
            "ms",
            "http.status_code=500, http.target=/flaky",
            "count=1 mean=160.0 ms max=160.0 ms",
        ),
        MetricRow(
            "http.server.response.size",
            "By",
            "http.status_code=200",
            "count=1 mean=2.0 KiB max=2.0 KiB",
        ),
    ]


def test_without_http_only_ours_and_a_summary_line() -> None:
    data = _metrics()
    assert [row.instrument for row in metric_rows(data)] == [
        "bgtasks.task.duration",
        "bgtasks.task.retries",
        "bgtasks.circuit.state",
    ]
    assert http_summary(data) == (
        "3 requests (status 200: 2, 500: 1), mean 66.7 ms, max 160.0 ms (http.server.duration; "
        "upstream counts the time of a request's background tasks in it)"
    )
    assert http_summary(None) is None


def test_rendered_report_orders_task_metrics_before_http() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    render_report(console, [], _metrics(), [], [], [])
    text = out.getvalue()
    assert "18000" not in text
    assert " ms B" not in text
    assert text.index("bgtasks.task.duration") < text.index("HTTP (upstream instrumentation)")
    assert "http.server.duration" not in text.split("HTTP (upstream instrumentation)")[0]
