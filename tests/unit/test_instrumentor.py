"""The span, event and metric contract for one task run, with in-memory providers."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.semconv.schemas import Schemas
from opentelemetry.trace import SpanKind, StatusCode
from starlette.background import BackgroundTask, BackgroundTasks

from otel_bgtasks import BackgroundTasksInstrumentor, background_task, current_task, schedule
from otel_bgtasks._execution import Executor
from otel_bgtasks._version import __version__
from otel_bgtasks.metrics import DURATION_BUCKETS, Instruments
from tests.support.clock import Clock


async def ok_async(x: int) -> int:
    return x


def ok_sync(x: int) -> int:
    return x


async def boom() -> None:
    raise ValueError("bad payload")


@background_task(name="send-mail")
async def named() -> None:
    return None


class Callable_:
    async def __call__(self) -> None:
        return None


def _request_span(tp: TracerProvider):
    return tp.get_tracer("test").start_as_current_span("GET /x", kind=SpanKind.SERVER)


async def test_link_mode_span_structure(telemetry, instrument):
    instrument()
    with _request_span(telemetry.tracer_provider) as request:
        task = BackgroundTask(ok_async, 1)
    await task()

    request_span = telemetry.span("GET /x")
    span = telemetry.span("process ok_async")
    task_id = span.attributes["bgtasks.task.id"]
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is None
    assert span.context.trace_id != request.get_span_context().trace_id
    assert [link.context for link in span.links] == [request_span.context]
    assert span.status.status_code is StatusCode.UNSET
    assert span.events == ()
    attrs = dict(span.attributes)
    assert attrs.pop("bgtasks.task.wait") >= 0
    assert attrs == {
        "bgtasks.task.name": "ok_async",
        "bgtasks.task.id": task_id,
        "code.function.name": "tests.unit.test_instrumentor.ok_async",
        "bgtasks.task.attempts": 1,
        "bgtasks.task.outcome": "success",
    }
    (event,) = request_span.events
    assert event.name == "bgtasks.enqueued"
    assert dict(event.attributes) == {"bgtasks.task.name": "ok_async", "bgtasks.task.id": task_id}


async def test_tracer_and_meter_declare_the_conventions_the_names_come_from(telemetry, instrument):
    newest = max(Schemas, key=lambda s: tuple(map(int, s.value.rsplit("/", 1)[1].split("."))))
    instrument()
    await BackgroundTask(ok_async, 1)()

    scope = telemetry.span("process ok_async").instrumentation_scope
    assert (scope.name, scope.version, scope.schema_url) == (
        "otel_bgtasks",
        __version__,
        newest.value,
    )
    data = telemetry.reader.get_metrics_data()
    assert {
        (sm.scope.name, sm.scope.schema_url)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
    } == {("otel_bgtasks", newest.value)}


async def test_child_mode_parents_under_the_scheduling_span(telemetry, instrument):
    instrument(trace_mode="child")
    with _request_span(telemetry.tracer_provider):
        task = BackgroundTask(ok_sync, 1)
    await task()
    request_span = telemetry.span("GET /x")
    span = telemetry.span("process ok_sync")
    assert span.parent == request_span.context
    assert span.context.trace_id == request_span.context.trace_id
    assert [link.context for link in span.links] == [request_span.context]


async def test_failure_is_recorded_once_and_remaining_tasks_still_run(telemetry, instrument):
    instrument()
    ran: list[str] = []

    def after() -> None:
        ran.append("after")

    tasks = BackgroundTasks()
    tasks.add_task(boom)
    tasks.add_task(after)
    await tasks()

    assert ran == ["after"]
    span = telemetry.span("process boom")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError: bad payload"
    assert span.attributes["bgtasks.task.outcome"] == "failure"
    assert span.attributes["error.type"] == "ValueError"
    assert [e.name for e in span.events] == ["exception"]
    assert span.events[0].attributes["exception.type"] == "ValueError"
    after_span = telemetry.span(f"process {after.__qualname__}")
    assert after_span.status.status_code is StatusCode.UNSET


async def test_propagate_exceptions_restores_starlette_behaviour(telemetry, instrument):
    instrument(propagate_exceptions=True)
    ran: list[str] = []
    tasks = BackgroundTasks()
    tasks.add_task(boom)
    tasks.add_task(lambda: ran.append("after"))
    with pytest.raises(ValueError, match="bad payload"):
        await tasks()
    assert ran == []
    assert telemetry.span("process boom").status.status_code is StatusCode.ERROR


@pytest.mark.parametrize(
    ("func", "name"),
    [
        (named, "send-mail"),
        (functools.partial(ok_sync, 3), "ok_sync"),
        (Callable_(), "Callable_"),
    ],
)
async def test_task_names(telemetry, instrument, func, name):
    instrument()
    await BackgroundTask(func)()
    assert telemetry.span(f"process {name}").attributes["bgtasks.task.name"] == name


async def test_metrics_have_contract_names_attributes_and_second_buckets(telemetry, instrument):
    instrument()
    await BackgroundTask(ok_async, 1)()
    await BackgroundTask(boom)()

    durations = {
        tuple(sorted(p.attributes.items())): p for p in telemetry.points("bgtasks.task.duration")
    }
    assert set(durations) == {
        (("bgtasks.task.name", "ok_async"), ("bgtasks.task.outcome", "success")),
        (
            ("bgtasks.task.name", "boom"),
            ("bgtasks.task.outcome", "failure"),
            ("error.type", "ValueError"),
        ),
    }
    for point in durations.values():
        assert point.count == 1
        assert tuple(point.explicit_bounds) == DURATION_BUCKETS
    waits = {
        p.attributes["bgtasks.task.name"]: p.count for p in telemetry.points("bgtasks.task.wait")
    }
    assert waits == {"ok_async": 1, "boom": 1}
    active = {
        p.attributes["bgtasks.task.name"]: p.value for p in telemetry.points("bgtasks.task.active")
    }
    assert active == {"ok_async": 0, "boom": 0}


async def test_active_counts_a_running_task(telemetry, instrument):
    instrument()
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> None:
        started.set()
        await release.wait()

    running = asyncio.create_task(BackgroundTask(slow)())
    await started.wait()
    (point,) = telemetry.points("bgtasks.task.active")
    assert point.value == 1
    release.set()
    await running
    (point,) = telemetry.points("bgtasks.task.active")
    assert point.value == 0


async def test_spans_created_in_a_task_are_children_and_task_context_is_visible(
    telemetry, instrument
):
    instrument()
    seen: list[tuple[str, str] | None] = []

    def work() -> None:  # sync: runs in Starlette's thread pool
        state = current_task()
        seen.append((state.name, state.task_id) if state else None)
        with telemetry.tracer_provider.get_tracer("t").start_as_current_span("inner"):
            pass

    await BackgroundTask(work)()
    task_span = telemetry.span(f"process {work.__qualname__}")
    assert telemetry.span("inner").parent == task_span.context
    assert seen == [(work.__qualname__, task_span.attributes["bgtasks.task.id"])]


async def test_schedule_outside_fastapi_async_and_thread(telemetry, instrument):
    instrument()
    with _request_span(telemetry.tracer_provider):
        in_loop = schedule(ok_async, 1)
        in_thread = schedule(ok_sync, 2)
    await asyncio.create_task(in_loop.run())
    thread = threading.Thread(target=in_thread.run_sync)
    thread.start()
    thread.join()
    request_span = telemetry.span("GET /x")
    for name in ("process ok_async", "process ok_sync"):
        assert [link.context for link in telemetry.span(name).links] == [request_span.context]
    assert len(request_span.events) == 2


def test_schedule_before_instrumenting_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"BackgroundTasksInstrumentor\(\)\.instrument\(\)"):
        schedule(ok_sync, 1)


def test_unknown_trace_mode_names_valid_values(telemetry):
    with pytest.raises(ValueError, match="link, child"):
        BackgroundTasksInstrumentor().instrument(
            tracer_provider=telemetry.tracer_provider, trace_mode="sibling"
        )
    assert not BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry


async def test_instrumenting_twice_warns_and_does_not_double_wrap(telemetry, instrument, caplog):
    instrumentor = instrument()
    with caplog.at_level(logging.WARNING):
        instrumentor.instrument(tracer_provider=telemetry.tracer_provider)
    assert "already instrumented" in caplog.text
    await BackgroundTask(ok_async, 1)()
    assert [s.name for s in telemetry.spans()] == ["process ok_async"]


async def test_uninstrument_restores_starlette(telemetry, instrument):
    original_init, original_call = BackgroundTask.__init__, BackgroundTask.__call__
    instrumentor = instrument()
    assert BackgroundTask.__call__ is not original_call
    instrumentor.uninstrument()
    assert (BackgroundTask.__init__, BackgroundTask.__call__) == (original_init, original_call)
    assert not hasattr(BackgroundTask, "_otel_original_call")
    await BackgroundTask(ok_async, 1)()
    assert telemetry.spans() == []


async def test_a_raising_hook_never_breaks_the_task(telemetry, instrument):
    def bad_hook(span, state):
        raise RuntimeError("hook bug")

    ran: list[int] = []
    instrument(start_hook=bad_hook, end_hook=bad_hook)
    await BackgroundTask(ran.append, 1)()
    assert ran == [1]
    assert telemetry.span("process list.append").attributes["bgtasks.task.outcome"] == "success"


async def test_hooks_see_span_and_state(telemetry, instrument):
    seen: list[tuple[str, int, str | None]] = []

    def end(span, state):
        span.set_attribute("custom", state.name)
        seen.append((state.name, state.attempt, state.outcome))

    instrument(end_hook=end)
    await BackgroundTask(ok_async, 1)()
    assert seen == [("ok_async", 1, "success")]
    assert telemetry.span("process ok_async").attributes["custom"] == "ok_async"


async def test_unsampled_request_is_not_required_to_sample_task(telemetry, instrument):
    # A non-recording scheduling span gets no event, and nothing breaks.
    instrument()
    with trace.use_span(trace.INVALID_SPAN):
        task = BackgroundTask(ok_async, 1)
    await task()
    assert telemetry.span("process ok_async").links == ()


async def test_histogram_exemplars_point_at_the_task_span(telemetry):
    clock = Clock(0.0)
    executor = Executor(
        telemetry.tracer_provider.get_tracer("otel_bgtasks"),
        Instruments(telemetry.meter_provider.get_meter("otel_bgtasks")),
        clock=clock,
    )

    async def slow() -> None:
        clock.now += 0.02

    with _request_span(telemetry.tracer_provider) as request:
        state = executor.prepare(slow, (), {}, link=request.get_span_context())
    # Both values above the first bucket: SDK 1.45 keeps no exemplar for bucket 0.
    clock.now += 0.02
    await executor.run(state)
    span = telemetry.span(f"process {slow.__qualname__}")
    data = telemetry.reader.get_metrics_data()  # once: exemplars reset at each collection
    (scope,) = data.resource_metrics[0].scope_metrics
    exemplars = {
        m.name: [(e.trace_id, e.span_id) for e in m.data.data_points[0].exemplars]
        for m in scope.metrics
        if m.name in ("bgtasks.task.duration", "bgtasks.task.wait")
    }
    expected = [(span.context.trace_id, span.context.span_id)]
    assert exemplars == {"bgtasks.task.duration": expected, "bgtasks.task.wait": expected}
