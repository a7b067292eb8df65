"""Celery on the dispatch seam: the same tasks, signals, policies and dead letters on a
worker fleet (``pip install otel-bgtasks[celery]``).

    from otel_bgtasks.celery import CeleryDispatcher, install_worker

    to_celery = CeleryDispatcher(celery_app, queue="bgtasks")   # the web process

    @background_task(name="charge-card", dispatch=to_celery, durable=True)
    async def charge_card(order_id: str) -> None: ...

    install_worker(celery_app, dead_letter_store="redis://store:6379/1")  # the worker module

See `otel_bgtasks.celery.dispatcher` (publishing, guarantees) and
`otel_bgtasks.celery.worker` (running).
"""

from __future__ import annotations

from otel_bgtasks.celery._wire import HEADER, RUN_TASK
from otel_bgtasks.celery.dispatcher import CeleryDispatcher
from otel_bgtasks.celery.worker import WorkerRuntime, install_worker

__all__ = ["HEADER", "RUN_TASK", "CeleryDispatcher", "WorkerRuntime", "install_worker"]
