"""A pytest plugin that instruments otel-bgtasks before an upstream test suite is imported.

Loaded with ``-p bgtasks_instrument_first`` (this directory on ``PYTHONPATH``) by
``scripts/upstream/run.py``, which runs Starlette's and FastAPI's own test suites, unchanged,
from their released source distributions. Every background task of those suites then goes
through the package: recording spans (an SDK tracer provider with an in-memory exporter), the
metric instruments, and ``propagate_exceptions=True`` (Starlette's raise-and-stop semantics,
which those suites assert). No dead-letter store: nothing is written outside the run.

``BGTASKS_UPSTREAM_TESTCLIENT_BACKEND=trio`` makes ``TestClient`` default to the trio backend
(FastAPI's suite builds its clients without choosing one; Starlette's is parametrised over
both backends by anyio's pytest plugin already). ``BGTASKS_UPSTREAM_INSTRUMENT=0`` leaves the
package out: the baseline run the instrumented one is compared with.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_bgtasks import BackgroundTasksInstrumentor

_exporter = InMemorySpanExporter()
_instrumentor = BackgroundTasksInstrumentor()


def _force_backend(backend: str) -> None:
    from starlette.testclient import TestClient

    original = TestClient.__init__
    if getattr(original, "_bgtasks_backend", None) == backend:
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("backend", backend)
        original(self, *args, **kwargs)

    __init__._bgtasks_backend = backend  # type: ignore[attr-defined]
    TestClient.__init__ = __init__  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    backend = os.environ.get("BGTASKS_UPSTREAM_TESTCLIENT_BACKEND")
    if backend:
        _force_backend(backend)
    if os.environ.get("BGTASKS_UPSTREAM_INSTRUMENT", "1") == "0":
        return
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(_exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    _instrumentor.instrument(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        propagate_exceptions=True,
        dead_letter_store=None,
    )


def pytest_runtest_teardown(item: pytest.Item) -> None:
    _exporter.clear()  # spans of one test are not kept for the whole run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(
        f"otel-bgtasks: instrumented={_instrumentor.is_instrumented_by_opentelemetry}"
        f" propagate_exceptions=True"
    )
