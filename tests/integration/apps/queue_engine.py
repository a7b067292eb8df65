"""A task engine in a few lines, for the dispatch seam's end-to-end test: a `Dispatcher` that
publishes `TaskMessage`s to an in-process queue (the "broker") from its own publisher thread,
and a consumer thread running its own executor (the "worker"). No Celery: the seam alone.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio.to_thread

from otel_bgtasks._execution import Executor
from otel_bgtasks.errors import CorruptEntryError, TaskImportError, UntrustedEntryError
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry, decode_message
from otel_bgtasks.state import TaskCallState

__all__ = ["DEADLINE_AFTER", "Consumer", "QueueDispatcher"]

DEADLINE_AFTER = 60.0


class QueueDispatcher:
    """Publishes each task as a signed `TaskMessage` to `broker` (off the event loop, from its
    publisher thread), then hands it off with a deadline `DEADLINE_AFTER` seconds on `clock`.

    Test switches: `unpublishable` (task names whose publish fails: dead-lettered as
    undeliverable), `submit_error` (raised by `submit` itself).
    """

    remote = True

    def __init__(
        self, route: str, broker: queue.Queue[str | None], clock: Callable[[], float] = time.time
    ) -> None:
        self.name = "queue"
        self.route = route
        self.broker = broker
        self.clock = clock
        self.unpublishable: set[str] = set()
        self.submit_error: Exception | None = None
        self.published: list[str] = []  # task ids, in publish order
        self.outbox: queue.Queue[tuple[Executor, TaskCallState]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, executor: Executor, states: Sequence[TaskCallState]) -> None:
        if self.submit_error is not None:
            raise self.submit_error
        for state in states:
            self.outbox.put((executor, state))
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._publish, name=f"publisher-{self.route}", daemon=True
                )
                self._thread.start()

    def _publish(self) -> None:
        while True:
            executor, state = self.outbox.get()
            try:
                if state.name in self.unpublishable:
                    raise ConnectionRefusedError("broker unreachable")
                message = executor.message_for(state, self.route)
                self.broker.put(message.to_json())
                self.published.append(state.task_id)
                executor.hand_off(state, self.route, self.clock() + DEADLINE_AFTER)
            except Exception as exc:
                executor.dead_letter_unrun(state, DeadLetterReason.UNDELIVERABLE, exc)
            finally:
                self.outbox.task_done()

    async def drain(self, executor: Executor, timeout: float) -> None:
        await anyio.to_thread.run_sync(self.outbox.join)

    def resend(
        self, executor: Executor, call: DeadLetter | JournalEntry, *, task_id: str
    ) -> float | None:
        message = executor.message_from_call(
            call,
            task_id=task_id,
            route=self.route,
            durable=isinstance(call, JournalEntry),
        )
        self.broker.put(message.to_json())
        self.published.append(task_id)
        return self.clock() + DEADLINE_AFTER


class Consumer:
    """The worker: a thread taking messages from `broker` and running them through its own
    executor (one event loop for the thread). `processed` gets ``(task_id, what)`` per
    message: the task's outcome, ``refused``, ``corrupt`` or ``crashed``. `crash_next`
    messages are taken and dropped without running (a worker dying mid-delivery)."""

    def __init__(self, broker: queue.Queue[str | None], executor: Executor) -> None:
        self.broker = broker
        self.executor = executor
        self.processed: queue.Queue[tuple[str, str]] = queue.Queue()
        self.crash_next = 0
        self._thread = threading.Thread(target=self._loop, name="consumer", daemon=True)

    def start(self) -> Consumer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.broker.put(None)
            self._thread.join()

    def next(self) -> tuple[str, str]:
        """The next processed message (a guard against a hang, never a decision)."""
        return self.processed.get(timeout=30)

    def _loop(self) -> None:
        with asyncio.Runner() as runner:
            while True:
                raw = self.broker.get()
                if raw is None:
                    return
                self._one(runner, raw)

    def _one(self, runner: asyncio.Runner, raw: str) -> None:
        try:
            message = decode_message(raw)
        except CorruptEntryError:
            self.processed.put(("", "corrupt"))
            return
        if self.crash_next:
            self.crash_next -= 1
            self.processed.put((message.task_id, "crashed"))
            return
        attributes: dict[str, Any] = {
            "messaging.system": "queue",
            "messaging.destination.name": message.route,
            "messaging.operation.type": "process",
            "messaging.message.id": message.task_id,
        }
        try:
            state = self.executor.receive(message, attributes=attributes)
        except (UntrustedEntryError, TaskImportError, CorruptEntryError) as exc:
            self.executor.dead_letter_message(message, DeadLetterReason.REFUSED, exc)
            self.processed.put((message.task_id, "refused"))
            return
        runner.run(self.executor.run(state))
        outcome = state.outcome.value if state.outcome is not None else "failure"
        self.processed.put((message.task_id, outcome))
