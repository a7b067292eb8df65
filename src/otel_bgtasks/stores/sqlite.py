"""`SQLiteDeadLetterStore`: dead letters and the durable-task journal in one SQLite file.

Safe for several worker processes on one host: WAL mode (readers never block the writer),
a busy timeout for concurrent writers, one connection per thread and per process (a forked
child opens its own). Each write is a single autocommitted statement with
``synchronous=NORMAL``: durable against a process crash, and cheap enough for the per-task
journal writes. Use Redis when workers run on several hosts.
"""

from __future__ import annotations

import builtins
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from otel_bgtasks.errors import ConfigurationError, CorruptEntryError, StoreUnavailableError
from otel_bgtasks.records import (
    DeadLetter,
    DeadLetterReason,
    JournalEntry,
    decode_entry,
    decode_journal,
)
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = ["SCHEMA_VERSION", "SQLiteDeadLetterStore"]

SCHEMA_VERSION = 2
"""Stored in ``PRAGMA user_version``; a file of another version is refused rather than
misread (version 1, without the claim columns, was never released)."""

_log = structlog.get_logger("otel_bgtasks")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    task_name TEXT NOT NULL,
    reason TEXT NOT NULL,
    last_failure REAL NOT NULL,
    data TEXT NOT NULL,
    claim_owner TEXT,
    claim_until REAL
);
CREATE INDEX IF NOT EXISTS dead_letters_last_failure ON dead_letters (last_failure, id);
CREATE INDEX IF NOT EXISTS dead_letters_task ON dead_letters (task_name);
CREATE TABLE IF NOT EXISTS journal (
    task_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    data TEXT NOT NULL,
    claim_owner TEXT,
    claim_until REAL
);
CREATE INDEX IF NOT EXISTS journal_owner ON journal (owner);
CREATE TABLE IF NOT EXISTS heartbeats (
    owner TEXT PRIMARY KEY,
    at REAL NOT NULL
);
"""

_TABLES = {"dead_letters": "id", "journal": "task_id"}


def _filters(
    task: str | None, reason: DeadLetterReason | str | None, since: float | None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if task is not None:
        clauses.append("task_name = ?")
        params.append(task)
    if reason is not None:
        clauses.append("reason = ?")
        params.append(DeadLetterReason(reason).value)
    if since is not None:
        clauses.append("last_failure >= ?")
        params.append(since)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


class SQLiteDeadLetterStore(DeadLetterStore):
    """Dead letters in an SQLite file (created with its schema if missing).

    Args:
        path: the database file; its directory must exist (unless `lazy`).
        timeout: seconds a writer waits for another process's write lock.
        lazy: create the file (and its directory) only at the first write: a dead letter, a
            journal row or a heartbeat. Until then reads see an empty store. The creation is
            logged once, with the path (how the instrumentor's default store is opened).

    Raises:
        ConfigurationError: (a `ValueError`) the directory does not exist, the file is not an
            SQLite database, or its schema is of another version of this package (the message
            says what to do).
        StoreUnavailableError: any other SQLite error (raised by every method too).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float = 5.0, lazy: bool = False
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        directory = os.path.dirname(os.path.abspath(self.path))
        if not lazy and not os.path.isdir(directory):
            raise ConfigurationError(
                f"cannot open dead-letter store {self.path!r}: directory {directory!r} does not"
                " exist; create it, or point the store elsewhere"
            )
        self._local = threading.local()
        self._connections: list[tuple[int, sqlite3.Connection]] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        # lazy and not created yet: reads answer from an empty in-memory schema
        self._deferred = lazy and not os.path.exists(self.path)
        self._create_lock = threading.Lock()
        if self._deferred:
            return
        self._open_file()

    def _open_file(self) -> None:
        try:
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise StoreUnavailableError(
                    f"SQLite dead-letter store {self.path!r}: {exc}"
                ) from exc
            raise ConfigurationError(f"cannot open dead-letter store {self.path!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"SQLiteDeadLetterStore({self.path!r})"

    @property
    def identity(self) -> str:
        """``sqlite:`` and the file's absolute path."""
        return f"sqlite:{os.path.abspath(self.path)}"

    # -- connections ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailableError(f"SQLite dead-letter store {self.path!r} is closed")
        pid = os.getpid()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == pid:
            current = self._file_id()
            if current == self._local.file_id:
                return conn
            if self._local.file_id is None and current is not None:  # created lazily
                self._local.file_id = current
                return conn
            # The file was deleted or replaced under us: writes to the old inode would vanish.
            _log.error(
                "SQLite store file was deleted or replaced, reopening it",
                path=self.path,
                exists=os.path.exists(self.path),
            )
            self._forget(conn)
            self._local.conn = None
            self._reopen_schema()
        # check_same_thread=False only so close() may close it from another thread; each
        # connection is used by the thread that opened it.
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        conn.execute("PRAGMA synchronous = NORMAL")
        self._local.conn = conn
        self._local.pid = pid
        self._local.file_id = self._file_id()
        with self._connections_lock:
            self._connections.append((pid, conn))
        return conn

    def _file_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _forget(self, conn: sqlite3.Connection) -> None:
        with self._connections_lock:
            self._connections = [(p, c) for p, c in self._connections if c is not conn]
        conn.close()

    def _reopen_schema(self) -> None:
        """Open a connection to the file now at `path` (created if gone) with its schema."""
        try:
            self._init_schema()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(
                f"SQLite dead-letter store {self.path!r} was replaced and cannot be reopened: {exc}"
            ) from exc

    def _create(self) -> None:
        """The first write of a lazy store: create the directory and the file, log it once."""
        with self._create_lock:
            if not self._deferred:
                return
            directory = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailableError(
                    f"cannot create the dead-letter store's directory {directory!r}: {exc};"
                    " set OTEL_BGTASKS_DLQ_URL or pass dead_letter_store="
                ) from exc
            self._open_file()
            self._deferred = False
        _log.info("dead-letter store created", path=os.path.abspath(self.path))

    def _empty(self) -> sqlite3.Connection:
        conn = getattr(self._local, "empty", None)
        if conn is None:
            conn = sqlite3.connect(":memory:", isolation_level=None)
            conn.executescript(_SCHEMA)
            self._local.empty = conn
        return conn

    @contextmanager
    def _db(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        if self._deferred:
            if not write and not os.path.exists(self.path):
                yield self._empty()  # nothing stored yet: an empty store, nothing created
                return
            self._create()  # a first write, or another process created the file meanwhile
        try:
            yield self._conn()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"SQLite dead-letter store {self.path!r}: {exc}") from exc

    def _init_schema(self) -> None:
        conn = self._conn()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            _log.warning("SQLite store not in WAL mode", path=self.path, journal_mode=mode)
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this otel-bgtasks supports"
                    f" ({SCHEMA_VERSION}); upgrade otel-bgtasks"
                )
            if 0 < version < SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} was written by an unreleased development version"
                    f" of otel-bgtasks and is not read by this one ({SCHEMA_VERSION}); move the"
                    " file aside and a new one is created (its entries are JSON in the `data`"
                    " column: restore them with DeadLetter.from_json and store.put)"
                )
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._closed = True
        pid = os.getpid()
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for owner_pid, conn in connections:
            if owner_pid == pid:  # a forked child leaves its parent's connections alone
                conn.close()

    # -- dead letters -----------------------------------------------------------------------

    def put(self, entry: DeadLetter) -> None:
        with self._db(write=True) as db:
            db.execute(
                "INSERT OR REPLACE INTO dead_letters (id, task_name, reason, last_failure, data)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    entry.id,
                    entry.task_name,
                    entry.reason.value,
                    entry.last_failure,
                    entry.to_json(),
                ),
            )

    update = put

    def get(self, entry_id: str) -> DeadLetter | None:
        with self._db() as db:
            row = db.execute("SELECT data FROM dead_letters WHERE id = ?", (entry_id,)).fetchone()
        return None if row is None else decode_entry(entry_id, row[0])

    def list(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> builtins.list[DeadLetter]:
        where, params = _filters(task, reason, since)
        out: builtins.list[DeadLetter] = []
        if limit is not None and limit <= 0:
            return out
        with self._db() as db:
            rows = db.execute(
                f"SELECT id, data FROM dead_letters{where} ORDER BY last_failure, id", params
            )
            for entry_id, data in rows:
                try:
                    out.append(decode_entry(entry_id, data))
                except CorruptEntryError as exc:
                    _log.error(
                        "corrupt dead-letter entry skipped", entry_id=entry_id, error=str(exc)
                    )
                    continue
                if limit is not None and len(out) >= limit:
                    break
        return out

    def delete(self, entry_id: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM dead_letters WHERE id = ?", (entry_id,)).rowcount > 0

    def purge(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
    ) -> int:
        where, params = _filters(task, reason, since)
        with self._db() as db:
            return db.execute(f"DELETE FROM dead_letters{where}", params).rowcount

    def count(self) -> int:
        with self._db() as db:
            return int(db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    def corrupt_ids(self) -> builtins.list[str]:
        bad: builtins.list[str] = []
        with self._db() as db:
            for entry_id, data in db.execute("SELECT id, data FROM dead_letters ORDER BY id"):
                try:
                    decode_entry(entry_id, data)
                except CorruptEntryError:
                    bad.append(entry_id)
        return bad

    # -- claims -----------------------------------------------------------------------------

    def _claim(
        self, table: str, row_id: str, owner: str, lease: float, now: float | None
    ) -> str | None:
        key = _TABLES[table]
        moment = time.time() if now is None else now
        with self._db() as db:
            rows = db.execute(
                f"UPDATE {table} SET claim_owner = ?, claim_until = ? WHERE {key} = ?"
                " AND (claim_owner IS NULL OR claim_owner = ? OR claim_until <= ?)"
                " RETURNING data",
                (owner, moment + lease, row_id, owner, moment),
            ).fetchall()
        return str(rows[0][0]) if rows else None

    def _release(self, table: str, row_id: str, owner: str) -> bool:
        key = _TABLES[table]
        with self._db() as db:
            return (
                db.execute(
                    f"UPDATE {table} SET claim_owner = NULL, claim_until = NULL"
                    f" WHERE {key} = ? AND claim_owner = ?",
                    (row_id, owner),
                ).rowcount
                > 0
            )

    def _delete_claimed(self, table: str, row_id: str, owner: str) -> bool:
        key = _TABLES[table]
        with self._db() as db:
            return (
                db.execute(
                    f"DELETE FROM {table} WHERE {key} = ? AND claim_owner = ?", (row_id, owner)
                ).rowcount
                > 0
            )

    def claim(
        self, entry_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> DeadLetter | None:
        data = self._claim("dead_letters", entry_id, owner, lease, now)
        if data is None:
            return None
        try:
            return decode_entry(entry_id, data)
        except CorruptEntryError:
            self._release("dead_letters", entry_id, owner)
            raise

    def release(self, entry_id: str, owner: str, *, entry: DeadLetter | None = None) -> bool:
        if entry is None:
            return self._release("dead_letters", entry_id, owner)
        with self._db() as db:
            return (
                db.execute(
                    "UPDATE dead_letters SET task_name = ?, reason = ?, last_failure = ?,"
                    " data = ?, claim_owner = NULL, claim_until = NULL"
                    " WHERE id = ? AND claim_owner = ?",
                    (
                        entry.task_name,
                        entry.reason.value,
                        entry.last_failure,
                        entry.to_json(),
                        entry_id,
                        owner,
                    ),
                ).rowcount
                > 0
            )

    def delete_claimed(self, entry_id: str, owner: str) -> bool:
        return self._delete_claimed("dead_letters", entry_id, owner)

    def journal_claim(
        self, task_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> JournalEntry | None:
        data = self._claim("journal", task_id, owner, lease, now)
        if data is None:
            return None
        try:
            return decode_journal(task_id, data)
        except CorruptEntryError:
            self._release("journal", task_id, owner)
            raise

    def journal_release(self, task_id: str, owner: str) -> bool:
        return self._release("journal", task_id, owner)

    def journal_remove_claimed(self, task_id: str, owner: str) -> bool:
        return self._delete_claimed("journal", task_id, owner)

    # -- journal and owners -------------------------------------------------------------------

    def journal_add(self, entry: JournalEntry) -> None:
        with self._db(write=True) as db:
            db.execute(
                "INSERT OR REPLACE INTO journal (task_id, owner, enqueued_at, data)"
                " VALUES (?, ?, ?, ?)",
                (entry.task_id, entry.owner, entry.enqueued_at, entry.to_json()),
            )

    def journal_remove(self, task_id: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM journal WHERE task_id = ?", (task_id,)).rowcount > 0

    def journal_list(self, *, owner: str | None = None) -> builtins.list[JournalEntry]:
        query = "SELECT task_id, data FROM journal"
        params: tuple[str, ...] = ()
        if owner is not None:
            query += " WHERE owner = ?"
            params = (owner,)
        out: builtins.list[JournalEntry] = []
        with self._db() as db:
            for task_id, data in db.execute(query + " ORDER BY enqueued_at, task_id", params):
                try:
                    out.append(decode_journal(task_id, data))
                except CorruptEntryError as exc:
                    _log.error("corrupt journal entry skipped", task_id=task_id, error=str(exc))
        return out

    def journal_hand_off(
        self, task_id: str, *, owner: str, deadline: float, signature: str | None = None
    ) -> bool:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")  # read, rewrite and store the row atomically
            try:
                row = db.execute(
                    "SELECT data FROM journal WHERE task_id = ?", (task_id,)
                ).fetchone()
                if row is None:
                    db.execute("COMMIT")
                    return False
                moved = decode_journal(task_id, row[0]).handed(owner, deadline, signature)
                db.execute(
                    "UPDATE journal SET owner = ?, data = ?, claim_owner = NULL,"
                    " claim_until = NULL WHERE task_id = ?",
                    (owner, moved.to_json(), task_id),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return True

    def heartbeat(self, owner: str, *, at: float | None = None) -> None:
        with self._db(write=True) as db:
            db.execute(
                "INSERT OR REPLACE INTO heartbeats (owner, at) VALUES (?, ?)",
                (owner, time.time() if at is None else at),
            )

    def last_seen(self) -> dict[str, float]:
        with self._db() as db:
            seen = {
                owner: float(at) for owner, at in db.execute("SELECT owner, at FROM heartbeats")
            }
            for owner, newest in db.execute(
                "SELECT owner, MAX(enqueued_at) FROM journal GROUP BY owner"
            ):
                seen[owner] = max(seen.get(owner, float(newest)), float(newest))
        return seen

    def forget_owner(self, owner: str, *, seen_before: float | None = None) -> None:
        with self._db() as db:
            if seen_before is None:
                db.execute("DELETE FROM heartbeats WHERE owner = ?", (owner,))
            else:
                db.execute(
                    "DELETE FROM heartbeats WHERE owner = ? AND at < ?", (owner, seen_before)
                )
