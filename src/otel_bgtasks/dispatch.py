"""Where a scheduled task goes once its response is done: the dispatch seam.

Every HTTP request served by a Starlette (FastAPI) app gets one `TaskGroup`: the background
tasks it scheduled, in order. The seam is installed around ``Starlette.__call__``, i.e.
outside the app's middleware stack and so outside upstream's ``OpenTelemetryMiddleware``
(which ``FastAPIInstrumentor`` puts inside that stack). When the request's ASGI call returns,
the group is closed:

- tasks the response ran inline are done (ran: their span);
- tasks the response handed over (dispatch ``"local"``) are submitted, in order, to their
  `Dispatcher`; upstream's server span, request duration and active-requests have ended by
  then, so they no longer include task time;
- tasks the response never ran are skipped (`Executor.skip`): ``request_failed`` when the
  endpoint raised or returned an error response without them (an `HTTPException` after
  ``add_task``), or the client went away before the response was sent;
  ``previous_task_failed`` when an earlier task of the response failed with
  ``propagate_exceptions=True``; ``shutdown`` when the server cancelled the response's tasks.

Modes (``instrument(dispatch=...)`` for every task, ``@background_task(dispatch=...)`` per
task):

- ``"inline"`` (default): Starlette's semantics, unchanged: the response runs its tasks after
  the body is sent, inside its ASGI call.
- ``"local"``: a bounded in-process pool on the app's event loop. ``max_concurrency`` (per
  process) bounds how many responses' task groups run at once; a group waits for a slot,
  never dropped. A group's tasks run one after another in their order, with the inline
  failure semantics (isolated by default; with ``propagate_exceptions`` a failure skips the
  rest of the group). At lifespan shutdown (uvicorn SIGTERM, gunicorn, TestClient's context
  exit; with or without ``Telemetry.lifespan``, under ``opentelemetry-instrument`` too) the
  pool is drained for up to ``drain_timeout`` seconds; then what still runs is cancelled
  (its span ends, a durable task stays journaled) and what never started is skipped
  (``shutdown``; durable ones stay journaled). Without a lifespan (``uvicorn --lifespan off``,
  ``TestClient`` not used as a context manager) there is nothing to drain at shutdown, so
  ``"local"`` falls back to inline for that app.

`Dispatcher` is the protocol a distributed engine plugs into (``instrument(dispatch=...)``
takes an instance): it receives a response's states in order and owns them from then on;
each ends through `Executor.run` (here or in a worker), `Executor.skip` or `Executor.release`
(published elsewhere). No executor change is needed for a new engine.

Zero-code: ``OTEL_BGTASKS_DISPATCH`` (``inline`` | ``local``), ``OTEL_BGTASKS_MAX_CONCURRENCY``
and ``OTEL_BGTASKS_DRAIN_TIMEOUT`` set the keywords (`otel_bgtasks.environment`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import structlog
from starlette.applications import Starlette

from otel_bgtasks._execution import Executor
from otel_bgtasks.attributes import SkipReason
from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.registry import dispatcher_for, register_dispatcher
from otel_bgtasks.response_gate import RequestGate
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.task import DISPATCH_MODES, DispatchMode

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_MAX_CONCURRENCY",
    "DispatchSeam",
    "Dispatcher",
    "LocalDispatcher",
    "TaskGroup",
    "check_drain_timeout",
    "check_max_concurrency",
    "current_group",
    "dispatcher_for",
    "register_dispatcher",
]

DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_DRAIN_TIMEOUT = 30.0

_log = structlog.get_logger("otel_bgtasks")


@runtime_checkable
class Dispatcher(Protocol):
    """Where a response's tasks go when the response's ASGI call has returned.

    `submit` is called on the event loop with the states one response handed over, in
    scheduling order; it must not block, and takes ownership: each state must end exactly
    once, through ``executor.run(state)`` (its span; here or in a worker built with
    `otel_bgtasks.replay.standalone_executor`), ``executor.skip(state, reason)``, or
    ``executor.release(state)`` once it was published to another process. `drain` is awaited
    at the app's lifespan shutdown.
    """

    name: str

    def submit(self, executor: Executor, states: Sequence[TaskCallState]) -> None:
        """Take a response's tasks (in order); never blocks, never drops."""
        ...

    async def drain(self, executor: Executor, timeout: float) -> None:
        """Finish or account for everything submitted, within `timeout` seconds."""
        ...


