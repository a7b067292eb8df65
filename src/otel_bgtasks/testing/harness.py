"""`BgTasks`: instrument with in-memory telemetry, wait for tasks, assert on them by name.

The value of the `bgtasks` pytest fixture, and usable on its own (``with BgTasks() as bg:``)
under unittest or anywhere else.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from opentelemetry.context import Context
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_bgtasks import BackgroundTasksInstrumentor, DeadLetter, DeadLetterStore
from otel_bgtasks.testing.runs import TaskRun, describe_runs
from otel_bgtasks.testing.store import InMemoryDeadLetterStore

__all__ = ["DEFAULT_TIMEOUT", "BgTasks", "TasksPendingError"]

DEFAULT_TIMEOUT = 5.0
"""Seconds `BgTasks.wait` waits by default."""

_PREFIX = "process "
_POLL = 0.005


class TasksPendingError(AssertionError):
    """Background tasks did not finish in time; the message lists them."""


class _Tracker(SpanProcessor):
    """Follows task spans as they start and end, and the tasks scheduled under other spans
    (their `bgtasks.enqueued` events), so `wait` knows what is still to come."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, Span] = {}
        self._running: dict[str, tuple[str, float]] = {}  # task id -> name, started
        self._finished: set[str] = set()
        self._scheduled: dict[str, str] = {}  # task id -> name, from finished spans' events

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        with self._lock:
            self._open[span.context.span_id] = span
            task_id = _task_id(span)
            if task_id is not None:
                self._running[task_id] = (_task_name(span), time.monotonic())

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self._open.pop(span.context.span_id, None)
            self._scheduled.update(_enqueued(span))
            task_id = _task_id(span)
            if task_id is not None:
                self._running.pop(task_id, None)
                self._finished.add(task_id)

    def pending(self) -> dict[str, str]:
        """Task id -> a description, for every task seen scheduled or running, not finished."""
        with self._lock:
            scheduled = dict(self._scheduled)
            for span in self._open.values():  # a request still open: its events so far
                scheduled.update(_enqueued(span))
            running = dict(self._running)
            finished = set(self._finished)
        now = time.monotonic()
        out = {
            task_id: f"{name!r} (running for {now - started:.1f} s)"
            for task_id, (name, started) in running.items()
        }
        for task_id, name in scheduled.items():
            if task_id not in finished and task_id not in out:
                out[task_id] = f"{name!r} (scheduled, not started)"
        return out

    def clear(self) -> None:
        with self._lock:
            self._finished.clear()
            self._scheduled.clear()


def _task_id(span: ReadableSpan) -> str | None:
    if not span.name.startswith(_PREFIX):
        return None
    value = (span.attributes or {}).get("bgtasks.task.id")
    return None if value is None else str(value)


def _task_name(span: ReadableSpan) -> str:
    return str((span.attributes or {}).get("bgtasks.task.name", span.name.removeprefix(_PREFIX)))


def _enqueued(span: ReadableSpan) -> dict[str, str]:
    out: dict[str, str] = {}
    for event in span.events:
        if event.name == "bgtasks.enqueued":
            attrs = event.attributes or {}
            out[str(attrs.get("bgtasks.task.id"))] = str(attrs.get("bgtasks.task.name"))
    return out


