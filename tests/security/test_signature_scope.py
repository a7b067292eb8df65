"""A signature authorizes exactly one thing (issue 18, case 2), on SQLite and a real Redis.

It binds the row's kind (a dead letter, a journal row, a broker message), a journal row's owner
and enqueue time, and a per-entry nonce; the store remembers consumed nonces, recorded with
the delete of a successful replay or recovery, so a consumed entry planted again is refused.
Entries written before a key was set (or with an older key, or an older scheme) are adopted
by an operator after review: ``otel-bgtasks dlq adopt``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from otel_bgtasks import DeadLetters, recover_interrupted_tasks, run_dead_letter
from otel_bgtasks.cli import main
from otel_bgtasks.errors import UntrustedEntryError
from otel_bgtasks.records import DeadLetter, JournalEntry
from otel_bgtasks.registry import declare_task_modules
from otel_bgtasks.signing import DEAD_LETTER, JOURNAL, MESSAGE, SigningKeys, signing_override
from tests.security import app_tasks
from tests.security.conftest import Backend, sqlite_backend
from tests.security.test_planted_entries import (
    DEAD_OWNER,
    TASKS,
    flat,
    planted_journal,
    planted_letter,
)

KEY = "k1-0123456789abcdef0123456789abcdef"
OLD_KEY = "k0-fedcba9876543210fedcba9876543210"
KEYS = SigningKeys.of(KEY)
LIVE_OWNER = "other-host:77:feedface0000"

MISMATCH = (
    "refused: the entry's signature does not match (tampered, copied from another kind of"
    " row, or signed with a key this process does not have)"
)


@pytest.fixture(autouse=True)
def _app_tasks() -> None:
    declare_task_modules(TASKS)


async def replay_all(backend: Backend) -> list[tuple[str, str]]:
    with signing_override(KEYS):
        report = await DeadLetters(backend.store).replay(None, run_dead_letter)
    return [(o.status, o.message) for o in report.outcomes]


async def test_a_consumed_dead_letter_planted_again_is_refused(backend: Backend) -> None:
    entry = planted_letter(f"{TASKS}:record", "acct", task_name="record").signed(KEYS)
    backend.store.put(entry)
    assert await replay_all(backend) == [("replayed", "")]
    for _ in range(3):  # the attacker kept a copy of the signed row and plants it again
        backend.store.put(entry)
        ((status, message),) = await replay_all(backend)
        assert status == "refused"
        assert message.startswith("refused: this entry already ran (its nonce was consumed")
    assert app_tasks.RAN == [("record", "acct")]  # once, not four times
    assert backend.store.list() == [entry]  # kept for the operator, never run


async def test_a_signed_journal_row_copied_into_the_dead_letters_is_refused(
    backend: Backend,
) -> None:
    row = planted_journal(f"{TASKS}:record", 1).signed(KEYS)
    copy = DeadLetter.from_journal(row, at=1.0, keys=SigningKeys.of(OLD_KEY)).replace(
        signature=row.signature, nonce=row.nonce
    )
    backend.store.put(copy)
    assert await replay_all(backend) == [("refused", MISMATCH)]
    assert app_tasks.RAN == []


async def test_a_live_process_row_pointed_at_a_dead_owner_is_not_rerun(backend: Backend) -> None:
    store = backend.store
    store.heartbeat(LIVE_OWNER)  # alive: it heartbeats
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    row = dataclasses.replace(planted_journal(f"{TASKS}:record", 1), owner=LIVE_OWNER).signed(KEYS)
    # the attacker rewrites the live process's row as if a dead process owned it
    backend.plant_journal_raw(
        row.task_id, dataclasses.replace(row, owner=DEAD_OWNER).to_json(), DEAD_OWNER, 1.0
    )
    with signing_override(KEYS):
        report = await recover_interrupted_tasks(mode="rerun", store=store)
    assert (report.refused, report.rerun_succeeded) == (1, 0)
    assert app_tasks.RAN == []


async def test_a_row_whose_index_names_a_dead_owner_is_left_to_its_owner(
    tmp_path: Path,
) -> None:
    """Only the store's index is changed (SQLite's ``owner`` column; Redis keeps none apart
    from the signed row): the row still names the live owner, so recovery of the dead owner
    leaves it alone."""
    backend = sqlite_backend(tmp_path / "dlq.db")
    with backend.store as store:
        await recover_a_row_listed_under_a_dead_owner(backend, store)


async def recover_a_row_listed_under_a_dead_owner(backend: Backend, store: Any) -> None:
    store.heartbeat(LIVE_OWNER)
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    row = dataclasses.replace(planted_journal(f"{TASKS}:record", 1), owner=LIVE_OWNER).signed(KEYS)
    backend.plant_journal_raw(row.task_id, row.to_json(), DEAD_OWNER, 1.0)
    with signing_override(KEYS):
        report = await recover_interrupted_tasks(mode="rerun", store=store)
    assert report.total == 0
    assert app_tasks.RAN == []
    assert [r.task_id for r in store.journal_list()] == [row.task_id]  # left to its owner


async def test_a_journal_row_s_enqueue_time_is_signed(backend: Backend) -> None:
    store = backend.store
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    row = planted_journal(f"{TASKS}:record", 1).signed(KEYS)
    store.journal_add(dataclasses.replace(row, enqueued_at=row.enqueued_at + 1))
    with signing_override(KEYS):
        report = await recover_interrupted_tasks(mode="rerun", store=store)
    assert report.refused == 1
    assert app_tasks.RAN == []


async def test_a_recovered_row_planted_again_is_refused(backend: Backend) -> None:
    store = backend.store
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    row = planted_journal(f"{TASKS}:record", 1).signed(KEYS)
    store.journal_add(row)
    with signing_override(KEYS):
        first = await recover_interrupted_tasks(mode="rerun", store=store)
        store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
        store.journal_add(row)  # planted again after it ran
        second = await recover_interrupted_tasks(mode="rerun", store=store)
    assert (first.rerun_succeeded, second.total) == (1, 0)
    assert app_tasks.RAN == [("record", 1)]


async def test_a_row_recovered_as_a_dead_letter_replays_once(backend: Backend) -> None:
    store = backend.store
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    row = planted_journal(f"{TASKS}:record", 1).signed(KEYS)
    store.journal_add(row)
    with signing_override(KEYS):
        moved = await recover_interrupted_tasks(mode="dead_letter", store=store)
        assert moved.dead_lettered == 1
        (letter,) = store.list()
        KEYS.verify(DEAD_LETTER, letter.signed_fields(), letter.signature)  # re-signed as such
        assert letter.nonce == row.nonce
    assert await replay_all(backend) == [("replayed", "")]
    store.put(letter)
    assert [s for s, _ in await replay_all(backend)] == ["refused"]
    assert app_tasks.RAN == [("record", 1)]


def test_the_kind_is_an_explicit_part_of_every_signature() -> None:
    fields: dict[str, Any] = {"id": "m-1", "payload_sha256": "00" * 32, "nonce": "n"}
    signature = KEYS.sign(MESSAGE, fields)
    KEYS.verify(MESSAGE, fields, signature)
    for other in (DEAD_LETTER, JOURNAL, "anything"):
        with pytest.raises(UntrustedEntryError, match="does not match"):
            KEYS.verify(other, fields, signature)
    with pytest.raises(UntrustedEntryError, match="does not match"):
        KEYS.verify(MESSAGE, {**fields, "nonce": "m"}, signature)
    with pytest.raises(ValueError, match="kind"):
        KEYS.sign("", fields)


def test_journal_rows_bind_owner_enqueue_time_and_nonce() -> None:
    row = planted_journal(f"{TASKS}:record", 1).signed(KEYS)
    assert row.nonce
    for change in ({"owner": "x:1:y"}, {"enqueued_at": 2.0}, {"nonce": "0" * 32}):
        with pytest.raises(UntrustedEntryError):
            dataclasses.replace(row, **change).verify_signature(KEYS)
    row.verify_signature(KEYS)
    assert isinstance(row, JournalEntry)


# -- adopting entries after review --------------------------------------------------------------


def test_dlq_adopt_signs_reviewed_entries_with_the_current_key(
    backend: Backend, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    before_key = planted_letter(f"{TASKS}:record", "before", task_name="record")  # unsigned
    old_key = planted_letter(f"{TASKS}:record", "old", task_name="record").signed(
        SigningKeys.of(OLD_KEY)
    )
    current = planted_letter(f"{TASKS}:record", "current", task_name="record").signed(KEYS)
    for entry in (before_key, old_key, current):
        backend.store.put(entry)
    env = {"OTEL_BGTASKS_SIGNING_KEY": KEY}
    base = ["--store", backend.url, "--tasks", TASKS, "dlq"]

    assert main([*base, "adopt", "--all"], environ=env) == 2  # stdin is not a terminal
    out, err = capsys.readouterr()
    assert "refusing to sign 2 entries without --yes" in err
    assert before_key.id in out
    assert old_key.id in out
    assert current.id not in out
    assert "record('before')" in flat(out) or '"before"' in out  # the call, for the review

    assert main([*base, "adopt", old_key.id, "--yes"], environ=env) == 0
    out, _ = capsys.readouterr()
    assert out.strip().endswith("signed 1 entry with the current key")
    assert main([*base, "adopt", "--all", "--yes"], environ=env) == 0
    out, _ = capsys.readouterr()
    assert out.strip().endswith("signed 1 entry with the current key")
    assert main([*base, "adopt", "--all", "--yes"], environ=env) == 0
    assert capsys.readouterr().out.strip() == "nothing to adopt: every entry verifies"

    assert main([*base, "replay", "--all"], environ=env) == 0
    assert sorted(app_tasks.RAN) == [("record", v) for v in ("before", "current", "old")]


def test_dlq_adopt_needs_a_key(backend: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    backend.store.put(planted_letter(f"{TASKS}:record", 1, task_name="record"))
    assert main(["--store", backend.url, "dlq", "adopt", "--all", "--yes"], environ={}) == 2
    assert "set OTEL_BGTASKS_SIGNING_KEY" in capsys.readouterr().err