@dataclass(slots=True, eq=False)
class TaskGroup:
    """The tasks one request scheduled (in order) and what its response did with them.

    Attributes:
        states: every task scheduled while serving the request.
        called: task ids the response ran inline or handed over.
        handed: (dispatcher, state) pairs handed over, in order, submitted at the end.
        failed: a task of this response raised (``propagate_exceptions=True``).
        closed: the request's ASGI call returned; later tasks belong to no response.
    """

    states: list[TaskCallState] = field(default_factory=list)
    called: set[str] = field(default_factory=set)
    handed: list[tuple[Dispatcher, TaskCallState]] = field(default_factory=list)
    failed: bool = False
    closed: bool = False


_group: ContextVar[TaskGroup | None] = ContextVar("otel_bgtasks_group", default=None)



def current_group() -> TaskGroup | None:
    """The task group of the request being served in this context, if any."""
    return _group.get()


def check_max_concurrency(value: object, where: str = "max_concurrency") -> int:
    """`value` as an int >= 1. Raises `ConfigurationError` naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{where}={value!r}: must be an integer >= 1")
    return value


def check_drain_timeout(value: object, where: str = "drain_timeout") -> float:
    """`value` as seconds >= 0, finite. Raises `ConfigurationError` naming `where`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigurationError(f"{where}={value!r}: must be a finite number of seconds >= 0")
    return float(value)


class _Pool:
    """The local workers of one event loop: `limit` coroutines taking groups from a queue."""

    def __init__(self, executor: Executor, limit: int) -> None:
        self.executor = executor
        self.queue: asyncio.Queue[list[TaskCallState]] = asyncio.Queue()
        self.workers = [asyncio.ensure_future(self._work()) for _ in range(limit)]
        self.running_groups = 0

    async def _work(self) -> None:
        _group.set(None)  # tasks scheduled by a task belong to no response
        while True:
            states = await self.queue.get()
            self.running_groups += 1
            try:
                await self._run_group(states)
            finally:
                self.running_groups -= 1
                self.queue.task_done()

    async def _run_group(self, states: list[TaskCallState]) -> None:
        executor = self.executor
        for index, state in enumerate(states):
            try:
                await executor.run(state)
            except Exception:
                # propagate_exceptions: the executor logged the failure; the rest of this
                # response's tasks do not run, as with Starlette's inline loop.
                for rest in states[index + 1 :]:
                    executor.skip(rest, SkipReason.PREVIOUS_TASK_FAILED)
                return
            except asyncio.CancelledError:  # drained past its timeout
                for rest in states[index + 1 :]:
                    executor.skip(rest, SkipReason.SHUTDOWN)
                raise

    async def drain(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.queue.join(), timeout)
        except TimeoutError:
            queued = self.queue.qsize()
            _log.warning(
                "background tasks not finished within the drain timeout; cancelling",
                drain_timeout=timeout,
                running_groups=self.running_groups,
                queued_groups=queued,
            )
        for worker in self.workers:
            worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self.workers, return_exceptions=True)
        while not self.queue.empty():
            for state in self.queue.get_nowait():
                self.executor.skip(state, SkipReason.SHUTDOWN)