class BgTasks:
    """In-memory telemetry and dead letters for one test, with assertions by task name.

    Entering instruments background tasks with a `TracerProvider` + `InMemorySpanExporter`,
    a `MeterProvider` + `InMemoryMetricReader` and an `InMemoryDeadLetterStore`; leaving
    uninstruments (and removes the FastAPI instrumentation `instrument_app` added).

    Args:
        **options: passed to `BackgroundTasksInstrumentor().instrument()` (``retry=``,
            ``trace_mode=``, ``timeout=``, ...); providers and store default to the ones above.

    Raises:
        RuntimeError: on entering, when otel_bgtasks is already instrumented (by the app at
            import time, say): the tasks would not reach these providers.
    """

    def __init__(self, **options: Any) -> None:
        self.span_exporter = InMemorySpanExporter()
        self.metric_reader = InMemoryMetricReader()
        self.store = InMemoryDeadLetterStore()
        self._tracker = _Tracker()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(self._tracker)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.span_exporter))
        self.meter_provider = MeterProvider(metric_readers=[self.metric_reader])
        self.instrumentor = BackgroundTasksInstrumentor()
        self._options = options
        self._dead_letter_store: DeadLetterStore | None = self.store
        self._apps: list[Any] = []
        self._entered = False

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self.instrumentor.is_instrumented_by_opentelemetry:
            raise RuntimeError(
                "otel_bgtasks is already instrumented, so tasks would not reach the test's "
                "providers: instrument in your app's startup (or a factory) rather than at "
                "import, or uninstrument before using BgTasks / the bgtasks fixture"
            )
        self._instrument(self._options)
        self._entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Uninstrument, remove app instrumentation and shut the providers down."""
        if not self._entered:
            return
        self._entered = False
        for app in self._apps:
            FastAPIInstrumentor.uninstrument_app(app)
        self._apps.clear()
        self.instrumentor.uninstrument()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    def _instrument(self, options: dict[str, Any]) -> None:
        kwargs: dict[str, Any] = {
            "tracer_provider": self.tracer_provider,
            "meter_provider": self.meter_provider,
            "dead_letter_store": self.store,
        }
        kwargs.update(options)
        given = kwargs["dead_letter_store"]
        # Runs and dead_letters() read the store the tasks write to (a URL's is not reachable).
        self._dead_letter_store = given if isinstance(given, DeadLetterStore) else None
        self.instrumentor.instrument(**kwargs)

    def instrument(self, **options: Any) -> None:
        """Instrument again with other options (``retry=``, ``trace_mode=``, ...), keeping the
        test's providers and store unless they are among `options`."""
        self.instrumentor.uninstrument()
        self._instrument(options)

    def instrument_app(self, app: Any) -> Any:
        """Instrument a FastAPI `app` with the test's providers (request spans, so runs can be
        checked against their request); undone when the test ends. Returns `app`.

        Call it before the app serves its first request.
        """
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )
        self._apps.append(app)
        return app

    # -- waiting -------------------------------------------------------------------------------

    def pending(self) -> list[str]:
        """Tasks seen scheduled or running and not finished, described."""
        return sorted(self._tracker.pending().values())

    def _done(self, names: Sequence[str]) -> bool:
        if self._tracker.pending():
            return False
        if not names:
            return True
        ran = {run.name for run in self.runs()}
        return all(name in ran for name in names)

    def _timed_out(self, names: Sequence[str], timeout: float) -> TasksPendingError:
        pending = self.pending()
        ran = {run.name for run in self.runs()}
        missing = [name for name in names if name not in ran]
        parts = []
        if pending:
            parts.append(f"{len(pending)} still pending: {', '.join(pending)}")
        if missing:
            parts.append(f"no finished run of {', '.join(map(repr, missing))}")
        return TasksPendingError(
            f"background tasks did not finish within {timeout} s: {'; '.join(parts)}; "
            f"finished: {describe_runs(self.runs())}"
        )

    def wait(self, *names: str, timeout: float = DEFAULT_TIMEOUT) -> list[TaskRun]:
        """Block until every task seen scheduled or running has finished and, for each of
        `names`, at least one run has; returns all runs.

        Tasks scheduled under a recording span (a request instrumented with `instrument_app`)
        are seen at scheduling; others once they start. Name a task to wait for one that may
        not have started yet (a real server, a thread).

        Raises:
            TasksPendingError: not done within `timeout` seconds; lists what is pending.
            RuntimeError: called on a running event loop (use `await wait_async()` there).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "BgTasks.wait() blocks, and the tasks of this event loop could not run: use "
                "`await bgtasks.wait_async()` in async tests"
            )
        deadline = time.monotonic() + timeout
        while not self._done(names):
            if time.monotonic() >= deadline:
                raise self._timed_out(names, timeout)
            time.sleep(_POLL)
        return self.runs()

    async def wait_async(self, *names: str, timeout: float = DEFAULT_TIMEOUT) -> list[TaskRun]:
        """`wait` for async tests: yields to the event loop (so tasks started with
        `asyncio.create_task(scheduled.run())` begin) until they are done."""
        await asyncio.sleep(0)
        deadline = time.monotonic() + timeout
        while not self._done(names):
            if time.monotonic() >= deadline:
                raise self._timed_out(names, timeout)
            await asyncio.sleep(_POLL)
        return self.runs()

    # -- reading and asserting ----------------------------------------------------------------

    def spans(self) -> list[ReadableSpan]:
        """Every finished span exported to the test's provider."""
        return list(self.span_exporter.get_finished_spans())

    def runs(self, name: str | None = None) -> list[TaskRun]:
        """Finished task runs (of task `name`, when given), in the order they started."""
        spans = self.spans()
        entries = {entry.id: entry for entry in self.dead_letters()}
        tasks = sorted(
            (s for s in spans if _task_id(s) is not None), key=lambda s: s.start_time or 0
        )
        runs = [TaskRun.from_span(s, spans=spans, dead_letters=entries) for s in tasks]
        return runs if name is None else [run for run in runs if run.name == name]

    def task(self, name: str) -> TaskRun:
        """The one finished run of task `name`.

        Raises:
            AssertionError: it has not run (the message lists what did run and what is still
                pending), or it ran more than once (use `runs(name)`).
        """
        runs = self.runs(name)
        if len(runs) == 1:
            return runs[0]
        if runs:
            raise AssertionError(
                f"task {name!r} ran {len(runs)} times; use bgtasks.runs({name!r}):\n"
                + "\n".join(run.describe() for run in runs)
            )
        pending = self.pending()
        hint = f"; still pending: {', '.join(pending)} (wait for them)" if pending else ""
        raise AssertionError(
            f"task {name!r} has not run: {describe_runs(self.runs())}{hint}. A task is named "
            "by @background_task(name=...) or its function's __qualname__"
        )

    def assert_not_run(self, name: str) -> None:
        """Assert no run of task `name` has finished."""
        runs = self.runs(name)
        if runs:
            raise AssertionError(
                f"expected task {name!r} not to run, it ran {len(runs)} time(s):\n"
                + "\n".join(run.describe() for run in runs)
            )

    def dead_letters(self, task: str | None = None) -> list[DeadLetter]:
        """The dead letters in the store tasks write to (of `task`, when given), oldest first:
        the in-memory `store`, or the `DeadLetterStore` passed as ``dead_letter_store=``."""
        store = self._dead_letter_store
        return [] if store is None else store.list(task=task)

    def clear(self) -> None:
        """Forget the spans and dead letters recorded so far (metrics are cumulative)."""
        self.span_exporter.clear()
        self._tracker.clear()
        self.store.purge()
