"""An app whose tasks go through the dispatch seam, stopped under load by test_dispatch_servers.

Environment: ``OTEL_BGTASKS_DLQ_URL`` (SQLite store), ``OTEL_BGTASKS_DISPATCH``,
``OTEL_BGTASKS_MAX_CONCURRENCY`` (read by the instrumentor), ``BGTASKS_TEST_RESULTS`` (the file
tasks append to), ``BGTASKS_TEST_TASK_SECONDS``, ``BGTASKS_TEST_DRAIN_TIMEOUT``;
``BGTASKS_TEST_SELF_INSTRUMENT=0`` under ``opentelemetry-instrument`` (it instruments).

``POST /work/{n}``: an even n schedules the durable task, an odd n the plain one.
"""

from __future__ import annotations

import os

from fastapi import BackgroundTasks, FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from tests.integration.apps.dispatch_tasks import durable_work, plain_work

from otel_bgtasks import BackgroundTasksInstrumentor
from otel_bgtasks.stores import DLQ_URL_ENV

RESULTS = os.environ["BGTASKS_TEST_RESULTS"]

app = FastAPI()

if os.environ.get("BGTASKS_TEST_SELF_INSTRUMENT", "1") == "1":
    provider = TracerProvider()
    BackgroundTasksInstrumentor().instrument(
        tracer_provider=provider,
        dead_letter_store=os.environ[DLQ_URL_ENV],
        drain_timeout=float(os.environ["BGTASKS_TEST_DRAIN_TIMEOUT"]),
    )
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=provider, exclude_spans=["receive", "send"]
    )


@app.get("/ready")
async def ready() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.post("/work/{task_no}")
async def work(task_no: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(durable_work if task_no % 2 == 0 else plain_work, task_no, RESULTS)
    return {"task_no": task_no}
