"""Celery on the dispatch seam, end to end with real processes: two loopback redis-servers
(broker, store), a prefork ``celery worker -c 2`` started by the test, the web side in this
process (instrumented, publishing through `CeleryDispatcher`). Completion is waited on as
records the tasks push to Redis (BLPOP), never on sleeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from otel_bgtasks import schedule
from otel_bgtasks.stores import open_store
from tests.celery_worker import CeleryWorker, running_worker
from tests.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.redis

WAIT = 60.0  # seconds: a failure bound for BLPOP, never an outcome


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, RedisServer]]:
    with running_redis(tmp_path_factory.mktemp("broker")) as broker, running_redis(
        tmp_path_factory.mktemp("store")
    ) as store:
        yield broker, store


@pytest.fixture(scope="module")
def celery_env(servers: tuple[RedisServer, RedisServer]) -> dict[str, str]:
    broker, store = servers
    return {
        "BGTASKS_TEST_BROKER": broker.url,
        "BGTASKS_TEST_STORE": f"redis://127.0.0.1:{store.port}/1",
    }


@pytest.fixture(scope="module")
def apps(celery_env: dict[str, str]) -> Any:
    from tests.integration.apps import celery_app, celery_tasks

    celery_app.configure(celery_env["BGTASKS_TEST_BROKER"], celery_env["BGTASKS_TEST_STORE"])
    return celery_tasks


@pytest.fixture
def results(apps: Any) -> Iterator[redis.Redis]:
    from tests.integration.apps.celery_app import results as client

    r = client()
    r.flushdb()
    yield r


@pytest.fixture(scope="module")
def worker(
    celery_env: dict[str, str], apps: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryWorker]:
    from tests.integration.apps.celery_app import results as client

    with running_worker(celery_env, client(), tmp_path_factory.mktemp("worker")) as w:
        yield w


@pytest.fixture
def web(instrument: Any, celery_env: dict[str, str], apps: Any) -> Any:
    """This process as the web side: instrumented, with the store."""
    return instrument(dead_letter_store=celery_env["BGTASKS_TEST_STORE"])


def wait_records(r: redis.Redis, key: str, count: int) -> list[list[Any]]:
    """Wait (BLPOP) for `count` records on `key`."""
    out = []
    for _ in range(count):
        got = r.blpop([key], timeout=WAIT)
        assert got is not None, f"only {len(out)} of {count} records on {key!r}"
        out.append(json.loads(got[1]))
    return out


def worker_spans(r: redis.Redis, name: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait (BLPOP) for `count` spans called `name` exported by the worker children."""
    spans = []
    for _ in range(count):
        got = r.blpop([f"span:{name}"], timeout=WAIT)
        assert got is not None, f"only {len(spans)} of {count} worker spans {name!r}"
        spans.append(json.loads(got[1]))
    return spans


def no_more(r: redis.Redis, *keys: str) -> None:
    """Nothing else arrived on `keys` (checked after the work that could add to them ended)."""
    for key in keys:
        assert r.llen(key) == 0, (key, r.lrange(key, 0, -1))


def test_a_durable_task_runs_on_the_worker_linked_to_its_producer_span(
    web: Any, worker: CeleryWorker, results: redis.Redis, telemetry: Any, celery_env: Any
) -> None:
    from tests.integration.apps.celery_tasks import record

    task = schedule(record, "t1", 7)
    assert task.handed
    [(index, pid)] = wait_records(results, "ran:t1", 1)
    assert index == 7 and pid in worker.children()
    [consumer] = worker_spans(results, "process record")
    producer = telemetry.span("send record")
    assert producer.kind.name == "PRODUCER"
    pctx = producer.get_span_context()
    assert consumer["kind"] == "CONSUMER"
    assert consumer["links"] == [{"trace_id": f"{pctx.trace_id:032x}", "span_id": f"{pctx.span_id:016x}"}]
    assert consumer["trace_id"] != f"{pctx.trace_id:032x}"  # link mode: a new trace
    attrs = consumer["attributes"]
    assert attrs["bgtasks.task.id"] == task.state.task_id
    assert attrs["messaging.message.id"] == task.state.task_id
    assert attrs["messaging.system"] == "redis"
    assert attrs["messaging.destination.name"] == "bgtasks"
    assert attrs["messaging.operation.type"] == "process"
    assert attrs["bgtasks.task.outcome"] == "success"
    assert attrs["bgtasks.message.deliveries"] == 1
    assert producer.attributes["messaging.operation.type"] == "send"
    assert producer.attributes["messaging.destination.name"] == "bgtasks"
    # the journal row moved to the route, then was removed by the worker
    with open_store(celery_env["BGTASKS_TEST_STORE"]) as store:
        assert store.journal_list() == []
