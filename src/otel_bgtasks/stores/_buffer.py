"""`BufferedStore`: writes from the task path never raise while the backing store is down."""

from __future__ import annotations

import builtins
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from otel_bgtasks.errors import StoreUnavailableError
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = ["BufferedStore"]

_log = structlog.get_logger("otel_bgtasks")

_OpKind = Literal["put", "journal_add", "journal_remove"]


@dataclass(slots=True, eq=False)
class _Op:
    kind: _OpKind
    key: str
    entry: DeadLetter | JournalEntry | None = None
    done: bool = False

    def apply(self, store: DeadLetterStore) -> bool:
        if self.kind == "put":
            assert isinstance(self.entry, DeadLetter)
            store.put(self.entry)
            return True
        if self.kind == "journal_add":
            assert isinstance(self.entry, JournalEntry)
            store.journal_add(self.entry)
            return True
        return store.journal_remove(self.key)

    def as_json(self) -> str:
        if self.entry is not None:
            return self.entry.to_json()
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

    Overflow: the queue holds at most `max_pending` writes; when full, the oldest is dropped
    and logged at ERROR with the whole entry as JSON (``entry=...``), so it can be restored by
    hand, and `dropped` is incremented. `close()` logs whatever could not be flushed the same
    way. A journal entry removed while its `journal_add` is still queued cancels both.

    Attributes:
        store: the wrapped store.
        write_errors: writes that could not be written when submitted (metric source).
        dropped: writes dropped from a full queue (or unflushed at close).
    """

    def __init__(
        self,
        store: DeadLetterStore,
        *,
        max_pending: int = 10_000,
        retry_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.store = store
        self.max_pending = max_pending
        self.retry_after = retry_after
        self.write_errors = 0
        self.dropped = 0
        self._clock = clock
        self._pending: deque[_Op] = deque()
        self._lock = threading.Lock()  # guards _pending, counters and _down_until
        self._flush_lock = threading.Lock()  # one flusher at a time
        self._down_until = float("-inf")
        self._last_error: BaseException | None = None

    @property
    def pending(self) -> int:
        """Writes waiting in memory."""
        with self._lock:
            return len(self._pending)

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
                    return True
        return self._write(_Op("journal_remove", task_id))

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
        dropped: _Op | None = None
        with self._lock:
            if len(self._pending) >= self.max_pending:
                dropped = self._pending.popleft()
                self.dropped += 1
            self._pending.append(op)
        if dropped is not None:
            _log.error(
                "dead-letter buffer full, oldest write dropped",
                op=dropped.kind,
                entry_id=dropped.key,
                entry=dropped.as_json(),
                max_pending=self.max_pending,
            )

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

    def forget_owner(self, owner: str) -> None:
        self.flush()
        self.store.forget_owner(owner)

    def close(self) -> None:
        """Flush what can be flushed, log the rest (whole entries, at ERROR), close the store."""
        try:
            self._drain(blocking=True)
        finally:
            with self._lock:
                lost = builtins.list(self._pending)
                self._pending.clear()
                self.dropped += len(lost)
            for op in lost:
                _log.error(
                    "dead-letter store unavailable at close, write dropped",
                    op=op.kind,
                    entry_id=op.key,
                    entry=op.as_json(),
                )
            self.store.close()

    def __repr__(self) -> str:
        return f"BufferedStore({self.store!r}, pending={self.pending})"
