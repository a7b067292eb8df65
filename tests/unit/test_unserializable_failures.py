"""A failing task whose arguments cannot be serialized still gets its dead letter, and the rest
of the response's tasks run (issue 11, finding 6): end to end through a FastAPI app."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from structlog.testing import capture_logs

from otel_bgtasks.calls import UNREPLAYABLE
from otel_bgtasks.instrumentor import current_executor
from otel_bgtasks.stores import SQLiteDeadLetterStore

ran: list[str] = []


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr refuses")


def recursive_list() -> list[Any]:
    items: list[Any] = [1]
    items.append(items)
    return items


def deep_list(depth: int = 5_000) -> list[Any]:
    items: list[Any] = []
    for _ in range(depth):
        items = [items]
    return items


def huge_int() -> int:
    sys.set_int_max_str_digits(0)  # building it needs no limit; printing it would
    try:
        return 10**5000
    finally:
        sys.set_int_max_str_digits(4300)


def fails(value: Any) -> None:
    raise ValueError("downstream refused")


def after() -> None:
    ran.append("after")


@pytest.mark.parametrize(
    "make", [recursive_list, deep_list, huge_int, BadRepr], ids=lambda f: f.__name__
)
async def test_unserializable_argument_is_dead_lettered_and_the_next_task_runs(
    make: Any, tmp_path: Path, instrument: Any
) -> None:
    ran.clear()
    store = SQLiteDeadLetterStore(tmp_path / "dlq.db")
    instrument(dead_letter_store=store)
    app = FastAPI()
    value = make()

    @app.get("/go")
    async def go(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(fails, value)
        tasks.add_task(after)
        return {}

    transport = httpx.ASGITransport(app=app)  # awaits the response's background tasks too
    # capture_logs: structlog's default console renderer (with rich installed) would render
    # the traceback's locals, the 5,000-deep list included, for over a minute
    with capture_logs() as logs:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.get("/go")).status_code == 200
    assert [log["event"] for log in logs] == ["background task failed"]
    assert ran == ["after"]
    (entry,) = store.list()
    assert (entry.task_name, entry.error_type, entry.serializer) == (
        "fails",
        "ValueError",
        UNREPLAYABLE,
    )
    assert len(entry.payload) <= 4_000  # bounded description, with the reason
    assert json.loads(entry.to_json()) == entry.to_dict()
    executor = current_executor()
    assert executor is not None
    assert executor.inflight == {}  # the state did not leak
    store.close()
