"""One-call telemetry for apps not run under `opentelemetry-instrument`.

`configure_telemetry()` builds a tracer provider and a meter provider with OTLP exporters,
configured only by the standard variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_EXPORTER_OTLP_*_ENDPOINT`,
`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_TRACES_SAMPLER`,
...), sets them as the global providers and flushes them at interpreter exit. Under uvicorn,
also pass `lifespan=telemetry.lifespan` to FastAPI: uvicorn ends a SIGTERM'd process by
re-raising the signal, which skips exit handlers.

The resource has a ``service.instance.id`` of the process (unless `OTEL_RESOURCE_ATTRIBUTES`
sets one): every process of a service exports its own series, which Prometheus keeps apart.
A forked worker child (prefork servers, Celery) calls `configure_telemetry()` again after the
fork, which gives it an id of its own, and `Telemetry.flush()` (or `shutdown()`) before it
exits: a forked child ends with ``os._exit``, without exit handlers.

`flush_global_providers()` is what the instrumentor's lifespan seam calls at every app's
lifespan shutdown, so zero-code apps (`opentelemetry-instrument uvicorn app:app`, whose
distro registers only an exit handler) deliver their last spans and metrics at SIGTERM too.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from opentelemetry import _logs as otel_logs
from opentelemetry import metrics, trace
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import Sampler

from otel_bgtasks._execution import active_executor
from otel_bgtasks.sampling import LinkAwareSampler

__all__ = [
    "FLUSH_TIMEOUT",
    "SERVICE_INSTANCE_ID",
    "Telemetry",
    "configure_telemetry",
    "flush_global_providers",
    "flush_providers",
]

SERVICE_INSTANCE_ID = "service.instance.id"

FLUSH_TIMEOUT = 5.0
"""Seconds `flush_global_providers` waits at most, for all signals together."""

_log = structlog.get_logger("otel_bgtasks")


def flush_global_providers(timeout: float = FLUSH_TIMEOUT) -> bool:
    """Export what the global tracer, meter and logger providers still hold; blocks.

    What the lifespan seam calls at every app's lifespan shutdown (see `flush_providers`).
    """
    return flush_providers(
        {
            "traces": trace.get_tracer_provider(),
            "metrics": metrics.get_meter_provider(),
            "logs": otel_logs.get_logger_provider(),
        },
        timeout=timeout,
    )


def flush_providers(providers: Mapping[str, object], *, timeout: float = FLUSH_TIMEOUT) -> bool:
    """Call ``force_flush`` on each provider (by signal name), within `timeout` seconds overall.

    Bounded: the flushes run at once, each in a daemon thread, and this waits at most
    `timeout` seconds for all of them (the SDK's ``force_flush`` ignores its own timeout and
    exports on the caller's thread: a collector that does not answer would hold shutdown for
    the exporter's whole retry time). A flush still running then carries on in its thread, as
    long as the process lives. Providers without ``force_flush`` (the API's no-op and proxy
    providers, when no SDK is configured) are skipped. Never raises: a failure is logged.

    Returns:
        True when every provider reported a complete flush within the time.
    """
    deadline = time.monotonic() + timeout
    results: dict[str, bool] = {}
    threads: list[tuple[str, threading.Thread]] = []

    def flush(signal: str, force_flush: Any) -> None:
        try:
            # The SDK's providers answer a bool; None (an older or custom one) is no news.
            results[signal] = force_flush(timeout_millis=int(timeout * 1000)) is not False
            if not results[signal]:
                _log.warning("telemetry flush at shutdown incomplete", signal=signal)
        except Exception:  # an exporter's bug must not break the app's shutdown
            _log.exception("telemetry flush at shutdown failed", signal=signal)
            results[signal] = False

    for signal, provider in providers.items():
        force_flush = getattr(provider, "force_flush", None)
        if force_flush is None:
            continue
        thread = threading.Thread(
            target=flush, args=(signal, force_flush), name=f"otel-bgtasks-flush-{signal}"
        )
        thread.daemon = True
        thread.start()
        threads.append((signal, thread))
    complete = True
    for signal, thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            complete = False
            _log.warning("telemetry flush at shutdown incomplete", signal=signal, timeout=timeout)
        elif not results.get(signal, False):
            complete = False
    return complete


@dataclass(slots=True)
class Telemetry:
    """The providers `configure_telemetry` installed; `shutdown()` flushes and closes both."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    _closed: bool = False

    @property
    def instance_id(self) -> str:
        """This process's ``service.instance.id``."""
        return str(self.tracer_provider.resource.attributes.get(SERVICE_INSTANCE_ID, ""))

    def flush(self, timeout_millis: int = 10_000) -> bool:
        """Export what is buffered now (spans, then metrics), without closing anything: for
        a forked child about to exit (``os._exit`` skips exit handlers), or before a fork.
        True when both flushed within `timeout_millis` each."""
        if self._closed:
            return True
        spans = self.tracer_provider.force_flush(timeout_millis)
        points = self.meter_provider.force_flush(timeout_millis)
        return bool(spans) and bool(points)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """A FastAPI/Starlette lifespan that flushes at shutdown: `FastAPI(lifespan=t.lifespan)`.

        Needed under uvicorn: after a graceful SIGTERM shutdown it re-raises the signal, which
        ends the process without running `atexit` handlers. Tasks still pending are reported,
        and buffered dead-letter/journal writes are flushed (bounded; what cannot be written
        is logged whole).
        """
        try:
            yield
        finally:
            executor = active_executor()
            if executor is not None:
                executor.report_pending()
                await asyncio.to_thread(executor.flush_store)
            self.shutdown()

    def shutdown(self) -> None:
        """Flush pending spans and metrics, then close the exporters (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


_instance: tuple[int, str] | None = None  # (pid, id): a forked child gets its own


def _instance_id() -> str:
    """This process's ``service.instance.id`` (a UUID v4; SDKs from 1.39 detect one the same
    way, which then wins)."""
    global _instance
    if _instance is None or _instance[0] != os.getpid():
        _instance = (os.getpid(), str(uuid.uuid4()))
    return _instance[1]


def _protocol(signal_var: str) -> str:
    return os.environ.get(signal_var) or os.environ.get(OTEL_EXPORTER_OTLP_PROTOCOL) or "grpc"


def _span_exporter() -> SpanExporter:
    if _protocol(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL).startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


def _metric_exporter() -> MetricExporter:
    if _protocol(OTEL_EXPORTER_OTLP_METRICS_PROTOCOL).startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
    return OTLPMetricExporter()


def configure_telemetry(
    *,
    service_name: str | None = None,
    span_processors: Sequence[SpanProcessor] = (),
    metric_readers: Sequence[MetricReader] = (),
    export: bool | None = None,
    sampler: Sampler | None = None,
    set_global: bool = True,
) -> Telemetry:
    """Create tracer and meter providers exporting OTLP, configured by `OTEL_*` variables.

    Args:
        service_name: default for `service.name` when `OTEL_SERVICE_NAME` is unset.
        span_processors, metric_readers: added besides the OTLP ones (e.g. in-memory, alerting).
        export: add the OTLP exporters; default: only when an `OTEL_EXPORTER_OTLP_*ENDPOINT`
            variable is set, so an app without a collector does not log connection errors.
        sampler: the root sampler; it is wrapped in `LinkAwareSampler` so a task scheduled by
            a sampled request is sampled. Default: the SDK's, from `OTEL_TRACES_SAMPLER`.
        set_global: install the providers as the global ones.
    """
    attributes: dict[str, str] = {}
    if service_name and not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name
    if SERVICE_INSTANCE_ID not in Resource.create().attributes:  # neither the env nor the SDK
        attributes[SERVICE_INSTANCE_ID] = _instance_id()
    resource = Resource.create(attributes)
    if export is None:
        export = any(
            os.environ.get(var)
            for var in (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            )
        )
    tracer_provider = TracerProvider(
        resource=resource, sampler=LinkAwareSampler(sampler) if sampler else LinkAwareSampler()
    )
    for processor in span_processors:
        tracer_provider.add_span_processor(processor)
    readers = list(metric_readers)
    if export:
        tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter()))
        readers.append(PeriodicExportingMetricReader(_metric_exporter()))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    telemetry = Telemetry(tracer_provider, meter_provider)
    atexit.register(telemetry.shutdown)
    return telemetry
