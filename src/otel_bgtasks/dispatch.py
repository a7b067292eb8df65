"""Where a scheduled task goes: the dispatch seam.

Every HTTP request served by a Starlette (FastAPI) app gets one `TaskGroup`: the background
tasks it scheduled, in order. The seam is installed around ``Starlette.__call__``, i.e.
outside the app's middleware stack and so outside upstream's ``OpenTelemetryMiddleware``
(which ``FastAPIInstrumentor`` puts inside that stack). When the request's ASGI call returns,
the group is closed:

- tasks the response ran inline are done (ran: their span);
- tasks the response handed over (any dispatch but ``"inline"``) are submitted, in order, to
  their `Dispatcher`; upstream's server span, request duration and active-requests have ended
  by then, so they no longer include task time;
- tasks the response never ran are skipped (`Executor.skip`): ``request_failed`` when the
  endpoint raised or returned an error response without them (an `HTTPException` after
  ``add_task``), or the client went away before the response was sent;
  ``previous_task_failed`` when an earlier task of the response failed with
  ``propagate_exceptions=True``; ``shutdown`` when the server cancelled the response's tasks.

Tasks scheduled outside a response (``schedule()``, a task scheduling a task, a task of the
local pool) go to their dispatcher at once: every task whose dispatch is not ``"inline"`` goes
to its dispatcher wherever it was scheduled.

Dispatch (``instrument(dispatch=...)`` for every task, ``@background_task(dispatch=...)`` per
task):

- ``"inline"`` (default): Starlette's semantics, unchanged: the response runs its tasks after
  the body is sent, inside its ASGI call.
- ``"local"``: a bounded in-process pool on the app's event loop (asyncio or trio: the pool is
  built on anyio, Starlette's own concurrency layer). ``max_concurrency`` (per process) bounds
  how many responses' task groups run at once; at most ``max_queued`` groups wait for a slot.
  Beyond that the response runs its tasks inline, as Starlette does (the server slows down
  instead of growing; counted in ``bgtasks.task.inlined``). A group's tasks run one after
  another in their order, with the inline failure semantics (isolated by default; with
  ``propagate_exceptions`` a failure skips the rest of the group). The pool serves while the
  app's lifespan does; at lifespan shutdown (uvicorn SIGTERM, gunicorn, TestClient's context
  exit; under ``opentelemetry-instrument`` too) it is drained for up to ``drain_timeout``
  seconds; then what still runs is cancelled (its span ends, a durable task stays journaled)
  and what never started is skipped (``shutdown``; durable ones stay journaled). Without a
  lifespan (``uvicorn --lifespan off``, ``TestClient`` not used as a context manager) there
  is nothing to drain at shutdown, so ``"local"`` falls back to inline for that app.
- a `Dispatcher` object: a task engine (e.g. Celery). It receives the tasks in order and owns
  them (see `otel_bgtasks.routes.Dispatcher` for what it must do with each). A dispatcher
  whose `submit` raises cannot lose tasks: those it did not account for are dead-lettered as
  ``undeliverable`` (the error logged once), and the response's other dispatchers still get
  theirs. Every dispatcher object the seam sees is registered by its route
  (`register_dispatcher`), for recovery and replay, and drained at shutdown.

Zero-code: ``OTEL_BGTASKS_DISPATCH`` (``inline`` | ``local``), ``OTEL_BGTASKS_MAX_CONCURRENCY``,
``OTEL_BGTASKS_MAX_QUEUED`` and ``OTEL_BGTASKS_DRAIN_TIMEOUT`` set the keywords
(`otel_bgtasks.environment`).
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from starlette.applications import Starlette

from otel_bgtasks._execution import Executor
from otel_bgtasks._logger import log
from otel_bgtasks._loops import running_loop
from otel_bgtasks.attributes import TASK_NAME, SkipReason
from otel_bgtasks.config import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_QUEUED,
    check_drain_timeout,
    check_max_concurrency,
    check_max_queued,
)
from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.options import EffectiveOptions
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry
from otel_bgtasks.response_gate import RequestGate
from otel_bgtasks.routes import (
    Dispatcher,
    dispatcher_for,
    register_dispatcher,
    registered_routes,
    unregister_dispatcher,
)
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.task import Dispatch
from otel_bgtasks.telemetry import flush_global_providers

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_MAX_QUEUED",
    "DispatchSeam",
    "Dispatcher",
    "LocalDispatcher",
    "TaskGroup",
    "check_drain_timeout",
    "check_max_concurrency",
    "check_max_queued",
    "current_group",
    "dispatcher_for",
    "register_dispatcher",
    "registered_routes",
    "unregister_dispatcher",
]

class _Pool:
    """The local workers of one app's lifespan on one event loop: `limit` tasks taking
    groups from a queue that holds at most `max_queued` of them (reserved when a response
    hands its first local task over, so the bound holds while responses are still running).
    """

    def __init__(self, executor: Executor, limit: int, max_queued: int) -> None:
        self.executor = executor
        self.limit = limit
        self.max_queued = max_queued
        self._send, self._receive = anyio.create_memory_object_stream[list[TaskCallState]](
            math.inf
        )
        self.waiting = 0  # groups queued or reserved, not taken by a worker yet
        self.running_groups = 0
        self._reserved = 0
        self._unfinished = 0  # groups submitted and not done
        self._idle: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._wanted = anyio.Event()  # set by the first group: the workers start then
        self.closed = False
        self._cancelled = anyio.get_cancelled_exc_class()

    def reserve(self) -> bool:
        """Take a place for a group about to be submitted: a free slot, else one of the
        `max_queued` places in the queue; False when every slot is busy and the queue full."""
        if self.closed or self.waiting >= self.max_queued + self.limit - self.running_groups:
            return False
        self.waiting += 1
        self._reserved += 1
        return True

    def put(self, states: Sequence[TaskCallState]) -> None:
        """Queue a group (in its reserved place, if it has one)."""
        if self._reserved:
            self._reserved -= 1
        else:
            self.waiting += 1
        if self.closed:  # shut down meanwhile: nothing will run them
            self.waiting -= 1
            for state in states:
                self.executor.skip(state, SkipReason.SHUTDOWN)
            return
        self._unfinished += 1
        self._send.send_nowait(list(states))
        self._wanted.set()

    def start(self, group: anyio.abc.TaskGroup) -> None:
        """Serve in `group` (its lifetime: the lifespan serving): the workers start with the
        first group submitted (an app whose tasks all run inline never starts them)."""
        self._scope = group.cancel_scope

        async def on_demand() -> None:
            await self._wanted.wait()
            for _ in range(self.limit):
                group.start_soon(self._work)

        group.start_soon(on_demand)

    async def _work(self) -> None:
        _group.set(None)  # tasks scheduled by a task belong to no response
        _pool.set(self)
        async for states in self._receive:
            self.waiting -= 1
            self.running_groups += 1
            try:
                await self._run_group(states)
            finally:
                self.running_groups -= 1
                self._unfinished -= 1
                if self._unfinished == 0 and self._idle is not None:
                    self._idle.set()

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
            except self._cancelled:  # drained past its timeout
                for rest in states[index + 1 :]:
                    executor.skip(rest, SkipReason.SHUTDOWN)
                raise

    async def drain(self, timeout: float) -> None:
        """Let the workers finish what is queued, for up to `timeout` seconds (then `stop`
        cancels what still runs)."""
        if self._unfinished:
            self._idle = anyio.Event()
            with anyio.move_on_after(timeout):
                await self._idle.wait()
        if self._unfinished:
            log.warning(
                "background tasks not finished within the drain timeout; cancelling",
                drain_timeout=timeout,
                running_groups=self.running_groups,
                queued_groups=self.waiting,
            )

    def stop(self) -> None:
        """Accept no more groups; cancel the workers."""
        self.closed = True
        if self._scope is not None:
            self._scope.cancel()

    def close(self) -> None:
        """After the workers ended: skip (``shutdown``) every group never started."""
        self.closed = True
        while True:
            try:
                states = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            self.waiting -= 1
            self._unfinished -= 1
            for state in states:
                self.executor.skip(state, SkipReason.SHUTDOWN)
        self._send.close()
        self._receive.close()


_pool: ContextVar[_Pool | None] = ContextVar("otel_bgtasks_pool", default=None)


class LocalDispatcher:
    """The ``"local"`` mode: a bounded pool of workers on the event loop that serves the app.

    One pool per app and event loop, from its lifespan's startup to its shutdown (an app whose
    tasks all run inline never starts workers). `max_concurrency` bounds the task groups
    running at once; at most `max_queued` more wait for a slot.
    """

    name = "local"
    route = "local"
    remote = False

    def __init__(
        self,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self.max_concurrency = check_max_concurrency(max_concurrency)
        self.max_queued = check_max_queued(max_queued)
        self._pools: dict[tuple[object, object], _Pool] = {}  # (app, loop) -> its pool
        self._newest: dict[object, _Pool] = {}  # loop -> the newest pool started on it

    def open(self, executor: Executor, app: object) -> _Pool:
        """The pool of `app` on the running loop (its lifespan started)."""
        loop = running_loop()
        pool = _Pool(executor, self.max_concurrency, self.max_queued)
        self._pools[(app, loop)] = self._newest[loop] = pool
        return pool

    def forget(self, app: object, pool: _Pool) -> None:
        """`app`'s lifespan on the running loop ended: its pool takes nothing more."""
        loop = running_loop()
        if self._pools.get((app, loop)) is pool:
            del self._pools[(app, loop)]
        if self._newest.get(loop) is pool:
            del self._newest[loop]

    def pool_for(self, app: object) -> _Pool | None:
        """The serving pool of `app` on the running loop (None: no lifespan, run inline)."""
        return self._pools.get((app, running_loop()))

    def current_pool(self) -> _Pool | None:
        """For a task scheduled outside a response: the pool running the current task, else
        the newest pool of the running loop, else None."""
        pool = _pool.get()
        if pool is not None and not pool.closed:
            return pool
        return self._newest.get(running_loop())

    def submit(self, executor: Executor, states: Sequence[TaskCallState]) -> None:
        """Queue `states` as one group on the current pool (`current_pool`); without one,
        nothing will run them: skipped (``shutdown``)."""
        pool = self.current_pool()
        if pool is None:
            for state in states:
                executor.skip(state, SkipReason.SHUTDOWN)
            return
        pool.put(states)

    async def drain(self, executor: Executor, timeout: float) -> None:
        """Drain every pool of the running loop (`_Pool.drain`), then stop its workers."""
        loop = running_loop()
        for (_, pool_loop), pool in list(self._pools.items()):
            if pool_loop is loop:
                await pool.drain(timeout)
                pool.stop()

    def resend(
        self, executor: Executor, call: DeadLetter | JournalEntry, *, task_id: str
    ) -> float | None:
        raise NotImplementedError("the local pool runs tasks in this process; nothing to resend")


