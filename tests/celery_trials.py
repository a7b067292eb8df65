"""The durability trials: durable tasks through Celery while a worker child, the whole worker
or the broker is SIGKILLed. Used by the test suite (one small trial per scenario) and by
``benchmarks/celery_durability.py`` (5 trials of 500 per scenario, numbers for the README).

A trial schedules `tasks` durable ``record`` tasks (20 ms each) from this process (the web
side: instrumented, publishing through the test app's `CeleryDispatcher`, re-sending expired
hand-offs with `start_recovery(every=...)`, `running_recovery`), waits until a fifth of them
ran, does its damage, then waits until every task is accounted for: ran (its record in
Redis) or dead-lettered. "Lost" are the tasks neither ran nor dead-lettered when the journal
is empty again (nothing left to re-send) and no record arrived for a while; a trial that
cannot account for everything within its bound reports the missing ones as lost instead of
hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import redis

from otel_bgtasks import schedule
from otel_bgtasks.recovery import start_recovery
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = ["SCENARIOS", "Scenario", "TrialResult", "run_trial", "running_recovery"]

Scenario = Literal["child", "worker", "broker"]
SCENARIOS: tuple[Scenario, ...] = ("child", "worker", "broker")


@contextmanager
def running_recovery(every: float) -> Iterator[None]:
    """`start_recovery(every=...)` on an event loop of its own (a thread), as a web app's
    lifespan runs it: hand-offs past their deadline are re-sent through the dispatcher."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        holder["task"] = start_recovery(mode="rerun", every=every)
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # stopped at the end
            await holder["task"].wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    started.wait(30)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(holder["task"].stop(), loop).result(60)
        thread.join(60)
        loop.close()


@dataclass(frozen=True, slots=True)
class TrialResult:
    scenario: str
    tasks: int
    ran: int
    ran_twice: int
    dead_lettered: int
    lost: int
    seconds: float  # from the damage until every task was accounted for

    def row(self) -> str:
        return (
            f"{self.scenario:<7} tasks={self.tasks} ran={self.ran} ran_twice={self.ran_twice}"
            f" dead_lettered={self.dead_lettered} lost={self.lost}"
            f" recovered_in={self.seconds:.1f}s"
        )


def run_trial(
    scenario: Scenario,
    *,
    tasks: int,
    results: redis.Redis,
    store: DeadLetterStore,
    damage: dict[Scenario, Callable[[], None]],
    record: Any,
    sleep: float = 0.02,
    bound: float = 300.0,
) -> TrialResult:
    """One trial; `damage[scenario]()` does the killing (and the restart)."""
    token = uuid.uuid4().hex[:10]
    key = f"ran:{token}"
    ids: dict[str, int] = {}
    for index in range(tasks):
        ids[schedule(record, token, index, sleep).state.task_id] = index
    counts: Counter[int] = Counter()

    def take(timeout: float) -> bool:
        got = results.blpop([key], timeout=timeout)
        if got is None:
            return False
        counts[json.loads(got[1])[0]] += 1
        for raw in results.lpop(key, 1000) or []:  # whatever else arrived meanwhile
            counts[json.loads(raw)[0]] += 1
        return True

    while len(counts) < max(1, tasks // 5):
        if not take(60):
            break
    damage[scenario]()
    damaged = time.monotonic()
    end = damaged + bound
    dead: set[int] = set()
    while time.monotonic() < end:
        if len(counts) + len(dead - set(counts)) >= tasks:
            break
        if not take(1.0):  # quiet for a second: look at the dead letters
            dead = {ids[e.id] for e in store.list() if e.id in ids}
    accounted = time.monotonic() - damaged
    # every task accounted for: let the re-sends and restored copies settle (journal empty)
    while time.monotonic() < end and any(r.task_id in ids for r in store.journal_list()):
        take(0.5)
    while take(0.5):
        pass
    dead = {ids[e.id] for e in store.list() if e.id in ids}
    ran = set(counts)
    return TrialResult(
        scenario=scenario,
        tasks=tasks,
        ran=len(ran),
        ran_twice=sum(1 for c in counts.values() if c > 1),
        dead_lettered=len(dead - ran),
        lost=tasks - len(ran | dead),
        seconds=accounted,
    )
