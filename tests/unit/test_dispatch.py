"""The dispatch seam's configuration, the `Dispatcher` protocol, per-task modes, the summary.

Apps are served by Starlette's TestClient used as a context manager (its lifespan starts the
local pool, its exit drains it); the uvicorn tests are in tests/integration/test_dispatch*.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest
import sniffio
import structlog
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient  # on httpx2 (the `testing` extra): no warning
from starlette.requests import ClientDisconnect
from structlog.testing import capture_logs

from otel_bgtasks import BackgroundTasksInstrumentor, RetryPolicy, background_task
from otel_bgtasks._execution import Executor, active_executor
from otel_bgtasks.dispatch import Dispatcher, LocalDispatcher
from otel_bgtasks.environment import options_from_env
from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.testing import InMemoryDeadLetterStore

DISPATCH_ENV = "OTEL_BGTASKS_DISPATCH"
MAX_CONCURRENCY_ENV = "OTEL_BGTASKS_MAX_CONCURRENCY"
done: list[str] = []


async def step(name: str) -> None:
    done.append(name)


@background_task(dispatch="inline")
async def inline_step(name: str) -> None:
    done.append(name)


def app_with(*funcs) -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, bool]:
        for i, func in enumerate(funcs):
            tasks.add_task(func, f"t{i}")
        done.append("response")
        return {"ok": True}

    return app


# -- configuration --------------------------------------------------------------------------


def test_environment_variables_are_read_and_checked():
    assert options_from_env(
        {DISPATCH_ENV: " Local ", MAX_CONCURRENCY_ENV: "4", "OTEL_BGTASKS_DRAIN_TIMEOUT": "2.5"}
    ) == {"dispatch": "local", "max_concurrency": 4, "drain_timeout": 2.5}
    assert options_from_env({DISPATCH_ENV: "", MAX_CONCURRENCY_ENV: ""}) == {}
    # an invalid value: a warning naming it, and the default applies (the SDK's convention)
    with capture_logs() as logs:
        assert options_from_env({DISPATCH_ENV: "celery", "OTEL_BGTASKS_DRAIN_TIMEOUT": "1"}) == {
            "drain_timeout": 1.0
        }
    assert [(e["variable"], e["value"], e["problem"]) for e in logs] == [
        ("OTEL_BGTASKS_DISPATCH", "celery", "expected inline or local")
    ]
    for value in ("0", "-1", "two", "1.5"):
        with capture_logs() as logs:
            assert options_from_env({MAX_CONCURRENCY_ENV: value}) == {}
        assert [(e["log_level"], e["variable"], e["value"]) for e in logs] == [
            ("warning", "OTEL_BGTASKS_MAX_CONCURRENCY", value)
        ]


def test_a_bad_dispatch_variable_keeps_the_default_and_instruments(monkeypatch, telemetry):
    monkeypatch.setenv(DISPATCH_ENV, "later")
    instrumentor = BackgroundTasksInstrumentor()
    with capture_logs() as logs:
        instrumentor.instrument(dead_letter_store=None, tracer_provider=telemetry.tracer_provider)
    try:
        assert instrumentor.is_instrumented_by_opentelemetry
        assert type(instrumentor)._seam.default.name == "inline"
        assert [e["variable"] for e in logs if e["log_level"] == "warning"] == [DISPATCH_ENV]
    finally:
        instrumentor.uninstrument()


def test_keywords_win_over_the_variables(monkeypatch, instrument):
    monkeypatch.setenv(DISPATCH_ENV, "local")
    monkeypatch.setenv(MAX_CONCURRENCY_ENV, "3")
    instrumentor = instrument(dispatch="inline", max_concurrency=5)
    seam = type(instrumentor)._seam
    assert seam.default.name == "inline"
    assert seam.local.max_concurrency == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dispatch": "remote"}, "dispatch='remote' is not valid; use one of inline, local"),
        ({"max_concurrency": 0}, "max_concurrency=0: must be an integer >= 1"),
        ({"max_concurrency": True}, "max_concurrency=True: must be an integer >= 1"),
        ({"drain_timeout": -1}, "drain_timeout=-1: must be a finite number of seconds >= 0"),
        (
            {"drain_timeout": float("nan")},
            "drain_timeout=nan: must be a finite number of seconds >= 0",
        ),
    ],
)
def test_bad_instrument_options_fail_at_once(telemetry, options, message):
    instrumentor = BackgroundTasksInstrumentor()
    with pytest.raises(ConfigurationError) as raised:
        instrumentor.instrument(dead_letter_store=None, **options)
    assert str(raised.value).startswith(message)
    assert not instrumentor.is_instrumented_by_opentelemetry


def test_the_decorator_checks_dispatch():
    with pytest.raises(ConfigurationError) as raised:
        background_task(dispatch="celery")  # type: ignore[arg-type]
    assert str(raised.value) == (
        "background_task(dispatch='celery') is not valid; use one of inline, local or a"
        " Dispatcher (or None: the instrumentor's default)"
    )
    with pytest.raises(ConfigurationError) as not_one:
        background_task(dispatch=object())  # type: ignore[arg-type]
    assert "an object with name, route, remote, submit(), drain() and resend()" in str(
        not_one.value
    )


# -- modes ----------------------------------------------------------------------------------


def test_local_runs_after_the_response_and_a_task_can_ask_for_inline(instrument):
    done.clear()
    instrument(dispatch="local")
    with TestClient(app_with(step, inline_step, step)) as client:
        assert client.get("/").status_code == 200
        # The inline task ran inside the response's call; the local ones were handed over.
        assert done[:2] == ["response", "t1"]
    assert done == ["response", "t1", "t0", "t2"]
    assert active_executor() is None or active_executor().inflight == {}


class Recorder:
    """A `Dispatcher` that publishes elsewhere: it keeps the states and hands them off."""

    name = "recorder"
    route = "recorder:test"
    remote = True

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.drained = 0

    def submit(self, executor: Executor, states: Sequence[TaskCallState]) -> None:
        self.batches.append([s.args[0] for s in states])
        for state in states:
            executor.hand_off(state, self.route, None)

    async def drain(self, executor: Executor, timeout: float) -> None:
        self.drained += 1

    def resend(self, executor: Executor, call: Any, *, task_id: str) -> float | None:
        raise NotImplementedError


def test_a_custom_dispatcher_gets_each_response_in_order(instrument):
    done.clear()
    recorder = Recorder()
    assert isinstance(recorder, Dispatcher)
    instrument(dispatch=recorder)
    with TestClient(app_with(step, inline_step, step)) as client:
        assert client.get("/").status_code == 200
        assert client.get("/").status_code == 200
        executor = active_executor()
        assert executor.inflight == {}
        assert executor.pending_count() == 0
    assert recorder.batches == [["t0", "t2"], ["t0", "t2"]]
    assert recorder.drained == 1
    assert done == ["response", "t1", "response", "t1"]


# -- responses that never got to their tasks -----------------------------------------------


def streaming_app() -> FastAPI:
    app = FastAPI()

    @app.get("/stream")
    async def stream(tasks: BackgroundTasks) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"chunk"
            yield b"chunk"
            await asyncio.Event().wait()  # streams until the client is gone or it is cancelled

        tasks.add_task(step, "after-stream")
        return StreamingResponse(chunks(), background=tasks)

    return app


async def call_asgi(app: FastAPI, send: Any, spec_version: str = "2.4") -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/stream",
        "raw_path": b"/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # never disconnects by message
        raise AssertionError

    await app(scope, receive, send)


def skipped(telemetry) -> dict[tuple[str, str], int]:
    return {
        (p.attributes["bgtasks.task.name"], p.attributes["bgtasks.skip.reason"]): p.value
        for p in telemetry.points("bgtasks.task.skipped")
    }


async def test_a_client_gone_mid_stream_asgi_2_4_skips_the_tasks(telemetry, instrument):
    """An ASGI 2.4 server raises OSError on send once the client is gone (the spec)."""
    done.clear()
    instrument()
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        if len(sent) > 2:
            raise OSError("client disconnected")

    with pytest.raises(ClientDisconnect):
        await call_asgi(streaming_app(), send)
    assert done == []
    assert skipped(telemetry) == {("step", "request_failed"): 1}
    assert active_executor().inflight == {}


async def test_a_cancelled_response_skips_its_tasks(telemetry, instrument):
    done.clear()
    instrument()
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        started.set()

    call = asyncio.ensure_future(call_asgi(streaming_app(), send, spec_version="2.3"))
    await started.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert done == []
    assert skipped(telemetry) == {("step", "request_failed"): 1}
    assert active_executor().inflight == {}


async def test_tasks_cancelled_by_the_server_are_skipped_for_shutdown(telemetry, instrument):
    """uvicorn's --timeout-graceful-shutdown cancels responses still running their tasks."""
    done.clear()
    instrument()
    running = asyncio.Event()

    async def hold(name: str) -> None:
        running.set()
        await asyncio.Event().wait()

    app = FastAPI()

    @app.get("/stream")
    async def endpoint(tasks: BackgroundTasks) -> dict[str, bool]:
        tasks.add_task(hold, "held")
        tasks.add_task(step, "after")
        return {"ok": True}

    call = asyncio.ensure_future(call_asgi(app, lambda message: asyncio.sleep(0)))
    await running.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert done == []
    assert skipped(telemetry) == {("step", "shutdown"): 1}
    (held,) = telemetry.spans()
    assert (
        held.name
        == "process test_tasks_cancelled_by_the_server_are_skipped_for_shutdown.<locals>.hold"
    )
    assert held.attributes["bgtasks.task.outcome"] == "failure"
    assert active_executor().inflight == {}


