"""`Telemetry`: the test suite's one telemetry harness.

It is the package's own `otel_bgtasks.testing.BgTasks` (a `TracerProvider` with an
`InMemorySpanExporter`, a `MeterProvider` with an `InMemoryMetricReader`, runs by task name),
plus the readers the unit tests assert whole structures with: `span(name)`, `points(metric)`.
The `telemetry` fixture gives one, not instrumented; the `instrument` fixture instruments with
its providers (tests/conftest.py).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_bgtasks.testing import BgTasks

__all__ = ["Telemetry"]


class Telemetry(BgTasks):
    """`BgTasks` with readers by span name and metric name."""

    @property
    def exporter(self) -> InMemorySpanExporter:
        return self.span_exporter

    @property
    def reader(self) -> InMemoryMetricReader:
        return self.metric_reader

    def span(self, name: str) -> ReadableSpan:
        """The one finished span called `name`."""
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, f"expected one span {name!r}, got {[s.name for s in self.spans()]}"
        return found[0]

    def points(self, metric: str) -> list[Any]:
        """The data points of `metric` at this collection."""
        data = self.metric_reader.get_metrics_data()
        if data is None:
            return []
        return [
            point
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == metric
            for point in m.data.data_points
        ]
