"""An example FastAPI app whose background tasks succeed, fail, retry and trip a breaker.

Run it with ``uvicorn otel_bgtasks.demo.app:app`` (it sets up telemetry from the standard
``OTEL_*`` variables and instruments itself) or under ``opentelemetry-instrument``.

Endpoints, each scheduling one background task:
    GET /ok           async task that succeeds
    GET /sync         sync task (thread pool) that succeeds, with a nested span
    GET /fail         permanent error (validation): straight to the dead letters
    GET /signup-fails the endpoint fails after add_task: the task is skipped (request_failed)
    GET /flaky        fails twice with a connection error, then succeeds (retries)
    GET /downstream   calls a "payments" downstream that is down until POST /downstream/up;
                      after 3 failures its circuit opens and tasks are rejected
    GET /durable      durable task, journaled until it finishes (?seconds=N to make it slow)
    GET /report       durable task sent to a Celery worker (otel_bgtasks.demo.worker; only
                      with the celery extra installed)
    GET /bgtasks/health   task health (and, with OTEL_BGTASKS_ADMIN_TOKEN set, the dead-letter
                          admin endpoints behind `Authorization: Bearer <token>`)
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable

import structlog
from fastapi import BackgroundTasks, FastAPI, HTTPException, Response
from opentelemetry import trace
from starlette.background import BackgroundTask

from otel_bgtasks import (
    BackgroundTasksInstrumentor,
    CircuitBreaker,
    RetryPolicy,
    background_task,
)
from otel_bgtasks.health import bearer_token_auth, bgtasks_router
from otel_bgtasks.telemetry import Telemetry, configure_telemetry

__all__ = ["app", "create_app", "downstream"]

_render_report: Callable[[str], Awaitable[None]] | None
try:  # the Celery part of the demo needs the celery extra
    from otel_bgtasks.demo.worker import render_report as _render_report
except ImportError:  # pragma: no cover - without celery the demo has no /report
    _render_report = None

_log = structlog.get_logger("otel_bgtasks.demo")
_tracer = trace.get_tracer("otel_bgtasks.demo")


class Downstream:
    """A pretend payments API that is down until told otherwise."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0
        self._lock = threading.Lock()

    def call(self, amount: int) -> int:
        with self._lock:
            self.calls += 1
        if not self.up:
            raise ConnectionRefusedError("payments-api refused the connection")
        return amount


downstream = Downstream()
_flaky_attempts: dict[str, int] = {}

PAYMENTS = CircuitBreaker("payments-api", failure_threshold=3, open_duration=30.0)
QUICK_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.05, max_delay=0.2, jitter=0.02)


@background_task(name="send-welcome-email")
async def send_welcome_email(user_id: int) -> None:
    await asyncio.sleep(0.01)
    _log.info("welcome email sent", user_id=user_id)


def resize_avatar(user_id: int) -> None:
    with _tracer.start_as_current_span("resize"):
        time.sleep(0.005)
    _log.info("avatar resized", user_id=user_id)


@background_task(retry=QUICK_RETRY)
def import_contacts(user_id: int, csv_row: str) -> None:
    if "," not in csv_row:
        raise ValueError(f"contact row {csv_row!r} has no comma")


@background_task(retry=QUICK_RETRY)
async def sync_crm(order_id: str) -> None:
    _flaky_attempts[order_id] = _flaky_attempts.get(order_id, 0) + 1
    if _flaky_attempts[order_id] <= 2:
        raise ConnectionResetError("crm connection reset by peer")


@background_task(name="charge-card", circuit=PAYMENTS)
def charge_card(order_id: str, amount: int) -> None:
    downstream.call(amount)


@background_task(durable=True)
async def generate_invoice(order_id: str, seconds: float = 0.0) -> None:
    await asyncio.sleep(seconds)
    _log.info("invoice generated", order_id=order_id)


def create_app(*, instrument: bool = True) -> FastAPI:
    """The example app; with `instrument`, sets up telemetry unless already done.

    Under `opentelemetry-instrument` the distro configures providers and our entry point
    instruments background tasks, so this only adds what is still missing.
    """
    telemetry = _setup_telemetry() if instrument else None
    app = FastAPI(title="otel-bgtasks demo", lifespan=telemetry.lifespan if telemetry else None)
    counter = {"n": 0}

    def next_id() -> str:
        counter["n"] += 1
        return f"order-{os.getpid()}-{counter['n']}"

    @app.get("/ok")
    async def ok(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(send_welcome_email, 42)
        return {"scheduled": "send-welcome-email"}

    @app.get("/sync")
    async def sync(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(resize_avatar, 42)
        return {"scheduled": "resize_avatar"}

    @app.get("/fail")
    async def fail(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(import_contacts, 42, "no-comma-here")
        tasks.add_task(send_welcome_email, 43)  # still runs after the failure
        return {"scheduled": "import_contacts, send-welcome-email"}

    @app.get("/signup-fails")
    async def signup_fails(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(send_welcome_email, 44)
        # The client sees the failure; its email never goes out (bgtasks.task.skipped).
        raise HTTPException(503, "the signup service is unavailable")

    @app.get("/flaky")
    async def flaky() -> Response:
        order = next_id()
        return Response(background=BackgroundTask(sync_crm, order), content=order)

    @app.get("/downstream")
    async def pay(tasks: BackgroundTasks) -> dict[str, str]:
        order = next_id()
        tasks.add_task(charge_card, order, 100)
        return {"scheduled": "charge-card", "order": order}

    @app.post("/downstream/up")
    async def up() -> dict[str, bool]:
        downstream.up = True
        return {"up": True}

    @app.get("/durable")
    async def durable(tasks: BackgroundTasks, seconds: float = 0.0) -> dict[str, str]:
        order = next_id()
        tasks.add_task(generate_invoice, order, seconds)
        return {"scheduled": "generate_invoice", "order": order}

    if _render_report is not None:

        @app.get("/report")
        async def report(tasks: BackgroundTasks) -> dict[str, str]:
            order = next_id()
            tasks.add_task(_render_report, order)
            return {"scheduled": "render-report", "order": order}

    token = os.environ.get("OTEL_BGTASKS_ADMIN_TOKEN")
    if token:  # the dead-letter admin endpoints, behind a bearer token
        app.include_router(bgtasks_router(auth=bearer_token_auth(token)))
    else:
        app.include_router(bgtasks_router(admin=False))
    if instrument and not getattr(app, "_is_instrumented_by_opentelemetry", False):
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app)
    return app


def _setup_telemetry() -> Telemetry | None:
    """Providers and instrumentation, unless `opentelemetry-instrument` already did it."""
    if BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry:
        return None
    telemetry = configure_telemetry(service_name="bgtasks-demo")
    BackgroundTasksInstrumentor().instrument()
    return telemetry


app = create_app(instrument=os.environ.get("OTEL_BGTASKS_DEMO_NO_INSTRUMENT") != "1")
