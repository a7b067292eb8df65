"""Tasks of the dispatch seam's end-to-end test (module-level: the worker finds them in the
registry by reference) and the two dispatchers they go through, on one broker."""

from __future__ import annotations

import queue

from tests.integration.apps.queue_engine import QueueDispatcher
from tests.support.clock import Clock

from otel_bgtasks import background_task

T0 = 1_800_000_000.0
BROKER: queue.Queue[str | None] = queue.Queue()
CLOCK = Clock(T0)
PER_TASK = QueueDispatcher("queue:receipts", BROKER, CLOCK)
DEFAULT = QueueDispatcher("queue:default", BROKER, CLOCK)

RAN: list[tuple[str, str]] = []  # (task, order), in the order they ran, wherever


@background_task(dispatch=PER_TASK)
async def send_receipt(order: str) -> None:
    RAN.append(("send_receipt", order))


@background_task(durable=True)
async def charge(order: str) -> None:  # the default dispatcher (instrument(dispatch=...))
    RAN.append(("charge", order))


@background_task(dispatch="inline")
def audit(order: str) -> None:
    RAN.append(("audit", order))
