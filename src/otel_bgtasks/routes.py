"""The `Dispatcher` protocol (where a scheduled task goes) and the registry that finds a
dispatcher again by its route.

A dispatcher is the seam a task engine plugs into (`otel_bgtasks.dispatch` installs it around
Starlette; the README's "The dispatch seam" section is the protocol a second engine
implements). Journal rows handed to a dispatcher and the dead letters of its tasks record its
`route`; recovery and replay find it with `dispatcher_for(route)`, so a task sent through a
route goes back through it, never runs in the wrong place.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from otel_bgtasks._execution import Executor
from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.records import DeadLetter, JournalEntry
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.task import DispatchTarget

__all__ = [
    "Dispatcher",
    "dispatcher_for",
    "register_dispatcher",
    "registered_routes",
    "unregister_dispatcher",
]


@runtime_checkable
class Dispatcher(DispatchTarget, Protocol):
    """Where scheduled tasks go: the protocol of ``"local"`` and of any task engine.

    Attributes:
        name: shown in logs (``"inline"``, ``"local"``, e.g. ``"celery"``).
        route: a stable id stored on the journal rows handed to it and on its tasks' dead
            letters (e.g. ``"celery:bgtasks"``); recovery and replay find the dispatcher by
            it (`register_dispatcher`).
        remote: True when tasks leave the process: their call is encoded at scheduling
            (`TaskCallState.call`), so bad arguments raise in the endpoint.

    Each state given to `submit` ends EXACTLY ONCE through one of: ``await
    executor.run(state)`` (ran here: its span and metrics), ``executor.skip(state, reason)``
    (never runs), ``executor.hand_off(state, route, deadline)`` (published elsewhere; a
    durable task's journal row moves with it), ``executor.dead_letter_unrun(state, reason,
    error)`` (never ran: undeliverable, refused, worker lost).
    """

    def submit(self, executor: Executor, states: Sequence[TaskCallState]) -> None:
        """Take these tasks (one response's, in order; or one task scheduled outside a
        response) and own them from now on. Called on the event loop (or the thread that
        scheduled the task): never blocks, never drops. An exception is contained by the
        seam: the tasks not accounted for yet are dead-lettered as ``undeliverable``."""
        ...

    async def drain(self, executor: Executor, timeout: float) -> None:
        """At the app's shutdown: finish or account for everything submitted within
        `timeout` seconds."""
        ...

    def resend(
        self, executor: Executor, call: DeadLetter | JournalEntry, *, task_id: str
    ) -> float | None:
        """Publish an already-encoded call again, with task id `task_id`: recovery of a
        handed-off journal row past its deadline, or the replay of a dead letter whose route
        is this dispatcher's. ``executor.message_from_call(call, ...)`` builds the message
        (checking the stored call as a replay does). Blocking allowed (called off the event
        loop); raises when it could not publish. Returns the new deadline of a re-sent
        journal row (epoch seconds on the store's clock), or None for recovery's default
        (`otel_bgtasks.recovery.RESEND_DEADLINE`).

        Only remote dispatchers are asked (an in-process one may raise NotImplementedError).
        """
        ...


_lock = threading.Lock()
_by_route: dict[str, Dispatcher] = {}


def register_dispatcher(dispatcher: Dispatcher) -> None:
    """Make `dispatcher` the one `dispatcher_for(dispatcher.route)` returns (recovery and
    replay send through it). The instrumentor registers the dispatchers it is given;
    a process that only replays or recovers (the CLI, a worker) registers its own.

    Raises:
        ConfigurationError: not a `Dispatcher`, or another dispatcher has that route.
    """
    if not isinstance(dispatcher, Dispatcher):
        raise ConfigurationError(
            f"{dispatcher!r} is not a Dispatcher (name, route, remote, submit, drain, resend)"
        )
    route = dispatcher.route
    if not isinstance(route, str) or not route:
        raise ConfigurationError(f"dispatcher {dispatcher.name!r}: route must be a non-empty str")
    with _lock:
        known = _by_route.get(route)
        if known is not None and known is not dispatcher:
            raise ConfigurationError(
                f"route {route!r} already belongs to dispatcher {known.name!r}; give each"
                " dispatcher its own route (e.g. the engine and its queue name)"
            )
        _by_route[route] = dispatcher


def unregister_dispatcher(dispatcher: Dispatcher) -> None:
    """Forget `dispatcher` (if it is the one registered for its route)."""
    with _lock:
        if _by_route.get(dispatcher.route) is dispatcher:
            del _by_route[dispatcher.route]


def dispatcher_for(route: str) -> Dispatcher | None:
    """The dispatcher registered for `route`, or None."""
    return _by_route.get(route)


def registered_routes() -> list[str]:
    """The routes with a registered dispatcher, sorted."""
    with _lock:
        return sorted(_by_route)
