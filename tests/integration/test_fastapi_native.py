"""Next to FastAPI's own telemetry (0.165: ``FastAPI(telemetry={...})``).

FastAPI wraps each background task in an INTERNAL ``fastapi.background_task`` span under the
request span (already ended). With ours on, each task run yields exactly one task span, ours,
with ``operation_spans`` on or off, whichever is set up first, in both dispatch modes; FastAPI's
request span and its ``http.server.request.duration`` metric are untouched.
"""

from __future__ import annotations

import pytest
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.trace import SpanKind, StatusCode
from tests.integration._server import UvicornThread, wait_for_tasks
from tests.support.waiting import wait_until

done: list[str] = []


async def step(name: str) -> None:
    done.append(name)


async def explode(name: str) -> None:
    raise RuntimeError(f"{name} failed")


def build_app(telemetry, operation_spans: bool) -> FastAPI:
    app = FastAPI(
        telemetry={
            "tracer_provider": telemetry.tracer_provider,
            "meter_provider": telemetry.meter_provider,
            "operation_spans": operation_spans,
        }
    )

    @app.get("/two")
    async def two(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(explode, "first")
        tasks.add_task(step, "second")
        return {"ok": "two"}

    return app


@pytest.mark.parametrize("mode", ["inline", "local"])
@pytest.mark.parametrize("ours_first", [True, False], ids=["ours-first", "fastapi-first"])
@pytest.mark.parametrize("operation_spans", [True, False], ids=["op-spans", "no-op-spans"])
def test_one_task_span_per_run_ours(telemetry, instrument, mode, ours_first, operation_spans):
    done.clear()
    if ours_first:
        instrument(dispatch=mode)
        app = build_app(telemetry, operation_spans)
    else:
        app = build_app(telemetry, operation_spans)
        instrument(dispatch=mode)
    with UvicornThread(app) as server, server.client() as client:
        assert client.get("/two").status_code == 200
        wait_for_tasks()
        (request,) = wait_until(
            lambda: [s for s in telemetry.spans() if s.kind is SpanKind.SERVER],
            what="FastAPI's request span",
        )

    assert done == ["second"]
    names = sorted(s.name for s in telemetry.spans())
    operations = ["fastapi.dependencies", "fastapi.endpoint", "fastapi.serialization"]
    assert names == sorted(
        ["GET /two", "process explode", "process step", *(operations if operation_spans else [])]
    )
    assert request.name == "GET /two"
    assert request.attributes["http.route"] == "/two"
    failed = next(s for s in telemetry.spans() if s.name == "process explode")
    assert failed.status.status_code is StatusCode.ERROR  # propagate_exceptions=False: ours
    # The link points at the span current at add_task: FastAPI's endpoint span when it has one.
    scheduler = (
        next(s for s in telemetry.spans() if s.name == "fastapi.endpoint")
        if operation_spans
        else request
    )
    assert [link.context for link in failed.links] == [scheduler.context]
    assert scheduler.context.trace_id == request.context.trace_id
    (duration,) = telemetry.points("http.server.request.duration")
    assert duration.count == 1
    assert duration.attributes["http.route"] == "/two"


def test_fastapis_task_span_is_back_after_uninstrument(telemetry, instrument):
    done.clear()
    app = build_app(telemetry, operation_spans=True)
    instrument().uninstrument()
    with UvicornThread(app) as server, server.client() as client:
        assert client.get("/two").status_code == 200
        (theirs,) = wait_until(
            lambda: [s for s in telemetry.spans() if s.name == "fastapi.background_task"],
            what="FastAPI's task span",
        )
    # Starlette's semantics without us: the first task's error skips the second.
    assert theirs.attributes["error.type"] == "RuntimeError"
    assert done == []
    assert not [s for s in telemetry.spans() if s.name.startswith("process ")]
