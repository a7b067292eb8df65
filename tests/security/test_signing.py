"""Signed entries: with a key set, only entries this app signed are decoded or run."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from starlette.background import BackgroundTask

from otel_bgtasks import DeadLetters, recover_interrupted_tasks, run_dead_letter
from otel_bgtasks.cli import main
from otel_bgtasks.errors import ConfigurationError, UntrustedEntryError
from otel_bgtasks.records import DeadLetter
from otel_bgtasks.registry import declare_task_modules
from otel_bgtasks.signing import SigningKeys, signing_override
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore
from tests.security import app_tasks
from tests.security.conftest import Planted
from tests.security.test_planted_entries import DEAD_OWNER, flat, planted_journal, planted_letter

TASKS = "tests.security.app_tasks"
KEY = "k1-0123456789abcdef0123456789abcdef"
OLD_KEY = "k0-fedcba9876543210fedcba9876543210"
OTHER_KEY = "kX-00000000000000000000000000000000"

UNSIGNED = (
    "refused: the entry is not signed and a signing key is set (it was not written by this"
    " app, or before signing was enabled); review it, then sign it with"
    " `otel-bgtasks dlq adopt ID`"
)
MISMATCH = (
    "refused: the entry's signature does not match (tampered, copied from another kind of"
    " row, or signed with a key this process does not have)"
)
OLDER = (
    "refused: the entry's signature is of an older scheme (v1: it does not bind the row's"
    " kind, owner or nonce); review it, then sign it with `otel-bgtasks dlq adopt ID`"
)


@pytest.fixture(autouse=True)
def _app_tasks() -> None:
    declare_task_modules(TASKS)


def signed(entry: DeadLetter, key: str = KEY) -> DeadLetter:
    return entry.signed(SigningKeys.of(key))


async def replay_statuses(store: SQLiteDeadLetterStore, key: str | None) -> list[tuple[str, str]]:
    with signing_override(SigningKeys.of(key) if key else None):
        report = await DeadLetters(store).replay(None, run_dead_letter)
    return [(o.status, o.message) for o in report.outcomes]


async def test_an_entry_the_app_signed_replays(store: SQLiteDeadLetterStore) -> None:
    store.put(signed(planted_letter(f"{TASKS}:record", 7, task_name="record")))
    assert await replay_statuses(store, KEY) == [("replayed", "")]
    assert app_tasks.RAN == [("record", 7)]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda e: e, UNSIGNED),  # written by someone without the key
        (lambda e: signed(e, OTHER_KEY), MISMATCH),  # a key this process does not have
        (lambda e: signed(e).replace(payload='{"args":[666],"kwargs":{}}'), MISMATCH),
        (lambda e: signed(e).replace(func_ref=f"{TASKS}:undecorated"), MISMATCH),
        (lambda e: signed(e).replace(task_name="other"), MISMATCH),
        (lambda e: signed(e).replace(id="f" * 32), MISMATCH),  # a signed call moved elsewhere
        (lambda e: signed(e).replace(signature="v2:" + "0" * 64), MISMATCH),
        (lambda e: signed(e).replace(nonce="0" * 32), MISMATCH),  # another use of the call
        (lambda e: signed(e).replace(signature="v1:" + "0" * 64), OLDER),
        (
            lambda e: signed(e).replace(signature="sha1:abc"),
            "refused: the entry's signature has an unknown format",
        ),
    ],
    ids=[
        "unsigned",
        "wrong key",
        "payload",
        "function",
        "task name",
        "id",
        "forged",
        "nonce",
        "0.1 scheme",
        "format",
    ],
)
async def test_unsigned_or_tampered_entries_are_refused_and_kept(
    store: SQLiteDeadLetterStore, make: Any, message: str
) -> None:
    entry = make(planted_letter(f"{TASKS}:record", 7, task_name="record"))
    store.put(entry)
    assert await replay_statuses(store, KEY) == [("refused", message)]
    assert store.list() == [entry]  # kept, unchanged
    assert app_tasks.RAN == []
    with signing_override(SigningKeys.of(KEY)), pytest.raises(UntrustedEntryError):
        await run_dead_letter(entry)


async def test_the_signature_is_checked_before_the_function_is_looked_up(
    store: SQLiteDeadLetterStore, planted: Planted
) -> None:
    store.put(planted_letter(f"{planted.module}:run", planted.command))
    assert await replay_statuses(store, KEY) == [("refused", UNSIGNED)]
    assert planted.untouched()


async def test_rotated_keys_the_first_signs_every_one_verifies(
    store: SQLiteDeadLetterStore,
) -> None:
    old = signed(planted_letter(f"{TASKS}:record", 1, task_name="record"), OLD_KEY)
    store.put(old)
    assert await replay_statuses(store, f"{KEY},{OLD_KEY}") == [("replayed", "")]
    new = planted_letter(f"{TASKS}:record", 2, task_name="record").signed(
        SigningKeys.of(f"{KEY},{OLD_KEY}")
    )
    assert new.signature == signed(new).signature  # the first key signs
    store.put(new)
    assert await replay_statuses(store, OLD_KEY) == [("refused", MISMATCH)]  # old key retired
    assert await replay_statuses(store, KEY) == [("replayed", "")]
    assert app_tasks.RAN == [("record", 1), ("record", 2)]


async def test_an_unknown_serializer_is_refused_nothing_unpickles(
    store: SQLiteDeadLetterStore,
) -> None:
    entry = signed(
        planted_letter(f"{TASKS}:record", task_name="record").replace(
            serializer="pickle", payload="gASVIQAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAJpZJSFlFKULg=="
        )
    )
    store.put(entry)
    assert await replay_statuses(store, KEY) == [
        (
            "import_error",
            "no serializer named 'pickle' is registered; known: json (call"
            " otel_bgtasks.register_serializer in the replaying process)",
        )
    ]
    assert store.list() == [entry]


async def test_the_executor_signs_dead_letters_and_journal_rows(
    store: SQLiteDeadLetterStore, instrument: Any
) -> None:
    keys = SigningKeys.of(KEY)
    with signing_override(keys):
        instrument(dead_letter_store=store)
        await BackgroundTask(app_tasks.fail_with, 3)()
        (entry,) = store.list()
        entry.verify_signature(keys)
        report = await DeadLetters(store).replay([entry.id], run_dead_letter)
    assert [o.status for o in report.outcomes] == ["failed"]  # ran again, failed again
    (updated,) = store.list()
    assert (updated.signature, updated.attempts) == (entry.signature, entry.attempts + 1)


async def test_recovery_verifies_journal_rows_and_keeps_refused_ones_refused(
    store: SQLiteDeadLetterStore,
) -> None:
    keys = SigningKeys.of(KEY)
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    good = planted_journal(f"{TASKS}:record", 5).signed(keys)
    forged = planted_journal(f"{TASKS}:record", 6)  # unsigned
    store.journal_add(good)
    store.journal_add(forged)
    with signing_override(keys):
        report = await recover_interrupted_tasks(mode="rerun", store=store)
        assert (report.rerun_succeeded, report.refused) == (1, 1)
        assert app_tasks.RAN == [("record", 5)]
        (kept,) = store.list()
        assert (kept.id, kept.signature, kept.error_message) == (forged.task_id, "", UNSIGNED)
        # moved to the dead letters, the row is not laundered into a signed entry
        again = await DeadLetters(store).replay(None, run_dead_letter)
        assert [o.status for o in again.outcomes] == ["refused"]


async def test_dead_lettering_a_signed_journal_row_keeps_its_signature(
    store: SQLiteDeadLetterStore,
) -> None:
    keys = SigningKeys.of(KEY)
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    store.journal_add(planted_journal(f"{TASKS}:record", 8).signed(keys))
    with signing_override(keys):
        report = await recover_interrupted_tasks(mode="dead_letter", store=store)
        assert report.dead_lettered == 1
        again = await DeadLetters(store).replay(None, run_dead_letter)
    assert [o.status for o in again.outcomes] == ["replayed"]
    assert app_tasks.RAN == [("record", 8)]


def test_cli_shows_refused_entries_and_exits_1(
    capsys: pytest.CaptureFixture[str],
    store: SQLiteDeadLetterStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    good = signed(planted_letter(f"{TASKS}:record", 1, task_name="record"))
    tampered = signed(planted_letter(f"{TASKS}:record", 2, task_name="record")).replace(
        func_ref="os:system", payload=json.dumps({"args": ["touch /tmp/x"], "kwargs": {}})
    )
    store.put(good)
    store.put(tampered)
    env = {"OTEL_BGTASKS_SIGNING_KEY": KEY}
    url = f"sqlite:///{store.path}"

    code = main(["--store", url, "dlq", "list"], environ=env)
    out, err = capsys.readouterr()
    assert code == 1
    checks = {line.split()[0]: line.split()[-4] for line in out.splitlines()[2:-1]}
    assert checks == {good.id[:12]: "ok", tampered.id[:12]: "refused"}
    assert flat(err) == f"refused: {tampered.id} runs os:system: {MISMATCH}"

    code = main(["--store", url, "dlq", "show", tampered.id], environ=env)
    out, _ = capsys.readouterr()
    assert code == 1
    assert "os:system" in out
    assert f"check refused: {MISMATCH}" in flat(out)

    code = main(["--store", url, "dlq", "replay", "--all"], environ=env)
    out, _ = capsys.readouterr()
    assert (code, out) == (1, "replay: 1 replayed, 1 refused\n")
    assert store.list() == [tampered]


def test_keys_are_checked_when_configured() -> None:
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        SigningKeys.of("short")
    with pytest.raises(ConfigurationError, match="at least one key"):
        SigningKeys.of(" , ")
    assert SigningKeys.of(f" {KEY} ,{OLD_KEY}").keys == (KEY.encode(), OLD_KEY.encode())


def test_cli_refuses_a_bad_key_with_exit_2(
    capsys: pytest.CaptureFixture[str], store: SQLiteDeadLetterStore
) -> None:
    code = main(
        ["--store", f"sqlite:///{store.path}", "dlq", "list"],
        environ={"OTEL_BGTASKS_SIGNING_KEY": "short"},
    )
    assert code == 2
    assert "a signing key must be at least 16 bytes" in capsys.readouterr().err


def test_a_bad_key_fails_at_instrument_time(
    instrument: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BGTASKS_SIGNING_KEY", "too-short")
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        instrument()


async def test_the_environment_key_signs_and_verifies(
    store: SQLiteDeadLetterStore, instrument: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BGTASKS_SIGNING_KEY", f"{KEY},{OLD_KEY}")
    instrument(dead_letter_store=store)
    await BackgroundTask(app_tasks.fail_with, 4)()
    (entry,) = store.list()
    entry.verify_signature(SigningKeys.of(KEY))
    store.put(entry.replace(payload='{"args":[5],"kwargs":{}}'))
    report = await DeadLetters(store).replay(None, run_dead_letter)
    assert [(o.status, o.message) for o in report.outcomes] == [("refused", MISMATCH)]


def test_configure_signing_in_code_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from otel_bgtasks import configure_signing
    from otel_bgtasks.signing import signing_keys

    monkeypatch.setenv("OTEL_BGTASKS_SIGNING_KEY", OLD_KEY)
    with signing_override(None):  # restores the process's setting afterwards
        configure_signing([KEY, OLD_KEY])
        assert signing_keys() == SigningKeys((KEY.encode(), OLD_KEY.encode()))
        configure_signing(None)
        assert signing_keys() is None  # off, whatever the environment says
    monkeypatch.delenv("OTEL_BGTASKS_SIGNING_KEY")
    assert signing_keys() is None
