"""A bounded outbox: tasks wait here, off the event loop, until their message is published.

`Outbox.put` is what the event loop calls: an append under a lock, never a socket. One daemon
thread takes items in order and calls ``publish(item)``; a failure (broker down, a timeout)
keeps the item at the head and retries with a capped backoff until the item's deadline, after
which ``expired(item, error)`` takes it (dead-lettered as undeliverable, or left to recovery).
Past `capacity` waiting items, new ones are not published at all: they go to ``expired`` at
once (``error`` None), handled on the same thread, so the loop never blocks and memory stays
bounded by what the thread has not yet handled.

The thread is started at the first `put` and re-created in a forked child (a thread does not
survive a fork).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog

from otel_bgtasks._tracebacks import exception_fields

__all__ = ["Outbox"]

T = TypeVar("T")

_log = structlog.get_logger("otel_bgtasks")


class Outbox(Generic[T]):
    """Publishes items in order on one thread, each retried until its deadline.

    Args:
        publish: sends one item; raises on failure (it is retried).
        expired: takes an item that will not be published: its deadline passed (``error``,
            the last failure) or the outbox was full (``error`` None). Must not raise.
        capacity: items waiting to be published at most (`max_backlog`).
        deadline: seconds an item may wait for a successful publish.
        reset: called after a failed publish (e.g. drop the connection).
        clock: monotonic seconds (injected by tests).
        backoff: first and last delay between failed attempts, doubling.
    """

    def __init__(
        self,
        publish: Callable[[T], None],
        expired: Callable[[T, BaseException | None], None],
        *,
        capacity: int,
        deadline: float,
        reset: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff: tuple[float, float] = (0.05, 1.0),
        name: str = "otel-bgtasks-outbox",
    ) -> None:
        self._publish = publish
        self._expired = expired
        self._reset = reset
        self.capacity = capacity
        self.deadline = deadline
        self._clock = clock
        self._backoff = backoff
        self._name = name
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[float, T]] = collections.deque()
        self._refused: collections.deque[T] = collections.deque()
        self._busy = False  # the thread is working on an item
        self._handing = 0  # a refused item taken from `_refused`, not handed over yet
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @property
    def backlog(self) -> int:
        """Items not published yet (waiting, or being published now)."""
        # the item being published stays at the head of `_items` until it succeeds; a
        # refused one being handed over has left `_refused` already
        return len(self._items) + len(self._refused) + self._handing

    def put(self, item: T) -> bool:
        """Queue `item`; False when the outbox was full (it goes to ``expired`` instead).
        Never blocks beyond a lock held for an append."""
        with self._cond:
            self._ensure_thread()
            accepted = len(self._items) < self.capacity
            if accepted:
                self._items.append((self._clock() + self.deadline, item))
            else:
                self._refused.append(item)
            self._cond.notify()
        return accepted

    def put_many(self, items: list[T]) -> None:
        """`put` each item, in order, under one lock."""
        with self._cond:
            self._ensure_thread()
            due = self._clock() + self.deadline
            for item in items:
                if len(self._items) < self.capacity:
                    self._items.append((due, item))
                else:
                    self._refused.append(item)
            self._cond.notify()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until nothing waits; True if the outbox is empty."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._items or self._refused or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self) -> list[T]:
        """Stop the thread after its current item; returns what was never published."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.deadline + 5)
        with self._cond:
            left = list(self._refused) + [item for _, item in self._items]
            self._refused.clear()
            self._items.clear()
        return left

    def _ensure_thread(self) -> None:
        # caller holds the lock
        pid = os.getpid()
        if pid != self._pid:  # forked: the parent's thread and items are not ours
            self._pid = pid
            self._items.clear()
            self._refused.clear()
            self._busy = False
            self._thread = None
        if self._thread is None or not self._thread.is_alive():
            self._closed = False
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        delay = self._backoff[0]
        error: BaseException | None = None
        while True:
            with self._cond:
                while not self._items and not self._refused and not self._closed:
                    self._cond.notify_all()  # `join` waiters: empty now
                    self._cond.wait()
                if self._closed:
                    self._cond.notify_all()
                    return
                if self._refused:
                    refused: T | None = self._refused.popleft()
                    self._handing = 1
                    head = None
                else:
                    refused = None
                    head = self._items[0]
                self._busy = True
            try:
                if refused is not None:
                    self._give_up(refused, None)
                    continue
                assert head is not None
                due, item = head
                if self._clock() > due:
                    self._pop(head)
                    self._give_up(item, error)
                    continue
                try:
                    self._publish(item)
                except Exception as exc:  # broker down, timeout: retried until the deadline
                    error = exc
                    if self._reset is not None:
                        try:
                            self._reset()
                        except Exception:  # a broken connection that cannot even close
                            _log.debug("outbox connection reset failed", **exception_fields())
                    with self._cond:
                        self._busy = False
                        if not self._closed:
                            self._cond.wait(min(delay, max(due - self._clock(), 0.0)))
                    delay = min(delay * 2, self._backoff[1])
                    continue
                self._pop(head)
                error = None
                delay = self._backoff[0]
            finally:
                with self._cond:
                    self._busy = False
                    self._handing = 0

    def _pop(self, head: tuple[float, T]) -> None:
        with self._cond:
            if self._items and self._items[0] is head:
                self._items.popleft()

    def _give_up(self, item: T, error: BaseException | None) -> None:
        try:
            self._expired(item, error)
        except Exception:  # the callback logs what it holds; the thread must go on
            _log.error("outbox could not hand over an unpublished task", **exception_fields())
