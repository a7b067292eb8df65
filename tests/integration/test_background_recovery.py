"""Recovery off the startup path: a real uvicorn serves while `start_recovery` re-runs a dead
process's journal in the background (bounded concurrency), and its shutdown interrupts
recovery, leaving what was not re-run journaled and free for the next recovery."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from tests.integration._server import UvicornThread
from tests.integration.apps.claim_tasks import SECONDS_ENV, read_lines
from tests.support.waiting import wait_until

from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.records import JournalEntry
from otel_bgtasks.recovery import start_recovery
from otel_bgtasks.registry import declare_task_modules
from otel_bgtasks.stores import SQLiteDeadLetterStore

DEAD = "another-host:7:gone"


def test_app_serves_while_recovery_runs_and_shutdown_interrupts_it(
    tmp_path: Path, instrument: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results.txt"
    store = SQLiteDeadLetterStore(tmp_path / "dlq.db")
    keys = [f"j{i}" for i in range(12)]
    for key in keys:
        store.journal_add(
            JournalEntry(
                task_id=uuid.uuid4().hex,
                task_name="slow_count",
                func_ref="tests.integration.apps.claim_tasks:slow_count",
                payload=json.dumps({"args": [key, str(results)], "kwargs": {}}),
                owner=DEAD,
                enqueued_at=time.time() - 3600,
            )
        )
    monkeypatch.setenv(SECONDS_ENV, "0.5")  # re-runs happen in this process
    declare_task_modules("tests.integration.apps.claim_tasks")  # the app's task module
    instrument(dead_letter_store=store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with start_recovery(mode="rerun", stale_after=60.0, concurrency=2):
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"pong": True}

    server = UvicornThread(app)
    server.start()  # lifespan startup returned at once
    try:
        with server.client() as client:
            assert client.get("/ping").json() == {"pong": True}
            started = {k for w, k, _ in read_lines(str(results)) if w == "start"}
            assert len(started) <= 2  # bounded concurrency
            wait_until(
                lambda: len([w for w, _, _ in read_lines(str(results)) if w == "ran"]) >= 2,
                what="a first re-run to finish",
            )
            assert client.get("/ping").json() == {"pong": True}
    finally:
        server.stop()
    ran = {k for w, k, _ in read_lines(str(results)) if w == "ran"}
    left = store.journal_list()
    assert ran  # recovery made progress ...
    assert left  # ... and the shutdown stopped it
    assert {json.loads(j.payload)["args"][0] for j in left} | ran == set(keys)
    # what it held was released: the next recovery can claim every remaining row at once
    assert all(store.journal_claim(j.task_id, "next", lease=60) == j for j in left)
    store.close()


async def test_start_recovery_checks_its_settings_before_starting() -> None:
    with pytest.raises(ConfigurationError, match="mode='often'"):
        start_recovery(mode="often")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="concurrency=0"):
        start_recovery(concurrency=0, store=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="no dead-letter store"):
        start_recovery()


async def test_wait_returns_the_report(tmp_path: Path) -> None:
    store = SQLiteDeadLetterStore(tmp_path / "dlq.db")
    task = start_recovery(mode="dead_letter", store=store)
    report = await task.wait()
    assert (report.total, task.done()) == (0, True)
    store.close()
