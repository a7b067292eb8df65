"""Recovery must leave alone the durable tasks of a process that is alive and still running them.

A worker that runs one long durable task (a report, an export) schedules nothing else for a
while. Meanwhile a sibling worker starts and runs `recover_interrupted_tasks()` in its
lifespan, as the README recommends. The long task's owner is alive, on this very host, and
busy: its task must be neither re-run (a duplicate while the original still runs) nor
dead-lettered as ``interrupted``.

No waiting for heartbeats to age: recovery runs with a `stale_after` every heartbeat exceeds
(so only the owner's liveness can save its task), while the task holds on a gate file that
the test creates afterwards.
"""

from __future__ import annotations

import httpx
from tests.integration._server import durable_app
from tests.integration.apps.durable_tasks import read_results
from tests.support.waiting import wait_until

from otel_bgtasks.recovery import RecoveryReport, recover_interrupted_tasks
from otel_bgtasks.stores import open_store

STALE_AFTER = 0.001  # every heartbeat is older than this: staleness alone would recover it


async def test_recovery_skips_a_live_owner_busy_with_a_long_durable_task(tmp_path, instrument):
    gate = tmp_path / "gate"
    worker, store_url, results = durable_app(tmp_path, name="worker", gate=gate)
    store = open_store(store_url)
    instrument(dead_letter_store=store)
    with worker:
        async with httpx.AsyncClient(base_url=worker.url) as client:
            assert (await client.post("/work/1")).status_code == 200
            (journaled,) = store.journal_list()
            assert journaled.owner.split(":")[-2] == str(worker.pid)

            report = await recover_interrupted_tasks(
                mode="rerun", store=store, stale_after=STALE_AFTER
            )

            assert report == RecoveryReport(), "a live worker's running task was recovered"
            assert store.journal_list() == [journaled]
            assert store.count() == 0
            assert read_results(str(results)) == []  # nobody ran it twice
            assert (await client.get("/ready")).json()["pid"] == worker.pid  # still alive
            gate.touch()  # the long task may finish now
            ran = wait_until(lambda: read_results(str(results)), what="the long task to finish")
            assert ran == [(1, worker.pid)]
            wait_until(lambda: not store.journal_list(), what="its journal row to go")
    store.close()
