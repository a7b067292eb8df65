"""Which event loop runs this thread, whatever the backend (asyncio or trio, through anyio:
Starlette's own concurrency layer)."""

from __future__ import annotations

import asyncio

from anyio.lowlevel import current_token

__all__ = ["running_loop"]


def running_loop() -> object | None:
    """The event loop running in this thread (asyncio's loop, or trio's token), or None.

    The same object for every call on one loop: a key for per-loop state.
    """
    try:
        return asyncio.get_running_loop()  # the common case, and the cheapest check
    except RuntimeError:
        pass
    try:
        return current_token().native_token
    except Exception:  # no event loop in this thread (anyio's NoEventLoopError)
        return None
