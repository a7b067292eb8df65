"""Instrument FastAPI/Starlette background tasks with OpenTelemetry.

Usage::

    from otel_bgtasks import BackgroundTasksInstrumentor

    BackgroundTasksInstrumentor().instrument()          # global providers
    BackgroundTasksInstrumentor().instrument(
        tracer_provider=tp, meter_provider=mp,           # explicit providers
        trace_mode="child",                              # "link" (default) or "child"
        propagate_exceptions=False,                      # True: Starlette's raise-and-stop
        start_hook=..., end_hook=...,                    # (span, TaskCallState) -> None
        retry=RetryPolicy(max_attempts=4),               # defaults for every task ...
        circuit=CircuitBreaker(failure_threshold=5),     # ... a decorator overrides them
        timeout=30.0,
        dead_letter_store="sqlite:///var/lib/app/dlq.db",  # or a store; None disables
        durable=False,
        dispatch="inline",                               # or "local": a bounded pool after
        max_concurrency=64, max_queued=1000,             # the response, or a Dispatcher
        drain_timeout=30.0,                              # (otel_bgtasks.dispatch)
    )

or, with no code change, ``opentelemetry-instrument uvicorn app:app`` (this package registers an
``opentelemetry_instrumentor`` entry point; ``OTEL_BGTASKS_*`` variables set the plain-valued
keywords when not passed, see `otel_bgtasks.environment`).

Every Starlette ``BackgroundTask`` is covered: ``BackgroundTasks.add_task`` in endpoints and
dependencies, ``Response(background=...)``, async and sync functions, partials and callable
objects. At scheduling, the current span gets a ``bgtasks.enqueued`` event; each run is one
CONSUMER span ``process {task_name}`` in a new trace linked to the scheduling span (``link``) or
a child of it (``child``). Outside FastAPI, ``schedule(func, *args)`` gives the same path (and
hands the task to its dispatcher at once when its dispatch is not ``"inline"``).

With ``opentelemetry-instrumentation-fastapi`` (which wraps ``BackgroundTask.__call__`` in a
bare span since 0.63b0) each task run still yields exactly one task span, ours, whichever is
instrumented first.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypedDict, Unpack

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider
from starlette.background import BackgroundTask, BackgroundTasks

from otel_bgtasks import _execution
from otel_bgtasks._execution import (
    Executor,
    TaskHook,
    TraceMode,
    active_executor,
    set_active_executor,
)
from otel_bgtasks._logger import log
from otel_bgtasks._version import __version__
from otel_bgtasks.calls import Serializer
from otel_bgtasks.circuit import CircuitBreaker
from otel_bgtasks.config import resolve_settings
from otel_bgtasks.dispatch import (
    Dispatcher,
    DispatchSeam,
)
from otel_bgtasks.errors import ErrorClassifier, NotInstrumentedError, UnsafeConfigurationError
from otel_bgtasks.package import _instruments
from otel_bgtasks.retry import RetryPolicy
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.stores.base import DeadLetterStore
from otel_bgtasks.task import DispatchMode


def _fastapi_background_tasks() -> type[BackgroundTasks] | None:
    """FastAPI's `BackgroundTasks` (>= 0.165 wraps each task in its own
    `fastapi.background_task` span), imported at instrumentation, not with this module: a
    Starlette app, or the CLI, does not load FastAPI."""
    try:
        from fastapi.background import BackgroundTasks as FastAPIBackgroundTasks
    except ImportError:  # pragma: no cover - FastAPI is a dependency
        return None
    return FastAPIBackgroundTasks


__all__ = [
    "AutoInstrumentor",
    "BackgroundTasksInstrumentor",
    "InstrumentOptions",
    "ScheduledTask",
    "current_executor",
    "schedule",
]

_SCOPE = "otel_bgtasks"
# Upstream's FastAPI instrumentor stores Starlette's original __call__ here and patches only
# when the attribute is absent; by holding it we keep one task span per run (ours).
_UPSTREAM_ATTR = "_otel_original_call"
_STATE_ATTR = "_bgtasks_state"  # set and read as a plain attribute in `_patch`


class InstrumentOptions(TypedDict, total=False):
    """The keyword arguments of `BackgroundTasksInstrumentor.instrument` (README table)."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    trace_mode: TraceMode
    propagate_exceptions: bool
    start_hook: TaskHook | None
    end_hook: TaskHook | None
    retry: RetryPolicy | None
    circuit: CircuitBreaker | None
    timeout: float | None
    durable: bool
    dead_letter_store: DeadLetterStore | str | None
    serializer: Serializer | None
    error_classifier: ErrorClassifier
    dispatch: DispatchMode | Dispatcher
    max_concurrency: int
    max_queued: int
    drain_timeout: float
    redact_exception_messages: bool
    log_locals: bool
    # BaseInstrumentor's own switches
    skip_dep_check: bool
    raise_exception_on_conflict: bool


