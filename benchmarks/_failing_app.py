"""The app of the ``failure_cost`` benchmark: an unrelated endpoint next to failing tasks.

Instrumented with this package (spans to an SDK provider without exporter, a SQLite dead-letter
store under ``$OTEL_BGTASKS_DLQ_URL``), logging with structlog as the user left it:
``BENCH_LOGS=default`` (unconfigured: the console renderer, rich installed) or ``json``
(`configure_structlog_json`); diagnostics: ``BENCH_LOGS=off`` (lines built, not written) and
``BENCH_STORE=none`` (no dead letters). stdout goes where the benchmark sends it (a file).

    GET /ping    the unrelated endpoint: no task, answers {"ok": true}
    GET /fail    schedules a task that fails with a pathological argument (a 900-deep list, as
                 a 1.8 kB JSON body would give) and secrets, then a task that succeeds
    GET /ok      the same two tasks, the first succeeding (the baseline: same load, no failure)
    GET /stats   failures, successes and dead letters so far, the event loop thread's CPU time
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from fastapi import BackgroundTasks, FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from otel_bgtasks import BackgroundTasksInstrumentor, configure_structlog_json

__all__ = ["app"]

DEEP_BODY = "[" * 900 + "]" * 900
COUNTS = {"failed": 0, "paid": 0, "after": 0}

if os.environ.get("BENCH_LOGS") == "json":
    configure_structlog_json()
elif os.environ.get("BENCH_LOGS") == "off":  # diagnostics: what the log line itself costs
    import structlog

    structlog.configure(
        processors=[structlog.processors.KeyValueRenderer()],
        logger_factory=structlog.ReturnLoggerFactory(),
    )

_instrumentor = BackgroundTasksInstrumentor()
_instrumentor.instrument(
    tracer_provider=TracerProvider(),
    meter_provider=MeterProvider(),
    dead_letter_store=(
        None if os.environ.get("BENCH_STORE") == "none" else os.environ["OTEL_BGTASKS_DLQ_URL"]
    ),
)


def charge(card: str, api_key: str, body: Any) -> None:
    COUNTS["failed"] += 1
    raise ConnectionError("gateway refused the charge")


def pay(card: str, api_key: str, body: Any) -> None:
    COUNTS["paid"] += 1


def after() -> None:
    COUNTS["after"] += 1


app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@app.get("/fail")
async def fail(background: BackgroundTasks) -> dict[str, bool]:
    background.add_task(charge, "4111111111111111", "sk_live_0123456789", json.loads(DEEP_BODY))
    background.add_task(after)
    return {"ok": True}


@app.get("/ok")
async def ok(background: BackgroundTasks) -> dict[str, bool]:
    background.add_task(pay, "4111111111111111", "sk_live_0123456789", json.loads(DEEP_BODY))
    background.add_task(after)
    return {"ok": True}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    executor_store = _instrumentor_store()
    return {
        **COUNTS,
        "dead_letters": executor_store.count() if executor_store else None,
        "loop_cpu_s": time.thread_time(),  # the event loop's thread: what requests wait on
    }


def _instrumentor_store() -> Any:
    from otel_bgtasks._execution import active_executor

    executor = active_executor()
    return executor.store if executor is not None else None
