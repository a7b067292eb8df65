"""The behaviour every `DeadLetterStore` must have, run against SQLite
(test_deadletter_sqlite.py), the in-memory store of `otel_bgtasks.testing` (below) and Redis
(tests/integration/test_redis_store.py).

A subclass provides two fixtures: `store` (an empty store) and `inject_raw`, a function
``(entry_id, raw_text, last_failure) -> None`` writing a row the way the backend stores it,
bypassing the store's encoder (corrupt-row tests).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from otel_bgtasks.errors import CorruptEntryError
from otel_bgtasks.identity import process_identity
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry, route_owner
from otel_bgtasks.recovery import recover_interrupted
from otel_bgtasks.stores.base import DeadLetterStore
from otel_bgtasks.testing import InMemoryDeadLetterStore
from tests.support.owners import dead_owner, identity_of

T0 = 1_700_000_000.0
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"


def make_entry(**overrides: Any) -> DeadLetter:
    """A valid dead letter; `overrides` replace fields."""
    fields: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "task_name": "send_mail",
        "func_ref": "tests.unit.test_deadletter:send_mail",
        "payload": '{"args":["a@example.com"],"kwargs":{}}',
        "error_type": "ConnectionError",
        "error_message": "smtp down",
        "traceback": "Traceback (most recent call last):\nConnectionError: smtp down\n",
        "category": "connection",
        "attempts": 3,
        "first_failure": T0,
        "last_failure": T0 + 10,
        "reason": DeadLetterReason.EXHAUSTED,
        "trace_id": TRACE_ID,
        "span_id": SPAN_ID,
    }
    fields.update(overrides)
    return DeadLetter(**fields)


def make_journal(**overrides: Any) -> JournalEntry:
    fields: dict[str, Any] = {
        "task_id": uuid.uuid4().hex,
        "task_name": "send_mail",
        "func_ref": "tests.unit.test_deadletter:send_mail",
        "payload": '{"args":[],"kwargs":{}}',
        "owner": "otherhost:1234:abcdef",
        "enqueued_at": T0,
        "trace_id": TRACE_ID,
        "span_id": SPAN_ID,
    }
    fields.update(overrides)
    return JournalEntry(**fields)


class StoreContract:
    # -- dead letters -------------------------------------------------------------------------

    def test_put_get_round_trip(self, store: DeadLetterStore) -> None:
        entry = make_entry()
        store.put(entry)
        assert store.get(entry.id) == entry
        assert store.get(uuid.uuid4().hex) is None
        assert store.count() == 1

    def test_list_is_oldest_last_failure_first(self, store: DeadLetterStore) -> None:
        late = make_entry(last_failure=T0 + 300)
        early = make_entry(last_failure=T0 + 100)
        middle = make_entry(last_failure=T0 + 200)
        for e in (late, early, middle):
            store.put(e)
        assert store.list() == [early, middle, late]
        assert store.list(limit=2) == [early, middle]
        assert store.list(limit=0) == []

    def test_list_filters(self, store: DeadLetterStore) -> None:
        a = make_entry(task_name="a", reason=DeadLetterReason.EXHAUSTED, last_failure=T0 + 1)
        b = make_entry(task_name="b", reason=DeadLetterReason.TIMEOUT, last_failure=T0 + 2)
        c = make_entry(task_name="a", reason=DeadLetterReason.TIMEOUT, last_failure=T0 + 3)
        for e in (a, b, c):
            store.put(e)
        assert store.list(task="a") == [a, c]
        assert store.list(reason=DeadLetterReason.TIMEOUT) == [b, c]
        assert store.list(reason="timeout", task="a") == [c]
        assert store.list(since=T0 + 2) == [b, c]
        assert store.list(since=T0 + 2, task="a", limit=5) == [c]
        assert store.list(task="nope") == []
        with pytest.raises(ValueError, match="bogus"):
            store.list(reason="bogus")

    def test_update_replaces_and_reorders(self, store: DeadLetterStore) -> None:
        first = make_entry(last_failure=T0 + 1)
        second = make_entry(last_failure=T0 + 2)
        store.put(first)
        store.put(second)
        failed_again = first.with_failure(ConnectionError("still down"), at=T0 + 50)
        store.update(failed_again)
        assert store.list() == [second, failed_again]
        stored = store.get(first.id)
        assert stored is not None
        assert (stored.attempts, stored.error_message) == (4, "still down")
        assert store.count() == 2

    def test_delete(self, store: DeadLetterStore) -> None:
        entry = make_entry()
        store.put(entry)
        assert store.delete(entry.id) is True
        assert store.delete(entry.id) is False
        assert store.get(entry.id) is None
        assert store.list() == []
        assert store.count() == 0

    def test_purge_with_filters_then_all(self, store: DeadLetterStore) -> None:
        a = make_entry(task_name="a", last_failure=T0 + 1)
        b = make_entry(task_name="b", reason=DeadLetterReason.PERMANENT, last_failure=T0 + 2)
        c = make_entry(task_name="c", last_failure=T0 + 3)
        d = make_entry(task_name="a", last_failure=T0 + 4)
        for e in (a, b, c, d):
            store.put(e)
        assert store.purge(task="a", since=T0 + 2) == 1  # d only
        assert store.list() == [a, b, c]
        assert store.purge(reason=DeadLetterReason.PERMANENT) == 1
        assert store.list() == [a, c]
        assert store.purge(task="zzz") == 0
        assert store.purge() == 2
        assert store.list() == []
        assert store.count() == 0

    def test_concurrent_puts_from_threads(self, store: DeadLetterStore) -> None:
        entries = [make_entry(last_failure=T0 + i) for i in range(200)]
        chunks = [entries[i::8] for i in range(8)]

        def work(chunk: list[DeadLetter]) -> None:
            for e in chunk:
                store.put(e)

        threads = [threading.Thread(target=work, args=(c,)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.list() == entries

    # -- corrupt rows ---------------------------------------------------------------------------

    def test_corrupt_rows_are_skipped_reported_and_deletable(
        self, store: DeadLetterStore, inject_raw: Any
    ) -> None:
        good_before = make_entry(last_failure=T0 + 1)
        good_after = make_entry(last_failure=T0 + 5)
        store.put(good_before)
        store.put(good_after)
        not_json = uuid.uuid4().hex
        missing_field = uuid.uuid4().hex
        bad_reason = uuid.uuid4().hex
        inject_raw(not_json, "{not json", T0 + 2)
        partial = make_entry(id=missing_field).to_dict()
        del partial["payload"]
        inject_raw(missing_field, _json(partial), T0 + 3)
        inject_raw(
            bad_reason, _json({**make_entry(id=bad_reason).to_dict(), "reason": "x"}), T0 + 4
        )

        with capture_logs() as logs:
            listed = store.list()
        assert listed == [good_before, good_after]
        errors = [log for log in logs if log["log_level"] == "error"]
        assert [log["entry_id"] for log in errors] == [not_json, missing_field, bad_reason]
        assert all(log["event"] == "corrupt dead-letter entry skipped" for log in errors)
        assert "'payload'" in errors[1]["error"]
        assert sorted(store.corrupt_ids()) == sorted([not_json, missing_field, bad_reason])
        assert store.count() == 5

        with pytest.raises(CorruptEntryError, match=not_json) as raised:
            store.get(not_json)
        assert raised.value.entry_id == not_json

        assert store.delete(not_json) is True
        assert sorted(store.corrupt_ids()) == sorted([missing_field, bad_reason])
        assert store.purge() == 4
        assert store.corrupt_ids() == []

    def test_row_whose_data_names_another_id_is_corrupt(
        self, store: DeadLetterStore, inject_raw: Any
    ) -> None:
        row_id = uuid.uuid4().hex
        inject_raw(row_id, make_entry().to_json(), T0)
        assert store.list() == []
        assert store.corrupt_ids() == [row_id]

    # -- journal and owners -------------------------------------------------------------------

    def test_journal_add_list_remove(self, store: DeadLetterStore) -> None:
        mine = make_journal(owner="h:1:a", enqueued_at=T0 + 2)
        older = make_journal(owner="h:2:b", enqueued_at=T0 + 1)
        store.journal_add(mine)
        store.journal_add(older)
        assert store.journal_list() == [older, mine]
        assert store.journal_list(owner="h:1:a") == [mine]
        assert store.journal_list(owner="nobody") == []
        assert store.journal_remove(mine.task_id) is True
        assert store.journal_remove(mine.task_id) is False
        assert store.journal_list() == [older]
        assert store.count() == 0  # the journal is not the dead-letter queue

    def test_last_seen_is_the_newest_of_heartbeat_and_journal_rows(
        self, store: DeadLetterStore
    ) -> None:
        store.heartbeat("h:1:a", at=T0 + 5)
        store.heartbeat("h:1:a", at=T0 + 7)
        store.journal_add(make_journal(owner="h:1:a", enqueued_at=T0 + 100))
        store.journal_add(make_journal(owner="h:2:b", enqueued_at=T0 + 1))
        store.journal_add(make_journal(owner="h:2:b", enqueued_at=T0 + 3))
        # a freshly journaled task is a sign of life even when the heartbeat is older
        assert store.last_seen() == {"h:1:a": T0 + 100, "h:2:b": T0 + 3}
        store.forget_owner("h:1:a")
        assert store.last_seen() == {"h:1:a": T0 + 100, "h:2:b": T0 + 3}

    def test_dead_owners(self, store: DeadLetterStore) -> None:
        me = process_identity()
        fresh_remote = "elsewhere:10:aaaa"
        stale_remote = "elsewhere:11:bbbb"
        journal_only_stale = "elsewhere:12:cccc"
        gone_local = dead_owner()
        my_earlier_self = identity_of(os.getpid(), start="1")
        now = T0 + 1000
        store.heartbeat(me, at=T0)  # stale, but this process is alive
        store.heartbeat(fresh_remote, at=now - 5)
        store.heartbeat(stale_remote, at=now - 120)
        store.heartbeat(gone_local, at=now)  # fresh heartbeat, but its pid is gone
        store.heartbeat(my_earlier_self, at=now)
        store.journal_add(make_journal(owner=journal_only_stale, enqueued_at=now - 300))
        assert store.dead_owners(60, now=now) == sorted(
            [stale_remote, journal_only_stale, gone_local, my_earlier_self]
        )

    def test_recover_interrupted_moves_journal_of_dead_owners(self, store: DeadLetterStore) -> None:
        now = T0 + 1000
        dead = "elsewhere:11:bbbb"
        alive = "elsewhere:10:aaaa"
        store.heartbeat(dead, at=now - 600)
        store.heartbeat(alive, at=now)
        lost = make_journal(owner=dead, task_name="charge", enqueued_at=now - 700)
        running = make_journal(owner=alive, enqueued_at=now - 1)
        store.journal_add(lost)
        store.journal_add(running)

        with capture_logs() as logs:
            moved = recover_interrupted(store, stale_after=60, now=now)
        expected = DeadLetter.from_journal(lost, at=now)
        assert moved == [expected]
        assert expected.id == lost.task_id
        assert (expected.reason, expected.attempts, expected.category) == (
            DeadLetterReason.INTERRUPTED,
            1,
            "system",
        )
        assert (expected.trace_id, expected.span_id) == (lost.trace_id, lost.span_id)
        assert store.list() == [expected]
        assert store.journal_list() == [running]
        assert dead not in store.last_seen()
        assert [(log["event"], log["task_id"]) for log in logs] == [
            ("durable task interrupted, moved to dead letters", lost.task_id)
        ]
        # a second pass (another process racing) finds nothing more and duplicates nothing
        assert recover_interrupted(store, stale_after=60, now=now) == []
        assert store.count() == 1

    # -- claims -------------------------------------------------------------------------------

    def test_claim_is_exclusive_until_the_lease_expires(self, store: DeadLetterStore) -> None:
        entry = make_entry()
        store.put(entry)
        assert store.claim(entry.id, "A", lease=30, now=T0) == entry
        assert store.claim(entry.id, "B", lease=30, now=T0 + 10) is None
        assert store.claim(entry.id, "A", lease=30, now=T0 + 10) == entry  # renewed: T0 + 40
        assert store.claim(entry.id, "B", lease=30, now=T0 + 35) is None
        assert store.claim(entry.id, "B", lease=30, now=T0 + 41) == entry  # A's lease expired
        # A (crashed, or too slow) can no longer touch it
        assert store.release(entry.id, "A") is False
        assert store.release(entry.id, "A", entry=entry.with_failure(at=T0 + 50)) is False
        assert store.delete_claimed(entry.id, "A") is False
        assert store.get(entry.id) == entry
        assert store.delete_claimed(entry.id, "B") is True
        assert (store.get(entry.id), store.list(), store.count()) == (None, [], 0)
        assert store.claim(entry.id, "A", lease=30) is None

    def test_claim_of_a_missing_entry_is_none(self, store: DeadLetterStore) -> None:
        assert store.claim("nope", "A", lease=30) is None
        assert store.release("nope", "A") is False
        assert store.delete_claimed("nope", "A") is False

    def test_release_stores_the_update_and_frees_the_entry(self, store: DeadLetterStore) -> None:
        entry = make_entry()
        store.put(entry)
        assert store.claim(entry.id, "A", lease=30) == entry
        updated = entry.with_failure(at=T0 + 99, reason=DeadLetterReason.PERMANENT)
        assert store.release(entry.id, "A", entry=updated) is True
        assert store.get(entry.id) == updated
        assert store.list(since=T0 + 99) == [updated]
        assert store.claim(entry.id, "B", lease=30) == updated  # free at once

    def test_a_failed_replay_never_brings_back_a_deleted_entry(
        self, store: DeadLetterStore
    ) -> None:
        entry = make_entry()
        store.put(entry)
        assert store.claim(entry.id, "A", lease=30) == entry
        assert store.delete(entry.id) is True  # an operator (or a replay after expiry)
        assert store.release(entry.id, "A", entry=entry.with_failure()) is False
        assert (store.get(entry.id), store.list(), store.count()) == (None, [], 0)
        store.put(entry)  # stored again later: a fresh row, unclaimed
        assert store.claim(entry.id, "B", lease=30) == entry

    def test_corrupt_row_claim_raises_and_leaves_it_free(
        self, store: DeadLetterStore, inject_raw: Any
    ) -> None:
        inject_raw("bad", "{not json", T0)
        with pytest.raises(CorruptEntryError):
            store.claim("bad", "A", lease=30)
        with pytest.raises(CorruptEntryError):
            store.claim("bad", "B", lease=30)  # released, not held by A
        assert store.delete("bad") is True

    def test_concurrent_claims_take_each_entry_once(self, store: DeadLetterStore) -> None:
        entries = [make_entry(last_failure=T0 + i) for i in range(200)]
        for entry in entries:
            store.put(entry)
        won: dict[str, list[str]] = {f"w{i}": [] for i in range(6)}

        def work(name: str) -> None:
            for entry in entries:
                if store.claim(entry.id, name, lease=300) is not None:
                    won[name].append(entry.id)

        threads = [threading.Thread(target=work, args=(name,)) for name in won]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        taken = sorted(i for ids in won.values() for i in ids)
        assert taken == sorted(e.id for e in entries)

    def test_journal_claims(self, store: DeadLetterStore) -> None:
        first, second = make_journal(enqueued_at=T0), make_journal(enqueued_at=T0 + 1)
        store.journal_add(first)
        store.journal_add(second)
        assert store.journal_claim(first.task_id, "A", lease=30, now=T0) == first
        assert store.journal_claim(first.task_id, "B", lease=30, now=T0 + 1) is None
        assert store.journal_remove_claimed(first.task_id, "B") is False
        assert store.journal_release(first.task_id, "B") is False
        assert store.journal_release(first.task_id, "A") is True
        assert store.journal_claim(first.task_id, "B", lease=30, now=T0 + 1) == first
        assert store.journal_claim(first.task_id, "A", lease=30, now=T0 + 31) == first  # expired
        assert store.journal_remove_claimed(first.task_id, "B") is False
        assert store.journal_remove_claimed(first.task_id, "A") is True
        assert store.journal_list() == [second]
        assert store.journal_claim(first.task_id, "A", lease=30) is None
        # the owner finishing its task removes its row whatever the claims
        assert store.journal_claim(second.task_id, "A", lease=30) == second
        assert store.journal_remove(second.task_id) is True
        assert store.journal_list() == []
        assert store.journal_release(second.task_id, "A") is False

    # -- hand-off to a route (the dispatch seam) ----------------------------------------------

    def test_a_hand_off_moves_the_row_to_its_route_until_its_deadline(
        self, store: DeadLetterStore
    ) -> None:
        row = make_journal(owner=process_identity(), enqueued_at=T0, signature="v1:old")
        other = make_journal(owner="h:1:a", enqueued_at=T0 + 1)
        store.journal_add(row)
        store.journal_add(other)
        assert store.journal_claim(row.task_id, "recoverer", lease=30, now=T0) == row
        assert store.journal_hand_off(
            row.task_id, owner=route_owner("queue:a"), deadline=T0 + 60
        ) is True
        moved = row.handed(route_owner("queue:a"), T0 + 60)
        assert moved.route == "queue:a"
        assert moved.signature == "v1:old"  # None keeps the row's signature
        assert store.journal_list() == [moved, other]
        assert store.journal_list(owner="route:queue:a") == [moved]
        # the claim went with the move: anyone may claim it now
        assert store.journal_claim(row.task_id, "other", lease=30, now=T0 + 1) == moved
        # a handed-off row has no process: never a dead owner, judged by its deadline
        assert "route:queue:a" not in store.dead_owners(stale_after=1, now=T0 + 1_000_000)
        assert store.expired_hand_offs(now=T0 + 59) == []
        assert store.expired_hand_offs(now=T0 + 60) == [moved]
        # handed off again (re-sent): a new deadline, a new signature
        assert store.journal_hand_off(
            row.task_id, owner=route_owner("queue:a"), deadline=T0 + 120, signature="v1:new"
        )
        again = row.handed(route_owner("queue:a"), T0 + 120, "v1:new")
        assert store.journal_list(owner="route:queue:a") == [again]
        assert store.expired_hand_offs(now=T0 + 60) == []
        # the consumer removes the row when the task ends; a late hand-off finds nothing
        assert store.journal_remove(row.task_id) is True
        assert store.journal_hand_off(row.task_id, owner="route:queue:a", deadline=T0) is False
        assert store.journal_list() == [other]

    def test_the_store_clock_is_epoch_seconds(self, store: DeadLetterStore) -> None:
        now = store.now()  # the local clock, or the shared server's
        assert isinstance(now, float)
        assert now > T0

    def test_forget_owner_keeps_an_owner_that_came_back(self, store: DeadLetterStore) -> None:
        store.heartbeat("h:1:a", at=T0 + 10)
        store.forget_owner("h:1:a", seen_before=T0 + 5)
        assert store.last_seen() == {"h:1:a": T0 + 10}
        store.forget_owner("h:1:a", seen_before=T0 + 11)
        assert store.last_seen() == {}
        store.forget_owner("nobody", seen_before=T0)  # unknown owners are fine


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data)


class TestInMemoryStore(StoreContract):
    """`otel_bgtasks.testing.InMemoryDeadLetterStore`, the store of the `bgtasks` fixture."""

    @pytest.fixture
    def store(self) -> InMemoryDeadLetterStore:
        return InMemoryDeadLetterStore()

    @pytest.fixture
    def inject_raw(self, store: InMemoryDeadLetterStore) -> Callable[[str, str, float], None]:
        def inject(entry_id: str, raw: str, last_failure: float) -> None:
            store.put_raw(entry_id, raw, task_name="send_mail", reason="exhausted", at=last_failure)

        return inject