_KNOWN = frozenset(InstrumentOptions.__annotations__)
_BASE_SWITCHES = frozenset({"skip_dep_check", "raise_exception_on_conflict"})


def _check_keywords(kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - _KNOWN)
    if unknown:
        raise TypeError(
            f"instrument() got unexpected keyword argument(s) {', '.join(map(repr, unknown))};"
            f" valid ones: {', '.join(sorted(_KNOWN))}"
        )


def current_executor() -> Executor | None:
    """The executor of the active instrumentation (None when not instrumented)."""
    return active_executor()


class ScheduledTask:
    """A task scheduled outside Starlette: run it with `await task.run()` or `task.run_sync()`.

    A task handed to its dispatcher at scheduling (`handed`: its dispatch is not
    ``"inline"``) runs there: `run` and `run_sync` then return at once.
    """

    __slots__ = ("_executor", "handed", "state")

    def __init__(self, executor: Executor, state: TaskCallState, *, handed: bool = False) -> None:
        self._executor = executor
        self.state = state
        self.handed = handed

    async def run(self) -> None:
        """Run the task on the current event loop (sync functions go to the thread pool)."""
        if not self.handed:
            await self._executor.run(self.state)

    def run_sync(self) -> None:
        """Run the task on this thread, e.g. as a `threading.Thread` target."""
        if not self.handed:
            asyncio.run(self._executor.run(self.state, inline=True))


