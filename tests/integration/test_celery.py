"""Celery on the dispatch seam, end to end with real processes: two loopback redis-servers
(broker, store), a prefork ``celery worker -c 2`` started by the test, the web side in this
process (instrumented, publishing through `CeleryDispatcher`). Completion is waited on as
records the tasks push to Redis (BLPOP), never on sleeps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from tests.celery_worker import CeleryWorker, running_worker
from tests.support.redis import RedisServer, running_redis

from otel_bgtasks import schedule
from otel_bgtasks.stores import open_store

pytestmark = pytest.mark.redis

WAIT = 60.0  # seconds: a failure bound for BLPOP, never an outcome


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, RedisServer]]:
    with running_redis(tmp_path_factory.mktemp("broker")) as broker, running_redis(
        tmp_path_factory.mktemp("store")
    ) as store:
        yield broker, store


KEY = "celery-tests-signing-key-0123456789"
TASKS = "tests.integration.apps.celery_tasks"


@pytest.fixture(scope="module")
def celery_env(servers: tuple[RedisServer, RedisServer]) -> Iterator[dict[str, str]]:
    """Both sides sign and verify messages (a planted unsigned one is refused)."""
    broker, store = servers
    saved = os.environ.get("OTEL_BGTASKS_SIGNING_KEY")
    os.environ["OTEL_BGTASKS_SIGNING_KEY"] = KEY
    yield {
        "BGTASKS_TEST_BROKER": broker.url,
        "BGTASKS_TEST_STORE": f"redis://127.0.0.1:{store.port}/1",
        "OTEL_BGTASKS_SIGNING_KEY": KEY,
    }
    if saved is None:
        del os.environ["OTEL_BGTASKS_SIGNING_KEY"]
    else:
        os.environ["OTEL_BGTASKS_SIGNING_KEY"] = saved


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
    return r


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


def wait_for(r: redis.Redis, predicate: Callable[[], Any], what: str) -> Any:
    """Poll a store condition (a row written by a worker), paced by BLPOP on an idle key;
    bounded, failing with `what`."""
    for _ in range(int(WAIT / 0.1)):
        value = predicate()
        if value:
            return value
        assert r.blpop(["idle"], timeout=0.1) is None
    pytest.fail(f"timed out waiting for {what}")


def test_a_durable_task_runs_on_the_worker_linked_to_its_producer_span(
    web: Any, worker: CeleryWorker, results: redis.Redis, telemetry: Any, celery_env: Any
) -> None:
    from tests.integration.apps.celery_tasks import record

    task = schedule(record, "t1", 7)
    assert task.handed
    [(index, pid)] = wait_records(results, "ran:t1", 1)
    assert index == 7
    assert pid in worker.children()
    [consumer] = worker_spans(results, "process record")
    producer = telemetry.span("send record")
    assert producer.kind.name == "PRODUCER"
    pctx = producer.get_span_context()
    assert consumer["kind"] == "CONSUMER"
    assert consumer["links"] == [
        {"trace_id": f"{pctx.trace_id:032x}", "span_id": f"{pctx.span_id:016x}"}
    ]
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
        wait_for(results, lambda: store.journal_list() == [], "the worker to remove the row")


def test_retries_on_the_worker_are_events_on_one_span(
    web: Any, worker: CeleryWorker, results: redis.Redis
) -> None:
    from tests.integration.apps.celery_tasks import flaky

    schedule(flaky, "f1")
    assert wait_records(results, "ran:f1", 1)[0][0] == 3
    [span] = worker_spans(results, "process flaky")
    retries = [e for e in span["events"] if e["name"] == "bgtasks.retry"]
    assert [e["attributes"]["bgtasks.retry.attempt"] for e in retries] == [2, 3]
    assert {e["attributes"]["error.type"] for e in retries} == {"ConnectionError"}
    assert span["attributes"]["bgtasks.task.attempts"] == 3
    assert span["attributes"]["bgtasks.task.outcome"] == "success"
    assert span["status"] == "UNSET"  # retried, then successful: not an error


def test_async_tasks_share_one_event_loop_per_child(
    web: Any, worker: CeleryWorker, results: redis.Redis
) -> None:
    from tests.integration.apps.celery_tasks import record_async

    for index in range(8):
        schedule(record_async, "a1", index)
    rows = wait_records(results, "ran:a1", 8)
    loops_by_pid: dict[int, set[int]] = {}
    for _, loop, pid in rows:
        loops_by_pid.setdefault(pid, set()).add(loop)
    assert all(len(loops) == 1 for loops in loops_by_pid.values()), loops_by_pid


def test_unserialisable_arguments_raise_at_scheduling(web: Any, worker: CeleryWorker) -> None:
    from tests.integration.apps.celery_tasks import record_once

    from otel_bgtasks.errors import SerializationError

    with pytest.raises(SerializationError, match=r"argument 'token'.*record-once"):
        schedule(record_once, object(), 1)


def test_a_poison_task_is_dead_lettered_after_max_deliveries(
    web: Any, worker: CeleryWorker, results: redis.Redis, celery_env: Any
) -> None:
    from tests.integration.apps.celery_tasks import poison

    task = schedule(poison, "p1")
    with open_store(celery_env["BGTASKS_TEST_STORE"]) as store:
        # each delivery kills a child; the worker replaces it
        entry = wait_for(results, lambda: store.get(task.state.task_id), "the dead letter")
        assert entry.reason.value == "worker_lost"
        assert entry.func_ref.endswith("celery_tasks:poison")
        assert entry.route == "celery:bgtasks"
        wait_for(results, lambda: store.journal_list() == [], "the row to be removed")
    # max_deliveries=3: killed at deliveries 1..3, dead-lettered at the 4th without running
    assert int(results.get("poison:p1") or 0) == 3


@pytest.mark.parametrize(
    ("case", "body", "why"),
    [
        ("unregistered", {"func_ref": "os:system"}, "UnregisteredTaskError"),
        ("unsigned", {"signature": ""}, "UntrustedEntryError"),
        ("tampered", {"payload": '{"args":["evil",0],"kwargs":{}}'}, "UntrustedEntryError"),
        ("malformed", None, "MessageError"),
    ],
)  # fmt: skip
def test_a_planted_message_is_refused_and_nothing_runs(
    case: str,
    body: dict[str, Any] | None,
    why: str,
    web: Any,
    worker: CeleryWorker,
    results: redis.Redis,
    celery_env: Any,
) -> None:
    """Messages written straight to the broker (anyone with access can): dead-lettered as
    refused, nothing imported or run."""
    import time

    from tests.integration.apps.celery_app import app

    from otel_bgtasks.celery import HEADER, RUN_TASK
    from otel_bgtasks.records import TaskMessage

    task_id = f"planted{case}".ljust(32, "0")
    now = time.time()
    good = TaskMessage(
        task_id=task_id,
        task_name="record",
        # signed with the key: only the registry stands between it and os.system
        func_ref="os:system" if case == "unregistered" else f"{TASKS}:record",
        payload=json.dumps({"args": [f"planted-{case}", 0], "kwargs": {}}),
        route="celery:bgtasks",
        enqueued_at=now,
        durable=False,
    ).signed()
    fields = {
        "task_name": "record",
        "func_ref": good.func_ref,
        "serializer": "json",
        "payload": good.payload,
        "signature": good.signature,
        "durable": False,
        "route": good.route,
    }
    args: Any = ({**fields, **body},) if body is not None else ("not an object",)
    app.send_task(
        RUN_TASK,
        args=args,
        task_id=task_id,
        queue="bgtasks",
        headers={HEADER: {"task_id": task_id, "enqueued_at": now}},
        serializer="json",
    )
    with open_store(celery_env["BGTASKS_TEST_STORE"]) as store:
        entry = wait_for(results, lambda: store.get(task_id), f"the {case} message's dead letter")
    assert entry.reason.value == "refused"
    assert entry.error_type.rsplit(".", 1)[-1] == why
    assert results.llen(f"ran:planted-{case}") == 0
    assert results.llen("ran:evil") == 0


def test_a_workers_dead_letter_is_replayed_by_the_cli_onto_a_worker(
    web: Any, worker: CeleryWorker, results: redis.Redis, celery_env: Any
) -> None:
    import subprocess
    import sys

    from tests.celery_worker import REPO_ROOT
    from tests.integration.apps.celery_tasks import fail_once

    schedule(fail_once, "r1")
    with open_store(celery_env["BGTASKS_TEST_STORE"]) as store:
        [entry] = wait_for(results, lambda: store.list(task="fail-once"), "the dead letter")
        task_id = entry.id
        assert entry.reason.value == "permanent"
        assert entry.route == "celery:bgtasks"
        done = subprocess.run(
            [
                sys.executable, "-m", "otel_bgtasks.cli", "dlq", "replay", task_id,
                "--store", celery_env["BGTASKS_TEST_STORE"],
                "--tasks", "tests.integration.apps.celery_tasks",
                "--celery-app", "tests.integration.apps.celery_app:app",
            ],
            cwd=REPO_ROOT,
            env={**os.environ, **celery_env, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "1 sent" in done.stdout
        assert wait_records(results, "ran:r1", 1)[0][0] == 1  # ran on a worker
        assert store.get(task_id) is None


def test_a_durable_task_that_lost_its_worker_runs_again_with_a_redelivery_event(
    web: Any, worker: CeleryWorker, results: redis.Redis
) -> None:
    from tests.integration.apps.celery_tasks import die_once

    schedule(die_once, "d1")
    assert wait_records(results, "ran:d1", 1)[0][0] == 1
    [span] = worker_spans(results, "process die-once")
    assert span["attributes"]["bgtasks.message.deliveries"] == 2
    [event] = [e for e in span["events"] if e["name"] == "bgtasks.message.redelivered"]
    assert event["attributes"] == {"bgtasks.message.deliveries": 2}
    assert span["attributes"]["bgtasks.task.outcome"] == "success"


def test_a_task_that_is_not_durable_runs_at_most_once(
    web: Any, worker: CeleryWorker, results: redis.Redis, celery_env: Any
) -> None:
    from tests.integration.apps.celery_tasks import die_once_not_durable

    task_id = schedule(die_once_not_durable, "n1").state.task_id
    with open_store(celery_env["BGTASKS_TEST_STORE"]) as store:
        entry = wait_for(results, lambda: store.get(task_id), "the worker_lost dead letter")
    assert entry.reason.value == "worker_lost"
    assert "at most once" in entry.error_message
    assert results.llen("ran:n1") == 0  # it did not run a second time
    assert int(results.get("die-once:n1") or 0) == 1
