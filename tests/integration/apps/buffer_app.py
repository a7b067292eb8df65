"""A server whose tasks fail, with the store URL from ``OTEL_BGTASKS_DLQ_URL`` and the telemetry
lifespan; test_buffer_shutdown takes the store away under it and stops it with SIGTERM.

Logs are JSON lines on stdout (``configure_structlog_json``), so the test reads each entry the
buffer could not store from the log line that holds it whole.
"""

from __future__ import annotations

import os

from fastapi import BackgroundTasks, FastAPI

from otel_bgtasks import BackgroundTasksInstrumentor, configure_structlog_json
from otel_bgtasks.stores import DLQ_URL_ENV
from otel_bgtasks.telemetry import configure_telemetry

configure_structlog_json()
telemetry = configure_telemetry(service_name="buffer-app", export=False)
BackgroundTasksInstrumentor().instrument(dead_letter_store=os.environ[DLQ_URL_ENV])

app = FastAPI(lifespan=telemetry.lifespan)


def sync_contacts(batch: int) -> None:
    raise ValueError(f"batch {batch} is malformed")


@app.get("/ready")
async def ready() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.post("/fail/{batch}")
async def fail(batch: int, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(sync_contacts, batch)
    return {"batch": batch}
