"""The dispatch seam under a real uvicorn with upstream's FastAPI instrumentation on.

``"inline"`` is Starlette's behaviour: a response runs its tasks inside its ASGI call, so
upstream's server span and request-duration histogram include the task's time. ``"local"``
hands the response's tasks to a bounded in-process pool when the ASGI call returns: the server
span has ended before the task span starts, and the request duration excludes the task.
Every scheduled task ends as ran (its span) or skipped (`bgtasks.task.skipped` with a reason).
The assertions are on structure (which span ends before which starts, sums compared with each
other), never on a wall-clock threshold.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from starlette.background import BackgroundTask
from starlette.exceptions import StarletteDeprecationWarning
from tests.integration._server import UvicornThread, wait_for_tasks
from tests.support.waiting import wait_until

from otel_bgtasks import background_task
from otel_bgtasks._execution import active_executor
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore

with warnings.catch_warnings():
    # Starlette 1.10 asks for `httpx2` under its TestClient; the httpx it still supports is
    # the one the rest of the suite uses.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

MODES = ["inline", "local"]
done: list[str] = []


async def step(name: str) -> None:
    done.append(name)


async def explode(name: str) -> None:
    done.append(name)
    raise RuntimeError(f"{name} failed")


@background_task(name="durable-step", durable=True)
async def durable_step(name: str) -> None:
    done.append(name)


class Gate:
    """Counts tasks running at once; each waits for the test to set `release`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.release = threading.Event()

    async def work(self, n: int) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            assert await asyncio.to_thread(self.release.wait, 30), "the test never released it"
        finally:
            with self.lock:
                self.running -= 1
        done.append(f"gate {n}")


