"""The Celery app of the Celery tests: imported by the test process (the web side) and by
the worker (`celery_worker`). Configured by environment variables the tests set:

- ``BGTASKS_TEST_BROKER``: the broker's Redis URL; ``BGTASKS_TEST_STORE``: the store's;
- ``BGTASKS_TEST_VISIBILITY``: the broker's visibility timeout (s, default 10);
- ``BGTASKS_TEST_PUBLISH_DEADLINE``: the dispatcher's publish deadline (s, default 30).
"""

from __future__ import annotations

import os

import redis
from celery import Celery

from otel_bgtasks.celery import CeleryDispatcher

BROKER = os.environ.get("BGTASKS_TEST_BROKER", "redis://127.0.0.1:6379/0")
STORE = os.environ.get("BGTASKS_TEST_STORE", "redis://127.0.0.1:6379/1")
VISIBILITY = float(os.environ.get("BGTASKS_TEST_VISIBILITY", "10"))

app = Celery("bgtasks_tests", broker=BROKER)
app.conf.update(
    broker_transport_options={"visibility_timeout": VISIBILITY},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    task_default_queue="celery",
)

to_celery = CeleryDispatcher(
    app,
    queue="bgtasks",
    publish_timeout=1.0,
    publish_deadline=float(os.environ.get("BGTASKS_TEST_PUBLISH_DEADLINE", "30")),
    max_deliveries=3,
)


@app.task(name="plain_add")
def plain_add(x: int, y: int) -> int:
    """A plain Celery task of the same app: upstream's instrumentation keeps its spans."""
    results().rpush("plain", x + y)
    return x + y


def configure(broker: str, store: str) -> None:
    """Point this (already imported) module at other servers: the test process's side."""
    global BROKER, STORE
    BROKER, STORE = broker, store
    app.conf.broker_url = broker
    # the app's own connection and producer pools still point at the previous broker
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
    to_celery.close()


def results() -> redis.Redis:
    """The store's Redis, where the test tasks record what ran (db 2 of the store server)."""
    base = STORE.rsplit("/", 1)[0]
    return redis.Redis.from_url(f"{base}/2", decode_responses=True)
