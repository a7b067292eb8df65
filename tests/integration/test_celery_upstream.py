"""Coexistence with opentelemetry-instrumentation-celery, instrumented before or after us, in
the web process and in the worker: exactly one producer and one consumer span per message of
ours; a plain Celery task of the same app keeps upstream's spans.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from tests.celery_worker import running_worker
from tests.support.redis import running_redis

from otel_bgtasks import schedule

pytestmark = pytest.mark.redis

WAIT = 60.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with (
        running_redis(tmp_path_factory.mktemp("broker")) as broker,
        running_redis(tmp_path_factory.mktemp("store")) as store,
    ):
        from tests.integration.apps import celery_app

        env = {
            "BGTASKS_TEST_BROKER": broker.url,
            "BGTASKS_TEST_STORE": f"redis://127.0.0.1:{store.port}/1",
        }
        celery_app.configure(env["BGTASKS_TEST_BROKER"], env["BGTASKS_TEST_STORE"])
        yield env


def _spans(r: Any, name: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in r.lrange(f"span:{name}", 0, -1)]


@pytest.mark.parametrize("order", ["before", "after"])
def test_one_producer_and_one_consumer_span_per_message_with_upstream_on(
    order: str, env: dict[str, str], instrument: Any, telemetry: Any, tmp_path: Any
) -> None:
    from tests.integration.apps.celery_app import plain_add, results
    from tests.integration.apps.celery_tasks import record

    r = results()
    r.flushdb()
    upstream = CeleryInstrumentor()
    if order == "before":
        upstream.instrument(tracer_provider=telemetry.tracer_provider)
    instrument(dead_letter_store=env["BGTASKS_TEST_STORE"])
    if order == "after":
        upstream.instrument(tracer_provider=telemetry.tracer_provider)
    try:
        worker_env = {**env, "BGTASKS_TEST_UPSTREAM": order}
        with running_worker(worker_env, r, tmp_path) as worker:
            schedule(record, "up", 1)
            plain_add.apply_async((2, 3), queue="bgtasks")
            assert r.blpop(["ran:up"], timeout=WAIT) is not None
            assert r.blpop(["plain"], timeout=WAIT) is not None
            worker.stop()  # warm shutdown: every task's postrun handlers and spans are done
    finally:
        upstream.uninstrument()
    # the worker: ours alone for our message, upstream's for the plain task
    assert len(_spans(r, "process record")) == 1
    assert _spans(r, "run/otel_bgtasks.run") == []
    [plain] = _spans(r, "run/plain_add")
    assert plain["kind"] == "CONSUMER"
    # the web side: one producer span of ours, upstream's only for the plain task
    names = [s.name for s in telemetry.spans()]
    assert names.count("send record") == 1
    assert "apply_async/otel_bgtasks.run" not in names
    assert names.count("apply_async/plain_add") == 1
    [consumer] = _spans(r, "process record")
    producer = telemetry.span("send record").get_span_context()
    assert consumer["links"] == [
        {"trace_id": f"{producer.trace_id:032x}", "span_id": f"{producer.span_id:016x}"}
    ]


def test_in_child_mode_the_worker_span_is_a_child_of_the_producer_span(
    env: dict[str, str], instrument: Any, telemetry: Any, tmp_path: Any
) -> None:
    """The worker's configuration (here OTEL_BGTASKS_TRACE_MODE, as install_worker's
    keywords) decides: with ``child`` the consumer span joins the producer's trace."""
    from tests.integration.apps.celery_app import results
    from tests.integration.apps.celery_tasks import record

    r = results()
    r.flushdb()
    instrument(dead_letter_store=env["BGTASKS_TEST_STORE"])
    with running_worker({**env, "OTEL_BGTASKS_TRACE_MODE": "child"}, r, tmp_path):
        schedule(record, "child-mode", 1)
        got = r.blpop(["span:process record"], timeout=WAIT)
    assert got is not None
    consumer = json.loads(got[1])
    producer = telemetry.span("send record").get_span_context()
    assert consumer["trace_id"] == f"{producer.trace_id:032x}"
    assert consumer["parent"] == f"{producer.span_id:016x}"
    assert consumer["links"] == [
        {"trace_id": f"{producer.trace_id:032x}", "span_id": f"{producer.span_id:016x}"}
    ]
