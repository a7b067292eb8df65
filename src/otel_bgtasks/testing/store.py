"""`InMemoryDeadLetterStore`: the `DeadLetterStore` contract in a dict, for tests.

Rows are kept encoded, as a real backend keeps them, so a test sees exactly what SQLite or
Redis would give back (and a corrupt row behaves as it does there).
"""

from __future__ import annotations

import builtins
import threading
import time

import structlog

from otel_bgtasks import (
    CorruptEntryError,
    DeadLetter,
    DeadLetterReason,
    DeadLetterStore,
    JournalEntry,
)
from otel_bgtasks.records import decode_entry, decode_journal

__all__ = ["InMemoryDeadLetterStore"]

_log = structlog.get_logger("otel_bgtasks")


class _Row:
    __slots__ = ("last_failure", "raw", "reason", "task_name")

    def __init__(self, task_name: str, reason: str, last_failure: float, raw: str) -> None:
        self.task_name = task_name
        self.reason = reason
        self.last_failure = last_failure
        self.raw = raw


class InMemoryDeadLetterStore(DeadLetterStore):
    """Dead letters, the durable-task journal and heartbeats in this process's memory.

    Thread-safe; nothing survives the process. For tests, and for apps that want dead letters
    only to inspect them in-process (`bgtasks` fixture of `otel_bgtasks.testing`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, _Row] = {}
        self._journal: dict[str, tuple[str, float, str]] = {}  # task id -> owner, at, raw
        self._heartbeats: dict[str, float] = {}
        # claims: row id -> (owner, lease expiry), for dead letters and journal rows apart
        self._claims: dict[str, tuple[str, float]] = {}
        self._journal_claims: dict[str, tuple[str, float]] = {}

    def __repr__(self) -> str:
        return f"InMemoryDeadLetterStore({len(self._rows)} dead letters)"

    @property
    def identity(self) -> str:
        """``memory:`` and this object's id (one store per object)."""
        return f"memory:{id(self):x}"

    # -- dead letters -------------------------------------------------------------------------

    def put(self, entry: DeadLetter) -> None:
        row = _Row(entry.task_name, entry.reason.value, entry.last_failure, entry.to_json())
        with self._lock:
            self._rows[entry.id] = row
            self._claims.pop(entry.id, None)

    update = put

    def put_raw(self, entry_id: str, raw: str, *, task_name: str, reason: str, at: float) -> None:
        """Store `raw` as the row `entry_id`, bypassing the encoder (to test corrupt rows)."""
        with self._lock:
            self._rows[entry_id] = _Row(task_name, reason, at, raw)

    def get(self, entry_id: str) -> DeadLetter | None:
        with self._lock:
            row = self._rows.get(entry_id)
        return None if row is None else decode_entry(entry_id, row.raw)

    def _matching(
        self, task: str | None, reason: DeadLetterReason | str | None, since: float | None
    ) -> builtins.list[tuple[str, _Row]]:
        wanted = DeadLetterReason(reason).value if reason is not None else None
        with self._lock:
            rows = list(self._rows.items())
        return sorted(
            (
                (entry_id, row)
                for entry_id, row in rows
                if (task is None or row.task_name == task)
                and (wanted is None or row.reason == wanted)
                and (since is None or row.last_failure >= since)
            ),
            key=lambda item: (item[1].last_failure, item[0]),
        )

    def list(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> builtins.list[DeadLetter]:
        out: builtins.list[DeadLetter] = []
        if limit is not None and limit <= 0:
            return out
        for entry_id, row in self._matching(task, reason, since):
            try:
                out.append(decode_entry(entry_id, row.raw))
            except CorruptEntryError as exc:
                _log.error("corrupt dead-letter entry skipped", entry_id=entry_id, error=str(exc))
                continue
            if limit is not None and len(out) >= limit:
                break
        return out

    def delete(self, entry_id: str) -> bool:
        with self._lock:
            self._claims.pop(entry_id, None)
            return self._rows.pop(entry_id, None) is not None

    def purge(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
    ) -> int:
        doomed = [entry_id for entry_id, _ in self._matching(task, reason, since)]
        with self._lock:
            return sum(self._rows.pop(entry_id, None) is not None for entry_id in doomed)

    def count(self) -> int:
        with self._lock:
            return len(self._rows)

    def corrupt_ids(self) -> builtins.list[str]:
        with self._lock:
            rows = sorted(self._rows.items())
        bad: builtins.list[str] = []
        for entry_id, row in rows:
            try:
                decode_entry(entry_id, row.raw)
            except CorruptEntryError:
                bad.append(entry_id)
        return bad

    # -- claims -------------------------------------------------------------------------------

    @staticmethod
    def _take(
        claims: dict[str, tuple[str, float]], key: str, owner: str, lease: float, now: float | None
    ) -> bool:
        moment = time.time() if now is None else now
        held = claims.get(key)
        if held is not None and held[0] != owner and held[1] > moment:
            return False
        claims[key] = (owner, moment + lease)
        return True

    @staticmethod
    def _holds(claims: dict[str, tuple[str, float]], key: str, owner: str) -> bool:
        held = claims.get(key)
        return held is not None and held[0] == owner

    def claim(
        self, entry_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> DeadLetter | None:
        with self._lock:
            row = self._rows.get(entry_id)
            if row is None or not self._take(self._claims, entry_id, owner, lease, now):
                return None
        try:
            return decode_entry(entry_id, row.raw)
        except CorruptEntryError:
            self.release(entry_id, owner)
            raise

    def release(self, entry_id: str, owner: str, *, entry: DeadLetter | None = None) -> bool:
        with self._lock:
            if entry_id not in self._rows or not self._holds(self._claims, entry_id, owner):
                return False
            if entry is not None:
                self._rows[entry_id] = _Row(
                    entry.task_name, entry.reason.value, entry.last_failure, entry.to_json()
                )
            del self._claims[entry_id]
            return True

    def delete_claimed(self, entry_id: str, owner: str) -> bool:
        with self._lock:
            if entry_id not in self._rows or not self._holds(self._claims, entry_id, owner):
                return False
            del self._rows[entry_id], self._claims[entry_id]
            return True

    def journal_claim(
        self, task_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> JournalEntry | None:
        with self._lock:
            row = self._journal.get(task_id)
            if row is None or not self._take(self._journal_claims, task_id, owner, lease, now):
                return None
        try:
            return decode_journal(task_id, row[2])
        except CorruptEntryError:
            self.journal_release(task_id, owner)
            raise

    def journal_release(self, task_id: str, owner: str) -> bool:
        with self._lock:
            if task_id not in self._journal or not self._holds(
                self._journal_claims, task_id, owner
            ):
                return False
            del self._journal_claims[task_id]
            return True

    def journal_remove_claimed(self, task_id: str, owner: str) -> bool:
        with self._lock:
            if task_id not in self._journal or not self._holds(
                self._journal_claims, task_id, owner
            ):
                return False
            del self._journal[task_id], self._journal_claims[task_id]
            return True

    # -- journal and owners -------------------------------------------------------------------

    def journal_add(self, entry: JournalEntry) -> None:
        with self._lock:
            self._journal[entry.task_id] = (entry.owner, entry.enqueued_at, entry.to_json())
            self._journal_claims.pop(entry.task_id, None)

    def journal_remove(self, task_id: str) -> bool:
        with self._lock:
            self._journal_claims.pop(task_id, None)
            return self._journal.pop(task_id, None) is not None

    def journal_list(self, *, owner: str | None = None) -> builtins.list[JournalEntry]:
        with self._lock:
            rows = sorted(self._journal.items(), key=lambda item: (item[1][1], item[0]))
        out: builtins.list[JournalEntry] = []
        for task_id, (row_owner, _, raw) in rows:
            if owner is not None and row_owner != owner:
                continue
            try:
                out.append(decode_journal(task_id, raw))
            except CorruptEntryError as exc:
                _log.error("corrupt journal entry skipped", task_id=task_id, error=str(exc))
        return out

    def journal_hand_off(
        self, task_id: str, *, owner: str, deadline: float, signature: str | None = None
    ) -> bool:
        with self._lock:
            row = self._journal.get(task_id)
            if row is None:
                return False
            moved = decode_journal(task_id, row[2]).handed(owner, deadline, signature)
            self._journal[task_id] = (owner, row[1], moved.to_json())
            self._journal_claims.pop(task_id, None)
            return True

    def heartbeat(self, owner: str, *, at: float | None = None) -> None:
        with self._lock:
            self._heartbeats[owner] = time.time() if at is None else at

    def last_seen(self) -> dict[str, float]:
        with self._lock:
            seen = dict(self._heartbeats)
            journal = list(self._journal.values())
        newest: dict[str, float] = {}
        for owner, at, _ in journal:
            newest[owner] = max(at, newest.get(owner, at))
        for owner, at in newest.items():
            seen[owner] = max(at, seen.get(owner, at))  # a fresh journal row is a sign of life
        return seen

    def forget_owner(self, owner: str, *, seen_before: float | None = None) -> None:
        with self._lock:
            at = self._heartbeats.get(owner)
            if at is not None and (seen_before is None or at < seen_before):
                del self._heartbeats[owner]
