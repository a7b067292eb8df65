"""Importable task functions for in-process tests (dead letters must name an importable task).

Module-level switches stand in for a downstream that is down and comes back; tests reset them
with `reset()`.
"""

from __future__ import annotations

import threading

__all__ = ["charge_card", "downstream", "hold", "import_contacts", "quick", "release", "reset"]

release = threading.Event()
"""Set it to let `hold` finish."""

downstream = {"up": False, "contacts_fixed": False}


def reset() -> None:
    release.clear()
    downstream.update(up=False, contacts_fixed=False)


def hold() -> None:  # sync: occupies a worker thread until released
    if not release.wait(30):
        raise TimeoutError("hold was never released")


async def quick() -> None:
    return None


async def import_contacts(row: str) -> None:
    if not downstream["contacts_fixed"] and "," not in row:
        raise ValueError(f"row {row!r} has no comma")


def charge_card(order_id: str) -> None:
    if not downstream["up"]:
        raise ConnectionRefusedError(f"payments refused order {order_id}")