def schedule(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> ScheduledTask:
    """Schedule `func(*args, **kwargs)` on the instrumented path, outside FastAPI.

    The current span gets the `bgtasks.enqueued` event now. A task whose dispatch is
    ``"inline"`` runs when the returned task runs (`asyncio.create_task(task.run())`, or
    `task.run_sync` in a thread); any other goes to its dispatcher now (``"local"``: the
    app's pool on this event loop, when its lifespan serves; else it runs when you run it).

    Raises:
        NotInstrumentedError: (a `RuntimeError`) the package is not instrumented yet.
        TypeError: a durable task, or one bound for another process, whose arguments cannot
            be encoded (the message names the argument).
    """
    executor = active_executor()
    if executor is None:
        raise NotInstrumentedError(
            "otel_bgtasks is not instrumented: call BackgroundTasksInstrumentor().instrument() "
            "(or run under opentelemetry-instrument) before schedule()"
        )
    state = executor.schedule(func, args, kwargs)
    seam = BackgroundTasksInstrumentor._seam
    handed = seam is not None and seam.dispatch_now(state)
    return ScheduledTask(executor, state, handed=handed)


def _probe() -> None:
    """A sync function to initialise a probe task with (`_is_starlette_init`)."""


def _is_starlette_init(init: Callable[..., None]) -> bool:
    """`init` is Starlette's own `BackgroundTask.__init__` (not another instrumentation's
    wrapper) and sets exactly func, args, kwargs and is_async: ours may then set them itself."""
    if getattr(init, "__module__", None) != "starlette.background":
        return False
    if getattr(init, "__qualname__", None) != "BackgroundTask.__init__":
        return False
    probe = BackgroundTask.__new__(BackgroundTask)
    init(probe, _probe, 1, k=2)
    return vars(probe) == {"func": _probe, "args": (1,), "kwargs": {"k": 2}, "is_async": False}


class BackgroundTasksInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """An instrumentor for Starlette/FastAPI background tasks."""

    _original_init: Callable[..., None] | None = None
    _original_call: Callable[..., Any] | None = None
    _upstream_call: Any = None
    _upstream_original: Any = None
    _owned_store: DeadLetterStore | None = None
    _seam: DispatchSeam | None = None
    _fastapi_call: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def instrument(self, **kwargs: Unpack[InstrumentOptions]) -> None:
        """Instrument Starlette's background tasks (see the module docstring for the options).

        Raises:
            TypeError: an unknown keyword (the message lists the valid ones), or a value of
                the wrong type.
            ValueError: a value out of range (`ConfigurationError`).
        """
        _check_keywords(dict(kwargs))
        super().instrument(**kwargs)

    def _instrument(self, **kwargs: Any) -> None:
        _check_keywords(kwargs)  # also when BaseInstrumentor is called directly
        # OTEL_BGTASKS_* variables (how opentelemetry-instrument configures us); code wins.
        settings = resolve_settings({k: v for k, v in kwargs.items() if k not in _BASE_SWITCHES})
        store, owned = settings.open_store()
        # A store opened here from a URL is ours to close; one passed in is the caller's.
        self._owned_store = store if owned else None
        try:
            executor = Executor.from_settings(settings, store, scope=_SCOPE, version=__version__)
            seam = DispatchSeam(
                executor,
                max_concurrency=settings.max_concurrency,
                max_queued=settings.max_queued,
                drain_timeout=settings.drain_timeout,
            )
        except Exception:  # a bad setting: do not leave the store we opened behind
            if self._owned_store is not None:
                self._owned_store.close()
                self._owned_store = None
            raise
        self._patch(executor)
        type(self)._seam = seam
        seam.install()
        set_active_executor(executor)

    def _uninstrument(self, **kwargs: Any) -> None:
        executor = active_executor()
        set_active_executor(None)
        seam, type(self)._seam = type(self)._seam, None
        if seam is not None:
            seam.uninstall()
        self._unpatch()
        if executor is not None:
            executor.close()
        owned, self._owned_store = self._owned_store, None
        if owned is not None:
            owned.close()

    # -- Starlette patching -------------------------------------------------------------------

    def _patch(self, executor: Executor) -> None:
        cls = BackgroundTask
        original_init = cls.__init__
        upstream_original = cls.__dict__.get(_UPSTREAM_ATTR)
        # Starlette's own __call__, even when upstream already wrapped it in its bare span.
        original_call = upstream_original if upstream_original is not None else cls.__call__

        plain_init = _is_starlette_init(original_init)

        def __init__(self: BackgroundTask, func: Callable[..., Any], *a: Any, **kw: Any) -> None:
            current = _execution._active  # active_executor(), without the call (per task)
            if current is None:
                original_init(self, func, *a, **kw)
                return
            if plain_init:
                # Starlette's own __init__ minus its is_async_callable(func) per task (about 5k
                # instructions): the executor resolves it once per function.
                self.func, self.args, self.kwargs = func, a, kw  # type: ignore[assignment]
                state = current.schedule(func, a, kw)
                self.is_async = state.is_async
            else:
                original_init(self, func, *a, **kw)
                state = current.schedule(func, a, kw, is_async=self.is_async)
            if cls.__call__ is not __call__:
                owner._reclaim(__call__)
            self._bgtasks_state = state  # type: ignore[attr-defined]  # _STATE_ATTR
            seam = owner._seam
            if seam is not None:
                seam.scheduled(state)

        def __call__(self: BackgroundTask) -> Awaitable[Any]:
            # Returns the coroutine to await (no `async def` layer that would only forward).
            try:
                state: TaskCallState = self._bgtasks_state  # type: ignore[attr-defined]
            except AttributeError:  # created before instrumentation
                return original_call(self)
            current = _execution._active
            if current is None:
                return original_call(self)
            seam = owner._seam
            if seam is None:
                return current.run(state)
            return seam.call(state)

        owner = type(self)
        owner._original_init = original_init
        owner._original_call = original_call
        owner._upstream_call = cls.__call__ if upstream_original is not None else None
        owner._upstream_original = upstream_original
        cls.__init__ = __init__  # type: ignore[method-assign]
        cls.__call__ = __call__  # type: ignore[method-assign,assignment]
        setattr(cls, _UPSTREAM_ATTR, __call__)
        fastapi_tasks = _fastapi_background_tasks()
        if fastapi_tasks is not None and "__call__" in fastapi_tasks.__dict__:
            # FastAPI's own telemetry wraps each task in a `fastapi.background_task` span; ours
            # is the one task span per run, so the collection runs its tasks as Starlette's does.
            owner._fastapi_call = fastapi_tasks.__dict__["__call__"]
            fastapi_tasks.__call__ = BackgroundTasks.__call__  # type: ignore[method-assign]

    @classmethod
    def _reclaim(cls, ours: Callable[..., Any]) -> None:
        """Upstream wrapped our __call__ after we patched (it was uninstrumented and
        instrumented again): take the slot back, keeping its wrapper for our uninstrument."""
        task_cls = BackgroundTask
        wrapper = task_cls.__call__
        if wrapper is ours:
            return
        cls._upstream_call = wrapper
        # Its wrapper calls ours, which passes through to Starlette's once we are off.
        cls._upstream_original = cls._original_call
        task_cls.__call__ = ours  # type: ignore[method-assign]
        setattr(task_cls, _UPSTREAM_ATTR, ours)

    def _unpatch(self) -> None:
        cls = BackgroundTask
        owner = type(self)
        if owner._original_init is None:
            return
        ours = cls.__call__
        cls.__init__ = owner._original_init  # type: ignore[method-assign]
        upstream_active = cls.__dict__.get(_UPSTREAM_ATTR) is ours
        if upstream_active and owner._upstream_call is not None:
            # Upstream instrumented before us and is still on: hand its wrapper back.
            cls.__call__ = owner._upstream_call  # type: ignore[method-assign]
            setattr(cls, _UPSTREAM_ATTR, owner._upstream_original)
        else:
            cls.__call__ = owner._original_call  # type: ignore[method-assign,assignment]
            if upstream_active:
                delattr(cls, _UPSTREAM_ATTR)
        owner._original_init = owner._original_call = None
        owner._upstream_call = owner._upstream_original = None
        fastapi_tasks = _fastapi_background_tasks()
        if owner._fastapi_call is not None and fastapi_tasks is not None:
            fastapi_tasks.__call__ = owner._fastapi_call  # type: ignore[method-assign]
            owner._fastapi_call = None


class AutoInstrumentor(BackgroundTasksInstrumentor):
    """The ``opentelemetry_instrumentor`` entry point (``opentelemetry-instrument``).

    It instruments through `BackgroundTasksInstrumentor` (one instrumentation whichever way
    it was made) and never takes the other instrumentations down with it: the distro stops
    loading entry points at the first one that raises, and ours loads before FastAPI's.

    - A setting that asks for a guarantee with a value that cannot work
      (`UnsafeConfigurationError`: ``OTEL_BGTASKS_DURABLE``, ``_DLQ_URL``,
      ``_REDACT_EXCEPTION_MESSAGES``, ``_SIGNING_KEY``): the process refuses to start, with
      one line naming the variable (`SystemExit`, which the distro does not catch).
    - Anything else that fails: logged, background tasks stay uninstrumented (the health
      endpoint says ``not_instrumented``), every other instrumentation goes on.
    """

    _instance = None  # its own singleton; the instrumentation state is the main class's

    def instrument(self, **kwargs: Any) -> None:
        try:
            BackgroundTasksInstrumentor().instrument(**kwargs)
        except UnsafeConfigurationError as exc:
            sys.stderr.write(f"otel-bgtasks: refusing to start: {exc}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None
        except Exception:
            log.exception(
                "otel-bgtasks: background tasks are NOT instrumented (other instrumentations"
                " go on); fix the error below",
            )

    def uninstrument(self, **kwargs: Any) -> None:
        BackgroundTasksInstrumentor().uninstrument(**kwargs)
