"""RedisDeadLetterStore against a real redis-server: the store contract, outages, the CLI."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from structlog.testing import capture_logs
from tests.support.clock import Clock
from tests.support.ports import free_port
from tests.support.redis import RedisServer, running_redis
from tests.unit.test_deadletter_contract import T0, StoreContract, make_entry, make_journal

from otel_bgtasks.cli import main
from otel_bgtasks.errors import StoreUnavailableError
from otel_bgtasks.records import DeadLetter, JournalEntry
from otel_bgtasks.stores import BufferedStore, RedisDeadLetterStore, open_store

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def raw(shared_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(shared_server.url, decode_responses=True)
    yield client
    client.close()


class TestRedisStore(StoreContract):
    @pytest.fixture
    def prefix(self) -> str:
        return f"test-{uuid.uuid4().hex[:8]}"

    @pytest.fixture
    def store(self, shared_server: RedisServer, prefix: str) -> Iterator[RedisDeadLetterStore]:
        store = RedisDeadLetterStore(shared_server.url, prefix=prefix)
        yield store
        store.close()

    @pytest.fixture
    def inject_raw(self, raw: redis.Redis, prefix: str) -> Callable[[str, str, float], None]:
        def inject(entry_id: str, data: str, last_failure: float) -> None:
            raw.hset(f"{prefix}:dlq:entries", entry_id, data)
            raw.zadd(f"{prefix}:dlq:by_time", {entry_id: last_failure})

        return inject


def test_key_layout(shared_server: RedisServer, raw: redis.Redis) -> None:
    store = open_store(f"{shared_server.url}?prefix=layout")
    assert isinstance(store, BufferedStore)
    inner = store.store
    assert isinstance(inner, RedisDeadLetterStore)
    assert inner.prefix == "layout"
    entry = make_entry(last_failure=T0 + 42)
    journal = make_journal(enqueued_at=T0 + 7)
    store.put(entry)
    store.journal_add(journal)
    store.heartbeat("h:1:a", at=T0 + 1)
    assert sorted(raw.keys("layout:*")) == [
        "layout:dlq:by_time",
        "layout:dlq:entries",
        "layout:heartbeats",
        "layout:journal:by_time",
        "layout:journal:entries",
    ]
    assert json.loads(raw.hget("layout:dlq:entries", entry.id)) == entry.to_dict()
    assert raw.zscore("layout:dlq:by_time", entry.id) == T0 + 42
    assert raw.zscore("layout:journal:by_time", journal.task_id) == T0 + 7
    assert float(raw.hget("layout:heartbeats", "h:1:a")) == T0 + 1
    store.purge()
    store.journal_remove(journal.task_id)
    store.forget_owner("h:1:a")
    assert raw.keys("layout:*") == []
    store.close()


def test_stale_index_ids_are_dropped(shared_server: RedisServer, raw: redis.Redis) -> None:
    store = RedisDeadLetterStore(shared_server.url, prefix="stale")
    entry = make_entry(last_failure=T0 + 2)
    store.put(entry)
    raw.zadd("stale:dlq:by_time", {"0" * 32: T0 + 1})  # index entry without data
    assert store.list() == [entry]
    assert raw.zrange("stale:dlq:by_time", 0, -1) == [entry.id]
    store.purge()
    store.close()


def test_accepts_a_ready_client(shared_server: RedisServer) -> None:
    client = redis.Redis.from_url(shared_server.url)  # bytes responses
    store = RedisDeadLetterStore(client, prefix="client")
    entry = make_entry()
    store.put(entry)
    assert store.list() == [entry]
    assert store.corrupt_ids() == []
    assert store.purge() == 1
    store.close()
    assert client.ping()  # not ours to close
    client.close()


def test_rediss_url_uses_tls() -> None:
    store = RedisDeadLetterStore("rediss://127.0.0.1:6380/2?prefix=tls")
    assert store.client.connection_pool.connection_class is redis.SSLConnection
    assert store.client.connection_pool.connection_kwargs["db"] == 2
    assert store.prefix == "tls"
    store.close()


def test_unreachable_redis_fails_fast_with_store_unavailable() -> None:
    store = RedisDeadLetterStore(f"redis://127.0.0.1:{free_port()}/0")
    kwargs = store.client.connection_pool.connection_kwargs
    # fast: a connect or command waits 1 s at most, and a refused connection not at all
    assert (kwargs["socket_connect_timeout"], kwargs["socket_timeout"]) == (1.0, 1.0)
    with pytest.raises(StoreUnavailableError, match=r"Redis dead-letter .*refused"):
        store.put(make_entry())
    store.close()


class CountingRedisStore(RedisDeadLetterStore):
    """Counts the writes that reach Redis (or try to)."""

    attempts = 0

    def put(self, entry: DeadLetter) -> None:
        self.attempts += 1
        super().put(entry)

    def journal_add(self, entry: JournalEntry) -> None:
        self.attempts += 1
        super().journal_add(entry)


def test_redis_stopped_in_the_middle(redis_server: RedisServer) -> None:
    default = open_store(redis_server.url)
    assert isinstance(default, BufferedStore)  # this test's wrapper, with its defaults
    assert isinstance(default.store, RedisDeadLetterStore)
    default.close()
    inner = CountingRedisStore(redis_server.url)
    # The buffer's retry interval passes only when this clock moves: here, never.
    store = BufferedStore(inner, retry_after=default.retry_after, clock=Clock())
    before = [make_entry(last_failure=T0 + i) for i in range(3)]
    for e in before:
        store.put(e)

    redis_server.stop()
    during = [make_entry(last_failure=T0 + 10 + i) for i in range(5)]
    with capture_logs() as logs:
        for e in during:
            store.put(e)  # no exception into the task path
        store.journal_add(journal := make_journal())
    # one failed attempt, then the retry interval keeps writes in memory
    assert inner.attempts == len(before) + 1
    assert store.write_errors == 6
    assert store.pending == 6
    errors = [log for log in logs if log["log_level"] == "error"]
    assert [log["entry_id"] for log in errors] == [e.id for e in during] + [journal.task_id]
    assert all(
        log["event"] == "dead-letter store unavailable, write kept in memory" for log in errors
    )
    assert "Connection refused" in errors[0]["error"]
    with pytest.raises(StoreUnavailableError, match="6 writes kept in memory"):
        store.list()

    redis_server.start()  # same port, empty (no persistence): everything must come from our buffer
    with capture_logs() as logs:
        listed = store.list()  # the next operation flushes first
    assert [(log["event"], log["flushed"]) for log in logs] == [
        ("dead-letter store back, buffered writes flushed", 6)
    ]
    assert listed == during
    assert store.pending == 0
    assert store.journal_list() == [journal]
    store.close()


def test_next_write_after_restart_flushes(redis_server: RedisServer) -> None:
    store = BufferedStore(RedisDeadLetterStore(redis_server.url), retry_after=0.0)
    first = make_entry(last_failure=T0 + 1)
    store.put(first)
    redis_server.stop()
    lost_while_down = make_entry(last_failure=T0 + 2)
    with capture_logs():
        store.put(lost_while_down)
    assert store.write_errors == 1
    redis_server.start()
    after = make_entry(last_failure=T0 + 3)
    store.put(after)  # flushes the queue (or the background drain does), then writes
    store.flush()  # the background drain may hold the queue this very moment: wait for it
    assert store.pending == 0
    check = RedisDeadLetterStore(redis_server.url)
    assert check.list() == [lost_while_down, after]  # `first` died with the old server
    check.close()
    store.close()


def test_cli_against_redis(redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    store = RedisDeadLetterStore(redis_server.url)
    entries = [make_entry(task_name=f"t{i}", last_failure=T0 + i) for i in range(3)]
    for e in entries:
        store.put(e)
    assert main(["dlq", "list", "--json"], environ={"OTEL_BGTASKS_DLQ_URL": redis_server.url}) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in listed] == [e.id for e in entries]
    assert main(["--store", redis_server.url, "dlq", "purge", "--task", "t1", "--yes"]) == 0
    assert capsys.readouterr().out == "purged 1 dead letter\n"
    assert [e.task_name for e in store.list()] == ["t0", "t2"]
    redis_server.stop()
    assert main(["--store", redis_server.url, "dlq", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("otel-bgtasks: error: Redis dead-letter store")
    assert "Traceback" not in err
    store.close()