class _Inline:
    """The ``"inline"`` mode marker: the response runs the task in its own ASGI call."""

    name = "inline"
    route = "inline"
    remote = False

    def submit(self, executor: Executor, states: Sequence[TaskCallState]) -> None:
        raise AssertionError("inline tasks are run by the response, never submitted")

    async def drain(self, executor: Executor, timeout: float) -> None:
        return None

    def resend(
        self, executor: Executor, call: DeadLetter | JournalEntry, *, task_id: str
    ) -> float | None:
        raise NotImplementedError("inline tasks run in their response; nothing to resend")


INLINE = _Inline()


@dataclass(slots=True, eq=False)
class TaskGroup:
    """The tasks one request scheduled (in order) and what its response did with them.

    Attributes:
        app: the Starlette app serving the request (its local pool).
        states: every task scheduled while serving the request.
        called: task ids the response ran inline or handed over.
        handed: (dispatcher, state) pairs handed over, in order, submitted at the end.
        failed: a task of this response raised (``propagate_exceptions=True``).
        closed: the request's ASGI call returned; later tasks belong to no response.
        pool: the local pool this response reserved a place in (its local tasks go there).
        overflow: the local pool was full: this response runs its local tasks inline.
    """

    app: object = None
    states: list[TaskCallState] = field(default_factory=list)
    called: set[str] = field(default_factory=set)
    handed: list[tuple[Dispatcher, TaskCallState]] = field(default_factory=list)
    failed: bool = False
    closed: bool = False
    pool: _Pool | None = None
    overflow: bool = False


