"""The store interface: dead letters, the durable-task journal and owner heartbeats.

Implementations live next to this module (`sqlite`, `redis`, the `_buffer` wrapper); another
backend subclasses `DeadLetterStore` and decodes its rows with `decode_entry` /
`decode_journal` (which raise `CorruptEntryError` naming the row).
"""

from __future__ import annotations

import builtins
import time
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self, TypedDict

from otel_bgtasks.identity import owner_is_alive, owner_is_dead, process_identity
from otel_bgtasks.records import ROUTE_OWNER_PREFIX, DeadLetter, DeadLetterReason, JournalEntry

__all__ = ["DeadLetterStore", "StoreStatus"]


class StoreStatus(TypedDict):
    """A buffering store's state for the health endpoint (no store call)."""

    pending: int
    pending_bytes: int
    dropped: int
    write_errors: int
    store_down: bool
    last_error: str | None


class DeadLetterStore(ABC):
    """Persistent dead letters plus the durable-task journal and owner heartbeats.

    Methods are synchronous and thread-safe: the executor calls them from worker threads.
    `list` skips rows that cannot be decoded (logging an error naming each) and `corrupt_ids`
    returns them, so one bad row never hides the others.

    Attributes:
        write_errors: writes that failed and were kept in memory (`bgtasks.dlq.write_errors`;
            a store without a buffer raises instead and leaves it at 0).
        dropped: buffered writes given up on and logged whole (`bgtasks.dlq.dropped`).
    """

    write_errors: int = 0
    dropped: int = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # dead letters
    @abstractmethod
    def put(self, entry: DeadLetter) -> None:
        """Store `entry` (replacing one with the same id)."""

    @abstractmethod
    def get(self, entry_id: str) -> DeadLetter | None:
        """The entry with this id, or None.

        Raises:
            CorruptEntryError: the row exists but cannot be decoded.
        """

    @abstractmethod
    def list(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Entries, oldest `last_failure` first, filtered by task name, reason and
        `last_failure >= since`; corrupt rows are skipped (see `corrupt_ids`)."""

    @abstractmethod
    def update(self, entry: DeadLetter) -> None:
        """Replace the stored entry with the same id (stores it if it was deleted)."""

    @abstractmethod
    def delete(self, entry_id: str) -> bool:
        """Remove an entry (corrupt rows too); True if it existed."""

    @abstractmethod
    def purge(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
    ) -> int:
        """Remove matching entries; without filters every row, corrupt ones included.
        Returns the number removed."""

    @abstractmethod
    def count(self) -> int:
        """Number of stored rows (the `bgtasks.dlq.depth` gauge)."""

    @abstractmethod
    def corrupt_ids(self) -> builtins.list[str]:
        """Ids of rows that cannot be decoded (scans the whole store)."""

    # claims: one replayer/recoverer at a time per row
    @abstractmethod
    def claim(
        self, entry_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> DeadLetter | None:
        """Atomically take a lease on the entry for `lease` seconds and return it.

        Succeeds when the entry is unclaimed, its lease expired, or `owner` already holds it
        (which renews the lease). Returns None when the entry does not exist or another owner
        holds a live lease.

        Raises:
            CorruptEntryError: the row exists but cannot be decoded (the claim is released).
        """

    @abstractmethod
    def release(self, entry_id: str, owner: str, *, entry: DeadLetter | None = None) -> bool:
        """Give up `owner`'s claim; with `entry`, store it in place of the row first.

        Applies only while the row still exists and `owner` holds the claim: an entry deleted
        (or taken over after the lease expired) meanwhile never comes back. True if applied.
        """

    @abstractmethod
    def delete_claimed(self, entry_id: str, owner: str) -> bool:
        """Delete the entry only if `owner` holds its claim; True if it was deleted."""

    @abstractmethod
    def journal_claim(
        self, task_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> JournalEntry | None:
        """`claim` for a journal row (recovery): None when missing or held by another."""

    @abstractmethod
    def journal_release(self, task_id: str, owner: str) -> bool:
        """Give up `owner`'s claim on a journal row (it stays journaled)."""

    @abstractmethod
    def journal_remove_claimed(self, task_id: str, owner: str) -> bool:
        """Remove a journal row only if `owner` holds its claim; True if removed."""

    # journal
    @abstractmethod
    def journal_add(self, entry: JournalEntry) -> None:
        """Record a durable task as scheduled/running (replacing one with the same id)."""

    @abstractmethod
    def journal_remove(self, task_id: str) -> bool:
        """Forget a durable task (it finished); True if it was recorded."""

    @abstractmethod
    def journal_list(self, *, owner: str | None = None) -> builtins.list[JournalEntry]:
        """Journaled tasks, oldest first, optionally of one owner; corrupt rows skipped."""

    @abstractmethod
    def journal_hand_off(
        self, task_id: str, *, owner: str, deadline: float, signature: str | None = None
    ) -> bool:
        """Move a journal row to `owner` (``route:<route>``, `records.route_owner`) until
        `deadline` (epoch seconds on this store's clock, `now`): the task was published to
        another process, which removes the row when the task ends; recovery re-sends it
        through that route's dispatcher once the deadline has passed, never runs it here.

        The row's stored ``owner`` and ``deadline`` change (its call does not); `signature`
        replaces the stored one (a row signed for its new owner), None keeps it. Any claim
        on the row is released. Returns False when the row does not exist (the task already
        ended).

        Raises:
            CorruptEntryError: the row exists but cannot be decoded (it is left as it is).
        """

    def now(self) -> float:
        """This store's clock, epoch seconds: hand-off deadlines are judged on it. The local
        clock here; a store shared by several hosts answers with the server's."""
        return time.time()

    def expired_hand_offs(self, *, now: float | None = None) -> builtins.list[JournalEntry]:
        """Journal rows handed to a route whose deadline has passed (`now`, default the
        store's clock), oldest first: recovery re-sends them through their dispatcher."""
        moment = self.now() if now is None else now
        return [
            entry
            for entry in self.journal_list()
            if entry.route is not None and entry.deadline is not None and entry.deadline <= moment
        ]

    # owners
    @abstractmethod
    def heartbeat(self, owner: str, *, at: float | None = None) -> None:
        """Record that `owner` is alive at `at` (default: now)."""

    @abstractmethod
    def last_seen(self) -> dict[str, float]:
        """Each known owner's last sign of life: the newest of its heartbeat and its journal
        rows' `enqueued_at` (a freshly journaled task is a sign of life)."""

    @abstractmethod
    def forget_owner(self, owner: str, *, seen_before: float | None = None) -> None:
        """Drop `owner`'s heartbeat (after its journal entries were recovered); with
        `seen_before`, only if its last heartbeat is older than that (it did not come back)."""

    def dead_owners(self, stale_after: float, *, now: float | None = None) -> builtins.list[str]:
        """Owners whose last sign of life (heartbeat or newest journal row) is older than
        `stale_after` seconds, or on this host whose process is gone (`owner_is_dead`). This
        process, and a process on this machine known to be running (`owner_is_alive`), are
        never listed, however old their heartbeat. Rows handed to a route (``route:...``)
        have no process: they are judged by their deadline (`expired_hand_offs`)."""
        moment = time.time() if now is None else now
        me = process_identity()
        dead = [
            owner
            for owner, seen in self.last_seen().items()
            if owner != me
            and not owner.startswith(ROUTE_OWNER_PREFIX)
            and (moment - seen > stale_after or owner_is_dead(owner))
            and not owner_is_alive(owner)
        ]
        return sorted(dead)

    @property
    def identity(self) -> str:
        """Which store this is, the same in every process that opens it and without secrets
        (the `bgtasks.dlq.store` attribute of `bgtasks.dlq.depth`): its class name unless a
        backend says better (SQLite: its absolute path; Redis: host, port, db and prefix)."""
        return type(self).__name__

    def status(self) -> StoreStatus | None:
        """The write buffer's state, or None for a store that writes through."""
        return None

    def flush_or_log(self, timeout: float = 5.0) -> int:
        """Write what is buffered within `timeout` seconds, logging the rest whole; returns
        how many writes were logged (0 for a store that writes through)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional for stores without resources
        """Release connections; pending buffered writes are flushed or logged."""
