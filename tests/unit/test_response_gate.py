"""The response gate: a durable task's journal row is written off the event loop, and committed
before the response's first message goes out (DESIGN.md §6). Every Starlette/FastAPI request
is gated by the dispatch seam; `JournalGate` does the same for another ASGI app."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fastapi import BackgroundTasks, FastAPI

from otel_bgtasks.instrumentor import current_executor, schedule
from otel_bgtasks.records import JournalEntry
from otel_bgtasks.response_gate import JournalGate, gate_active
from otel_bgtasks.stores import SQLiteDeadLetterStore
from tests.unit.tasks import durable_invoice

T = TypeVar("T")


class RecordingStore(SQLiteDeadLetterStore):
    """A real SQLite store that records which thread committed each journal write; with
    `held`, each write waits until the test sets `release` (a slow store)."""

    def __init__(self, path: Path, events: list[str], *, held: bool = True) -> None:
        super().__init__(path)
        self.events = events
        self.threads: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not held:
            self.release.set()

    def journal_add(self, entry: JournalEntry) -> None:
        self.entered.set()
        assert self.release.wait(30), "the test never released the journal write"
        super().journal_add(entry)
        self.threads.append(threading.get_ident())
        self.events.append("journal committed")


async def while_the_write_is_held(store: RecordingStore, request: Awaitable[T]) -> T:
    """Run `request` with the store's journal write held: nothing may go out until it is
    released, however often the loop runs meanwhile."""
    call = asyncio.ensure_future(request)
    assert await asyncio.to_thread(store.entered.wait, 30), "no journal write"
    for _ in range(50):
        await asyncio.sleep(0)  # every chance for a response that does not wait to start
    assert store.events == []
    store.release.set()
    return await call


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
    transport = httpx.ASGITransport(app=recorder(app, events))  # gated by the dispatch seam
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        response = await while_the_write_is_held(store, client.get("/work"))
        assert response.json() == {"ok": True}
    assert seen == [True]
    assert events == ["journal committed", "response started"]
    assert loop_thread not in store.threads
    executor = current_executor()
    assert executor is not None
    assert executor.journal is not None
    executor.journal.close()  # waits for the writer thread's queue: the removal, after the add
    assert store.journal_list() == []
    store.close()


async def test_outside_a_request_the_write_stays_synchronous(
    tmp_path: Path, instrument: Any
) -> None:
    events: list[str] = []
    store = RecordingStore(tmp_path / "dlq.db", events, held=False)
    instrument(dead_letter_store=store)
    assert not gate_active()
    task = schedule(durable_invoice, "o-2")  # e.g. a script or a consumer loop
    assert events == ["journal committed"]  # committed when schedule() returns
    assert store.threads == [threading.get_ident()]
    await task.run()
    store.close()


async def test_journal_gate_holds_another_asgi_app(tmp_path: Path, instrument: Any) -> None:
    events: list[str] = []
    store = RecordingStore(tmp_path / "dlq.db", events)
    instrument(dead_letter_store=store)

    async def bare(scope: Any, receive: Any, send: Any) -> None:  # not a Starlette app
        assert gate_active()
        schedule(durable_invoice, "o-3")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    transport = httpx.ASGITransport(app=recorder(JournalGate(bare), events))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        assert (await while_the_write_is_held(store, client.get("/"))).status_code == 204
    assert events == ["journal committed", "response started"]
    assert threading.get_ident() not in store.threads
    store.close()
