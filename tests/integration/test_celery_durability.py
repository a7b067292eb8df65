"""The durability trials in CI: one trial of 100 durable tasks per scenario (SIGKILL one
worker child; SIGKILL the whole worker, then restart it once; SIGKILL the broker, then
restart it empty). Lost must be 0. The full 5 x 500 runs in benchmarks/celery_durability.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.celery_trials import SCENARIOS, Scenario, run_trial, running_recovery
from tests.celery_worker import CeleryWorker, running_worker
from tests.support.redis import RedisServer, running_redis

from otel_bgtasks.stores import open_store

pytestmark = pytest.mark.redis

TASKS = 100


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
    return {
        "BGTASKS_TEST_BROKER": broker.url,
        "BGTASKS_TEST_STORE": f"redis://127.0.0.1:{store.port}/1",
    }


@pytest.fixture(scope="module")
def worker(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    from tests.integration.apps import celery_app

    celery_app.configure(env["BGTASKS_TEST_BROKER"], env["BGTASKS_TEST_STORE"])
    with running_worker(env, celery_app.results(), tmp_path_factory.mktemp("worker")) as w:
        yield w


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_durable_task_is_lost(
    scenario: Scenario,
    worker: CeleryWorker,
    servers: tuple[RedisServer, RedisServer],
    env: dict[str, str],
    instrument: Any,
) -> None:
    from tests.integration.apps.celery_app import results
    from tests.integration.apps.celery_tasks import record

    broker, _ = servers
    instrument(dead_letter_store=env["BGTASKS_TEST_STORE"])

    def restart_worker() -> None:
        worker.kill()
        worker.start()

    def restart_broker() -> None:
        broker.kill()
        broker.start()

    with running_recovery(every=0.5), open_store(env["BGTASKS_TEST_STORE"]) as store:
        result = run_trial(
            scenario,
            tasks=TASKS,
            results=results(),
            store=store,
            damage={
                "child": worker.kill_child,
                "worker": restart_worker,
                "broker": restart_broker,
            },
            record=record,
        )
    print(result.row())
    assert result.lost == 0, result.row()
    assert result.ran + result.dead_lettered == TASKS, result.row()