running: dict[str, Any] = {}  # "event": an anyio.Event made on the test's loop


async def hold_until_cancelled(name: str) -> None:
    done.append(f"{name} started")
    running["event"].set()
    await anyio.sleep_forever()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_drain_past_its_timeout_cancels_the_running_and_skips_the_queued(
    telemetry, instrument, backend
):
    """Deterministic: one worker, three groups; the first never ends, so the drain times out
    (a 0 s timeout: nothing waits for a timer). On asyncio and on trio."""
    done.clear()
    instrument()
    executor = active_executor()
    local = LocalDispatcher(max_concurrency=1)
    app = object()

    async def serve_and_drain() -> None:
        assert sniffio.current_async_library() == backend
        pool = local.open(executor, app)
        running["event"] = anyio.Event()
        groups = [
            [
                executor.schedule(hold_until_cancelled, (f"g{n}",), {}),
                executor.schedule(step, (f"g{n}",), {}),
            ]
            for n in range(3)
        ]
        for states in groups:
            local.submit(executor, states)
        async with anyio.create_task_group() as workers:
            pool.start(workers)
            await running["event"].wait()  # the worker took the first group, runs its task
            await local.drain(executor, 0)
        local.forget(app, pool)
        pool.close()

    anyio.run(serve_and_drain, backend=backend)
    assert done == ["g0 started"]
    (held,) = telemetry.spans()
    assert held.attributes["bgtasks.task.outcome"] == "failure"  # cancelled while running
    assert skipped(telemetry) == {
        ("step", "shutdown"): 3,
        ("hold_until_cancelled", "shutdown"): 2,
    }
    assert executor.inflight == {}