_group: ContextVar[TaskGroup | None] = ContextVar("otel_bgtasks_group", default=None)


def current_group() -> TaskGroup | None:
    """The task group of the request being served in this context, if any."""
    return _group.get()


async def _handed() -> None:
    """What a response awaits for a task handed to a dispatcher: nothing (a coroutine, as
    `BackgroundTask.__call__` always returned one)."""


@dataclass(slots=True)
class _Lifespan:
    pool: _Pool | None = None
    serving: bool = False


class DispatchSeam:
    """Groups each request's tasks, routes every task to its dispatcher, and accounts for the
    ones that never run. Installed by the instrumentor (`install` / `uninstall`); the default
    dispatch is the executor's (``instrument(dispatch=...)``)."""

    def __init__(
        self,
        executor: Executor,
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_queued: int = DEFAULT_MAX_QUEUED,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        self.executor = executor
        self.local = LocalDispatcher(max_concurrency, max_queued)
        self.drain_timeout = check_drain_timeout(drain_timeout)
        # every dispatcher object seen, by id (kept alive here): drained at shutdown
        self._known: dict[int, Dispatcher] = {}
        self._registered: list[Dispatcher] = []
        self.default = self._resolve(executor.defaults.dispatch)
        self._original_call: Callable[..., Any] | None = None
        self._accounting: list[concurrent.futures.Future[None]] = []
        self._accounting_lock = threading.Lock()
        self._offload: concurrent.futures.ThreadPoolExecutor | None = None

    # -- dispatchers ------------------------------------------------------------------------

    def _resolve(self, dispatch: Dispatch) -> Dispatcher:
        if dispatch == "inline":
            return INLINE
        if dispatch == "local":
            return self.local
        return self._adopt(dispatch)

    def _adopt(self, dispatch: object) -> Dispatcher:
        known = self._known.get(id(dispatch))
        if known is not None:
            return known
        if not isinstance(dispatch, Dispatcher):
            raise ConfigurationError(
                f"dispatch={dispatch!r}: a dispatcher needs name, route, remote, submit(),"
                " drain() and resend() (otel_bgtasks.dispatch.Dispatcher)"
            )
        if dispatcher_for(dispatch.route) is None:
            register_dispatcher(dispatch)  # recovery and replay find it by its route
            self._registered.append(dispatch)
        self._known[id(dispatch)] = dispatch
        return dispatch

    def _dispatcher(self, options: EffectiveOptions) -> Dispatcher:
        dispatch = options.dispatch
        if dispatch == "local":
            return self.local
        return self._known.get(id(dispatch)) or self._adopt(dispatch)

    def _submit(self, dispatcher: Dispatcher, states: list[TaskCallState]) -> None:
        """`dispatcher.submit`, contained: if it raises, the tasks it did not account for
        are dead-lettered as ``undeliverable`` (off the loop), the error logged once."""
        executor = self.executor
        try:
            dispatcher.submit(executor, states)
        except Exception as exc:
            left = [s for s in states if s.task_id in executor.inflight]
            log.exception(
                "dispatcher could not take its tasks; they are dead-lettered as undeliverable",
                dispatcher=dispatcher.name,
                route=dispatcher.route,
                tasks=len(left),
                task_names=sorted({s.name for s in left})[:20],
            )
            if left:
                self._account_off_loop(left, exc)

    def _account_off_loop(self, states: list[TaskCallState], error: BaseException) -> None:
        def dead_letter() -> None:
            for state in states:
                try:
                    self.executor.dead_letter_unrun(state, DeadLetterReason.UNDELIVERABLE, error)
                except Exception:  # never lose the others
                    log.exception("undeliverable task could not be accounted for")

        with self._accounting_lock:
            if self._offload is None:
                self._offload = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="otel-bgtasks-dispatch"
                )
            future = self._offload.submit(dead_letter)
            self._accounting = [f for f in self._accounting if not f.done()]
            self._accounting.append(future)

    def settle(self, timeout: float | None = None) -> None:
        """Wait (blocking) until the tasks of dispatchers that raised are dead-lettered."""
        with self._accounting_lock:
            pending = list(self._accounting)
        concurrent.futures.wait(pending, timeout=timeout)

    # -- scheduling and the response --------------------------------------------------------

    def scheduled(self, state: TaskCallState) -> None:
        """A task was scheduled: it joins the current request's group, if any."""
        group = _group.get()
        if group is not None and not group.closed:
            group.states.append(state)

    def dispatch_now(self, state: TaskCallState) -> bool:
        """Hand a task scheduled outside a response to its dispatcher at once; False when
        the caller runs it here (dispatch ``"inline"``, or ``"local"`` without a serving
        pool on this loop, or with its queue full)."""
        options = state.options
        if options.inline:
            return False
        dispatcher = self._dispatcher(options)
        if dispatcher is self.local:
            pool = self.local.current_pool()
            if pool is None:
                return False
            if not pool.reserve():
                self.executor.instruments.inlined.add(1, {TASK_NAME: state.name})
                return False
            pool.put([state])
            return True
        self._submit(dispatcher, [state])
        return True

    def call(self, state: TaskCallState) -> Awaitable[Any]:
        """The response runs (inline) or hands over (other dispatch) one of its tasks;
        returns what to await: in the common case the executor's run itself, no forwarding
        layer. Outside a response, a task goes to its dispatcher at once."""
        group = _group.get()
        # outside a response (or run later by the app itself): to its dispatcher at once
        if group is None or group.closed:
            if state.options.inline or not self.dispatch_now(state):
                return self.executor.run(state)
            return _handed()
        options = state.options
        group.called.add(state.task_id)
        if not options.inline:
            dispatcher = self._dispatcher(options)
            if dispatcher is not self.local:
                group.handed.append((dispatcher, state))
                return _handed()
            if not group.overflow:
                pool = group.pool
                if pool is None:
                    pool = self.local.pool_for(group.app)
                    if pool is not None:
                        if pool.reserve():
                            group.pool = pool
                        else:  # back-pressure: this response runs them, as Starlette would
                            group.overflow = True
                            pool = None
                if pool is not None:
                    group.handed.append((dispatcher, state))
                    return _handed()
            if group.overflow:
                self.executor.instruments.inlined.add(1, {TASK_NAME: state.name})
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
        handed over (each dispatcher its batch, in order), skip what it never ran."""
        group.closed = True
        executor = self.executor
        handed = group.handed
        if handed:
            batches: dict[int, tuple[Dispatcher, list[TaskCallState]]] = {}
            for dispatcher, state in handed:
                batches.setdefault(id(dispatcher), (dispatcher, []))[1].append(state)
            for dispatcher, states in batches.values():
                if dispatcher is self.local and group.pool is not None:
                    group.pool.put(states)
                else:
                    self._submit(dispatcher, states)
        if len(group.called) == len(group.states):
            return
        if group.failed:
            reason = SkipReason.PREVIOUS_TASK_FAILED
        elif isinstance(error, anyio.get_cancelled_exc_class()) and group.called:
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
                await seam._serve_lifespan(original, app, scope, receive, send)
            else:  # websockets; a mounted app inside a request: the outer group owns it
                await original(app, scope, receive, send)

        __call__.__wrapped__ = original  # type: ignore[attr-defined]
        Starlette.__call__ = __call__  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        """Restore ``Starlette.__call__``; forget the dispatchers registered here."""
        if self._original_call is not None:
            Starlette.__call__ = self._original_call  # type: ignore[method-assign]
            self._original_call = None
        for dispatcher in self._registered:
            unregister_dispatcher(dispatcher)
        self._registered.clear()
        self.settle()
        if self._offload is not None:
            self._offload.shutdown(wait=True)
            self._offload = None

    async def _serve_http(
        self, original: Callable[..., Any], app: Starlette, scope: Any, receive: Any, send: Any
    ) -> None:
        group = TaskGroup(app)
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

    async def _serve_lifespan(
        self, original: Callable[..., Any], app: Starlette, scope: Any, receive: Any, send: Any
    ) -> None:
        """The app's lifespan: at startup its local pool opens; while the app serves (the
        lifespan waiting for its shutdown message) the pool's workers run; at shutdown,
        before the app's own shutdown (its lifespan flushes telemetry, closes pools), the
        pool and every dispatcher are drained, then the journal and the store flushed."""
        lifespan = _Lifespan()
        seam = self

        async def wrapped() -> Any:
            if lifespan.pool is not None and not lifespan.serving:
                lifespan.serving = True
                return await seam._serve_until_shutdown(app, lifespan.pool, receive)
            message = await receive()
            kind = message.get("type")
            if kind == "lifespan.startup":
                lifespan.pool = seam.local.open(seam.executor, app)
            elif kind == "lifespan.shutdown":
                await seam._shutdown(None)
            return message

        try:
            await original(app, scope, wrapped, send)
        finally:
            if lifespan.pool is not None:  # startup failed, or no shutdown message came
                self.local.forget(app, lifespan.pool)
                lifespan.pool.close()

    async def _serve_until_shutdown(
        self, app: Starlette, pool: _Pool, receive: Callable[[], Awaitable[Any]]
    ) -> Any:
        error: Exception | None = None
        message: Any = None
        async with anyio.create_task_group() as workers:
            pool.start(workers)
            try:
                message = await receive()
            except Exception as exc:  # a server's error: raised below, unwrapped
                error = exc
            else:
                if message.get("type") == "lifespan.shutdown":
                    await self._drain(pool)
            pool.stop()
        self.local.forget(app, pool)
        pool.close()
        if error is not None:
            raise error
        if message.get("type") == "lifespan.shutdown":
            await self._flush()
        return message

    async def _drain(self, pool: _Pool | None) -> None:
        """Drain the app's pool, then every dispatcher object seen (each `drain_timeout`)."""
        if pool is not None:
            await pool.drain(self.drain_timeout)
        for dispatcher in list(self._known.values()):
            try:
                await dispatcher.drain(self.executor, self.drain_timeout)
            except Exception:
                log.exception("dispatcher drain failed", dispatcher=dispatcher.name)

    async def _shutdown(self, pool: _Pool | None) -> None:
        await self._drain(pool)
        await self._flush()

    async def _flush(self) -> None:
        # Tasks of dispatchers that raised, then the journal's queued writes and the store's
        # buffer (bounded): uvicorn ends a SIGTERM'd process without exit handlers.
        def flush() -> None:
            self.settle()
            self.executor.flush_store()
            flush_global_providers()  # spans, metrics: same reason (zero-code apps too)

        await anyio.to_thread.run_sync(flush)
