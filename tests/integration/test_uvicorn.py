"""Background tasks of a FastAPI app served by a real uvicorn, hit by a real HTTP client.

The request span comes from opentelemetry-instrumentation-fastapi (``instrument_app`` with the
test's providers), so links and parents are checked against a real SERVER span, not a span the
test made up. Ours is instrumented first (the ``instrument`` fixture), then the app.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import structlog
from fastapi import BackgroundTasks, Depends, FastAPI, Response
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode, Tracer
from starlette.background import BackgroundTask
from tests.integration._server import UvicornThread, wait_for_tasks
from tests.support.waiting import wait_until

from otel_bgtasks import TraceContextFilter, TraceContextProcessor, background_task
from otel_bgtasks.metrics import DURATION_BUCKETS

MODULE = __name__
done: list[tuple[str, Any]] = []  # what the tasks did, in order


# -- tasks -------------------------------------------------------------------------------------


async def send_email(tracer: Tracer, user_id: int) -> None:
    with tracer.start_as_current_span("smtp send"):
        done.append(("send_email", user_id))


def resize_avatar(tracer: Tracer, user_id: int) -> None:  # sync: Starlette's thread pool
    with tracer.start_as_current_span("resize"), tracer.start_as_current_span("encode"):
        done.append(("resize_avatar", user_id))


@background_task(name="audit-log")
def audit(source: str) -> None:
    done.append(("audit", source))


async def import_row(row: str) -> None:
    raise ValueError(f"row {row!r} has no comma")


async def log_lines(n: int) -> None:
    structlog.get_logger("test.task").info("structlog line in task", n=n)
    logging.getLogger("test.task").warning("stdlib line in task %s", n)


# -- app ---------------------------------------------------------------------------------------


def build_app(tracer: Tracer) -> FastAPI:
    app = FastAPI()

    async def audit_async_dependency(tasks: BackgroundTasks) -> None:
        tasks.add_task(audit, "async-dependency")

    def audit_sync_dependency(tasks: BackgroundTasks) -> None:  # runs in the thread pool
        tasks.add_task(audit, "sync-dependency")

    @app.get("/async")
    async def async_task(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(send_email, tracer, 1)
        return {"ok": "async"}

    @app.get("/sync")
    def sync_task(tasks: BackgroundTasks) -> dict[str, str]:  # sync endpoint, sync task
        tasks.add_task(resize_avatar, tracer, 2)
        return {"ok": "sync"}

    @app.get("/response")
    async def response_background() -> Response:
        return Response("accepted", background=BackgroundTask(send_email, tracer, 3))

    @app.get(
        "/dependency",
        dependencies=[Depends(audit_async_dependency), Depends(audit_sync_dependency)],
    )
    async def dependency() -> dict[str, str]:
        return {"ok": "dependency"}

    @app.get("/fail-then-ok")
    async def fail_then_ok(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(import_row, "no-comma")
        tasks.add_task(send_email, tracer, 4)
        return {"ok": "scheduled"}

    @app.get("/logs")
    async def logs(tasks: BackgroundTasks) -> dict[str, str]:
        logging.getLogger("test.endpoint").warning("stdlib line in request")
        tasks.add_task(log_lines, 5)
        return {"ok": "logs"}

    return app


@contextmanager
def serving(telemetry, instrument, trace_mode: str = "link") -> Iterator[Any]:
    done.clear()
    instrument(trace_mode=trace_mode)
    app = build_app(telemetry.tracer_provider.get_tracer("test.app"))
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


def get(client, telemetry, path: str) -> ReadableSpan:
    """GET `path`, wait for its tasks and its SERVER span; returns the span."""
    response = client.get(path)
    assert response.status_code == 200, response.text
    wait_for_tasks()
    name = f"GET {path}"

    def server_span() -> list[ReadableSpan]:
        return [s for s in telemetry.spans() if s.name == name and s.kind is SpanKind.SERVER]

    (span,) = wait_until(server_span, what=f"the {name} SERVER span")
    return span


def enqueued(request: ReadableSpan) -> list[dict[str, Any]]:
    """The bgtasks.enqueued events of a request span, as attribute dicts, in order."""
    assert all(e.name == "bgtasks.enqueued" for e in request.events), request.events
    return [dict(e.attributes) for e in request.events]


def assert_task_span(
    span: ReadableSpan,
    request: ReadableSpan,
    *,
    trace_mode: str,
    name: str,
    function: str,
    outcome: str = "success",
    extra: dict[str, Any] | None = None,
) -> None:
    """The whole structure of one task span scheduled by `request`."""
    assert span.name == f"process {name}"
    assert span.kind is SpanKind.CONSUMER
    assert [link.context for link in span.links] == [request.context]
    assert all(not link.attributes for link in span.links)
    if trace_mode == "link":
        assert span.parent is None
        assert span.context.trace_id != request.context.trace_id
    else:
        assert span.parent is not None
        assert span.parent.span_id == request.context.span_id
        assert span.context.trace_id == request.context.trace_id
    assert span.context.trace_flags.sampled
    attrs = dict(span.attributes)
    assert attrs.pop("bgtasks.task.wait") >= 0
    assert attrs == {
        "bgtasks.task.name": name,
        "bgtasks.task.id": span.attributes["bgtasks.task.id"],
        "code.function.name": function,
        "bgtasks.task.attempts": 1,
        "bgtasks.task.outcome": outcome,
        **(extra or {}),
    }
    assert len(span.attributes["bgtasks.task.id"]) == 32


def children(telemetry, parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in telemetry.spans() if s.parent and s.parent.span_id == parent.context.span_id]


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("trace_mode", ["link", "child"])
def test_async_task_span_is_linked_to_the_request_span(telemetry, instrument, trace_mode):
    with serving(telemetry, instrument, trace_mode) as client:
        request = get(client, telemetry, "/async")

    assert request.status.status_code is StatusCode.UNSET
    assert request.attributes["http.route"] == "/async"
    task = telemetry.span("process send_email")
    assert_task_span(
        task, request, trace_mode=trace_mode, name="send_email", function=f"{MODULE}.send_email"
    )
    assert task.status.status_code is StatusCode.UNSET
    assert task.events == ()
    assert enqueued(request) == [
        {"bgtasks.task.name": "send_email", "bgtasks.task.id": task.attributes["bgtasks.task.id"]}
    ]
    inner = telemetry.span("smtp send")
    assert inner.parent == task.context
    assert inner.context.trace_id == task.context.trace_id
    assert inner.kind is SpanKind.INTERNAL
    assert done == [("send_email", 1)]
    # Only the request, the task and the task's own span: nothing doubled, nothing bare.
    assert sorted(s.name for s in telemetry.spans()) == [
        "GET /async",
        "process send_email",
        "smtp send",
    ]


@pytest.mark.parametrize("trace_mode", ["link", "child"])
def test_sync_task_in_sync_endpoint_with_nested_spans(telemetry, instrument, trace_mode):
    with serving(telemetry, instrument, trace_mode) as client:
        request = get(client, telemetry, "/sync")

    task = telemetry.span("process resize_avatar")
    assert_task_span(
        task,
        request,
        trace_mode=trace_mode,
        name="resize_avatar",
        function=f"{MODULE}.resize_avatar",
    )
    assert enqueued(request) == [
        {
            "bgtasks.task.name": "resize_avatar",
            "bgtasks.task.id": task.attributes["bgtasks.task.id"],
        }
    ]
    resize, encode = telemetry.span("resize"), telemetry.span("encode")
    assert resize.parent == task.context
    assert encode.parent == resize.context
    assert {resize.context.trace_id, encode.context.trace_id} == {task.context.trace_id}
    assert children(telemetry, task) == [resize]
    assert done == [("resize_avatar", 2)]


@pytest.mark.parametrize("trace_mode", ["link", "child"])
def test_response_background_task(telemetry, instrument, trace_mode):
    with serving(telemetry, instrument, trace_mode) as client:
        response = client.get("/response")
        assert response.text == "accepted"
        wait_for_tasks()
        request = wait_until(
            lambda: [s for s in telemetry.spans() if s.name == "GET /response"],
            what="the request span",
        )[0]

    task = telemetry.span("process send_email")
    assert_task_span(
        task, request, trace_mode=trace_mode, name="send_email", function=f"{MODULE}.send_email"
    )
    assert enqueued(request) == [
        {"bgtasks.task.name": "send_email", "bgtasks.task.id": task.attributes["bgtasks.task.id"]}
    ]
    assert telemetry.span("smtp send").parent == task.context
    assert done == [("send_email", 3)]


@pytest.mark.parametrize("trace_mode", ["link", "child"])
def test_tasks_added_in_async_and_sync_dependencies(telemetry, instrument, trace_mode):
    with serving(telemetry, instrument, trace_mode) as client:
        request = get(client, telemetry, "/dependency")

    tasks = sorted(
        (s for s in telemetry.spans() if s.name == "process audit-log"),
        key=lambda s: s.start_time,
    )
    assert len(tasks) == 2
    for task in tasks:
        assert_task_span(
            task, request, trace_mode=trace_mode, name="audit-log", function=f"{MODULE}.audit"
        )
    assert enqueued(request) == [
        {"bgtasks.task.name": "audit-log", "bgtasks.task.id": t.attributes["bgtasks.task.id"]}
        for t in tasks
    ]
    assert tasks[0].attributes["bgtasks.task.id"] != tasks[1].attributes["bgtasks.task.id"]
    assert done == [("audit", "async-dependency"), ("audit", "sync-dependency")]


@pytest.mark.parametrize("trace_mode", ["link", "child"])
def test_failing_task_then_succeeding_task_in_one_response(
    telemetry, instrument, caplog, trace_mode
):
    caplog.set_level(logging.INFO)
    with serving(telemetry, instrument, trace_mode) as client:
        request = get(client, telemetry, "/fail-then-ok")

    failed = telemetry.span("process import_row")
    assert_task_span(
        failed,
        request,
        trace_mode=trace_mode,
        name="import_row",
        function=f"{MODULE}.import_row",
        outcome="failure",
        extra={"error.type": "ValueError", "bgtasks.error.category": "validation"},
    )
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError: row 'no-comma' has no comma"
    (exception,) = failed.events
    assert exception.name == "exception"
    assert exception.attributes["exception.type"] == "ValueError"
    assert exception.attributes["exception.message"] == "row 'no-comma' has no comma"
    assert "import_row" in exception.attributes["exception.stacktrace"]

    ok = telemetry.span("process send_email")
    assert_task_span(
        ok, request, trace_mode=trace_mode, name="send_email", function=f"{MODULE}.send_email"
    )
    assert ok.status.status_code is StatusCode.UNSET
    assert ok.start_time >= failed.end_time  # Starlette runs them one after the other
    assert done == [("send_email", 4)]
    assert enqueued(request) == [
        {"bgtasks.task.name": name, "bgtasks.task.id": span.attributes["bgtasks.task.id"]}
        for name, span in (("import_row", failed), ("send_email", ok))
    ]
    # The request itself did not fail, and the ASGI server never saw the exception.
    assert request.status.status_code is StatusCode.UNSET
    assert request.events == tuple(e for e in request.events if e.name == "bgtasks.enqueued")
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
    server_errors = [
        r
        for r in caplog.records
        if r.name.startswith(("uvicorn", "starlette", "fastapi")) and r.levelno >= logging.ERROR
    ]
    assert server_errors == []


def test_log_lines_in_a_task_carry_trace_and_task_ids(telemetry, instrument, caplog):
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(stdlib_filter := TraceContextFilter())
    try:
        with (
            structlog.testing.capture_logs(processors=[TraceContextProcessor()]) as captured,
            serving(telemetry, instrument) as client,
        ):
            request = get(client, telemetry, "/logs")
    finally:
        caplog.handler.removeFilter(stdlib_filter)

    task = telemetry.span("process log_lines")
    task_fields = {
        "trace_id": format(task.context.trace_id, "032x"),
        "span_id": format(task.context.span_id, "016x"),
        "task_name": "log_lines",
        "task_id": task.attributes["bgtasks.task.id"],
    }
    (entry,) = [e for e in captured if e["event"] == "structlog line in task"]
    assert entry == {"event": "structlog line in task", "n": 5, "log_level": "info", **task_fields}

    (record,) = [r for r in caplog.records if r.getMessage() == "stdlib line in task 5"]
    assert {key: getattr(record, key) for key in task_fields} == task_fields
    # In the request (not a task): the request's ids, and empty task fields.
    (in_request,) = [r for r in caplog.records if r.getMessage() == "stdlib line in request"]
    assert {key: getattr(in_request, key) for key in task_fields} == {
        "trace_id": format(request.context.trace_id, "032x"),
        "span_id": format(request.context.span_id, "016x"),
        "task_name": "",
        "task_id": "",
    }
    # link mode: the task's trace is not the request's, the log lines say which is which.
    assert task_fields["trace_id"] != format(request.context.trace_id, "032x")


def test_task_metrics_have_data_points_with_contract_attributes(telemetry, instrument):
    with serving(telemetry, instrument) as client:
        get(client, telemetry, "/async")
        get(client, telemetry, "/sync")
        get(client, telemetry, "/fail-then-ok")

    durations = {
        tuple(sorted(p.attributes.items())): p for p in telemetry.points("bgtasks.task.duration")
    }
    assert set(durations) == {
        (("bgtasks.task.name", "send_email"), ("bgtasks.task.outcome", "success")),
        (("bgtasks.task.name", "resize_avatar"), ("bgtasks.task.outcome", "success")),
        (
            ("bgtasks.task.name", "import_row"),
            ("bgtasks.task.outcome", "failure"),
            ("error.type", "ValueError"),
        ),
    }
    counts = {key[0][1]: p.count for key, p in durations.items()}
    assert counts == {"send_email": 2, "resize_avatar": 1, "import_row": 1}
    for point in durations.values():
        assert tuple(point.explicit_bounds) == DURATION_BUCKETS
        assert sum(point.bucket_counts) == point.count
        assert point.sum >= 0
    waits = {
        tuple(sorted(p.attributes.items())): p.count for p in telemetry.points("bgtasks.task.wait")
    }
    assert waits == {
        (("bgtasks.task.name", "send_email"),): 2,
        (("bgtasks.task.name", "resize_avatar"),): 1,
        (("bgtasks.task.name", "import_row"),): 1,
    }
    for point in telemetry.points("bgtasks.task.wait"):
        assert tuple(point.explicit_bounds) == DURATION_BUCKETS
    active = {
        tuple(sorted(p.attributes.items())): p.value
        for p in telemetry.points("bgtasks.task.active")
    }
    assert active == {
        (("bgtasks.task.name", "send_email"),): 0,
        (("bgtasks.task.name", "resize_avatar"),): 0,
        (("bgtasks.task.name", "import_row"),): 0,
    }