# -- the shutdown summary -------------------------------------------------------------------


def test_the_shutdown_report_is_one_summary_line(instrument):
    instrument()
    executor = active_executor()
    states = [executor.schedule(step, (f"s{n}",), {}) for n in range(200)]
    executor.schedule(inline_step, ("x",), {})
    with structlog.testing.capture_logs() as captured:
        executor.report_pending(sample=3)
    (entry,) = captured
    assert entry == {
        "event": "background tasks still pending or running at shutdown",
        "log_level": "warning",
        "count": 201,
        "running": 0,
        "pending": 201,
        "durable": 0,
        "by_task": {"step": 200, "inline_step": 1},
        "sample_ids": [s.task_id for s in states[:3]],
        "hint": "durable tasks stay journaled and are recovered by `otel-bgtasks recover`",
    }
    assert len(repr(entry)) < 1000


# -- back-pressure --------------------------------------------------------------------------


def test_a_full_local_queue_runs_the_response_tasks_inline_and_counts_them(
    telemetry, instrument
):
    """One slot, one queued group: the third response runs its task itself (Starlette's
    way), counted in bgtasks.task.inlined; nothing is lost."""
    done.clear()
    instrument(dispatch="local", max_concurrency=1, max_queued=1)
    started, release = threading.Event(), threading.Event()

    def hold(name: str) -> None:  # a sync task: holds a worker thread, not the loop
        started.set()
        release.wait()
        done.append(name)

    app = FastAPI()

    @app.get("/{kind}/{name}")
    async def endpoint(kind: str, name: str, tasks: BackgroundTasks) -> dict[str, bool]:
        tasks.add_task(hold if kind == "hold" else step, name)
        return {"ok": True}

    with TestClient(app) as client:
        client.get("/hold/h1")  # takes the only slot
        assert started.wait(30)  # a guard against a hang, not a decision
        client.get("/step/q1")  # waits for the slot: the one queued group
        client.get("/step/o1")  # the queue is full: its response runs it
        assert done == ["o1"]
        release.set()
    assert done == ["o1", "h1", "q1"]  # the lifespan's drain ran the rest, in order
    assert [(p.attributes, p.value) for p in telemetry.points("bgtasks.task.inlined")] == [
        ({"bgtasks.task.name": "step"}, 1)
    ]
    assert skipped(telemetry) == {}
    assert active_executor().inflight == {}


