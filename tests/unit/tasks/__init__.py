"""Module-level tasks (importable, so dead letters of them can be replayed)."""

from __future__ import annotations

from otel_bgtasks import background_task

CALLS: list[tuple[str, int]] = []
BROKEN = {"charge": True}


@background_task(name="charge")
def charge(order: str, amount: int) -> None:
    if BROKEN["charge"]:
        raise ConnectionRefusedError("payments down")
    CALLS.append((order, amount))


@background_task(durable=True)
async def durable_invoice(order: str) -> None:
    CALLS.append((order, 0))


class User:
    """Not JSON-serializable."""


@background_task(durable=True)
async def durable_welcome(user: User) -> None:
    return None
