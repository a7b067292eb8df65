"""The Celery app of the Celery benchmarks, for the web side and for the worker
(``celery -A benchmarks._celery_bench worker``). Environment:

- ``BENCH_BROKER``, ``BENCH_RESULTS``: Redis URLs of the broker and of the results counter;
- ``BENCH_MODE`` (worker): ``ours`` (`install_worker`) or ``upstream`` (plain Celery tasks
  with opentelemetry-instrumentation-celery); ``BENCH_RUN``: readiness key suffix.

Both modes run the same task body (`_count`) with the same SDK providers (a batch span
processor and a periodic metric reader exporting to no-op exporters), set up per child after
the fork.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery, signals

from benchmarks._common import noop_providers
from otel_bgtasks import background_task
from otel_bgtasks.celery import CeleryDispatcher, install_worker

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
RESULTS = os.environ.get("BENCH_RESULTS", "redis://127.0.0.1:6379/2")
MODE = os.environ.get("BENCH_MODE", "")
QUEUE = "bench"

app = Celery("bench", broker=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    task_default_queue=QUEUE,
)
to_bench = CeleryDispatcher(app, queue=QUEUE)
_client: redis.Redis | None = None


def results() -> redis.Redis:
    global _client
    if _client is None or _client.connection_pool.pid != os.getpid():
        _client = redis.Redis.from_url(RESULTS, decode_responses=True)
    return _client


def _count(run: str, total: int) -> None:
    if results().incr(f"count:{run}") == total:
        results().rpush(f"done:{run}", "1")


@app.task(name="bench_plain", acks_late=True, ignore_result=True)
def bench_plain(run: str, total: int, payload: str) -> None:
    """The baseline: a plain Celery task."""
    _count(run, total)


@background_task(name="bench-sync", dispatch=to_bench)
def bench_sync(run: str, total: int, payload: str) -> None:
    _count(run, total)


@background_task(name="bench-async", dispatch=to_bench)
async def bench_async(run: str, total: int, payload: str) -> None:
    _count(run, total)


@signals.worker_process_init.connect(weak=False)
def _child(**_: Any) -> None:
    from opentelemetry import metrics, trace

    tracer_provider, meter_provider, _ = noop_providers()
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    if MODE == "upstream":
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()


@signals.worker_ready.connect(weak=False)
def _ready(**_: Any) -> None:
    results().rpush(f"ready:{os.environ.get('BENCH_RUN', 'run')}", os.getpid())


if MODE == "ours":
    install_worker(app, dead_letter_store=None)
