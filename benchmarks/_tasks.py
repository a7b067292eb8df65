"""Module-level task functions (importable by reference, as durable tasks and replays need)."""

from __future__ import annotations

__all__ = ["noop", "replay_target"]


async def noop(n: int) -> None:
    """The cheapest possible async background task: what is measured is the path around it."""
    return None


async def replay_target(n: int) -> None:
    """The task every dead letter of the replay benchmark refers to."""
    return None
