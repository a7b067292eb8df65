"""Background tasks sent to Celery by the tests; each records its run in the results Redis
(`celery_app.results`) when its body is done, so a test waits on those records (BLPOP)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

from tenacity import wait_none
from tests.integration.apps.celery_app import results, to_celery

from otel_bgtasks import RetryPolicy, background_task


def _record(key: str, *values: object) -> None:
    results().rpush(key, json.dumps([*values, os.getpid()]))


@background_task(name="record", dispatch=to_celery, durable=True, timeout=5.0)
def record(token: str, index: int, sleep: float = 0.0) -> None:
    """Durable: sleeps `sleep` s, then records ``[index, pid]`` in ``ran:<token>``."""
    if sleep:
        time.sleep(sleep)
    _record(f"ran:{token}", index)


@background_task(name="record-once", dispatch=to_celery)
def record_once(token: str, index: int, sleep: float = 0.0) -> None:
    """Not durable (at most once): as `record`."""
    if sleep:
        time.sleep(sleep)
    _record(f"ran:{token}", index)


@background_task(name="record-async", dispatch=to_celery)
async def record_async(token: str, index: int) -> None:
    """An async task: records the id of the event loop it ran on."""
    await asyncio.sleep(0)
    _record(f"ran:{token}", index, id(asyncio.get_running_loop()))


@background_task(
    name="flaky",
    dispatch=to_celery,
    retry=RetryPolicy(max_attempts=3, wait=wait_none()),
)
def flaky(token: str) -> None:
    """Fails twice (ConnectionError), then records its success."""
    attempts = results().incr(f"attempts:{token}")
    if attempts < 3:
        raise ConnectionError(f"downstream refused attempt {attempts}")
    _record(f"ran:{token}", attempts)


@background_task(name="poison", dispatch=to_celery, durable=True, timeout=5.0)
def poison(token: str) -> None:
    """Kills the worker process that runs it, every time."""
    results().incr(f"poison:{token}")
    os.kill(os.getpid(), signal.SIGKILL)


@background_task(name="fail-once", dispatch=to_celery)
def fail_once(token: str) -> None:
    """Fails for good (ValueError: permanent) the first time, succeeds when replayed."""
    if results().incr(f"fail-once:{token}") == 1:
        raise ValueError("not yet")
    _record(f"ran:{token}", 1)


@background_task(name="die-once", dispatch=to_celery, durable=True, timeout=5.0)
def die_once(token: str) -> None:
    """Durable: kills its worker process the first time, then runs."""
    if results().incr(f"die-once:{token}") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _record(f"ran:{token}", 1)


@background_task(name="die-once-not-durable", dispatch=to_celery)
def die_once_not_durable(token: str) -> None:
    """Not durable (at most once): kills its worker process the first time."""
    if results().incr(f"die-once:{token}") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _record(f"ran:{token}", 1)


@background_task(name="rendezvous", dispatch=to_celery)
def rendezvous(token: str, parties: int) -> None:
    """Waits until `parties` runs of it are running at once: with one task per prefork child,
    each runs on a child of its own."""
    client = results()
    if client.incr(f"rendezvous:{token}") >= parties:
        client.rpush(f"rendezvous-go:{token}", *["go"] * parties)
    client.blpop([f"rendezvous-go:{token}"], timeout=60)
    _record(f"ran:{token}", os.getpid())
