"""Fixtures of the adversarial suite: a planted module whose import leaves a mark, a store."""

from __future__ import annotations

import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from otel_bgtasks.stores.base import DeadLetterStore
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore
from tests.security import app_tasks


@dataclass(frozen=True)
class Planted:
    """A module on sys.path that writes `imported_mark` when imported, and a shell command
    that writes `ran_mark` when run: an attacker's entries name them."""

    module: str
    imported_mark: Path
    ran_mark: Path

    @property
    def command(self) -> str:
        return f"touch {self.ran_mark}"

    def untouched(self) -> bool:
        return (
            not self.imported_mark.exists()
            and not self.ran_mark.exists()
            and self.module not in sys.modules
        )


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Planted]:
    name = f"planted_{uuid.uuid4().hex[:8]}"
    code_dir = tmp_path / "attacker"
    code_dir.mkdir()
    mark = tmp_path / "imported"
    (code_dir / f"{name}.py").write_text(
        f"open({str(mark)!r}, 'w').write('imported')\n"
        "def run(*args, **kwargs):\n"
        f"    open({str(mark)!r}, 'a').write('ran')\n"
    )
    monkeypatch.syspath_prepend(str(code_dir))
    yield Planted(name, mark, tmp_path / "pwned")
    sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _reset_ran() -> Iterator[None]:
    app_tasks.RAN.clear()
    yield
    app_tasks.RAN.clear()


@dataclass
class Backend:
    """One store under attack, and how an attacker writes raw rows into it (bypassing the
    store's encoder)."""

    name: str
    url: str
    store: DeadLetterStore
    plant_letter_raw: Callable[[str, str | bytes, float], None]
    plant_journal_raw: Callable[[str, str | bytes, str, float], None]
    open: Callable[..., DeadLetterStore]  # another store on the same data, with options


def sqlite_backend(path: Path) -> Backend:
    store = SQLiteDeadLetterStore(path)

    def letter(entry_id: str, raw: str | bytes, at: float) -> None:
        with sqlite3.connect(path) as db:
            db.execute(
                "INSERT OR REPLACE INTO dead_letters (id, task_name, reason, last_failure, data)"
                " VALUES (?, 'send_mail', 'exhausted', ?, ?)",
                (entry_id, at, raw),
            )

    def journal(task_id: str, raw: str | bytes, owner: str, at: float) -> None:
        with sqlite3.connect(path) as db:
            db.execute(
                "INSERT OR REPLACE INTO journal (task_id, owner, enqueued_at, data)"
                " VALUES (?, ?, ?, ?)",
                (task_id, owner, at, raw),
            )

    def reopen(**options: Any) -> DeadLetterStore:
        return SQLiteDeadLetterStore(path, **options)

    return Backend("sqlite", f"sqlite:///{path}", store, letter, journal, reopen)


def _redis_backend(url: str) -> Backend:
    import redis

    from otel_bgtasks.stores.redis import RedisDeadLetterStore

    store = RedisDeadLetterStore(url)
    client = redis.Redis.from_url(url)

    def letter(entry_id: str, raw: str | bytes, at: float) -> None:
        client.hset("bgtasks:dlq:entries", entry_id, raw)
        client.zadd("bgtasks:dlq:by_time", {entry_id: at})

    def journal(task_id: str, raw: str | bytes, owner: str, at: float) -> None:
        client.hset("bgtasks:journal:entries", task_id, raw)
        client.zadd("bgtasks:journal:by_time", {task_id: at})

    def reopen(**options: Any) -> DeadLetterStore:
        return RedisDeadLetterStore(url, **options)

    return Backend("redis", url, store, letter, journal, reopen)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The SQLite store and the Redis store (a real redis-server), each empty."""
    if request.param == "sqlite":
        opened = sqlite_backend(tmp_path / "dlq.db")
        yield opened
        opened.store.close()
        return
    from tests.support.redis import running_redis

    with running_redis(tmp_path) as server:
        opened = _redis_backend(server.url)
        yield opened
        opened.store.close()
