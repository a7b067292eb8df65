"""Hold a response's first message until its request's durable journal writes are committed.

DESIGN.md §6: a durable task's journal row is committed before the response's first message
is sent (a client that saw the response can rely on the task being recovered after a crash).
Written on the event loop, a slow store would freeze the server; so inside a request wrapped
by `JournalGate` the journal hands its writes to a worker thread and registers them here, and
the gate awaits them (off the loop) when the response starts. Without a gate, writes from
the event loop stay synchronous: the guarantee is kept either way.

    app = FastAPI()
    app.add_middleware(JournalGate)      # or: app = JournalGate(app)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

import anyio.to_thread

__all__ = ["JournalGate", "RequestGate", "gate_active", "track_write", "wait_for_writes"]

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_writes: ContextVar[list[concurrent.futures.Future[Any]] | None] = ContextVar(
    "otel_bgtasks_journal_writes", default=None
)


def gate_active() -> bool:
    """True inside a request a `JournalGate` holds (journal writes may be deferred)."""
    return _writes.get() is not None


def track_write(future: concurrent.futures.Future[Any]) -> bool:
    """Register a pending journal write of the current request; False without a gate."""
    pending = _writes.get()
    if pending is None:
        return False
    pending.append(future)
    return True


async def wait_for_writes() -> None:
    """Wait (without blocking the loop) for the current request's registered writes.

    A write that failed is not raised here: the journal logged it, and the buffered store
    keeps it; the response goes out either way.
    """
    pending = _writes.get()
    while pending:
        future = pending.pop()
        try:
            await _wait(future)
        except Exception:  # logged where the write ran
            continue


async def _wait(future: concurrent.futures.Future[Any]) -> Any:
    """Await a thread's future on asyncio or on trio (Starlette's other backend)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: a worker thread waits for it
        return await anyio.to_thread.run_sync(future.result)
    return await asyncio.wrap_future(future)


class RequestGate:
    """The gate of one HTTP request, for an ASGI wrapper that already exists (the dispatch
    seam): open it around the request, pass `wrap(send)` down, `await close()` at the end::

        gate = RequestGate()
        try:
            await app(scope, receive, gate.wrap(send))
        finally:
            await gate.close()

    Open it in the task that runs the request: the journal registers its writes in it.
    """

    def __init__(self) -> None:
        self._token = _writes.set([])
        self._started = False

    def wrap(self, send: _Send) -> _Send:
        async def gated_send(message: _Message) -> None:
            if not self._started and message.get("type") == "http.response.start":
                self._started = True
                await wait_for_writes()
            await send(message)

        return gated_send

    async def close(self) -> None:
        """Wait for the writes still registered (tasks added after the response started)."""
        try:
            await wait_for_writes()
        finally:
            _writes.reset(self._token)


class JournalGate:
    """ASGI middleware: defer durable journal writes off the event loop, and send a
    response's first message only once they are committed."""

    def __init__(self, app: _ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        gate = RequestGate()
        try:
            await self.app(scope, receive, gate.wrap(send))
        finally:
            await gate.close()
