"""Next to opentelemetry-instrumentation-fastapi (0.66b2), which wraps BackgroundTask.__call__
in a bare ``BackgroundTask {name}`` span since 0.63b0.

Whichever is instrumented first, each task run yields exactly one task span, ours; switching
either off leaves the other working. The README documents one limit, tested as documented: if
ours was first and is switched off while upstream stays, upstream's bare task span does not
come back until an app is instrumented again.

Upstream is exercised both ways a user turns it on: ``FastAPIInstrumentor.instrument_app(app)``
and ``FastAPIInstrumentor().instrument()`` (which instruments every FastAPI app created
afterwards: apps here are made with ``fastapi.FastAPI()`` for that reason). A real uvicorn
serves the app throughout each test; instrumentations change under it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fastapi
import pytest
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from starlette.background import BackgroundTask
from tests.integration._server import UvicornThread
from tests.support.waiting import wait_until

from otel_bgtasks import BackgroundTasksInstrumentor

UPSTREAM_ATTR = "_otel_original_call"
STARLETTE_CALL = BackgroundTask.__dict__["__call__"]
STARLETTE_INIT = BackgroundTask.__dict__["__init__"]
_PATCHED = ("__call__", "__init__", UPSTREAM_ATTR)
_OURS_CLASS_ATTRS = ("_original_init", "_original_call", "_upstream_call", "_upstream_original")

done: list[str] = []
cycles: list[str] = []  # one entry per finished ASGI request cycle (background tasks included)


async def greet(name: str) -> None:
    done.append(f"greet {name}")


def crunch(n: int) -> None:  # sync: thread pool
    done.append(f"crunch {n}")


@pytest.fixture(autouse=True)
def restore_global_state() -> Iterator[None]:
    """Undo whatever a test left patched: BackgroundTask, fastapi.FastAPI, both instrumentors.

    Autouse, so it is set up before `instrument` and torn down after it.
    """
    saved = {key: BackgroundTask.__dict__.get(key) for key in _PATCHED}
    saved_ours = {key: getattr(BackgroundTasksInstrumentor, key) for key in _OURS_CLASS_ATTRS}
    saved_fastapi = fastapi.FastAPI
    done.clear()
    yield
    if FastAPIInstrumentor().is_instrumented_by_opentelemetry:
        FastAPIInstrumentor().uninstrument()
    if BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry:
        BackgroundTasksInstrumentor().uninstrument()
    for key, value in saved.items():
        if value is None:
            if key in BackgroundTask.__dict__:
                delattr(BackgroundTask, key)
        else:
            setattr(BackgroundTask, key, value)
    for key, value in saved_ours.items():
        setattr(BackgroundTasksInstrumentor, key, value)
    fastapi.FastAPI = saved_fastapi  # type: ignore[misc]


class CycleDone:
    """ASGI middleware noting when a request cycle, its background tasks included, is over.

    Upstream's request span ends with the last body chunk, before the background tasks, and
    a bare upstream task span ends after the task function returned: only the end of the
    cycle says that every span of a request has ended.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                cycles.append(scope["path"])


def build_app() -> fastapi.FastAPI:
    # fastapi.FastAPI, not a name imported at module load: upstream's instrument() swaps it.
    app = fastapi.FastAPI()
    app.add_middleware(CycleDone)

    @app.get("/work")
    async def work(tasks: fastapi.BackgroundTasks) -> dict[str, str]:
        tasks.add_task(greet, "ada")
        tasks.add_task(crunch, 7)
        return {"scheduled": "greet, crunch"}

    return app


