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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import structlog

from otel_bgtasks.errors import (
    ConfigurationError,
    ConsumedEntryError,
    CorruptEntryError,
    StoreUnavailableError,
)
from otel_bgtasks.records import (
    MAX_ROW_BYTES,
    PREVIEW_CHARS,
    DeadLetter,
    DeadLetterPreview,
    DeadLetterReason,
    JournalEntry,
    decode_entry,
    decode_journal,
    preview_text,
)
from otel_bgtasks.stores.base import CONSUMED_RETENTION, DeadLetterStore

__all__ = ["SCHEMA_VERSION", "SQLiteDeadLetterStore"]

SCHEMA_VERSION = 3
"""Stored in ``PRAGMA user_version``; a file of another version is refused rather than
misread (versions 1 and 2, without the claim columns, then without the payloads kept apart
in ``dead_letter_payloads`` and the consumed nonces in ``consumed``, were never released)."""

_log = structlog.get_logger("otel_bgtasks")
_T = TypeVar("_T")

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
CREATE TABLE IF NOT EXISTS dead_letter_payloads (
    id TEXT PRIMARY KEY,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS consumed (
    nonce TEXT PRIMARY KEY,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS consumed_at ON consumed (at);
"""

_TABLES = {"dead_letters": "id", "journal": "task_id"}
_BATCH = 500  # ids per IN (...) query
_CLOSE_WAIT = 5.0  # seconds `close` waits for other threads' calls under way
_WHAT = {"dead_letters": "dead-letter entry", "journal": "journal entry"}


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
        max_row_bytes: a row longer than this is corrupt, and SQLite refuses to load it
            (``SQLITE_LIMIT_LENGTH``): it is never read into memory (default 256 MiB).
        clock: the wall clock leases and liveness are judged by (`now()`). Every process
            using the file is on this host and shares it: SQLite has no clock of its own, so
            processes whose clocks disagree (several hosts on a network file system) would
            take each other's leases; use Redis across hosts.

    Raises:
        ConfigurationError: (a `ValueError`) the directory does not exist, the file is not an
            SQLite database, or its schema is of another version of this package (the message
            says what to do).
        StoreUnavailableError: any other SQLite error (raised by every method too).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        lazy: bool = False,
        max_row_bytes: int = MAX_ROW_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        self.clock = clock
        self.timeout = timeout
        self.max_row_bytes = max_row_bytes
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
        self._idle = threading.Condition()
        self._active = 0  # calls under way (`_db`)
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
        # a value longer than this is refused by SQLite itself ("string or blob too big")
        # instead of being loaded: an oversized row is that row's corruption (`_row`)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.max_row_bytes)
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
        with self._idle:  # `close` waits for calls under way (no connection closed mid-call)
            if self._closed:
                raise StoreUnavailableError(f"SQLite dead-letter store {self.path!r} is closed")
            self._active += 1
        try:
            yield self._conn()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"SQLite dead-letter store {self.path!r}: {exc}") from exc
        finally:
            with self._idle:
                self._active -= 1
                if not self._active:
                    self._idle.notify_all()

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
        with self._idle:
            self._closed = True
            # Another thread's call under way (a heartbeat) keeps its connection until it
            # returns: closing a connection in the middle of a statement crashes SQLite.
            self._idle.wait_for(lambda: not self._active, timeout=_CLOSE_WAIT)
        pid = os.getpid()
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for owner_pid, conn in connections:
            if owner_pid == pid:  # a forked child leaves its parent's connections alone
                conn.close()

    # -- dead letters -----------------------------------------------------------------------
    # A row holds the entry without its payload (`data`); the payload is a BLOB of its own
    # (`dead_letter_payloads`), so listing and claiming never read it and a preview reads
    # only its first bytes. A row with its payload inside `data` (written by hand, or
    # planted) is read as it is, within `max_row_bytes`.

    @contextmanager
    def _transaction(self, db: sqlite3.Connection) -> Iterator[None]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _write(self, db: sqlite3.Connection, entry: DeadLetter) -> None:
        db.execute(
            "INSERT OR REPLACE INTO dead_letters (id, task_name, reason, last_failure, data)"
            " VALUES (?, ?, ?, ?, ?)",
            (entry.id, entry.task_name, entry.reason.value, entry.last_failure, entry.meta_json()),
        )
        db.execute(
            "INSERT OR REPLACE INTO dead_letter_payloads (id, payload) VALUES (?, ?)",
            (entry.id, entry.payload.encode()),
        )

    def put(self, entry: DeadLetter) -> None:
        with self._db(write=True) as db, self._transaction(db):
            self._write(db, entry)

    update = put

    def _too_big(self, row_id: str, what: str, exc: BaseException) -> CorruptEntryError:
        return CorruptEntryError(
            row_id,
            f"longer than the limit, over the limit of {self.max_row_bytes} ({exc})",
            what=what,
        )

    def _row(self, db: sqlite3.Connection, table: str, row_id: str) -> str | bytes | None:
        """A row's data, read alone: an oversized value fails this statement, not a scan.

        Raises:
            CorruptEntryError: the value is longer than `max_row_bytes`.
        """
        key = _TABLES[table]
        try:
            row = db.execute(f"SELECT data FROM {table} WHERE {key} = ?", (row_id,)).fetchone()
        except sqlite3.DataError as exc:  # SQLITE_TOOBIG: never loaded
            raise self._too_big(row_id, _WHAT[table], exc) from None
        return None if row is None else row[0]

    def _payload_size(self, db: sqlite3.Connection, entry_id: str) -> int | None:
        """The kept-apart payload's length in bytes (read from the row header, not loaded),
        None for a row whose payload is inside `data`."""
        row = db.execute(
            "SELECT length(payload) FROM dead_letter_payloads WHERE id = ?", (entry_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _payload(self, db: sqlite3.Connection, entry_id: str) -> bytes | None:
        try:
            row = db.execute(
                "SELECT payload FROM dead_letter_payloads WHERE id = ?", (entry_id,)
            ).fetchone()
        except sqlite3.DataError as exc:
            raise self._too_big(entry_id, "dead-letter entry", exc) from None
        return None if row is None else bytes(row[0])

    def _entry(self, db: sqlite3.Connection, entry_id: str) -> DeadLetter | None:
        """The whole entry, None if gone. Raises `CorruptEntryError` naming it."""
        raw = self._row(db, "dead_letters", entry_id)
        if raw is None:
            return None
        payload = self._payload(db, entry_id)
        return decode_entry(entry_id, raw, max_bytes=self.max_row_bytes, payload=payload)

    def _preview(
        self, db: sqlite3.Connection, entry_id: str, chars: int
    ) -> DeadLetterPreview | None:
        """The entry with its payload's first `chars` characters (incremental blob I/O: at
        most 4 bytes a character are read), None if gone."""
        raw = self._row(db, "dead_letters", entry_id)
        if raw is None:
            return None
        size = self._payload_size(db, entry_id)
        if size is None:  # the payload inside `data`: whole, within max_row_bytes
            return DeadLetterPreview.of(
                decode_entry(entry_id, raw, max_bytes=self.max_row_bytes), chars
            )
        head = b""
        if chars > 0 and size:
            (rowid,) = db.execute(
                "SELECT rowid FROM dead_letter_payloads WHERE id = ?", (entry_id,)
            ).fetchone()
            with db.blobopen("dead_letter_payloads", "payload", rowid, readonly=True) as blob:
                head = blob.read(min(size, chars * 4))
        entry = decode_entry(
            entry_id, raw, max_bytes=self.max_row_bytes, payload=preview_text(head, chars)
        )
        return DeadLetterPreview(entry, size)

    def _ids(self, db: sqlite3.Connection, query: str, params: Any = ()) -> builtins.list[str]:
        return [str(row[0]) for row in db.execute(query, params).fetchall()]

    def get(self, entry_id: str) -> DeadLetter | None:
        with self._db() as db:
            return self._entry(db, entry_id)

    def preview(self, entry_id: str, *, chars: int = PREVIEW_CHARS) -> DeadLetterPreview | None:
        with self._db() as db:
            return self._preview(db, entry_id, chars)

    def payload_chunks(self, entry_id: str, *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with self._db() as db:
            found = db.execute(
                "SELECT rowid, length(payload) FROM dead_letter_payloads WHERE id = ?",
                (entry_id,),
            ).fetchone()
        if found is None:  # the payload inside `data` (or gone): whole, within max_row_bytes
            yield from super().payload_chunks(entry_id, chunk_size=chunk_size)
            return
        rowid, size = found
        # A connection of the stream's own, with one blob handle: reopening the blob for each
        # chunk walks its overflow pages from the start again (quadratic: 4 s for 100 MB
        # against 0.3 s), and a consumer may pull chunks from several threads (a streamed
        # HTTP response), which the thread's own connection must not see.
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, check_same_thread=False)
            try:
                with conn.blobopen("dead_letter_payloads", "payload", rowid, readonly=True) as blob:
                    for _ in range(0, size, chunk_size):
                        yield blob.read(chunk_size)
            finally:
                conn.close()
        except sqlite3.Error as exc:  # deleted or replaced meanwhile, or the file is gone
            raise StoreUnavailableError(
                f"SQLite dead-letter store {self.path!r}: payload of {entry_id!r}: {exc}"
            ) from exc

    def _scan(
        self,
        read: Callable[[sqlite3.Connection, str], _T | None],
        task: str | None,
        reason: DeadLetterReason | str | None,
        since: float | None,
        limit: int | None,
    ) -> builtins.list[_T]:
        where, params = _filters(task, reason, since)
        out: builtins.list[_T] = []
        if limit is not None and limit <= 0:
            return out
        with self._db() as db:
            # ids first, then each row alone: one oversized row fails its own read only
            query = f"SELECT id FROM dead_letters{where} ORDER BY last_failure, id"
            for entry_id in self._ids(db, query, params):
                try:
                    found = read(db, entry_id)
                except CorruptEntryError as exc:
                    _log.error(
                        "corrupt dead-letter entry skipped", entry_id=entry_id, error=str(exc)
                    )
                    continue
                if found is None:  # deleted meanwhile
                    continue
                out.append(found)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def list(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> builtins.list[DeadLetter]:
        return self._scan(self._entry, task, reason, since, limit)

    def previews(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
        chars: int = PREVIEW_CHARS,
    ) -> builtins.list[DeadLetterPreview]:
        def read(db: sqlite3.Connection, entry_id: str) -> DeadLetterPreview | None:
            return self._preview(db, entry_id, chars)

        return self._scan(read, task, reason, since, limit)

    def delete(self, entry_id: str) -> bool:
        with self._db() as db, self._transaction(db):
            db.execute("DELETE FROM dead_letter_payloads WHERE id = ?", (entry_id,))
            return db.execute("DELETE FROM dead_letters WHERE id = ?", (entry_id,)).rowcount > 0

    def purge(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
    ) -> int:
        where, params = _filters(task, reason, since)
        with self._db() as db, self._transaction(db):
            doomed = f"SELECT id FROM dead_letters{where}"
            db.execute(f"DELETE FROM dead_letter_payloads WHERE id IN ({doomed})", params)
            return db.execute(f"DELETE FROM dead_letters{where}", params).rowcount

    def count(self) -> int:
        with self._db() as db:
            return int(db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    def corrupt_ids(self) -> builtins.list[str]:
        bad: builtins.list[str] = []
        with self._db() as db:
            for entry_id in self._ids(db, "SELECT id FROM dead_letters ORDER BY id"):
                try:
                    size = self._payload_size(db, entry_id)
                    if size is not None and size > self.max_row_bytes:
                        raise self._too_big(entry_id, "dead-letter entry", ValueError(size))
                    self._preview(db, entry_id, 0)
                except CorruptEntryError:
                    bad.append(entry_id)
        return bad

    # -- claims -----------------------------------------------------------------------------

    def _claim(
        self,
        table: str,
        row_id: str,
        owner: str,
        lease: float,
        now: float | None,
        read: Callable[[sqlite3.Connection, str], Any],
    ) -> Any:
        """The claimed row decoded (`read`), None when missing or held by another owner.

        Raises:
            CorruptEntryError: the row cannot be decoded (the claim is released).
            ConsumedEntryError: its nonce was consumed: it ran already (released too).
        """
        key = _TABLES[table]
        moment = self.clock() if now is None else now
        with self._db() as db:
            try:
                taken = db.execute(
                    f"UPDATE {table} SET claim_owner = ?, claim_until = ? WHERE {key} = ?"
                    " AND (claim_owner IS NULL OR claim_owner = ? OR claim_until <= ?)",
                    (owner, moment + lease, row_id, owner, moment),
                ).rowcount
            except sqlite3.DataError:  # an oversized row cannot be rewritten: not claimed
                self._row(db, table, row_id)  # raises CorruptEntryError naming it
                raise
            if not taken:
                return None
            try:
                found = read(db, row_id)
                if found is not None and found.nonce:
                    consumed = self._consumed(db, [found.nonce])
                    if consumed:
                        raise ConsumedEntryError(row_id, consumed[found.nonce])
            except (CorruptEntryError, ConsumedEntryError):
                self._release(table, row_id, owner)
                raise
            return found

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

    def _delete_claimed(self, table: str, row_id: str, owner: str, consume: str) -> bool:
        key = _TABLES[table]
        with self._db() as db, self._transaction(db):
            deleted = (
                db.execute(
                    f"DELETE FROM {table} WHERE {key} = ? AND claim_owner = ?", (row_id, owner)
                ).rowcount
                > 0
            )
            if deleted and table == "dead_letters":
                db.execute("DELETE FROM dead_letter_payloads WHERE id = ?", (row_id,))
            if deleted and consume:  # in the delete's transaction: never one without the other
                moment = self.clock()
                db.execute(
                    "INSERT OR REPLACE INTO consumed (nonce, at) VALUES (?, ?)", (consume, moment)
                )
                db.execute("DELETE FROM consumed WHERE at < ?", (moment - CONSUMED_RETENTION,))
            return deleted

    def _consumed(self, db: sqlite3.Connection, nonces: builtins.list[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        for start in range(0, len(nonces), _BATCH):
            batch = nonces[start : start + _BATCH]
            marks = ",".join("?" * len(batch))
            for nonce, at in db.execute(
                f"SELECT nonce, at FROM consumed WHERE nonce IN ({marks})", batch
            ):
                found[str(nonce)] = float(at)
        return found

    def consumed(self, nonces: Iterable[str]) -> dict[str, float]:
        wanted = [n for n in dict.fromkeys(nonces) if n]
        with self._db() as db:
            return self._consumed(db, wanted)

    def claim(
        self, entry_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> DeadLetter | None:
        claimed: DeadLetter | None = self._claim(
            "dead_letters", entry_id, owner, lease, now, self._entry
        )
        return claimed

    def release(self, entry_id: str, owner: str, *, entry: DeadLetter | None = None) -> bool:
        if entry is None:
            return self._release("dead_letters", entry_id, owner)
        with self._db() as db, self._transaction(db):
            applied = (
                db.execute(
                    "UPDATE dead_letters SET task_name = ?, reason = ?, last_failure = ?,"
                    " data = ?, claim_owner = NULL, claim_until = NULL"
                    " WHERE id = ? AND claim_owner = ?",
                    (
                        entry.task_name,
                        entry.reason.value,
                        entry.last_failure,
                        entry.meta_json(),
                        entry_id,
                        owner,
                    ),
                ).rowcount
                > 0
            )
            if applied:
                db.execute(
                    "INSERT OR REPLACE INTO dead_letter_payloads (id, payload) VALUES (?, ?)",
                    (entry_id, entry.payload.encode()),
                )
            return applied

    def delete_claimed(self, entry_id: str, owner: str, *, consume: str = "") -> bool:
        return self._delete_claimed("dead_letters", entry_id, owner, consume)

    def _journal_row(self, db: sqlite3.Connection, task_id: str) -> JournalEntry | None:
        raw = self._row(db, "journal", task_id)
        return None if raw is None else decode_journal(task_id, raw, max_bytes=self.max_row_bytes)

    def journal_claim(
        self, task_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> JournalEntry | None:
        claimed: JournalEntry | None = self._claim(
            "journal", task_id, owner, lease, now, self._journal_row
        )
        return claimed

    def journal_release(self, task_id: str, owner: str) -> bool:
        return self._release("journal", task_id, owner)

    def journal_remove_claimed(self, task_id: str, owner: str, *, consume: str = "") -> bool:
        return self._delete_claimed("journal", task_id, owner, consume)

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
        query = "SELECT task_id FROM journal"
        params: tuple[str, ...] = ()
        if owner is not None:
            query += " WHERE owner = ?"
            params = (owner,)
        out: builtins.list[JournalEntry] = []
        with self._db() as db:
            for task_id in self._ids(db, query + " ORDER BY enqueued_at, task_id", params):
                try:
                    entry = self._journal_row(db, task_id)
                except CorruptEntryError as exc:
                    _log.error("corrupt journal entry skipped", task_id=task_id, error=str(exc))
                    continue
                if entry is not None:
                    out.append(entry)
        return out

    def journal_hand_off(
        self, task_id: str, *, owner: str, deadline: float, signature: str | None = None
    ) -> bool:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")  # read, rewrite and store the row atomically
            try:
                row = self._journal_row(db, task_id)
                if row is None:
                    db.execute("COMMIT")
                    return False
                moved = row.handed(owner, deadline, signature)
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

    def now(self) -> float:
        return self.clock()

    def heartbeat(self, owner: str, *, at: float | None = None) -> None:
        with self._db(write=True) as db:
            db.execute(
                "INSERT OR REPLACE INTO heartbeats (owner, at) VALUES (?, ?)",
                (owner, self.clock() if at is None else at),
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
