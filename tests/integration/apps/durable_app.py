"""A server with durable tasks, crashed on purpose by test_crash_recovery.

Environment: ``OTEL_BGTASKS_DLQ_URL`` (the SQLite store), ``BGTASKS_TEST_RESULTS`` (the file
the tasks append to), ``BGTASKS_TEST_TASK_SECONDS`` (how long each task works).

Each ``POST /work/{n}`` schedules ``record_result(n, results)`` and answers with the trace and
span ids of its request span: the journal keeps them, so the test can check that a re-run or
a dead letter points back to exactly the request that scheduled it.
"""

from __future__ import annotations

import os

from fastapi import BackgroundTasks, FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from tests.integration.apps.durable_tasks import record_result

from otel_bgtasks import BackgroundTasksInstrumentor
from otel_bgtasks.stores import DLQ_URL_ENV

RESULTS = os.environ["BGTASKS_TEST_RESULTS"]

# An SDK provider without exporter: real span ids for the links, nothing sent anywhere.
provider = TracerProvider()
BackgroundTasksInstrumentor().instrument(
    tracer_provider=provider, dead_letter_store=os.environ[DLQ_URL_ENV]
)

app = FastAPI()
FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, exclude_spans=["receive", "send"])


@app.get("/ready")
async def ready() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.post("/work/{task_no}")
async def work(task_no: int, tasks: BackgroundTasks) -> dict[str, object]:
    tasks.add_task(record_result, task_no, RESULTS)
    ctx = trace.get_current_span().get_span_context()
    return {
        "task_no": task_no,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
    }
