"""The app the HTTP benchmarks serve with uvicorn: one endpoint that schedules one task.

``BENCH_VARIANT`` picks the instrumentation: ``none``, ``upstream`` (opentelemetry-
instrumentation-fastapi on the app) or ``ours`` (upstream plus this package, default dead-letter
store under ``$OTEL_BGTASKS_DLQ_URL``). Every variant builds the same SDK providers exporting
OTLP/gRPC to ``$OTEL_EXPORTER_OTLP_ENDPOINT`` (a BatchSpanProcessor and a periodic metric
reader), so only the instrumentation differs. ``BENCH_QUIET_SDK_DROP_LOG=1`` (the ``drop_path``
diagnostic only) raises the SDK batch processor's logger to ERROR, so the "Queue full, dropping"
warning it issues for every span dropped from a full queue is not even built.
``BENCH_NOOP_SPAN_EXPORT=1`` (the ``tail_parts`` diagnostic) exports spans to a no-op exporter
(the batch processor runs, nothing is encoded or sent); ``BENCH_GC_FREEZE=1`` moves everything
alive after start-up to the permanent generation (``gc.freeze()``), so collections only walk
objects made since.

    GET  /work    schedules `task_done(perf_counter())` and answers {"ok": true}
    GET  /work50  the endpoint works 5 ms (asyncio.sleep), its task 50 ms (dispatch benchmark)
    GET  /request-metric  upstream's request-duration histogram for /work50 (cumulative bucket
                  counts, ms), with ``BENCH_REQUEST_METRIC=1`` (fine 0.5 ms buckets up to 300 ms)
    GET  /stats   requests served, tasks done, task latency (scheduling -> task end), RSS
    GET  /mem     RSS, counters and the span queue's length only (cheap: polled during load)
    POST /reset   zero the counters (after a warm-up)
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import Any

from fastapi import BackgroundTasks, FastAPI
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from benchmarks._common import rss_mb

__all__ = ["app"]

VARIANT = os.environ.get("BENCH_VARIANT", "none")
_LATENCY_KEEP = 200_000


class _Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.tasks = 0
        self.latency: deque[float] = deque(maxlen=_LATENCY_KEEP)
        self.rss_at_reset = rss_mb()
        self.cpu_at_reset = time.process_time()
        self.main_cpu_at_reset = time.thread_time()  # endpoints run on the main thread


STATS = _Stats()
RSS_AT_START = rss_mb()

resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "bench")})
if os.environ.get("BENCH_QUIET_SDK_DROP_LOG") == "1":
    import logging

    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
# No flush at exit: a stopped or black-holed backend would only delay the server's shutdown.
tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
if os.environ.get("BENCH_NOOP_SPAN_EXPORT") == "1":
    from benchmarks._common import NoopSpanExporter

    span_processor = BatchSpanProcessor(NoopSpanExporter())
else:
    span_processor = BatchSpanProcessor(OTLPSpanExporter())
tracer_provider.add_span_processor(span_processor)
REQUEST_METRIC_BOUNDS = [i * 0.5 for i in range(601)]  # ms: 0 .. 300 in 0.5 ms steps
_readers: list[Any] = [PeriodicExportingMetricReader(OTLPMetricExporter())]
_views: list[Any] = []
request_metric_reader: Any = None
if os.environ.get("BENCH_REQUEST_METRIC") == "1":
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    request_metric_reader = InMemoryMetricReader()
    _readers.append(request_metric_reader)
    _views.append(
        View(
            instrument_name="http.server.duration",
            aggregation=ExplicitBucketHistogramAggregation(REQUEST_METRIC_BOUNDS),
        )
    )
meter_provider = MeterProvider(
    resource=resource,
    metric_readers=_readers,
    views=_views,
    shutdown_on_exit=False,
)


def _span_queue_length() -> int | None:
    """Spans waiting in the BatchSpanProcessor (SDK internals: None if they moved)."""
    queue = getattr(getattr(span_processor, "_batch_processor", None), "_queue", None)
    return len(queue) if queue is not None else None


async def task_done(scheduled: float) -> None:
    """The background task: counts itself and its latency from scheduling."""
    STATS.tasks += 1
    STATS.latency.append(time.perf_counter() - scheduled)


app = FastAPI()


@app.get("/work")
async def work(background: BackgroundTasks) -> dict[str, bool]:
    STATS.requests += 1
    background.add_task(task_done, time.perf_counter())
    return {"ok": True}


async def task_50ms(scheduled: float) -> None:
    await asyncio.sleep(0.05)
    STATS.tasks += 1
    STATS.latency.append(time.perf_counter() - scheduled)


@app.get("/work50")
async def work50(background: BackgroundTasks) -> dict[str, bool]:
    STATS.requests += 1
    await asyncio.sleep(0.005)  # the request's own work, so its latency is the endpoint's
    background.add_task(task_50ms, time.perf_counter())
    return {"ok": True}


@app.get("/request-metric")
async def request_metric() -> dict[str, Any]:
    """Cumulative bucket counts of upstream's http.server.duration (ms) for /work50."""
    if request_metric_reader is None:
        return {"bounds": [], "counts": []}
    counts = [0] * (len(REQUEST_METRIC_BOUNDS) + 1)
    data = request_metric_reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != "http.server.duration":
                    continue
                for point in metric.data.data_points:
                    if point.attributes.get("http.target") == "/work50":
                        counts = [a + b for a, b in zip(counts, point.bucket_counts, strict=True)]
    return {"bounds": REQUEST_METRIC_BOUNDS, "counts": counts}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@app.get("/stats")
async def stats() -> dict[str, Any]:
    latency = list(STATS.latency)
    failures = 0
    if VARIANT == "ours":
        from otel_bgtasks._execution import active_executor as current_executor

        executor = current_executor()
        failures = len(executor.failures.recent) if executor is not None else -1
    return {
        "variant": VARIANT,
        "requests": STATS.requests,
        "tasks": STATS.tasks,
        "task_latency_p50_ms": _percentile(latency, 0.50) * 1000,
        "task_latency_p99_ms": _percentile(latency, 0.99) * 1000,
        "task_latency_mean_ms": (sum(latency) / len(latency) * 1000) if latency else None,
        "rss_mb": rss_mb(),
        "rss_at_reset_mb": STATS.rss_at_reset,
        "rss_at_start_mb": RSS_AT_START,
        "task_failures": failures,
        "span_queue": _span_queue_length(),
        # CPU seconds since the reset: the whole process, and the event loop's thread alone
        # (the rest is the SDK's export threads).
        "cpu_s": time.process_time() - STATS.cpu_at_reset,
        "main_thread_cpu_s": time.thread_time() - STATS.main_cpu_at_reset,
    }


@app.get("/mem")
async def mem() -> dict[str, Any]:
    return {
        "rss_mb": rss_mb(),
        "requests": STATS.requests,
        "tasks": STATS.tasks,
        "span_queue": _span_queue_length(),
    }


@app.post("/reset")
async def reset() -> dict[str, bool]:
    STATS.reset()
    return {"ok": True}


if VARIANT in ("upstream", "ours"):
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        excluded_urls="/stats,/reset,/mem,/request-metric",
    )
if VARIANT == "ours":
    from otel_bgtasks import BackgroundTasksInstrumentor

    BackgroundTasksInstrumentor().instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider
    )
elif VARIANT not in ("none", "upstream"):
    raise ValueError(f"BENCH_VARIANT={VARIANT!r}: use none, upstream or ours")
if os.environ.get("BENCH_GC_FREEZE") == "1":
    import gc

    gc.collect()
    gc.freeze()
