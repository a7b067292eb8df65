"""`Clock`: injected time. A test moves `now` itself, so no test waits for a timer."""

from __future__ import annotations

__all__ = ["Clock"]


class Clock:
    """A callable returning `now` (seconds), for the `clock=` of breakers, buffers, the
    executor and the alerting rules."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
