"""The shop's tasks that replays run (`OTEL_BGTASKS_TASK_MODULES=shop.tasks`)."""

from __future__ import annotations

from otel_bgtasks import CircuitBreaker, background_task

CHARGED: list[str] = []


@background_task(name="charge-card", circuit=CircuitBreaker("payments-api"))
def charge_card(order_id: str, amount: int) -> None:
    CHARGED.append(order_id)
