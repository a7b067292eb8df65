"""Nothing buffered is lost silently: a real uvicorn app, a real redis-server taken away.

Dead letters written while Redis is down wait in the `BufferedStore`. When Redis comes back
they drain by themselves (no further write needed), so an idle app stopped with SIGTERM has
stored them all; if Redis is still down at SIGTERM, the telemetry lifespan's bounded flush
logs every one of them whole (replayable JSON).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import httpx
from tests.integration._server import AppProcess
from tests.support.ports import LOOPBACK, free_port
from tests.support.redis import RedisServer
from tests.support.waiting import wait_until

from otel_bgtasks.records import DeadLetter
from otel_bgtasks.stores import DLQ_URL_ENV
from otel_bgtasks.stores.redis import RedisDeadLetterStore

FAILURES = 50


def buffer_app(tmp_path: Path, store_url: str) -> AppProcess:
    port = free_port()
    return AppProcess(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.integration.apps.buffer_app:app",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--no-access-log",
        ],
        workdir=tmp_path,
        port=port,
        env={DLQ_URL_ENV: store_url},
        ready_path="/ready",
        name="buffer-app",
    )


def fail_batches(app: AppProcess, count: int) -> None:
    with httpx.Client(base_url=app.url, timeout=10.0) as client:
        for batch in range(count):
            assert client.post(f"/fail/{batch}").status_code == 200


def logged_lines(app: AppProcess) -> list[dict[str, object]]:
    lines = []
    for line in app.stdout().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def kept_in_memory(app: AppProcess) -> int:
    return sum(
        1
        for line in logged_lines(app)
        if line.get("event") == "dead-letter store unavailable, write kept in memory"
    )


def test_store_down_then_back_then_sigterm_stores_every_entry(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    store = RedisDeadLetterStore(redis_server.url)
    app = buffer_app(tmp_path, redis_server.url)
    with app:
        redis_server.stop()
        fail_batches(app, FAILURES)
        wait_until(lambda: kept_in_memory(app) == FAILURES, what="50 buffered dead letters")
        redis_server.start()
        # idle from here on: the buffer drains in the background
        wait_until(lambda: store.count() == FAILURES, what="the buffer to drain", timeout=30)
        code = app.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM)
    stored = store.list()
    assert sorted(json.loads(e.payload)["args"][0] for e in stored) == list(range(FAILURES))
    assert [line for line in logged_lines(app) if "dropped" in str(line.get("event"))] == []
    store.close()


def test_store_still_down_at_sigterm_logs_every_entry_whole(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    app = buffer_app(tmp_path, redis_server.url)
    with app:
        redis_server.stop()
        fail_batches(app, FAILURES)
        wait_until(lambda: kept_in_memory(app) == FAILURES, what="50 buffered dead letters")
        code = app.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM)
    dropped = [
        line
        for line in logged_lines(app)
        if line.get("event") == "dead-letter store unavailable at close, write dropped"
    ]
    entries = [DeadLetter.from_json(str(line["entry"])) for line in dropped]
    assert sorted(json.loads(e.payload)["args"][0] for e in entries) == list(range(FAILURES))
    assert {(e.task_name, e.error_type) for e in entries} == {("sync_contacts", "ValueError")}
    assert len({e.id for e in entries}) == FAILURES
    redis_server.start()
    with RedisDeadLetterStore(redis_server.url) as store:
        assert store.count() == 0  # nothing half-written: the log holds them all
