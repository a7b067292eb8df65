"""The dispatch seam's configuration, the `Dispatcher` protocol, per-task modes, the summary.

Apps are served by Starlette's TestClient used as a context manager (its lifespan starts the
local pool, its exit drains it); the uvicorn tests are in tests/integration/test_dispatch*.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytest
import structlog
from fastapi import BackgroundTasks, FastAPI
from starlette.exceptions import StarletteDeprecationWarning

from otel_bgtasks import BackgroundTasksInstrumentor, background_task
from otel_bgtasks._execution import Executor, active_executor
from otel_bgtasks.dispatch import (
    DISPATCH_ENV,
    MAX_CONCURRENCY_ENV,
    Dispatcher,
    dispatch_from_env,
)
from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.state import TaskCallState

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)  # Starlette 1.10 wants httpx2
    from fastapi.testclient import TestClient

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
    assert dispatch_from_env({}) == (None, None)
    assert dispatch_from_env({DISPATCH_ENV: " Local ", MAX_CONCURRENCY_ENV: "4"}) == ("local", 4)
    assert dispatch_from_env({DISPATCH_ENV: "", MAX_CONCURRENCY_ENV: ""}) == (None, None)
    with pytest.raises(ConfigurationError) as bad_mode:
        dispatch_from_env({DISPATCH_ENV: "celery"})
    assert str(bad_mode.value) == (
        "OTEL_BGTASKS_DISPATCH='celery' is not valid; use one of inline, local"
    )
    for value in ("0", "-1", "two", "1.5"):
        with pytest.raises(ConfigurationError) as bad_limit:
            dispatch_from_env({MAX_CONCURRENCY_ENV: value})
        assert str(bad_limit.value) == (
            f"OTEL_BGTASKS_MAX_CONCURRENCY={value!r} is not valid; use an integer >= 1"
            " (task groups run at once per process)"
        )


def test_the_entry_point_fails_at_startup_naming_the_variable(monkeypatch, telemetry):
    monkeypatch.setenv(DISPATCH_ENV, "later")
    instrumentor = BackgroundTasksInstrumentor()
    with pytest.raises(ConfigurationError, match="OTEL_BGTASKS_DISPATCH='later'"):
        instrumentor.instrument(dead_letter_store=None)
    assert not instrumentor.is_instrumented_by_opentelemetry


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
        "background_task(dispatch='celery'): use one of inline, local or None"
        " (the instrumentor's default)"
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
    """A `Dispatcher` that publishes elsewhere: it keeps the states and releases them."""

    name = "recorder"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.drained = 0

    def submit(self, executor: Executor, states: Sequence[TaskCallState]) -> None:
        self.batches.append([s.args[0] for s in states])
        for state in states:
            executor.release(state)

    async def drain(self, executor: Executor, timeout: float) -> None:
        self.drained += 1


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