@dataclass
class Upstream:
    """Upstream's FastAPI instrumentation, switched on either way a user does it."""

    mode: str
    telemetry: Any
    apps: list[fastapi.FastAPI] = field(default_factory=list)
    on: bool = False

    def _kwargs(self) -> dict[str, Any]:
        return {
            "tracer_provider": self.telemetry.tracer_provider,
            "meter_provider": self.telemetry.meter_provider,
            "exclude_spans": ["receive", "send"],
        }

    def instrument(self, app: fastapi.FastAPI | None = None) -> fastapi.FastAPI:
        """Turn upstream on; returns the (instrumented) app, built here if not given."""
        if self.mode == "instrument_app":
            app = app or build_app()
            FastAPIInstrumentor.instrument_app(app, **self._kwargs())
        else:
            assert app is None, "instrument() applies to apps created afterwards"
            FastAPIInstrumentor().instrument(**self._kwargs())
            app = build_app()
        assert app._is_instrumented_by_opentelemetry
        self.apps.append(app)
        self.on = True
        return app

    def new_app(self) -> fastapi.FastAPI:
        """Instrument one more app (what re-arms upstream's BackgroundTask patch)."""
        if self.mode == "instrument_app":
            app = build_app()
            FastAPIInstrumentor.instrument_app(app, **self._kwargs())
        else:
            app = build_app()  # instrumented by its constructor
        assert app._is_instrumented_by_opentelemetry
        self.apps.append(app)
        return app

    def uninstrument(self) -> None:
        if self.mode == "instrument_app":
            for app in self.apps:
                FastAPIInstrumentor.uninstrument_app(app)
        else:
            FastAPIInstrumentor().uninstrument()
        self.on = False


@pytest.fixture(params=["instrument_app", "instrument"])
def upstream(request, telemetry) -> Upstream:
    return Upstream(request.param, telemetry)


def run_request(client, telemetry) -> list[ReadableSpan]:
    """GET /work once, wait until everything it produces has ended; returns its spans."""
    telemetry.exporter.clear()
    done.clear()
    finished = len(cycles)
    assert client.get("/work").status_code == 200
    wait_until(lambda: len(cycles) > finished, what="the request cycle to finish")
    assert sorted(done) == ["crunch 7", "greet ada"]
    return telemetry.spans()


def names(spans: list[ReadableSpan]) -> list[str]:
    return sorted(s.name for s in spans)


def by_name(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name]
    return span


def assert_ours_linked(spans: list[ReadableSpan]) -> None:
    """Exactly one task span per run, ours, linked to the request; no bare upstream span."""
    assert names(spans) == ["GET /work", "process crunch", "process greet"]
    request = by_name(spans, "GET /work")
    assert request.kind is SpanKind.SERVER
    assert [e.name for e in request.events] == ["bgtasks.enqueued", "bgtasks.enqueued"]
    for task_name in ("greet", "crunch"):
        task = by_name(spans, f"process {task_name}")
        assert task.kind is SpanKind.CONSUMER
        assert task.parent is None
        assert [link.context for link in task.links] == [request.context]
        assert task.attributes["bgtasks.task.outcome"] == "success"
    ids = [e.attributes["bgtasks.task.id"] for e in request.events]
    assert ids == [
        by_name(spans, f"process {n}").attributes["bgtasks.task.id"] for n in ("greet", "crunch")
    ]


def assert_ours_alone(spans: list[ReadableSpan]) -> None:
    """Upstream off: our task spans, no request span to link to."""
    assert names(spans) == ["process crunch", "process greet"]
    for span in spans:
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is None
        assert span.links == ()


def assert_upstream_bare(spans: list[ReadableSpan]) -> None:
    """Ours off: upstream's request span and its bare task spans, children of the request."""
    assert names(spans) == ["BackgroundTask crunch", "BackgroundTask greet", "GET /work"]
    request = by_name(spans, "GET /work")
    assert request.events == ()
    for task_name in ("greet", "crunch"):
        bare = by_name(spans, f"BackgroundTask {task_name}")
        assert bare.kind is SpanKind.INTERNAL
        assert bare.parent == request.context
        assert bare.links == ()


def assert_upstream_requests_only(spans: list[ReadableSpan]) -> None:
    """Ours off after being first (the documented limit): request spans, no task spans."""
    assert names(spans) == ["GET /work"]
    assert by_name(spans, "GET /work").events == ()


def assert_starlette_restored() -> None:
    assert BackgroundTask.__dict__["__call__"] is STARLETTE_CALL
    assert BackgroundTask.__dict__["__init__"] is STARLETTE_INIT
    assert UPSTREAM_ATTR not in BackgroundTask.__dict__


