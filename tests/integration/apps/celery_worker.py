"""The worker module of the Celery tests: ``celery -A tests.integration.apps.celery_worker
worker``. Besides `install_worker` it gives each worker child telemetry the test can read:
spans are written as JSON lines to the results Redis (list ``spans``), set up after the fork
by a ``worker_process_init`` handler connected before `install_worker`'s (which then uses
these global providers). ``worker_ready`` pushes the main pid to ``ready:<BGTASKS_TEST_RUN>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from celery import signals
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from tests.integration.apps import celery_tasks  # noqa: F401 - the app's tasks
from tests.integration.apps.celery_app import STORE, app, results

from otel_bgtasks.celery import install_worker

RUN = os.environ.get("BGTASKS_TEST_RUN", "run")
# "before" / "after": opentelemetry-instrumentation-celery instrumented before or after
# install_worker (coexistence tests); "" : not at all.
UPSTREAM = os.environ.get("BGTASKS_TEST_UPSTREAM", "")


class RedisSpanExporter(SpanExporter):
    """Each finished span as one JSON object on the results Redis list ``span:<name>``
    (tests wait on it with BLPOP)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = results()
        for span in spans:
            client.rpush(f"span:{span.name}", json.dumps(_span(span)))
        return SpanExportResult.SUCCESS


def _span(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent": f"{span.parent.span_id:016x}" if span.parent else None,
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
        "status": span.status.status_code.name,
        "resource": dict(span.resource.attributes),
    }


# "1": the children export OTLP from the OTEL_* variables (install_worker configures them),
# for the e2e test through the real collector; otherwise spans go to the results Redis.
OTLP = os.environ.get("BGTASKS_TEST_OTLP") == "1"


def _child_telemetry(**_: Any) -> None:
    resource = Resource.create({"service.name": "bgtasks-test-worker"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(RedisSpanExporter()))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(resource=resource))


if not OTLP:
    signals.worker_process_init.connect(_child_telemetry, weak=False)


@signals.worker_ready.connect(weak=False)
def _ready(**_: Any) -> None:
    results().rpush(f"ready:{RUN}", os.getpid())


def _upstream(**_: Any) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument()


if UPSTREAM == "before":
    signals.worker_process_init.connect(_upstream, weak=False)
install_worker(app, dead_letter_store=STORE)
if UPSTREAM == "after":
    signals.worker_process_init.connect(_upstream, weak=False)
