"""`JournalGate`: a durable task's journal row is written off the event loop, and committed
before the response's first message goes out (DESIGN.md §6)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import BackgroundTasks, FastAPI

from otel_bgtasks.instrumentor import current_executor, schedule
from otel_bgtasks.records import JournalEntry
from otel_bgtasks.response_gate import JournalGate, gate_active
from otel_bgtasks.stores import SQLiteDeadLetterStore
from tests.unit.tasks import durable_invoice


class RecordingStore(SQLiteDeadLetterStore):
    """A real SQLite store that records which thread committed each journal write, slowly."""

    def __init__(self, path: Path, events: list[str]) -> None:
        super().__init__(path)
        self.events = events
        self.threads: list[int] = []

    def journal_add(self, entry: JournalEntry) -> None:
        time.sleep(0.05)  # a slow store: the response must still wait for the commit
        super().journal_add(entry)
        self.threads.append(threading.get_ident())
        self.events.append("journal committed")


def recorder(app: Any, events: list[str]) -> Any:
    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        async def record(message: Any) -> None:
            if message["type"] == "http.response.start":
                events.append("response started")
            await send(message)

        await app(scope, receive, record)

    return asgi


async def test_the_row_is_committed_off_the_loop_before_the_response_starts(
    tmp_path: Path, instrument: Any
) -> None:
    events: list[str] = []
    store = RecordingStore(tmp_path / "dlq.db", events)
    instrument(dead_letter_store=store)
    app = FastAPI()
    seen: list[bool] = []

    @app.get("/work")
    async def work(tasks: BackgroundTasks) -> dict[str, bool]:
        seen.append(gate_active())
        tasks.add_task(durable_invoice, "o-1")
        return {"ok": True}

    loop_thread = threading.get_ident()
    transport = httpx.ASGITransport(app=recorder(JournalGate(app), events))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.get("/work")).json() == {"ok": True}
    assert seen == [True]
    assert events == ["journal committed", "response started"]
    assert loop_thread not in store.threads
    executor = current_executor()
    assert executor is not None
    assert executor.journal is not None
    executor.journal.close()  # waits for the writer thread's queue: the removal, after the add
    assert store.journal_list() == []
    store.close()


async def test_an_instrumented_app_is_gated_without_middleware(
    tmp_path: Path, instrument: Any
) -> None:
    events: list[str] = []
    store = RecordingStore(tmp_path / "dlq.db", events)
    instrument(dead_letter_store=store)
    app = FastAPI()
    seen: list[bool] = []

    @app.get("/work")
    async def work(tasks: BackgroundTasks) -> dict[str, bool]:
        seen.append(gate_active())
        tasks.add_task(durable_invoice, "o-1")
        return {"ok": True}

    loop_thread = threading.get_ident()
    transport = httpx.ASGITransport(app=recorder(app, events))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await client.get("/work")).json() == {"ok": True}
    assert seen == [True]
    assert events == ["journal committed", "response started"]
    assert loop_thread not in store.threads
    store.close()


async def test_outside_a_request_the_write_stays_synchronous(
    tmp_path: Path, instrument: Any
) -> None:
    events: list[str] = []
    store = RecordingStore(tmp_path / "dlq.db", events)
    instrument(dead_letter_store=store)
    assert not gate_active()
    scheduled = schedule(durable_invoice, "o-2")
    assert events == ["journal committed"]  # committed when schedule() returned
    assert store.threads == [threading.get_ident()]  # on the loop: the guarantee first
    await scheduled.run()
    store.close()
