"""A durable task cut short by the server's shutdown stays journaled, so recovery re-runs it.

uvicorn with ``--timeout-graceful-shutdown`` (a usual production setting, so that a deploy
does not hang on a stuck task) cancels the request cycles still running when the timeout
expires, background tasks included. The README: "On shutdown, tasks still pending or running
are logged (never dropped silently); durable ones stay in the journal."
"""

from __future__ import annotations

import signal
import sys

import httpx
from tests.integration._server import AppProcess, free_port
from tests.integration.apps.durable_tasks import SECONDS_ENV, read_results

from otel_bgtasks.deadletter import DLQ_URL_ENV, open_store
from otel_bgtasks.recovery import RecoveryReport, recover_interrupted_tasks


async def test_task_cancelled_by_graceful_shutdown_timeout_is_recovered(tmp_path, instrument):
    store_url = f"sqlite:///{tmp_path / 'dlq.db'}"
    results = tmp_path / "results.txt"
    port = free_port()
    server = AppProcess(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.integration.apps.durable_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "1",
        ],
        workdir=tmp_path,
        port=port,
        env={
            DLQ_URL_ENV: store_url,
            "BGTASKS_TEST_RESULTS": str(results),
            SECONDS_ENV: "60",  # far longer than the shutdown grace
        },
        ready_path="/ready",
        name="server",
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
