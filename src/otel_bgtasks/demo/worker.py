"""The demo's Celery side (``pip install otel-bgtasks[celery]``): the demo app sends
``render-report`` to a Celery worker through `CeleryDispatcher`; the worker runs it with
`install_worker`, its spans linked to the app's request, its metrics on the same dashboard.

    celery -A otel_bgtasks.demo.worker worker -Q bgtasks -c 2      # the worker
    GET /report                                                    # the app schedules one

``BGTASKS_DEMO_BROKER`` is the broker (default ``redis://localhost:6379/2``);
``OTEL_BGTASKS_DLQ_URL`` the shared dead-letter store.
"""

from __future__ import annotations

import asyncio
import os
import random

import structlog
from celery import Celery

from otel_bgtasks import RetryPolicy, background_task
from otel_bgtasks.celery import CeleryDispatcher, install_worker

__all__ = ["celery_app", "render_report", "to_celery"]

celery_app = Celery(
    "bgtasks-demo", broker=os.environ.get("BGTASKS_DEMO_BROKER", "redis://localhost:6379/2")
)
celery_app.conf.update(
    broker_transport_options={"visibility_timeout": 300},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
to_celery = CeleryDispatcher(celery_app, queue="bgtasks")
_log = structlog.get_logger("otel_bgtasks.demo")


@background_task(
    name="render-report",
    dispatch=to_celery,
    durable=True,
    timeout=30.0,
    retry=RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=2.0),
)
async def render_report(order_id: str) -> None:
    """Renders on a worker; one run in five hits a flaky renderer first (a retry event)."""
    await asyncio.sleep(0.05)
    if random.random() < 0.2:  # a demo's flakiness
        raise ConnectionError("the renderer dropped the connection")
    _log.info("report rendered", order_id=order_id)


install_worker(celery_app, dead_letter_store=os.environ.get("OTEL_BGTASKS_DLQ_URL") or None)