def test_max_queued_is_checked_and_read_from_the_environment(telemetry):
    assert options_from_env({"OTEL_BGTASKS_MAX_QUEUED": "0"}) == {"max_queued": 0}
    with structlog.testing.capture_logs() as logs:  # invalid: a warning, the default used
        assert options_from_env({"OTEL_BGTASKS_MAX_QUEUED": "-1"}) == {}
    assert [(e["variable"], e["problem"]) for e in logs] == [
        ("OTEL_BGTASKS_MAX_QUEUED", "expected an integer >= 0")
    ]
    instrumentor = BackgroundTasksInstrumentor()
    with pytest.raises(ConfigurationError, match=r"max_queued=-1: must be an integer >= 0"):
        instrumentor.instrument(dead_letter_store=None, max_queued=-1)
    assert not instrumentor.is_instrumented_by_opentelemetry


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_local_pool_serves_a_trio_app_too(instrument, backend):
    """The lifespan wrapper and the pool run on Starlette's backends alike (anyio)."""
    done.clear()
    instrument(dispatch="local")
    with TestClient(app_with(step, step), backend=backend) as client:
        assert client.get("/").status_code == 200
    assert done == ["response", "t0", "t1"]
    assert active_executor().inflight == {}


flaky_calls: list[int] = []


async def flaky_once(name: str) -> None:
    flaky_calls.append(1)
    if len(flaky_calls) == 1:
        raise ConnectionError("first attempt fails")
    done.append(name)


@pytest.mark.parametrize("dispatch", ["inline", "local"])
def test_policies_and_durable_tasks_run_on_trio(telemetry, instrument, dispatch):
    """The executor's awaits are Starlette's backend's: a retry's sleep, a timeout's scope,
    the journal's writes and the response gate, on a trio app."""
    done.clear()
    flaky_calls.clear()
    store = InMemoryDeadLetterStore()
    instrument(
        dispatch=dispatch,
        retry=RetryPolicy(max_attempts=2, initial_delay=0, jitter=0),
        timeout=30.0,
        durable=True,
        dead_letter_store=store,
    )
    with TestClient(app_with(flaky_once), backend="trio") as client:
        assert client.get("/").status_code == 200
    assert done == ["response", "t0"]
    (span,) = telemetry.spans()
    assert span.attributes["bgtasks.task.attempts"] == 2
    assert span.attributes["bgtasks.task.outcome"] == "success"
    assert [event.name for event in span.events] == ["bgtasks.retry"]
    assert store.journal_list() == []  # journaled, then removed when it ended
    assert active_executor().inflight == {}


def test_max_queued_zero_queues_nothing_but_uses_free_slots(telemetry, instrument):
    done.clear()
    instrument(dispatch="local", max_concurrency=2, max_queued=0)
    with TestClient(app_with(step)) as client:
        client.get("/")
    assert done == ["response", "t0"]  # a free slot took it after the response
    assert telemetry.points("bgtasks.task.inlined") == []
