"""A broker that goes away: requests keep being served (publishing is off the event loop, in a
bounded outbox), tasks wait and are published when the broker is back; past the publish
deadline a task that is not durable is dead-lettered as undeliverable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from tests.celery_worker import CeleryWorker, running_worker
from tests.integration._server import UvicornThread
from tests.support.redis import RedisServer, running_redis

from otel_bgtasks.stores import open_store

pytestmark = pytest.mark.redis

WAIT = 60.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, RedisServer]]:
    with (
        running_redis(tmp_path_factory.mktemp("broker")) as broker,
        running_redis(tmp_path_factory.mktemp("store")) as store,
    ):
        yield broker, store


@pytest.fixture(scope="module")
def env(servers: tuple[RedisServer, RedisServer]) -> dict[str, str]:
    broker, store = servers
    from tests.integration.apps import celery_app

    env = {
        "BGTASKS_TEST_BROKER": broker.url,
        "BGTASKS_TEST_STORE": f"redis://127.0.0.1:{store.port}/1",
    }
    celery_app.configure(env["BGTASKS_TEST_BROKER"], env["BGTASKS_TEST_STORE"])
    return env


@pytest.fixture(scope="module")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    from tests.integration.apps.celery_app import results

    with running_worker(env, results(), tmp_path_factory.mktemp("worker")) as w:
        yield w


def _app() -> FastAPI:
    from tests.integration.apps.celery_tasks import record, record_once

    app = FastAPI()

    @app.post("/order/{index}")
    def order(index: int, background_tasks: BackgroundTasks) -> dict[str, int]:
        background_tasks.add_task(record_once, "down", index)
        background_tasks.add_task(record, "down-durable", index)
        return {"index": index}

    return app


def test_requests_are_served_while_the_broker_is_down_and_nothing_is_lost(
    servers: tuple[RedisServer, RedisServer],
    env: dict[str, str],
    worker: CeleryWorker,
    instrument: Any,
) -> None:
    from tests.integration.apps.celery_app import results, to_celery

    broker, _ = servers
    r = results()
    r.delete("ran:down", "ran:down-durable")
    instrument(dead_letter_store=env["BGTASKS_TEST_STORE"])
    # a machine loaded by other work must not let the tasks expire while the broker is down
    deadline, to_celery._outbox.deadline = to_celery._outbox.deadline, 600.0
    with UvicornThread(_app()) as server:
        broker.kill()
        try:
            with server.client() as client:
                for index in range(20):
                    assert client.post(f"/order/{index}").status_code == 200
            # every response was sent while its tasks wait, unpublished, in the outbox
            assert to_celery.backlog == 40
        finally:
            broker.start()
        ran = {json.loads(r.blpop(["ran:down"], timeout=WAIT)[1])[0] for _ in range(20)}
        durable = {
            json.loads(r.blpop(["ran:down-durable"], timeout=WAIT)[1])[0] for _ in range(20)
        }
    to_celery._outbox.deadline = deadline
    assert ran == durable == set(range(20))
    assert to_celery.backlog == 0


def test_past_the_publish_deadline_tasks_are_dead_lettered_as_undeliverable(
    env: dict[str, str], instrument: Any, telemetry: Any
) -> None:
    """A dispatcher whose broker never answers: each task waits its publish deadline in the
    outbox, then the ones that are not durable are dead letters; durable ones stay journaled,
    handed to the route, for recovery to re-send."""
    from celery import Celery
    from tests.integration.apps.celery_app import results
    from tests.support.ports import free_port

    from otel_bgtasks import background_task, schedule
    from otel_bgtasks.celery import CeleryDispatcher

    dead = Celery("dead", broker=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    to_nowhere = CeleryDispatcher(dead, queue="nowhere", publish_timeout=0.2, publish_deadline=0.5)
    send = background_task(name="send-nowhere", dispatch=to_nowhere)(_send_nowhere)
    keep = background_task(
        name="keep-nowhere", dispatch=to_nowhere, durable=True, timeout=1.0
    )(_keep_nowhere)
    instrument(dead_letter_store=env["BGTASKS_TEST_STORE"])
    sent = [schedule(send, i).state.task_id for i in range(3)]
    kept = schedule(keep, 1).state.task_id
    r = results()
    with open_store(env["BGTASKS_TEST_STORE"]) as store:
        for _ in range(int(WAIT / 0.1)):
            if all(store.get(task_id) for task_id in sent) and to_nowhere.backlog == 0:
                break
            assert r.blpop(["idle"], timeout=0.1) is None
        entries = [store.get(task_id) for task_id in sent]
        assert all(e is not None and e.reason.value == "undeliverable" for e in entries)
        assert {e.route for e in entries if e} == {"celery:nowhere"}
        [row] = [row for row in store.journal_list() if row.task_id == kept]
        assert row.owner == "route:celery:nowhere"
        assert store.get(kept) is None
    producers = [s for s in telemetry.spans() if s.name == "send send-nowhere"]
    assert len(producers) == 3
    assert all(s.status.status_code.name == "ERROR" for s in producers)
    # the head of the outbox was tried (an event per attempt); the ones behind it expired
    assert any(any(e.name == "bgtasks.publish.failed" for e in s.events) for s in producers)
    to_nowhere.close()


def _send_nowhere(index: int) -> None:
    raise AssertionError("never runs")


def _keep_nowhere(index: int) -> None:
    raise AssertionError("never runs")
