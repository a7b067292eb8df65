"""BufferedStore: task-path writes never raise while the backing store is down."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from otel_bgtasks.errors import StoreUnavailableError
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry
from otel_bgtasks.stores import BufferedStore, SQLiteDeadLetterStore
from otel_bgtasks.stores.base import DeadLetterStore
from tests.support.clock import Clock
from tests.unit.test_deadletter_contract import T0, make_entry, make_journal


class Outage(ConnectionError):
    pass


class FlakyStore(DeadLetterStore):
    """A real SQLite store behind a switch: while `up` is False every call raises `Outage`."""

    def __init__(self, inner: DeadLetterStore) -> None:
        self.inner = inner
        self.up = True
        self.calls: list[str] = []
        self.stored = threading.Condition()

    def _check(self, name: str) -> None:
        self.calls.append(name)
        if not self.up:
            raise Outage("store is down")

    def put(self, entry: DeadLetter) -> None:
        self._check("put")
        self.inner.put(entry)
        with self.stored:
            self.stored.notify_all()

    def wait_stored(self, count: int) -> None:
        """Block until the inner store holds `count` dead letters (30 s to fail with)."""
        with self.stored:
            assert self.stored.wait_for(lambda: self.inner.count() >= count, 30), self.calls

    def get(self, entry_id: str) -> DeadLetter | None:
        self._check("get")
        return self.inner.get(entry_id)

    def list(self, **kwargs: Any) -> list[DeadLetter]:
        self._check("list")
        return self.inner.list(**kwargs)

    def update(self, entry: DeadLetter) -> None:
        self._check("update")
        self.inner.update(entry)

    def delete(self, entry_id: str) -> bool:
        self._check("delete")
        return self.inner.delete(entry_id)

    def purge(self, **kwargs: Any) -> int:
        self._check("purge")
        return self.inner.purge(**kwargs)

    def count(self) -> int:
        self._check("count")
        return self.inner.count()

    def corrupt_ids(self) -> list[str]:
        self._check("corrupt_ids")
        return self.inner.corrupt_ids()

    def journal_add(self, entry: JournalEntry) -> None:
        self._check("journal_add")
        self.inner.journal_add(entry)

    def journal_remove(self, task_id: str) -> bool:
        self._check("journal_remove")
        return self.inner.journal_remove(task_id)

    def journal_list(self, *, owner: str | None = None) -> list[JournalEntry]:
        self._check("journal_list")
        return self.inner.journal_list(owner=owner)

    def heartbeat(self, owner: str, *, at: float | None = None) -> None:
        self._check("heartbeat")
        self.inner.heartbeat(owner, at=at)

    def last_seen(self) -> dict[str, float]:
        self._check("last_seen")
        return self.inner.last_seen()

    def forget_owner(self, owner: str, *, seen_before: float | None = None) -> None:
        self._check("forget_owner")
        self.inner.forget_owner(owner, seen_before=seen_before)

    def claim(self, entry_id: str, owner: str, **kwargs: Any) -> DeadLetter | None:
        self._check("claim")
        return self.inner.claim(entry_id, owner, **kwargs)

    def release(self, entry_id: str, owner: str, **kwargs: Any) -> bool:
        self._check("release")
        return self.inner.release(entry_id, owner, **kwargs)

    def delete_claimed(self, entry_id: str, owner: str) -> bool:
        self._check("delete_claimed")
        return self.inner.delete_claimed(entry_id, owner)

    def journal_claim(self, task_id: str, owner: str, **kwargs: Any) -> JournalEntry | None:
        self._check("journal_claim")
        return self.inner.journal_claim(task_id, owner, **kwargs)

    def journal_release(self, task_id: str, owner: str) -> bool:
        self._check("journal_release")
        return self.inner.journal_release(task_id, owner)

    def journal_remove_claimed(self, task_id: str, owner: str) -> bool:
        self._check("journal_remove_claimed")
        return self.inner.journal_remove_claimed(task_id, owner)

    def journal_hand_off(self, task_id: str, **kwargs: Any) -> bool:
        self._check("journal_hand_off")
        return self.inner.journal_hand_off(task_id, **kwargs)

    def close(self) -> None:
        self.calls.append("close")
        self.inner.close()


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[FlakyStore]:
    store = FlakyStore(SQLiteDeadLetterStore(tmp_path / "dlq.db"))
    yield store
    store.inner.close()  # idempotent


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def buffered(flaky: FlakyStore, clock: Clock) -> Iterator[BufferedStore]:
    buffer = BufferedStore(flaky, max_pending=5, retry_after=10.0, clock=clock)
    yield buffer
    with capture_logs():  # what a test left queued is not logged again at interpreter exit
        buffer.flush_or_log(0)


def test_writes_pass_through_while_up(buffered: BufferedStore, flaky: FlakyStore) -> None:
    entry = make_entry()
    buffered.put(entry)
    assert flaky.inner.list() == [entry]
    assert (buffered.write_errors, buffered.pending, buffered.dropped) == (0, 0, 0)


def test_outage_buffers_logs_counts_then_flushes_on_next_write(
    buffered: BufferedStore, flaky: FlakyStore, clock: Clock
) -> None:
    before = make_entry(last_failure=T0 + 1)
    buffered.put(before)
    flaky.up = False
    during = [make_entry(last_failure=T0 + 2 + i) for i in range(3)]
    with capture_logs() as logs:
        for entry in during:
            buffered.put(entry)  # must not raise
    assert buffered.write_errors == 3
    assert buffered.pending == 3
    assert [(log["event"], log["entry_id"], log["log_level"]) for log in logs] == [
        ("dead-letter store unavailable, write kept in memory", e.id, "error") for e in during
    ]
    assert logs[0]["error"] == "Outage('store is down')"
    # one attempt on the store, then the retry interval keeps writes off it
    assert flaky.calls.count("put") == 2

    flaky.up = True
    clock.now += 5  # still inside retry_after: the next write is queued behind the others
    after = make_entry(last_failure=T0 + 10)
    buffered.put(after)
    assert buffered.pending == 4
    assert flaky.inner.list() == [before]

    clock.now += 10
    last = make_entry(last_failure=T0 + 11)
    with capture_logs() as logs:
        buffered.put(last)
    assert buffered.pending == 0
    assert flaky.inner.list() == [before, *during, after, last]
    assert buffered.write_errors == 4
    assert [(log["event"], log["flushed"]) for log in logs] == [
        ("dead-letter store back, buffered writes flushed", 5)
    ]


def test_reads_flush_first_whatever_the_interval(
    buffered: BufferedStore, flaky: FlakyStore
) -> None:
    flaky.up = False
    entry = make_entry()
    buffered.put(entry)
    with pytest.raises(StoreUnavailableError, match=r"1 writes kept in memory") as raised:
        buffered.list()
    assert isinstance(raised.value.__cause__, Outage)
    flaky.up = True
    assert buffered.list() == [entry]  # no clock advance needed
    assert buffered.count() == 1
    assert buffered.pending == 0


def test_overflow_drops_oldest_and_logs_whole_entry(
    buffered: BufferedStore, flaky: FlakyStore
) -> None:
    flaky.up = False
    entries = [make_entry(last_failure=T0 + i, task_name=f"t{i}") for i in range(7)]
    with capture_logs() as logs:
        for e in entries:
            buffered.put(e)
    assert (buffered.pending, buffered.dropped, buffered.write_errors) == (5, 2, 7)
    dropped = [
        log for log in logs if log["event"] == "dead-letter buffer full, oldest write dropped"
    ]
    assert [log["entry_id"] for log in dropped] == [entries[0].id, entries[1].id]
    assert all(log["log_level"] == "error" for log in dropped)
    assert DeadLetter.from_json(dropped[0]["entry"]) == entries[0]  # restorable from the log
    flaky.up = True
    assert buffered.list() == entries[2:]


def test_journal_remove_cancels_a_queued_add(
    buffered: BufferedStore, flaky: FlakyStore, clock: Clock
) -> None:
    flaky.up = False
    finished = make_journal(enqueued_at=T0)
    running = make_journal(enqueued_at=T0 + 1)
    buffered.journal_add(finished)
    buffered.journal_add(running)
    assert buffered.journal_remove(finished.task_id) is True
    assert buffered.pending == 1
    flaky.up = True
    assert buffered.journal_list() == [running]
    # a remove for an entry already written is queued like any write while down
    flaky.up = False
    clock.now += 20
    assert buffered.journal_remove(running.task_id) is True
    assert buffered.pending == 1
    flaky.up = True
    clock.now += 20
    buffered.put(make_entry())
    assert flaky.inner.journal_list() == []


def test_a_hand_off_while_down_waits_in_order_behind_its_add(
    buffered: BufferedStore, flaky: FlakyStore, clock: Clock
) -> None:
    flaky.up = False
    row = make_journal(enqueued_at=T0)
    buffered.journal_add(row)
    assert buffered.journal_hand_off(row.task_id, owner="route:q", deadline=T0 + 60) is True
    assert buffered.pending == 2
    assert flaky.inner.journal_list() == []
    with capture_logs() as logs:
        assert buffered.flush_or_log(timeout=0) == 2  # still down: both logged whole
    assert [entry.get("entry") for entry in logs] == [
        row.to_json(),
        json.dumps(
            {"journal_hand_off": row.task_id, "owner": "route:q", "deadline": T0 + 60},
            separators=(",", ":"),
        ),
    ]
    flaky.up = True
    clock.now += 20
    buffered.journal_add(row)
    assert buffered.journal_hand_off(row.task_id, owner="route:q", deadline=T0 + 60) is True
    assert flaky.inner.journal_list() == [row.handed("route:q", T0 + 60)]


def test_journal_writes_pass_through_and_report_removal(
    buffered: BufferedStore, flaky: FlakyStore
) -> None:
    entry = make_journal()
    buffered.journal_add(entry)
    assert buffered.journal_remove(entry.task_id) is True
    assert buffered.journal_remove(entry.task_id) is False


def test_heartbeat_is_best_effort(buffered: BufferedStore, flaky: FlakyStore, clock: Clock) -> None:
    flaky.up = False
    with capture_logs() as logs:
        buffered.heartbeat("h:1:a", at=T0)
        buffered.heartbeat("h:1:a", at=T0 + 1)  # inside the retry interval: not even tried
    assert flaky.calls == ["heartbeat"]
    assert [log["event"] for log in logs] == ["dead-letter store unavailable, heartbeat skipped"]
    assert buffered.pending == 0
    flaky.up = True
    clock.now += 20
    buffered.heartbeat("h:1:a", at=T0 + 2)
    assert buffered.last_seen() == {"h:1:a": T0 + 2}


def test_operator_writes_flush_first(buffered: BufferedStore, flaky: FlakyStore) -> None:
    flaky.up = False
    entry = make_entry()
    buffered.put(entry)
    flaky.up = True
    updated = entry.with_failure(at=T0 + 99, reason=DeadLetterReason.PERMANENT)
    buffered.update(updated)
    assert buffered.get(entry.id) == updated
    assert buffered.delete(entry.id) is True
    flaky.up = False
    buffered.put(make_entry())
    flaky.up = True
    assert buffered.purge() == 1


def test_close_logs_what_could_not_be_flushed(buffered: BufferedStore, flaky: FlakyStore) -> None:
    flaky.up = False
    entry = make_entry()
    journal = make_journal()
    buffered.put(entry)
    buffered.journal_add(journal)
    with capture_logs() as logs:
        buffered.close()
    lost = [log for log in logs if log["event"].endswith("at close, write dropped")]
    assert [(log["op"], json.loads(log["entry"])) for log in lost] == [
        ("put", entry.to_dict()),
        ("journal_add", journal.to_dict()),
    ]
    assert buffered.dropped == 2
    assert flaky.calls[-1] == "close"


def test_close_flushes_when_the_store_is_back(buffered: BufferedStore, flaky: FlakyStore) -> None:
    flaky.up = False
    entry = make_entry()
    buffered.put(entry)
    flaky.up = True
    buffered.close()
    assert flaky.calls[-2:] == ["put", "close"]
    assert buffered.dropped == 0
    inner = flaky.inner
    assert isinstance(inner, SQLiteDeadLetterStore)
    with SQLiteDeadLetterStore(inner.path) as reopened:
        assert reopened.list() == [entry]


def test_concurrent_writers_during_recovery_lose_nothing(flaky: FlakyStore, clock: Clock) -> None:
    buffered = BufferedStore(flaky, max_pending=10_000, retry_after=0.0, clock=clock)
    flaky.up = False
    first = [make_entry(last_failure=T0 + i) for i in range(50)]
    for e in first:
        buffered.put(e)
    flaky.up = True
    rest = [make_entry(last_failure=T0 + 100 + i) for i in range(200)]

    def work(chunk: list[DeadLetter]) -> None:
        for e in chunk:
            buffered.put(e)

    threads = [threading.Thread(target=work, args=(rest[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert buffered.list() == first + rest
    assert buffered.pending == 0


def test_max_pending_must_be_positive(flaky: FlakyStore) -> None:
    with pytest.raises(ValueError, match="max_pending must be >= 1"):
        BufferedStore(flaky, max_pending=0)


def test_the_buffer_is_bounded_in_bytes_too(flaky: FlakyStore, clock: Clock) -> None:
    big = [make_entry(last_failure=T0 + i, error_message="x" * 1_500) for i in range(5)]
    size = len(big[0].to_json())
    buffered = BufferedStore(flaky, max_pending=1_000, max_bytes=3 * size + 10, clock=clock)
    flaky.up = False
    with capture_logs() as logs:
        for entry in big:
            buffered.put(entry)
    kept = buffered.status()
    assert (kept["pending"], kept["dropped"]) == (3, 2)
    assert kept["pending_bytes"] == sum(len(e.to_json()) for e in big[2:])
    dropped = [
        log for log in logs if log["event"] == "dead-letter buffer full, oldest write dropped"
    ]
    assert [DeadLetter.from_json(log["entry"]) for log in dropped] == big[:2]
    flaky.up = True
    assert buffered.list() == big[2:]
    assert buffered.status()["pending_bytes"] == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        BufferedStore(flaky, max_bytes=0)
    buffered.close()


def test_the_buffer_drains_by_itself_when_the_store_returns(flaky: FlakyStore) -> None:
    buffered = BufferedStore(flaky, retry_after=0.05)
    flaky.up = False
    entries = [make_entry(last_failure=T0 + i) for i in range(3)]
    for entry in entries:
        buffered.put(entry)
    assert buffered.pending == 3
    flaky.up = True  # no further call on the buffer from here
    flaky.wait_stored(3)  # written by the buffer's own thread
    assert flaky.inner.list() == entries
    buffered.close()


def test_flush_or_log_is_bounded_and_logs_every_write_whole(flaky: FlakyStore) -> None:
    release = threading.Event()

    class Hung(FlakyStore):
        def put(self, entry: DeadLetter) -> None:
            if not self.up:
                release.wait(30)  # a black-holed store: the call hangs
                raise Outage("timed out")
            super().put(entry)

    hung = Hung(flaky.inner)
    buffered = BufferedStore(hung, retry_after=60)
    hung.up = False
    entries = [make_entry(last_failure=T0 + i) for i in range(3)]
    first = threading.Thread(target=buffered.put, args=(entries[0],))
    first.start()  # the task's write hangs on the store ...
    first.join(0.1)
    release.set()
    first.join()
    release.clear()
    for entry in entries[1:]:
        buffered.put(entry)  # ... the next ones are queued without touching it
    with capture_logs() as logs:
        logged = buffered.flush_or_log(timeout=0.2)
    release.set()
    assert logged == 3
    assert [
        DeadLetter.from_json(log["entry"])
        for log in logs
        if log["event"] == "dead-letter store unavailable at close, write dropped"
    ] == entries
    assert (buffered.pending, buffered.dropped) == (0, 3)
