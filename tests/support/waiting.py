"""`wait_until`: the one poller, for what the test cannot be told about by an event (another
process, a real server, a telemetry pipeline).

Inside the test's own process, wait on an event instead (`threading.Event`, `asyncio.Event`,
a span processor's callback). The timeout here is a deadline for giving up with a message,
never what decides a test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T],
    *,
    what: str = "condition",
    timeout: float = 30.0,
    interval: float = 0.01,
) -> T:
    """Call `probe` until it returns something truthy, and return that.

    An exception from `probe` counts as "not yet" (a server still starting). Raises
    AssertionError naming `what` and the last result or exception once `timeout` seconds
    have passed.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = probe()
        except Exception as exc:  # retried; the last one is reported
            last = exc
        else:
            if result:
                return result
            last = result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s; last: {last!r}")
        time.sleep(interval)
