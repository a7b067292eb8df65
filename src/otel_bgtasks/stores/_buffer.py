"""`BufferedStore`: writes from the task path never raise while the backing store is down."""

from __future__ import annotations

import atexit
import builtins
import json
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from otel_bgtasks.errors import ConfigurationError, StoreUnavailableError
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry
from otel_bgtasks.stores.base import DeadLetterStore, StoreStatus

__all__ = ["BufferedStore"]

_log = structlog.get_logger("otel_bgtasks")

_OpKind = Literal["put", "journal_add", "journal_remove", "journal_hand_off"]

SHUTDOWN_FLUSH_TIMEOUT = 5.0
"""Seconds a shutdown waits for buffered writes to reach the store before logging them."""

_live: weakref.WeakSet[BufferedStore] = weakref.WeakSet()


def _flush_all_at_exit() -> None:
    for buffer in builtins.list(_live):
        buffer.flush_or_log(SHUTDOWN_FLUSH_TIMEOUT)


atexit.register(_flush_all_at_exit)


@dataclass(slots=True, eq=False)
class _Op:
    kind: _OpKind
    key: str
    entry: DeadLetter | JournalEntry | None = None
    done: bool = False
    size: int = 0
    hand_off: tuple[str, float, str | None] | None = None  # owner, deadline, signature

    def apply(self, store: DeadLetterStore) -> bool:
        if self.kind == "put":
            assert isinstance(self.entry, DeadLetter)
            store.put(self.entry)
            return True
        if self.kind == "journal_add":
            assert isinstance(self.entry, JournalEntry)
            store.journal_add(self.entry)
            return True
        if self.kind == "journal_hand_off":
            assert self.hand_off is not None
            owner, deadline, signature = self.hand_off
            return store.journal_hand_off(
                self.key, owner=owner, deadline=deadline, signature=signature
            )
        return store.journal_remove(self.key)

    def as_json(self) -> str:
        if self.entry is not None:
            return self.entry.to_json()
        if self.hand_off is not None:
            owner, deadline, _ = self.hand_off
            return json.dumps(
                {"journal_hand_off": self.key, "owner": owner, "deadline": deadline},
                separators=(",", ":"),
            )
        return f'{{"journal_remove":"{self.key}"}}'


