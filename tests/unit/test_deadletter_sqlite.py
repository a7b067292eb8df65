"""SQLiteDeadLetterStore: the store contract on a temp file, plus what only SQLite has."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from otel_bgtasks.errors import BgTasksError, ConfigurationError, StoreUnavailableError
from otel_bgtasks.records import DeadLetterReason
from otel_bgtasks.stores import BufferedStore, SQLiteDeadLetterStore, open_store
from otel_bgtasks.stores.sqlite import SCHEMA_VERSION
from tests.unit.test_deadletter_contract import StoreContract, make_entry


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def inject_raw(self, store_path: Path) -> Callable[[str, str, float], None]:
        def inject(entry_id: str, raw: str, last_failure: float) -> None:
            with sqlite3.connect(store_path) as conn:
                conn.execute(
                    "INSERT INTO dead_letters (id, task_name, reason, last_failure, data)"
                    " VALUES (?, 'send_mail', 'exhausted', ?, ?)",
                    (entry_id, last_failure, raw),
                )
            conn.close()

        return inject


def test_schema_is_created_with_version_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    SQLiteDeadLetterStore(path).close()
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"dead_letters", "journal", "heartbeats"}
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_reopening_keeps_entries(tmp_path: Path) -> None:
    path = tmp_path / "keep.db"
    entry = make_entry()
    with SQLiteDeadLetterStore(path) as store:
        store.put(entry)
    with SQLiteDeadLetterStore(path) as store:
        assert store.list() == [entry]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    SQLiteDeadLetterStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ValueError, match=r"schema version 3 is newer .* upgrade otel-bgtasks"):
        SQLiteDeadLetterStore(path)


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not sqlite, " * 100)
    with pytest.raises(ConfigurationError, match=r"cannot open dead-letter store .*notes.txt"):
        SQLiteDeadLetterStore(path)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"directory .*nowhere.* does not exist"):
        SQLiteDeadLetterStore(tmp_path / "nowhere" / "dlq.db")


def test_a_relative_url_says_how_to_write_an_absolute_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: `sqlite:///var/lib/shop/dlq.db` is relative; the error says so, as a
    BgTasksError (a ConfigurationError, still a ValueError)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError) as raised:
        open_store("sqlite:///var/lib/shop/dlq.db")
    assert isinstance(raised.value, BgTasksError)
    assert isinstance(raised.value, ValueError)
    assert str(raised.value) == (
        f"cannot open dead-letter store 'var/lib/shop/dlq.db': directory"
        f" '{tmp_path}/var/lib/shop' does not exist; create it, or point the store elsewhere"
        f" ('sqlite:///var/lib/shop/dlq.db' is relative to the working directory"
        f" '{tmp_path}'; for the absolute path /var/lib/shop/dlq.db write four slashes:"
        " sqlite:////var/lib/shop/dlq.db)"
    )
    (tmp_path / "abs").mkdir()
    open_store(f"sqlite:///{tmp_path}/abs/dlq.db").close()  # four slashes in all: absolute


def test_closed_store_raises_store_unavailable(tmp_path: Path) -> None:
    store = SQLiteDeadLetterStore(tmp_path / "c.db")
    store.close()
    with pytest.raises(StoreUnavailableError, match="is closed"):
        store.count()


def test_sqlite_errors_become_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "dropped.db"
    store = SQLiteDeadLetterStore(path)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE dead_letters")
    conn.close()
    with pytest.raises(StoreUnavailableError, match="no such table: dead_letters"):
        store.put(make_entry())
    store.close()


def test_open_store_sqlite_urls(tmp_path: Path) -> None:
    absolute = tmp_path / "abs.db"
    store = open_store(f"sqlite:///{absolute}")  # four slashes: an absolute path
    assert isinstance(store, BufferedStore)
    assert isinstance(store.store, SQLiteDeadLetterStore)
    assert store.store.path == str(absolute)
    store.put(make_entry(reason=DeadLetterReason.CIRCUIT_OPEN))
    store.close()
    assert absolute.exists()
    raw = open_store(f"sqlite:///{absolute}", buffered=False)
    assert isinstance(raw, SQLiteDeadLetterStore)
    assert [e.reason for e in raw.list()] == [DeadLetterReason.CIRCUIT_OPEN]
    raw.close()


def test_open_store_relative_sqlite_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the process working directory, not a fake
    store = open_store("sqlite:///relative.db", buffered=False)
    assert isinstance(store, SQLiteDeadLetterStore)
    assert store.path == "relative.db"
    store.close()
    assert (tmp_path / "relative.db").exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://localhost/db", r"unsupported dead-letter store URL 'mysql://localhost/db'"),
        ("dlq.db", r"valid forms: sqlite:///path.db, .*redis://host:port/db, rediss://"),
        ("sqlite://", r"invalid SQLite URL 'sqlite://': expected sqlite:///path.db"),
        ("sqlite:///", r"invalid SQLite URL"),
        ("sqlite:///:memory:", r"give a file path"),
        ("sqlite:///x.db?mode=ro", r"without query parameters"),
    ],
)
def test_open_store_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


class TestBufferedSQLiteStore(TestSQLiteStore):
    """The contract holds through the `BufferedStore` wrapper too (`open_store`'s default)."""

    @pytest.fixture
    def store(self, store_path: Path) -> Iterator[BufferedStore]:  # type: ignore[override]
        store = BufferedStore(SQLiteDeadLetterStore(store_path))
        yield store
        store.close()


def test_a_version_1_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE dead_letters (id TEXT PRIMARY KEY, task_name TEXT NOT NULL,"
            " reason TEXT NOT NULL, last_failure REAL NOT NULL, data TEXT NOT NULL);"
            "PRAGMA user_version = 1;"
        )
    conn.close()
    with pytest.raises(
        ConfigurationError,
        match=r"schema version 1 .* not read by this one \(2\); move the file aside",
    ):
        SQLiteDeadLetterStore(path)
    with sqlite3.connect(path) as conn:  # refused, not touched
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == [
            "dead_letters",
            "sqlite_autoindex_dead_letters_1",
        ]
    conn.close()


def test_a_deleted_file_is_detected_and_reopened(tmp_path: Path) -> None:
    path = tmp_path / "dlq.db"
    store = SQLiteDeadLetterStore(path)
    store.put(make_entry())
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    entry = make_entry()
    with capture_logs() as logs:
        store.put(entry)  # written to the file now at the path, not the deleted inode
    assert [log["event"] for log in logs] == [
        "SQLite store file was deleted or replaced, reopening it"
    ]
    store.close()
    with SQLiteDeadLetterStore(path) as reopened:
        assert reopened.list() == [entry]
