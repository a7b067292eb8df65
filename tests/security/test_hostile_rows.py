"""One hostile row stops nothing (issue 18, case 1).

A row of 200,000 nested ``[`` (a few hundred kB), a row nested inside a valid record, a row
bigger than the store's row limit, bytes that are not UTF-8: each is that row's corruption
(`CorruptEntryError` naming it) on every store path of SQLite and of a real Redis, and
``dlq list``, ``dlq replay --all``, ``recover --rerun`` and `start_recovery` skip and name it
and handle the good rows.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from otel_bgtasks import DeadLetters, run_dead_letter
from otel_bgtasks.cli import main
from otel_bgtasks.errors import CorruptEntryError
from otel_bgtasks.recovery import start_recovery
from otel_bgtasks.registry import declare_task_modules
from tests.security import app_tasks
from tests.security.conftest import Backend
from tests.security.test_planted_entries import (
    DEAD_OWNER,
    TASKS,
    flat,
    planted_journal,
    planted_letter,
)

DEEP = "[" * 200_000
DEEP_OBJECT = '{"a":' * 200_000


def hostile_rows() -> dict[str, str | bytes]:
    """Rows an attacker (or a broken disk) leaves, by what is wrong with them."""
    good = planted_letter(f"{TASKS}:record", 1).to_dict()
    return {
        "deep-array": DEEP,
        "deep-object": DEEP_OBJECT,
        "deep-inside-a-record": json.dumps({**good, "task_name": None})[:-1] + ',"x":' + DEEP + "}",
        "not-utf8": b"\xff\xfe" + b"[" * 10,
        "deep-closed": "[" * 5_000 + "]" * 5_000,
    }


def record_entries(backend: Backend) -> list[Any]:
    entries = [
        planted_letter(f"{TASKS}:record", n, task_name="record").replace(last_failure=10.0 + n)
        for n in range(3)
    ]
    for entry in entries:
        backend.store.put(entry)
    return entries


def plant_hostile_letters(backend: Backend) -> list[str]:
    ids = []
    for n, (name, raw) in enumerate(hostile_rows().items()):
        row_id = f"{name}-{n}"
        backend.plant_letter_raw(row_id, raw, 10.5 + n)
        ids.append(row_id)
    return ids


def test_every_dead_letter_path_names_the_bad_rows_and_serves_the_good(backend: Backend) -> None:
    good = record_entries(backend)
    bad = plant_hostile_letters(backend)
    store = backend.store

    assert store.list() == good
    assert store.list(limit=2) == good[:2]
    assert store.list(task="record") == good
    assert sorted(store.corrupt_ids()) == sorted(bad)
    assert store.count() == len(good) + len(bad)
    for row_id in bad:
        with pytest.raises(CorruptEntryError) as raised:
            store.get(row_id)
        assert raised.value.entry_id == row_id
        with pytest.raises(CorruptEntryError):
            store.claim(row_id, "A", lease=30)
        with pytest.raises(CorruptEntryError):
            store.claim(row_id, "B", lease=30)  # released again: not held by A
    assert store.get(good[0].id) == good[0]
    assert store.purge(task="record") == len(good)
    assert store.purge() == len(bad)


def test_every_journal_path_names_the_bad_rows_and_serves_the_good(backend: Backend) -> None:
    store = backend.store
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    good = planted_journal(f"{TASKS}:record", 1)
    store.journal_add(good)
    bad = []
    for n, (name, raw) in enumerate(hostile_rows().items()):
        backend.plant_journal_raw(f"{name}-{n}", raw, DEAD_OWNER, 5.0 + n)
        bad.append(f"{name}-{n}")

    assert store.journal_list() == [good]
    assert store.journal_list(owner=DEAD_OWNER) == [good]
    assert DEAD_OWNER in store.last_seen()
    assert store.dead_owners(60) == [DEAD_OWNER]
    for row_id in bad:
        with pytest.raises(CorruptEntryError) as raised:
            store.journal_claim(row_id, "A", lease=30)
        assert raised.value.entry_id == row_id


def test_a_row_over_the_size_limit_is_corrupt_and_never_parsed(backend: Backend) -> None:
    good = record_entries(backend)
    big = json.dumps(planted_letter(f"{TASKS}:record", "x" * 300_000).to_dict())
    backend.plant_letter_raw("too-big", big, 11.5)
    backend.plant_journal_raw("too-big-journal", big, DEAD_OWNER, 5.0)
    with backend.open(max_row_bytes=100_000) as store:
        assert store.list() == good
        assert store.corrupt_ids() == ["too-big"]
        with pytest.raises(CorruptEntryError, match="over the limit of 100000"):
            store.get("too-big")
        with pytest.raises(CorruptEntryError, match="over the limit of 100000"):
            store.claim("too-big", "A", lease=30)
        assert store.journal_list() == []
        with pytest.raises(CorruptEntryError, match="over the limit of 100000"):
            store.journal_claim("too-big-journal", "A", lease=30)
        assert store.delete("too-big") is True
        assert store.journal_remove("too-big-journal") is True
        assert store.count() == len(good)


async def test_a_deep_payload_in_a_valid_record_is_that_entry_s_failure(backend: Backend) -> None:
    declare_task_modules(TASKS)
    good = record_entries(backend)
    deep = planted_letter(f"{TASKS}:record", task_name="record").replace(
        payload='{"args":' + DEEP + "}", last_failure=11.5
    )
    backend.store.put(deep)
    report = await DeadLetters(backend.store).replay(None, run_dead_letter)
    statuses = {o.entry_id: (o.status, o.message) for o in report.outcomes}
    assert statuses.pop(deep.id) == (
        "error",
        "ValueError: payload cannot be decoded by 'json': nested deeper than 66",
    )
    assert set(statuses.values()) == {("replayed", "")}
    assert sorted(app_tasks.RAN) == [("record", n) for n in range(3)]
    assert [e.id for e in backend.store.list()] == [deep.id]
    assert [e.id for e in good if backend.store.get(e.id)] == []


def test_cli_list_and_replay_all_skip_and_name_the_bad_rows(
    backend: Backend, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    good = record_entries(backend)
    bad = plant_hostile_letters(backend)
    base = ["--store", backend.url, "--tasks", TASKS]

    assert main([*base, "dlq", "list", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [e["id"] for e in json.loads(out)] == [e.id for e in good]
    for row_id in bad:
        assert row_id in flat(err)

    assert main([*base, "dlq", "replay", "--all"]) == 0
    out, err = capsys.readouterr()
    assert out == "replay: 3 replayed\n"
    for row_id in bad:
        assert row_id in flat(err)
    assert sorted(app_tasks.RAN) == [("record", n) for n in range(3)]
    assert sorted(backend.store.corrupt_ids()) == sorted(bad)


def plant_hostile_journal(backend: Backend) -> tuple[Any, list[str]]:
    backend.store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    good = planted_journal(f"{TASKS}:record", 7)
    backend.store.journal_add(good)
    bad = []
    for n, (name, raw) in enumerate(hostile_rows().items()):
        backend.plant_journal_raw(f"{name}-{n}", raw, DEAD_OWNER, 5.0 + n)
        bad.append(f"{name}-{n}")
    return good, bad


def test_cli_recover_rerun_skips_and_names_the_bad_rows(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    _, bad = plant_hostile_journal(backend)
    assert main(["--store", backend.url, "--tasks", TASKS, "recover", "--rerun"]) == 0
    out, err = capsys.readouterr()
    assert out == "recover: 1 re-run ok\n"
    for row_id in bad:
        assert row_id in flat(err)
    assert app_tasks.RAN == [("record", 7)]


async def test_start_recovery_skips_the_bad_rows(backend: Backend) -> None:
    declare_task_modules(TASKS)
    _, bad = plant_hostile_journal(backend)
    with capture_logs() as logs:
        async with start_recovery(mode="rerun", store=backend.store) as recovery:
            report = await recovery.wait()
    assert (report.rerun_succeeded, report.total) == (1, 1)
    assert app_tasks.RAN == [("record", 7)]
    named = {log["task_id"] for log in logs if log["event"] == "corrupt journal entry skipped"}
    assert named == set(bad)