class LocalDispatcher:
    """The ``"local"`` mode: a bounded pool of workers on the event loop that serves the app.

    One pool per event loop whose app's lifespan started, created at the first hand-off (an
    app whose tasks all run inline never starts workers) and drained at lifespan shutdown.
    `max_concurrency` bounds the task groups running at once (per loop, so per process under
    uvicorn and gunicorn); groups beyond it wait in an unbounded queue.
    """

    name = "local"

    def __init__(self, max_concurrency: int = DEFAULT_MAX_CONCURRENCY) -> None:
        self.max_concurrency = check_max_concurrency(max_concurrency)
        self._lifespans: dict[asyncio.AbstractEventLoop, int] = {}  # started, not shut down
        self._pools: dict[asyncio.AbstractEventLoop, _Pool] = {}

    def ready(self) -> bool:
        """An app's lifespan runs on the current event loop (so a drain will come)."""
        try:
            return asyncio.get_running_loop() in self._lifespans
        except RuntimeError:
            return False

    def started(self, executor: Executor) -> None:
        """An app's lifespan started on the running loop."""
        loop = asyncio.get_running_loop()
        self._lifespans[loop] = self._lifespans.get(loop, 0) + 1

    def submit(self, executor: Executor, states: Sequence[TaskCallState]) -> None:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            if loop not in self._lifespans:  # drained meanwhile: nothing will run them
                for state in states:
                    executor.skip(state, SkipReason.SHUTDOWN)
                return
            pool = self._pools[loop] = _Pool(executor, self.max_concurrency)
        pool.queue.put_nowait(list(states))

    async def drain(self, executor: Executor, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        count = self._lifespans.get(loop, 0) - 1
        if count > 0:
            self._lifespans[loop] = count
            return
        self._lifespans.pop(loop, None)
        pool = self._pools.pop(loop, None)
        if pool is not None:
            await pool.drain(timeout)


class _Inline:
    """The ``"inline"`` mode marker: the response runs the task in its own ASGI call."""

    name = "inline"

    def submit(self, executor: Executor, states: Sequence[TaskCallState]) -> None:
        raise AssertionError("inline tasks are run by the response, never submitted")

    async def drain(self, executor: Executor, timeout: float) -> None:
        return None


INLINE = _Inline()


async def _handed() -> None:
    """What a response awaits for a task handed to a dispatcher: nothing (a coroutine, as
    `BackgroundTask.__call__` always returned one)."""


class DispatchSeam:
    """Groups each request's tasks, routes them to their dispatcher, and accounts for the
    ones that never run. Installed by the instrumentor (`install` / `uninstall`)."""

    def __init__(
        self,
        executor: Executor,
        *,
        dispatch: DispatchMode | Dispatcher = "inline",
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        self.executor = executor
        self.local = LocalDispatcher(max_concurrency)
        self.drain_timeout = check_drain_timeout(drain_timeout)
        self.by_mode: dict[str, Dispatcher] = {"inline": INLINE, "local": self.local}
        if isinstance(dispatch, str):
            if dispatch not in DISPATCH_MODES:
                raise ConfigurationError(
                    f"dispatch={dispatch!r} is not valid; use one of {', '.join(DISPATCH_MODES)}"
                    " or a Dispatcher"
                )
            self.default: Dispatcher = self.by_mode[dispatch]
        elif isinstance(dispatch, Dispatcher):
            self.default = dispatch
            executor.default_remote = bool(getattr(dispatch, "remote", False))
            executor.default_dispatch = dispatch
        else:
            raise ConfigurationError(
                f"dispatch={dispatch!r}: pass one of {', '.join(DISPATCH_MODES)} or a Dispatcher"
            )
        self._original_call: Callable[..., Any] | None = None
        self.used: set[Any] = set()  # dispatchers other than local that got tasks

    def submit_now(self, state: TaskCallState) -> bool:
        """A task scheduled outside a response (`schedule()`): a remote dispatcher takes it
        at once (True); other tasks are run by the caller (False)."""
        mode = state.options.dispatch
        dispatcher = self.default if mode is None else mode
        if isinstance(dispatcher, str) or not getattr(dispatcher, "remote", False):
            return False
        self.used.add(dispatcher)
        dispatcher.submit(self.executor, [state])
        return True

    # -- scheduling and the response --------------------------------------------------------

    def scheduled(self, state: TaskCallState) -> None:
        """A task was scheduled: it joins the current request's group, if any."""
        group = _group.get()
        if group is not None and not group.closed:
            group.states.append(state)

    def call(self, state: TaskCallState) -> Awaitable[Any]:
        """The response runs (inline) or hands over (other modes) one of its tasks; returns
        what to await: in the common case the executor's run itself, no forwarding layer."""
        group = _group.get()
        if group is not None and group.closed:  # run later by the app itself, outside a response
            group = None
        mode = state.options.dispatch
        if mode is None:
            dispatcher = self.default
        elif isinstance(mode, str):
            dispatcher = self.by_mode[mode]
        else:
            dispatcher = mode
        if group is None:
            if getattr(dispatcher, "remote", False):  # bound for another process anyway
                self.used.add(dispatcher)
                dispatcher.submit(self.executor, [state])
                return _handed()
            return self.executor.run(state)
        group.called.add(state.task_id)
        if dispatcher is not INLINE and (dispatcher is not self.local or self.local.ready()):
            if dispatcher is not self.local:
                self.used.add(dispatcher)
            group.handed.append((dispatcher, state))
            return _handed()
        if self.executor.propagate_exceptions:  # the run may raise: the group must know
            return self._run_noting_failure(group, state)
        return self.executor.run(state)  # isolation: it never raises an Exception

    async def _run_noting_failure(self, group: TaskGroup, state: TaskCallState) -> None:
        try:
            await self.executor.run(state)
        except Exception:
            group.failed = True
            raise

    def close_group(self, group: TaskGroup, error: BaseException | None) -> None:
        """The request's ASGI call returned (or raised `error`): submit what the response
        handed over, skip what it never ran."""
        group.closed = True
        executor = self.executor
        handed = group.handed
        if handed:
            batches: dict[int, tuple[Dispatcher, list[TaskCallState]]] = {}
            for dispatcher, state in handed:
                batches.setdefault(id(dispatcher), (dispatcher, []))[1].append(state)
            for dispatcher, states in batches.values():
                dispatcher.submit(executor, states)
        if len(group.called) == len(group.states):
            return
        if group.failed:
            reason = SkipReason.PREVIOUS_TASK_FAILED
        elif isinstance(error, asyncio.CancelledError) and group.called:
            reason = SkipReason.SHUTDOWN  # the server cancelled the response's task run
        else:
            reason = SkipReason.REQUEST_FAILED
        for state in group.states:
            if state.task_id not in group.called:
                executor.skip(state, reason)

    # -- the ASGI seam ----------------------------------------------------------------------

    def install(self) -> None:
        """Wrap ``Starlette.__call__`` (every Starlette and FastAPI app, any server)."""
        original = Starlette.__call__
        self._original_call = original
        seam = self

        async def __call__(app: Starlette, scope: Any, receive: Any, send: Any) -> None:
            kind = scope["type"]
            if kind == "http" and _group.get() is None:
                await seam._serve_http(original, app, scope, receive, send)
            elif kind == "lifespan":
                await original(app, scope, seam._lifespan_receive(receive), send)
            else:  # websockets; a mounted app inside a request: the outer group owns it
                await original(app, scope, receive, send)

        __call__.__wrapped__ = original  # type: ignore[attr-defined]
        Starlette.__call__ = __call__  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        """Restore ``Starlette.__call__``."""
        if self._original_call is not None:
            Starlette.__call__ = self._original_call  # type: ignore[method-assign]
            self._original_call = None

    async def _serve_http(
        self, original: Callable[..., Any], app: Starlette, scope: Any, receive: Any, send: Any
    ) -> None:
        group = TaskGroup()
        token = _group.set(group)
        # durable journal rows are written off the loop and committed before the response
        # starts (response_gate, DESIGN.md §6)
        gate = RequestGate()
        error: BaseException | None = None
        try:
            await original(app, scope, receive, gate.wrap(send))
        except BaseException as exc:
            error = exc
            raise
        finally:
            await gate.close()
            _group.reset(token)
            if group.states:
                self.close_group(group, error)
            else:
                group.closed = True

    def _lifespan_receive(self, receive: Callable[[], Any]) -> Callable[[], Any]:
        seam = self

        async def wrapped() -> Any:
            message = await receive()
            kind = message.get("type")
            if kind == "lifespan.startup":
                seam.local.started(seam.executor)
            elif kind == "lifespan.shutdown":
                # Before the app's own shutdown (its lifespan flushes telemetry, closes pools).
                await seam.drain()
                # Then the journal's queued writes and the store's buffer (bounded): uvicorn
                # ends a SIGTERM'd process without exit handlers.
                await asyncio.to_thread(seam.executor.flush_store)
            return message

        return wrapped

    async def drain(self) -> None:
        """Drain the running loop's local pool (and a custom default dispatcher)."""
        await self.local.drain(self.executor, self.drain_timeout)
        others = set(self.used)
        if self.default is not self.local and self.default is not INLINE:
            others.add(self.default)
        for dispatcher in others:
            await dispatcher.drain(self.executor, self.drain_timeout)