@pytest.mark.parametrize("first", ["ours", "upstream"])
@pytest.mark.parametrize("off_first", ["ours", "upstream"])
def test_one_task_span_and_each_survives_the_other(
    telemetry, instrument, upstream, first, off_first
):
    ours: BackgroundTasksInstrumentor
    if first == "ours":
        ours = instrument()
        app = upstream.instrument()
    else:
        app = upstream.instrument()
        ours = instrument()

    with UvicornThread(app) as server, server.client() as client:
        assert_ours_linked(run_request(client, telemetry))
        # Again: nothing accumulates from one request to the next.
        assert_ours_linked(run_request(client, telemetry))

        if off_first == "upstream":
            upstream.uninstrument()
            assert_ours_alone(run_request(client, telemetry))
            ours.uninstrument()
            assert run_request(client, telemetry) == []
        else:
            ours.uninstrument()
            spans = run_request(client, telemetry)
            if first == "upstream":
                assert_upstream_bare(spans)  # upstream's own wrapper is handed back
            else:
                assert_upstream_requests_only(spans)  # the documented limit
            upstream.uninstrument()
            assert run_request(client, telemetry) == []

    assert_starlette_restored()


def test_documented_limit_bare_span_returns_when_an_app_is_instrumented_again(
    telemetry, instrument, upstream
):
    ours = instrument()
    app = upstream.instrument()
    with UvicornThread(app) as server, server.client() as client:
        assert_ours_linked(run_request(client, telemetry))
        ours.uninstrument()
        assert BackgroundTask.__dict__["__call__"] is STARLETTE_CALL
        assert_upstream_requests_only(run_request(client, telemetry))

        upstream.new_app()  # upstream patches BackgroundTask again, for every app
        assert_upstream_bare(run_request(client, telemetry))

        upstream.uninstrument()
    assert_starlette_restored()


@pytest.mark.parametrize("first", ["ours", "upstream"])
def test_upstream_instrumenting_another_app_later_does_not_double_task_spans(
    telemetry, instrument, upstream, first
):
    """Apps come and go (one per test, per tenant...): the later ones must not add a span."""
    if first == "ours":
        instrument()
        app = upstream.instrument()
    else:
        app = upstream.instrument()
        instrument()
    second = upstream.new_app()
    for served in (app, second):
        with UvicornThread(served) as server, server.client() as client:
            assert_ours_linked(run_request(client, telemetry))


@pytest.mark.parametrize("first", ["ours", "upstream"])
@pytest.mark.parametrize("off_first", ["ours", "upstream"])
def test_upstream_switched_off_and_on_again_keeps_one_task_span(
    telemetry, instrument, upstream, first, off_first
):
    """Upstream uninstrumented, then instrumented again (e.g. per-test apps) while ours stays.

    Upstream's uninstrument deletes the marker attribute through which ours keeps upstream
    from wrapping BackgroundTask.__call__; when upstream is switched on again it must still
    not wrap our span in its bare one. Afterwards each still survives the other, and with
    both off Starlette is exactly as it was.
    """
    if first == "ours":
        ours = instrument()
        upstream.instrument()
    else:
        upstream.instrument()
        ours = instrument()
    upstream.uninstrument()
    upstream.apps.clear()
    app = upstream.instrument()
    with UvicornThread(app) as server, server.client() as client:
        spans = run_request(client, telemetry)
        assert [s.name for s in spans if s.name.startswith("BackgroundTask")] == []
        assert_ours_linked(spans)

        if off_first == "ours":
            ours.uninstrument()
            # Upstream was (re-)instrumented after ours: its own wrapper is handed back.
            assert_upstream_bare(run_request(client, telemetry))
            upstream.uninstrument()
        else:
            upstream.uninstrument()
            assert_ours_alone(run_request(client, telemetry))
            ours.uninstrument()
        assert run_request(client, telemetry) == []
    assert_starlette_restored()


def test_upstream_alone_then_ours_alone_leave_starlette_exact(telemetry, instrument, upstream):
    """Sanity of the fixture and of both uninstruments: no residue either way."""
    app = upstream.instrument()
    with UvicornThread(app) as server, server.client() as client:
        assert_upstream_bare(run_request(client, telemetry))
    upstream.uninstrument()
    assert_starlette_restored()

    ours = instrument()
    plain = build_app()
    with UvicornThread(plain) as server, server.client() as client:
        assert_ours_alone(run_request(client, telemetry))
    ours.uninstrument()
    assert_starlette_restored()
