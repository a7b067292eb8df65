"""Recovery must leave alone the durable tasks of a process that is alive and still running them.

A worker that runs one long durable task (a report, an export) schedules nothing else for a
while. Meanwhile a sibling worker starts and runs `recover_interrupted_tasks()` in its
lifespan, as the README recommends. The long task's owner is alive, on this very host, and
busy: its task must be neither re-run (a duplicate while the original still runs) nor
dead-lettered as ``interrupted``.

This takes real time: the owner's liveness is its heartbeat, written at most every
`HEARTBEAT_EVERY` (10 s) seconds, so `stale_after` must exceed that for the question to be
fair, and the test waits a little longer than `stale_after` before recovering.
"""

from __future__ import annotations

import asyncio

import httpx
from tests.integration._server import durable_app
from tests.integration.apps.durable_tasks import read_results

from otel_bgtasks.journal import HEARTBEAT_EVERY
from otel_bgtasks.recovery import RecoveryReport, recover_interrupted_tasks
from otel_bgtasks.stores import open_store

STALE_AFTER = HEARTBEAT_EVERY + 1.0  # a live owner heartbeating on schedule is never stale
TASK_SECONDS = STALE_AFTER + 20.0  # the task outlives the wait below by far


async def test_recovery_skips_a_live_owner_busy_with_a_long_durable_task(tmp_path, instrument):
    worker, store_url, results = durable_app(tmp_path, task_seconds=TASK_SECONDS, name="worker")
    store = open_store(store_url)
    instrument(dead_letter_store=store)
    with worker:
        async with httpx.AsyncClient(base_url=worker.url) as client:
            assert (await client.post("/work/1")).status_code == 200
            (journaled,) = store.journal_list()
            assert journaled.owner.split(":")[-2] == str(worker.pid)

            await asyncio.sleep(STALE_AFTER + 1.0)  # the long task is still running
            assert (await client.get("/ready")).json()["pid"] == worker.pid  # alive

        report = await recover_interrupted_tasks(mode="rerun", store=store, stale_after=STALE_AFTER)

        assert report == RecoveryReport(), "a live worker's running task was recovered"
        assert store.journal_list() == [journaled]
        assert store.count() == 0
        assert read_results(str(results)) == []  # nobody ran it twice
