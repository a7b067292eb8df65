"""The app's task module in the adversarial suite (given to the CLI as ``--tasks``)."""

from __future__ import annotations

from os import system  # noqa: F401 - an imported name: must NOT count as one of our tasks
from typing import Any

from otel_bgtasks import background_task

RAN: list[tuple[str, Any]] = []

CARD = "4111111111111111"
API_KEY = "sk_live_0123456789abcdef"
PASSWORD = "hunter2-password"


@background_task
def record(value: Any) -> None:
    """A registered task: replaying or recovering it is allowed."""
    RAN.append(("record", value))


@background_task
def charge(card: str, api_key: str) -> None:
    """Fails with a secret in its arguments and another in its message."""
    raise ConnectionError(f"gateway refused login with password {PASSWORD}")


@background_task
def fail_with(value: Any) -> None:
    """Fails whatever `value` is (a pathological argument)."""
    raise ValueError("cannot process the value")


@background_task
def recurse(depth: int) -> None:
    """Fails with a RecursionError ~1,000 frames deep."""
    recurse(depth + 1)


def undecorated(value: Any) -> None:
    """A plain module-level function of a declared task module: replayable by the rule."""
    RAN.append(("undecorated", value))


def undecorated_fail(value: Any) -> None:
    """Undecorated and failing: replayable only where the app scheduled it (or declared)."""
    RAN.append(("undecorated_fail", value))
    raise ConnectionError("still failing")


@background_task
async def afail_with(value: Any) -> None:
    """Fails on the event loop (no worker thread holding its arguments)."""
    raise ValueError("cannot process the value")