class BufferedStore(DeadLetterStore):
    """Wraps a store so that `put`, `journal_add` and `journal_remove` never raise.

    When a write fails (the store is down, the disk is full...), it is appended to an
    in-memory queue, an error naming the entry is logged and `write_errors` is incremented.
    For `retry_after` seconds after a failure, writes go straight to the queue without
    touching the store (a task never waits on a dead store more than once per interval);
    after that, the next write flushes the queue in order. Reads, `update`, `delete` and
    `purge` first flush the queue whatever the interval, and raise `StoreUnavailableError`
    if that fails: they are the operator's path, not the task's.

    A background thread drains the queue once the store is back (every `retry_after`
    seconds while writes are queued), so buffered writes do not wait for the next write.

    Overflow: the queue holds at most `max_pending` writes and `max_bytes` of entry JSON; when
    full, the oldest is dropped and logged at ERROR with the whole entry as JSON
    (``entry=...``), so it can be restored by hand, and `dropped` is incremented (the
    `bgtasks.dlq.dropped` metric). At shutdown (`flush_or_log`: the telemetry lifespan,
    uninstrument, `close()` and interpreter exit) the queue is flushed within a bounded time
    and whatever could not be written is logged the same way. A journal entry removed while its
    `journal_add` is still queued cancels both.

    Attributes:
        store: the wrapped store.
        write_errors: writes that could not be written when submitted (metric source).
        dropped: writes dropped from a full queue or unflushed at shutdown (metric source).
    """

    def __init__(
        self,
        store: DeadLetterStore,
        *,
        max_pending: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        retry_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_pending < 1:
            raise ConfigurationError(f"max_pending must be >= 1, got {max_pending}")
        if max_bytes < 1:
            raise ConfigurationError(f"max_bytes must be >= 1, got {max_bytes}")
        self.store = store
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.retry_after = retry_after
        self.write_errors = 0
        self.dropped = 0
        self._clock = clock
        self._pending: deque[_Op] = deque()
        self._bytes = 0
        self._lock = threading.Lock()  # guards _pending, counters, _down_until, _drainer
        self._flush_lock = threading.Lock()  # one flusher at a time
        self._down_until = float("-inf")
        self._last_error: BaseException | None = None
        self._drainer: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopped = False
        _live.add(self)

    @property
    def pending(self) -> int:
        """Writes waiting in memory."""
        with self._lock:
            return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Size of the queued entries' JSON."""
        with self._lock:
            return self._bytes

    def status(self) -> StoreStatus:
        """The buffer's state for the health endpoint (no store call)."""
        with self._lock:
            return {
                "pending": len(self._pending),
                "pending_bytes": self._bytes,
                "dropped": self.dropped,
                "write_errors": self.write_errors,
                "store_down": self._clock() < self._down_until,
                "last_error": repr(self._last_error) if self._last_error else None,
            }

    # -- buffered writes (task path) ----------------------------------------------------------

    def put(self, entry: DeadLetter) -> None:
        self._write(_Op("put", entry.id, entry))

    def journal_add(self, entry: JournalEntry) -> None:
        self._write(_Op("journal_add", entry.task_id, entry))

    def journal_remove(self, task_id: str) -> bool:
        with self._lock:
            # The head may be being written by a flush right now: never cancel that one.
            skip_head = self._flush_lock.locked()
            for index, op in enumerate(self._pending):
                if index == 0 and skip_head:
                    continue
                if op.kind == "journal_add" and op.key == task_id:
                    del self._pending[index]
                    self._bytes -= op.size
                    return True
        return self._write(_Op("journal_remove", task_id))

    def journal_hand_off(
        self, task_id: str, *, owner: str, deadline: float, signature: str | None = None
    ) -> bool:
        """Buffered like `journal_add`: a hand-off never raises into a dispatcher; while the
        store is down it waits in order behind the row's add (True: accepted)."""
        return self._write(
            _Op("journal_hand_off", task_id, hand_off=(owner, float(deadline), signature))
        )

    def now(self) -> float:
        return self.store.now()

    def heartbeat(self, owner: str, *, at: float | None = None) -> None:
        """Best effort: skipped while the store is down (the next beat will do)."""
        if self._is_down():
            return
        try:
            self.store.heartbeat(owner, at=at)
        except Exception as exc:
            self._mark_down(exc)
            _log.warning("dead-letter store unavailable, heartbeat skipped", error=repr(exc))

    def _is_down(self) -> bool:
        with self._lock:
            return self._clock() < self._down_until

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            self._down_until = self._clock() + self.retry_after
            self._last_error = exc

    def _write(self, op: _Op) -> bool:
        with self._lock:
            direct = not self._pending and self._clock() >= self._down_until
        error: BaseException | None = None
        result = True
        if direct:
            try:
                result = op.apply(self.store)
                op.done = True
            except Exception as exc:  # the task path must not see store failures
                error = exc
                self._mark_down(exc)
        if not op.done:
            self._enqueue(op)
            if error is None and not self._is_down() and self._drain(blocking=False) == "busy":
                return result  # another thread is flushing the queue, this op included
        if not op.done:
            with self._lock:
                self.write_errors += 1
                pending = len(self._pending)
                cause = error or self._last_error
            _log.error(
                "dead-letter store unavailable, write kept in memory",
                op=op.kind,
                entry_id=op.key,
                pending=pending,
                error=repr(cause) if cause is not None else None,
            )
        return result

    def _enqueue(self, op: _Op) -> None:
        op.size = len(op.as_json())
        dropped: builtins.list[_Op] = []
        with self._lock:
            while self._pending and (
                len(self._pending) >= self.max_pending or self._bytes + op.size > self.max_bytes
            ):
                old = self._pending.popleft()
                self._bytes -= old.size
                dropped.append(old)
            self.dropped += len(dropped)
            self._pending.append(op)
            self._bytes += op.size
            if self._drainer is None and not self._stopped:
                self._drainer = threading.Thread(
                    target=self._drain_in_background, name="otel-bgtasks-buffer", daemon=True
                )
                self._drainer.start()
        for old in dropped:
            _log.error(
                "dead-letter buffer full, oldest write dropped",
                op=old.kind,
                entry_id=old.key,
                entry=old.as_json(),
                max_pending=self.max_pending,
                max_bytes=self.max_bytes,
            )

    def _drain_in_background(self) -> None:
        """Retry the store every `retry_after` seconds until the queue is empty."""
        while True:
            self._wake.wait(max(self.retry_after, 0.05))
            self._wake.clear()
            with self._lock:
                if not self._pending or self._stopped:
                    self._drainer = None
                    return
                down = self._clock() < self._down_until
            if not down:
                self._drain(blocking=True)

    def _drain(self, *, blocking: bool) -> Literal["empty", "failed", "busy"]:
        """Write queued ops in order until the queue is empty or the store fails."""
        if not self._flush_lock.acquire(blocking=blocking):
            return "busy"
        flushed = 0
        try:
            while True:
                with self._lock:
                    if not self._pending:
                        self._down_until = float("-inf")
                        return "empty"
                    op = self._pending[0]
                try:
                    op.apply(self.store)
                except Exception as exc:
                    self._mark_down(exc)
                    return "failed"
                with self._lock:
                    if self._pending and self._pending[0] is op:
                        self._pending.popleft()
                        self._bytes -= op.size
                    op.done = True
                flushed += 1
        finally:
            self._flush_lock.release()
            if flushed:
                _log.info("dead-letter store back, buffered writes flushed", flushed=flushed)

    def flush(self) -> None:
        """Write every queued op now.

        Raises:
            StoreUnavailableError: the store is still down (the ops stay queued).
        """
        with self._lock:
            if not self._pending:
                return
        if self._drain(blocking=True) != "empty":
            with self._lock:
                pending, cause = len(self._pending), self._last_error
            raise StoreUnavailableError(
                f"dead-letter store unavailable ({cause!r}); {pending} writes kept in memory"
            ) from cause

    # -- operator path: flush first, then delegate --------------------------------------------

    def get(self, entry_id: str) -> DeadLetter | None:
        self.flush()
        return self.store.get(entry_id)

    def list(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> builtins.list[DeadLetter]:
        self.flush()
        return self.store.list(task=task, reason=reason, since=since, limit=limit)

    def update(self, entry: DeadLetter) -> None:
        self.flush()
        self.store.update(entry)

    def delete(self, entry_id: str) -> bool:
        self.flush()
        return self.store.delete(entry_id)

    def purge(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
    ) -> int:
        self.flush()
        return self.store.purge(task=task, reason=reason, since=since)

    def count(self) -> int:
        if self._is_down():  # the depth gauge and health must not wait on a dead store
            raise StoreUnavailableError(
                f"dead-letter store unavailable ({self._last_error!r})"
            ) from self._last_error
        self.flush()
        return self.store.count()

    def corrupt_ids(self) -> builtins.list[str]:
        self.flush()
        return self.store.corrupt_ids()

    def journal_list(self, *, owner: str | None = None) -> builtins.list[JournalEntry]:
        self.flush()
        return self.store.journal_list(owner=owner)

    def last_seen(self) -> dict[str, float]:
        self.flush()
        return self.store.last_seen()

    def forget_owner(self, owner: str, *, seen_before: float | None = None) -> None:
        self.flush()
        self.store.forget_owner(owner, seen_before=seen_before)

    def claim(
        self, entry_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> DeadLetter | None:
        self.flush()
        return self.store.claim(entry_id, owner, lease=lease, now=now)

    def release(self, entry_id: str, owner: str, *, entry: DeadLetter | None = None) -> bool:
        self.flush()
        return self.store.release(entry_id, owner, entry=entry)

    def delete_claimed(self, entry_id: str, owner: str) -> bool:
        self.flush()
        return self.store.delete_claimed(entry_id, owner)

    def journal_claim(
        self, task_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> JournalEntry | None:
        self.flush()
        return self.store.journal_claim(task_id, owner, lease=lease, now=now)

    def journal_release(self, task_id: str, owner: str) -> bool:
        self.flush()
        return self.store.journal_release(task_id, owner)

    def journal_remove_claimed(self, task_id: str, owner: str) -> bool:
        self.flush()
        return self.store.journal_remove_claimed(task_id, owner)

    # -- shutdown -----------------------------------------------------------------------------

    def flush_or_log(self, timeout: float = SHUTDOWN_FLUSH_TIMEOUT) -> int:
        """Write the queue to the store within `timeout` seconds; log every write still
        queued after that at ERROR, whole (``entry=`` the replayable JSON), and count it in
        `dropped`. Returns how many were logged. Every shutdown path calls it.

        A write being sent when the time runs out is logged too: it may be stored as well
        (a duplicate, never a loss).
        """
        with self._lock:
            empty = not self._pending
        if not empty:
            done = threading.Event()

            def run() -> None:
                try:
                    self._drain(blocking=True)
                finally:
                    done.set()

            threading.Thread(target=run, name="otel-bgtasks-buffer-flush", daemon=True).start()
            done.wait(max(timeout, 0.0))
        with self._lock:
            lost = builtins.list(self._pending)
            self._pending.clear()
            self._bytes = 0
            self.dropped += len(lost)
        for op in lost:
            _log.error(
                "dead-letter store unavailable at close, write dropped",
                op=op.kind,
                entry_id=op.key,
                entry=op.as_json(),
            )
        return len(lost)

    def close(self) -> None:
        """Flush what can be flushed (bounded), log the rest (whole entries), close the store."""
        try:
            self.flush_or_log()
        finally:
            with self._lock:
                self._stopped = True
            self._wake.set()
            _live.discard(self)
            self.store.close()

    def __repr__(self) -> str:
        return f"BufferedStore({self.store!r}, pending={self.pending})"

    @property
    def identity(self) -> str:
        """The wrapped store's."""
        return self.store.identity
