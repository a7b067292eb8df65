"""Pathological arguments cost a bounded amount per failure: each is dead-lettered with a
bounded description, the log line and the span stay small, and the response's other tasks
still run. (Sizes are asserted, not times: a bounded output is what keeps the time bounded.)
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from fastapi import BackgroundTasks, FastAPI, Request
from starlette.background import BackgroundTask

from otel_bgtasks import configure_structlog_json
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore
from tests.conftest import Telemetry
from tests.integration._server import UvicornThread, wait_for_tasks
from tests.security import app_tasks
from tests.security.app_tasks import afail_with, fail_with, record, recurse

LOG_BYTES_PER_FAILURE = 16_384  # the line, its bounded message and traceback
DEEP_BODY = "[" * 900 + "]" * 900  # 1.8 kB of request body


class ReprRaises:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")

    def __str__(self) -> str:
        raise RuntimeError("no str either")


def recursive() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def build_app() -> FastAPI:
    app = FastAPI()

    @app.post("/deep")
    async def deep(request: Request, bg: BackgroundTasks) -> dict[str, str]:
        bg.add_task(fail_with, await request.json())
        bg.add_task(record, "after deep")
        return {}

    @app.post("/recursive")
    async def loop(bg: BackgroundTasks) -> dict[str, str]:
        bg.add_task(fail_with, recursive())
        bg.add_task(record, "after recursive")
        return {}

    @app.post("/huge-int")
    async def huge(bg: BackgroundTasks) -> dict[str, str]:
        bg.add_task(fail_with, 10**5000)
        bg.add_task(record, "after huge int")
        return {}

    @app.post("/repr-raises")
    async def bad_repr(bg: BackgroundTasks) -> dict[str, str]:
        bg.add_task(fail_with, ReprRaises())
        bg.add_task(record, "after repr")
        return {}

    @app.post("/recursion-error")
    async def deep_stack(bg: BackgroundTasks) -> dict[str, str]:
        bg.add_task(recurse, 0)
        bg.add_task(record, "after recursion")
        return {}

    return app


@pytest.fixture(params=["unconfigured", "json"])
def logging_setup(request: pytest.FixtureRequest) -> Iterator[str]:
    structlog.reset_defaults()
    if request.param == "json":
        configure_structlog_json()
        structlog.configure(cache_logger_on_first_use=False)
    yield request.param
    structlog.reset_defaults()


CASES = [
    ("/deep", DEEP_BODY, "after deep", "nested deeper than 64"),
    ("/recursive", None, "after recursive", "nested deeper than 64"),
    ("/huge-int", None, "after huge int", "int too large"),
    ("/repr-raises", None, "after repr", "(ReprRaises)"),
    ("/recursion-error", None, "after recursion", None),
]


@pytest.mark.parametrize(("path", "body", "after", "why"), CASES, ids=[c[0] for c in CASES])
def test_a_pathological_argument_is_dead_lettered_bounded(
    capsys: pytest.CaptureFixture[str],
    telemetry: Telemetry,
    instrument: Any,
    store: SQLiteDeadLetterStore,
    logging_setup: str,
    path: str,
    body: str | None,
    after: str,
    why: str | None,
) -> None:
    instrument(dead_letter_store=store)
    capsys.readouterr()
    with UvicornThread(build_app()) as server, server.client() as client:
        response = client.post(
            path, content=body, headers={"content-type": "application/json"}, timeout=30
        )
        assert response.status_code == 200
        wait_for_tasks(timeout=60)
    out, err = capsys.readouterr()

    ran = app_tasks.RAN
    assert ran == [("record", after)]  # the response's other task still ran
    (entry,) = store.list()
    assert len(entry.to_json()) < 16_000
    assert len(entry.traceback) <= 8_192
    assert len(entry.error_message) <= 1_024
    if why is not None:
        assert entry.serializer == "unreplayable"
        assert why in json.loads(entry.payload)["unreplayable"]
    else:
        assert entry.error_type == "RecursionError"
        assert "frames cut" in entry.traceback
    assert len((out + err).encode()) < LOG_BYTES_PER_FAILURE
    assert "background task failed" in out + err

    (span,) = [s for s in telemetry.spans() if s.name.startswith("process fail") or
               s.name == "process recurse"]  # fmt: skip
    (event,) = [e for e in span.events if e.name == "exception"]
    assert len(str(event.attributes["exception.stacktrace"])) <= 8_192
    assert len(str(event.attributes["exception.message"])) <= 1_024
    assert len(span.status.description or "") <= 1_100


def shout() -> None:
    raise ValueError("A" * 5_000_000)


async def test_a_message_of_megabytes_is_cut(
    telemetry: Telemetry, instrument: Any, store: SQLiteDeadLetterStore
) -> None:
    instrument(dead_letter_store=store)
    with structlog.testing.capture_logs() as logs:
        await BackgroundTask(shout)()
    (entry,) = store.list()
    assert len(entry.error_message) == 1_024
    assert entry.error_message.endswith("characters cut]")
    (line,) = [log for log in logs if log["event"] == "background task failed"]
    assert len(line["error_message"]) == 1_024
    assert len(line["exception"]) <= 8_192
    assert "exc_info" not in line


async def test_a_handled_failure_lets_go_of_its_arguments(
    telemetry: Telemetry, instrument: Any, store: SQLiteDeadLetterStore
) -> None:
    """Once rendered, stored and logged, a failure's frames hold no locals (the arguments):
    they are freed by reference counting, not kept until the cyclic collector runs."""
    seen: list[Any] = []
    instrument(dead_letter_store=store, end_hook=lambda span, state: seen.append(state))
    await BackgroundTask(afail_with, ["a", "large", "argument"])()
    (state,) = seen
    frames = [frame for frame, _ in traceback.walk_tb(state.exception.__traceback__)]
    assert [f.f_code.co_name for f in frames][-1] == "afail_with"
    assert "run" not in [f.f_code.co_name for f in frames]  # the executor's own frame dropped
    assert [f.f_locals for f in frames] == [{}] * len(frames)
    (entry,) = store.list()
    assert "in afail_with" in entry.traceback  # rendered before: every frame is shown
