"""What each span of a request costs the export thread (opt-in: ``--only export_parts``).

The HTTP benchmark's `ours` app exports more than `upstream`'s: our CONSUMER task span (six
attributes and a link) instead of upstream's bare INTERNAL one, and the `bgtasks.enqueued`
event on the request span. This prices each part where the export thread pays it: the spans of
one real request (FastAPI + opentelemetry-instrumentation-fastapi, with and without this
package, served in process through httpx's ASGI transport and caught by an in-memory
exporter) are encoded as OTLP/gRPC does (`encode_spans` + `SerializeToString`), each kind on
its own inside 512-span batches (the batch processor's), in CPU time per span (median of
interleaved repetitions). Also reported: the encoded bytes per span of each kind, and the main
thread's cost of `add_event` on a recording span.

Figures: `encode_us` and `bytes` per span kind (`request`, `request_with_event`, `http_send`
(upstream's ASGI send spans, per request), `upstream_task`, `ours_task`), and per request:
`upstream_export_us` (everything upstream exports), `ours_export_us`, with the difference split
into `task_span_extra_us` (our task span minus upstream's) and `event_extra_us` (request span
with the event minus without).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

from fastapi import BackgroundTasks, FastAPI  # module level: the endpoint's annotation

from benchmarks._common import median

__all__ = ["run", "table"]

REPEAT = {"full": (9, 20), "quick": (5, 6)}  # (rounds, 512-span batches per kind per round)


def _spans(with_ours: bool) -> list[Any]:
    """The spans one request of the benchmark app exports (after a warm-up request)."""
    from httpx import ASGITransport, AsyncClient
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from benchmarks._tasks import noop

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "bench-ours"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = FastAPI()

    @app.get("/work")
    async def work(background: BackgroundTasks) -> dict[str, bool]:
        background.add_task(noop, time.perf_counter())
        return {"ok": True}

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    instrumentor = None
    if with_ours:
        from otel_bgtasks import BackgroundTasksInstrumentor

        instrumentor = BackgroundTasksInstrumentor()
        instrumentor.instrument(tracer_provider=provider, dead_letter_store=None)

    async def requests() -> None:
        async with AsyncClient(transport=ASGITransport(app=app), base_url="http://t") as client:
            for _ in range(2):
                exporter.clear()
                response = await client.get("/work")
                assert response.status_code == 200, response.text

    try:
        asyncio.run(requests())
    finally:
        if instrumentor is not None:
            instrumentor.uninstrument()
        FastAPIInstrumentor.uninstrument_app(app)
    return list(exporter.get_finished_spans())


def _kinds(upstream: Sequence[Any], ours: Sequence[Any]) -> dict[str, list[Any]]:
    from opentelemetry.trace import SpanKind

    def request(spans: Sequence[Any]) -> Any:
        return next(s for s in spans if s.kind is SpanKind.SERVER)

    ours_request = request(ours)
    sends = [s for s in upstream if "http send" in s.name]
    return {
        "request": [_without_events(ours_request)],
        "request_with_event": [ours_request],
        "http_send": sends,
        "upstream_task": [s for s in upstream if s.name.startswith("BackgroundTask")][:1],
        "ours_task": [s for s in ours if s.kind is SpanKind.CONSUMER][:1],
    }


def _without_events(span: Any) -> Any:
    from opentelemetry.sdk.trace import ReadableSpan

    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes,
        events=(),
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


BATCH = 512  # the BatchSpanProcessor's export batch


def _encode_cost(spans: Sequence[Any], count: int) -> float:
    """CPU microseconds per span to encode and serialize `spans` inside a batch of 512 (as the
    BatchSpanProcessor exports them: resource and scope once per batch)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    batch = list(spans) * (BATCH // len(spans))
    start = time.process_time_ns()
    for _ in range(count):
        encode_spans(batch).SerializeToString()
    return (time.process_time_ns() - start) / count / len(batch) / 1000


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    upstream = _spans(with_ours=False)
    ours = _spans(with_ours=True)
    kinds = _kinds(upstream, ours)
    n_rounds, count = REPEAT["quick" if quick else "full"]
    if rounds is not None:
        n_rounds = rounds
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(n_rounds):
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
        for kind in order:
            samples[kind].append(_encode_cost(kinds[kind], count))
    encode_us = {k: median(v) for k, v in samples.items()}
    size = {
        k: len(encode_spans(list(v) * (BATCH // len(v))).SerializeToString()) / BATCH
        for k, v in kinds.items()
    }
    sends = len(kinds["http_send"])
    upstream_export = (
        encode_us["request"] + sends * encode_us["http_send"] + encode_us["upstream_task"]
    )
    ours_export = (
        encode_us["request_with_event"] + sends * encode_us["http_send"] + encode_us["ours_task"]
    )
    figures = {
        "encode_us": encode_us,
        "bytes": size,
        "http_send_spans_per_request": sends,
        "upstream_export_us": upstream_export,
        "ours_export_us": ours_export,
        "task_span_extra_us": encode_us["ours_task"] - encode_us["upstream_task"],
        "event_extra_us": encode_us["request_with_event"] - encode_us["request"],
        "add_event_main_thread_us": _add_event_cost(20_000),
    }
    log(f"  export_parts: {json.dumps(figures)}")
    return figures


def _add_event_cost(count: int) -> float:
    """Main-thread CPU microseconds of `add_event(bgtasks.enqueued, 2 attributes)`."""
    from opentelemetry.sdk.trace import TracerProvider

    from otel_bgtasks import attributes as attr

    tracer = TracerProvider().get_tracer("bench")
    spans = [tracer.start_span("GET /work") for _ in range(count)]
    start = time.process_time_ns()
    for span in spans:
        span.add_event(attr.EVENT_ENQUEUED, {attr.TASK_NAME: "noop", attr.TASK_ID: "0" * 32})
    with_event = time.process_time_ns() - start
    return with_event / count / 1000


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for kind, us in figures["encode_us"].items():
        rows.append(
            (f"export_parts {kind}", f"{us:.1f} us encode, {figures['bytes'][kind]:.0f} B", "")
        )
    rows.append(
        (
            "export_parts per request: upstream, ours",
            f"{figures['upstream_export_us']:.1f} us, {figures['ours_export_us']:.1f} us "
            f"(task span +{figures['task_span_extra_us']:.1f}, event "
            f"+{figures['event_extra_us']:.1f}; add_event on the loop "
            f"{figures['add_event_main_thread_us']:.1f} us)",
            "(report)",
        )
    )
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
