"""A durable task cut short by the server's shutdown stays journaled, so recovery re-runs it.

uvicorn with ``--timeout-graceful-shutdown`` (a usual production setting, so that a deploy
does not hang on a stuck task) cancels the request cycles still running when the timeout
expires, background tasks included. The README: "On shutdown, tasks still pending or running
are logged (never dropped silently); durable ones stay in the journal."
"""

from __future__ import annotations

import signal

import httpx
from tests.integration._server import durable_app
from tests.integration.apps.durable_tasks import read_results

from otel_bgtasks.recovery import RecoveryReport, recover_interrupted_tasks
from otel_bgtasks.stores import open_store


async def test_task_cancelled_by_graceful_shutdown_timeout_is_recovered(tmp_path, instrument):
    server, store_url, results = durable_app(  # the task holds on a gate that never opens
        tmp_path,
        name="server",
        gate=tmp_path / "never",
        uvicorn_args=["--timeout-graceful-shutdown", "1"],
    )
    store = open_store(store_url)
    with server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            assert (await client.post("/work/7")).status_code == 200
        (journaled,) = store.journal_list()
        code = server.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM)
    # The scenario happened: uvicorn cancelled the running task.
    assert "Cancel 1 running task(s)" in server.stderr()
    assert read_results(str(results)) == []

    assert store.journal_list() == [journaled], "the interrupted durable task left the journal"

    instrument(dead_letter_store=store)
    report = await recover_interrupted_tasks(mode="rerun", store=store, stale_after=3600.0)
    assert report == RecoveryReport(rerun_succeeded=1)
    assert [n for n, _ in read_results(str(results))] == [7]
    assert store.journal_list() == []