gate = Gate()


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/sequence")
    async def sequence(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(step, "first")
        tasks.add_task(explode, "second")
        tasks.add_task(step, "third")
        return {"ok": "sequence"}

    @app.get("/raises")
    async def raises(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(step, "never")
        tasks.add_task(durable_step, "never-durable")
        raise RuntimeError("the endpoint failed")

    @app.get("/http-error")
    async def http_error(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(step, "never")
        raise HTTPException(409, "conflict")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"chunk\n"
            # until the client is gone and Starlette cancels the stream (30 s to fail with)
            await asyncio.wait_for(asyncio.Event().wait(), 30)

        return StreamingResponse(chunks(), background=BackgroundTask(step, "after-stream"))

    @app.get("/gate/{n}")
    async def gated(n: int, tasks: BackgroundTasks) -> dict[str, int]:
        tasks.add_task(gate.work, n)
        tasks.add_task(step, f"after {n}")
        return {"n": n}

    return app


@contextmanager
def serving(telemetry, instrument, **options: Any) -> Iterator[Any]:
    done.clear()
    instrument(**options)
    app = build_app()
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        exclude_spans=["receive", "send"],
    )
    try:
        with UvicornThread(app) as server, server.client() as client:
            yield client
    finally:
        FastAPIInstrumentor.uninstrument_app(app)


def server_span(telemetry, path: str) -> ReadableSpan:
    (span,) = wait_until(
        lambda: [
            s for s in telemetry.spans() if s.name == f"GET {path}" and s.kind is SpanKind.SERVER
        ],
        what=f"the GET {path} SERVER span",
    )
    return span


def request_durations(telemetry, route: str) -> tuple[int, float]:
    """Upstream's request-duration histogram for `route`: count and sum in seconds (old or new
    semconv)."""
    count, total = 0, 0.0
    for name, scale in (("http.server.request.duration", 1.0), ("http.server.duration", 1e-3)):
        for point in telemetry.points(name):
            attrs = point.attributes  # the old conventions name the route http.target
            if route in (attrs.get("http.route"), attrs.get("http.target")):
                count += point.count
                total += point.sum * scale
    return count, total


def skipped(telemetry) -> dict[tuple[str, str], int]:
    return {
        (p.attributes["bgtasks.task.name"], p.attributes["bgtasks.skip.reason"]): p.value
        for p in telemetry.points("bgtasks.task.skipped")
    }


def pending(telemetry) -> dict[str, int]:
    return {
        p.attributes["bgtasks.task.name"]: p.value for p in telemetry.points("bgtasks.task.pending")
    }


# -- request metrics ------------------------------------------------------------------------


def test_local_ends_the_server_span_and_request_duration_before_the_task(telemetry, instrument):
    gate.__init__()
    with serving(telemetry, instrument, dispatch="local") as client:
        assert client.get("/gate/1").status_code == 200
        wait_until(lambda: gate.running == 1, what="the task to run")
        request = server_span(telemetry, "/gate/{n}")
        # While the task still runs, the request's duration is already recorded.
        count, request_seconds = request_durations(telemetry, "/gate/{n}")
        assert (count, request_seconds > 0) == (1, True)
        gate.release.set()
        wait_for_tasks()

    task = telemetry.span("process Gate.work")
    assert [link.context for link in task.links] == [request.context]
    assert task.status.status_code is StatusCode.UNSET
    assert request.end_time <= task.start_time  # the request was over before the task began
    assert request_durations(telemetry, "/gate/{n}") == (1, request_seconds)
    assert done == ["gate 1", "after 1"]


def test_inline_keeps_starlettes_behaviour_the_request_includes_the_task(telemetry, instrument):
    """Documented: with "inline" upstream's request duration includes the task.

    Upstream (0.66b2) ends its server span at the final body message, before Starlette runs the
    tasks, but records `http.server.duration` and decrements `http.server.active_requests`
    only when the application call returns, after them.
    """
    gate.__init__()
    with serving(telemetry, instrument, dispatch="inline") as client:
        assert client.get("/gate/1").status_code == 200  # the body came before the task
        wait_until(lambda: gate.running == 1, what="the task to run")
        request = server_span(telemetry, "/gate/{n}")
        assert request_durations(telemetry, "/gate/{n}") == (0, 0.0)  # not while it runs
        gate.release.set()
        wait_for_tasks()
        wait_until(lambda: request_durations(telemetry, "/gate/{n}")[0], what="the duration")

    task = telemetry.span("process Gate.work")
    assert request.end_time <= task.start_time
    task_seconds = (task.end_time - task.start_time) / 1e9
    assert request_durations(telemetry, "/gate/{n}")[1] >= task_seconds


@pytest.mark.parametrize(("mode", "active_while_the_task_runs"), [("inline", 1), ("local", 0)])
def test_active_requests_while_the_task_runs(
    telemetry, instrument, mode, active_while_the_task_runs
):
    gate.__init__()
    with serving(telemetry, instrument, dispatch=mode) as client:
        assert client.get("/gate/1").status_code == 200  # the body came before the task
        wait_until(lambda: gate.running == 1, what="the task to run")
        (active,) = telemetry.points("http.server.active_requests")
        assert active.value == active_while_the_task_runs
        gate.release.set()
        wait_for_tasks()
    assert done == ["gate 1", "after 1"]


# -- order and failure semantics: the same body in both modes -------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_task_is_isolated_and_the_rest_run_in_order(telemetry, instrument, mode):
    with serving(telemetry, instrument, dispatch=mode) as client:
        assert client.get("/sequence").status_code == 200
        wait_for_tasks()
        server_span(telemetry, "/sequence")

    assert done == ["first", "second", "third"]
    spans = sorted(
        (s for s in telemetry.spans() if s.name.startswith("process ")),
        key=lambda s: s.start_time,
    )
    assert [(s.name, s.attributes["bgtasks.task.outcome"]) for s in spans] == [
        ("process step", "success"),
        ("process explode", "failure"),
        ("process step", "success"),
    ]
    assert spans[0].end_time <= spans[1].start_time <= spans[1].end_time <= spans[2].start_time
    assert spans[1].status.status_code is StatusCode.ERROR
    assert skipped(telemetry) == {}


@pytest.mark.parametrize("mode", MODES)
def test_propagate_exceptions_skips_the_rest_of_the_response(telemetry, instrument, mode):
    with serving(telemetry, instrument, dispatch=mode, propagate_exceptions=True) as client:
        client.get("/sequence")  # inline: the error reaches uvicorn after the response
        wait_for_tasks()

    assert done == ["first", "second"]
    spans = sorted(
        (s for s in telemetry.spans() if s.name.startswith("process ")),
        key=lambda s: s.start_time,
    )
    assert [(s.name, s.attributes["bgtasks.task.outcome"]) for s in spans] == [
        ("process step", "success"),
        ("process explode", "failure"),
    ]
    assert skipped(telemetry) == {("step", "previous_task_failed"): 1}
    assert active_executor().inflight == {}
    assert pending(telemetry) == {"step": 0, "explode": 0}


# -- tasks of failed requests ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_tasks_of_a_failed_request_are_skipped_and_let_go(telemetry, instrument, tmp_path, mode):
    store = SQLiteDeadLetterStore(tmp_path / "dlq.db")
    with serving(telemetry, instrument, dispatch=mode, dead_letter_store=store) as client:
        for _ in range(3):
            assert client.get("/raises").status_code == 500
            assert client.get("/http-error").status_code == 409
        wait_for_tasks()
        executor = active_executor()
        assert executor.inflight == {}
        assert executor.pending_count() == 0

    assert done == []
    assert [s.name for s in telemetry.spans() if s.name.startswith("process ")] == []
    assert skipped(telemetry) == {
        ("step", "request_failed"): 6,
        ("durable-step", "request_failed"): 3,
    }
    assert store.journal_list() == []  # the failed requests' durable tasks will not recover
    assert pending(telemetry) == {"step": 0, "durable-step": 0}
    store.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_cut_by_the_client_still_runs_its_tasks_under_uvicorn(telemetry, instrument, mode):
    """Documented: uvicorn speaks ASGI 2.3, so Starlette notices the disconnect by listening,
    cancels the stream and still runs the response's tasks (ran, not skipped). Servers of ASGI
    2.4 raise on send instead: tests/unit/test_dispatch.py covers that skip."""
    with serving(telemetry, instrument, dispatch=mode) as client:
        host, port = client.base_url.host, client.base_url.port
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(f"GET /stream HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert b"chunk" in sock.recv(4096)
        wait_until(lambda: done, what="the task after the stream")
        wait_for_tasks()

    assert done == ["after-stream"]
    assert skipped(telemetry) == {}


# -- the local pool's bound -----------------------------------------------------------------


def test_max_concurrency_bounds_the_groups_running_at_once(telemetry, instrument):
    gate.__init__()
    with serving(telemetry, instrument, dispatch="local", max_concurrency=2) as client:
        for n in range(20):
            assert client.get(f"/gate/{n}").status_code == 200
        # Two groups hold the slots; the other 18 wait, their tasks pending.
        wait_until(lambda: gate.running == 2, what="two groups running")
        backlog = pending(telemetry)
        assert backlog == {"Gate.work": 18, "step": 20}
        gate.release.set()
        wait_for_tasks()

    assert gate.peak == 2
    assert sorted(done) == sorted(
        [f"gate {n}" for n in range(20)] + [f"after {n}" for n in range(20)]
    )
    # Each group's tasks in their order.
    for n in range(20):
        assert done.index(f"gate {n}") < done.index(f"after {n}")
    assert pending(telemetry) == {"Gate.work": 0, "step": 0}
    runs = {
        p.attributes["bgtasks.task.name"]: p.count
        for p in telemetry.points("bgtasks.task.duration")
    }
    assert runs == {"Gate.work": 20, "step": 20}


# -- TestClient -----------------------------------------------------------------------------


def test_testclient_as_context_manager_runs_local_tasks_after_the_response(telemetry, instrument):
    instrument(dispatch="local")
    done.clear()
    app = build_app()
    with TestClient(app) as client:
        assert client.get("/sequence").status_code == 200
        wait_for_tasks()
    assert done == ["first", "second", "third"]


def test_testclient_without_context_manager_runs_local_tasks_inline(telemetry, instrument):
    """No lifespan, so nothing would drain the pool: "local" falls back to inline."""
    instrument(dispatch="local")
    done.clear()
    client = TestClient(build_app())
    assert client.get("/sequence").status_code == 200
    assert done == ["first", "second", "third"]  # already run when the response returned
    assert active_executor().inflight == {}
