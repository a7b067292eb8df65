"""SQLite dead-letter stores shared by processes: concurrent writers, a schema created by
several at once, a forked child (real processes, hence not in tests/unit)."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from tests.unit.test_deadletter_contract import T0, make_entry, make_journal

from otel_bgtasks.stores import SQLiteDeadLetterStore
from otel_bgtasks.stores.sqlite import SCHEMA_VERSION


def _write_many(path: str, worker: int, count: int) -> None:
    store = SQLiteDeadLetterStore(path)
    for i in range(count):
        store.put(make_entry(task_name=f"worker{worker}", last_failure=T0 + i))
        journal = make_journal(owner=f"h:{worker}:x", enqueued_at=T0 + i)
        store.journal_add(journal)
        if i % 2:
            store.journal_remove(journal.task_id)
    store.close()


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    SQLiteDeadLetterStore(path).close()  # schema exists; the workers race on writes only
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_write_many, args=(path, w, 150)) for w in (1, 2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0, 0]
    with SQLiteDeadLetterStore(path) as store:
        assert store.count() == 300
        assert len(store.list(task="worker1")) == 150
        assert len(store.list(task="worker2")) == 150
        assert len(store.journal_list(owner="h:1:x")) == 75
        assert len(store.journal_list(owner="h:2:x")) == 75
        assert store.corrupt_ids() == []


def _create_schema(path: str) -> None:
    SQLiteDeadLetterStore(path).close()


def test_processes_racing_to_create_the_schema(tmp_path: Path) -> None:
    path = str(tmp_path / "fresh.db")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_create_schema, args=(path,)) for _ in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0, 0, 0]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def _use_inherited_store(store: SQLiteDeadLetterStore, queue: multiprocessing.Queue[int]) -> None:
    store.put(make_entry(task_name="child"))
    queue.put(store.count())
    store.close()


@pytest.mark.filterwarnings(
    # Python 3.12+ warns that fork() in a process with threads may deadlock; the child here
    # only touches SQLite through its own new connection.
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)
def test_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    store = SQLiteDeadLetterStore(tmp_path / "fork.db")
    store.put(make_entry(task_name="parent"))  # the parent's connection exists before fork
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[int] = ctx.Queue()
    child = ctx.Process(target=_use_inherited_store, args=(store, queue))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == 2
    # the child's close() left the parent's connection open
    assert sorted(e.task_name for e in store.list()) == ["child", "parent"]
    store.close()
