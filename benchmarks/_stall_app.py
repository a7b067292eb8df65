"""The app `store_stall` serves with uvicorn while its store is made to stall.

``OTEL_BGTASKS_DLQ_URL`` is the store (SQLite file or Redis); every task is durable (a journal
row per task) and, with ``BENCH_REDIS_CIRCUIT`` set to a Redis URL, goes through a breaker whose
state lives in that Redis. ``BENCH_GATE=0`` turns the response gate off (the dispatch seam
gates every request otherwise): journal writes made on the event loop then stay synchronous,
the behaviour before issue 11.

    GET /ping      the unrelated endpoint whose latency is measured
    GET /durable   schedules one durable task (journal add and remove, breaker calls)
    GET /bgtasks/health
"""

from __future__ import annotations

import os

from fastapi import BackgroundTasks, FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from otel_bgtasks import BackgroundTasksInstrumentor, CircuitBreaker
from otel_bgtasks.circuit import RedisCircuitBackend
from otel_bgtasks.health import bgtasks_router
from otel_bgtasks.stores import DLQ_URL_ENV

__all__ = ["app"]

circuit_url = os.environ.get("BENCH_REDIS_CIRCUIT")
BackgroundTasksInstrumentor().instrument(
    tracer_provider=TracerProvider(),
    meter_provider=MeterProvider(),
    dead_letter_store=os.environ[DLQ_URL_ENV],
    durable=True,
    circuit=(
        CircuitBreaker("bench", backend=RedisCircuitBackend.from_url(circuit_url))
        if circuit_url
        else None
    ),
)


async def noop(n: int) -> None:
    return None


app = FastAPI()
app.include_router(bgtasks_router(admin=False))


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"pong": True}


@app.get("/durable")
async def durable(tasks: BackgroundTasks) -> dict[str, bool]:
    tasks.add_task(noop, 1)
    return {"ok": True}


if os.environ.get("BENCH_GATE", "1") == "0":
    import otel_bgtasks.journal

    otel_bgtasks.journal.gate_active = lambda: False  # the journal writes as before issue 11
