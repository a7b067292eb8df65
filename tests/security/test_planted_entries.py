"""An attacker who can write the store plants entries naming code to run: nothing runs.

Every entry point that reads entries back (CLI replay and recover, the `DeadLetters` API, the
admin router over a real uvicorn, `recover_interrupted_tasks`) refuses them: the code never
runs, the module they name is never imported, the entry is kept and the refusal says why.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from fastapi import FastAPI

from otel_bgtasks import DeadLetters, recover_interrupted_tasks, run_dead_letter
from otel_bgtasks.cli import main
from otel_bgtasks.health import bearer_token_auth, bgtasks_router
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore
from tests.integration._server import UvicornThread
from tests.security import app_tasks
from tests.security.conftest import Planted

TASKS = "tests.security.app_tasks"
DEAD_OWNER = "attacker-host:4242:deadbeef0000"


def planted_letter(func_ref: str, *args: Any, task_name: str = "send_mail") -> DeadLetter:
    """What an attacker writes: an innocent task name, a function of their choosing."""
    return DeadLetter(
        id=uuid.uuid4().hex,
        task_name=task_name,
        func_ref=func_ref,
        payload=json.dumps({"args": list(args), "kwargs": {}}),
        error_type="ConnectionError",
        error_message="smtp down",
        traceback="",
        category="connection",
        attempts=1,
        first_failure=1.0,
        last_failure=2.0,
        reason=DeadLetterReason.EXHAUSTED,
    )


def planted_journal(func_ref: str, *args: Any) -> JournalEntry:
    return JournalEntry(
        task_id=uuid.uuid4().hex,
        task_name="send_mail",
        func_ref=func_ref,
        payload=json.dumps({"args": list(args), "kwargs": {}}),
        owner=DEAD_OWNER,
        enqueued_at=1.0,
    )


def attacks(planted: Planted) -> list[str]:
    """Function references an attacker may plant, with the arguments of `os.system`."""
    return [
        "os:system",  # a builtin of an ordinary module
        f"{planted.module}:run",  # a module whose import is the attack
        f"{TASKS}:system",  # os.system imported into a declared task module
        f"{TASKS}:app_tasks.RAN.append",  # a dotted path through a declared module
        "builtins:eval",
    ]


def plant_letters(store: SQLiteDeadLetterStore, planted: Planted) -> list[DeadLetter]:
    entries = [planted_letter(ref, planted.command) for ref in attacks(planted)]
    for entry in entries:
        store.put(entry)
    return entries


def refusal(ref: str, declared: str) -> str:
    return (
        f"refused: task {ref!r} is not a registered task of this app (declared task modules:"
        f" {declared}); decorate it with @background_task in a module given by --tasks or"
        " OTEL_BGTASKS_TASK_MODULES; the entry is kept"
    )


def flat(text: str) -> str:
    """`text` with rich's line wrapping undone."""
    return " ".join(text.split())


def sorted_by_id(entries: list[DeadLetter]) -> list[DeadLetter]:
    return sorted(entries, key=lambda e: e.id)


# -- the CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("declared", [True, False], ids=["with --tasks", "without --tasks"])
def test_cli_replay_refuses_planted_entries(
    capsys: pytest.CaptureFixture[str],
    store: SQLiteDeadLetterStore,
    planted: Planted,
    declared: bool,
) -> None:
    entries = plant_letters(store, planted)
    tasks = ["--tasks", TASKS] if declared else []
    code = main(["--store", f"sqlite:///{store.path}", *tasks, "dlq", "replay", "--all"])
    out, err = capsys.readouterr()

    assert code == 1
    assert out == f"replay: {len(entries)} refused\n"
    for entry in entries:
        expected = refusal(entry.func_ref, TASKS if declared else "none")
        assert f"refused: {entry.id} send_mail: {expected}" in flat(err)
    assert sorted_by_id(store.list()) == sorted_by_id(entries)  # kept, unchanged
    assert planted.untouched()
    assert app_tasks.RAN == []


def test_cli_list_and_show_name_the_function_and_why_it_is_refused(
    capsys: pytest.CaptureFixture[str],
    store: SQLiteDeadLetterStore,
    planted: Planted,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    entry = planted_letter("os:system", planted.command)
    store.put(entry)
    url = f"sqlite:///{store.path}"

    code = main(["--store", url, "--tasks", TASKS, "dlq", "list"])
    out, err = capsys.readouterr()
    assert code == 1
    row = out.splitlines()[2].split()
    assert (row[0], row[1], row[2], row[-4]) == (entry.id[:12], "send_mail", "os:system", "refused")
    assert flat(err) == f"refused: {entry.id} runs os:system: {refusal('os:system', TASKS)}"

    code = main(["--store", url, "--tasks", TASKS, "dlq", "show", entry.id, "--json"])
    out, _ = capsys.readouterr()
    assert code == 1
    assert json.loads(out) == {
        **entry.to_dict(),
        "check": "refused",
        "check_reason": refusal("os:system", TASKS),
    }
    assert planted.untouched()


def test_cli_recover_rerun_refuses_planted_journal_rows(
    capsys: pytest.CaptureFixture[str], store: SQLiteDeadLetterStore, planted: Planted
) -> None:
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    rows = [planted_journal(ref, planted.command) for ref in attacks(planted)]
    for row in rows:
        store.journal_add(row)

    code = main(["--store", f"sqlite:///{store.path}", "--tasks", TASKS, "recover", "--rerun"])
    out, _ = capsys.readouterr()

    assert code == 1
    assert out == f"recover: {len(rows)} refused (kept as dead letters)\n"
    assert store.journal_list() == []
    kept = {e.id: e for e in store.list()}
    assert set(kept) == {row.task_id for row in rows}  # kept where an operator looks
    for row in rows:
        assert kept[row.task_id].func_ref == row.func_ref
        assert kept[row.task_id].error_type == "UnregisteredTaskError"
        assert kept[row.task_id].error_message == refusal(row.func_ref, TASKS)
    assert planted.untouched()

    # and the dead letters recovery made of them are refused in turn
    assert main(["--store", f"sqlite:///{store.path}", "dlq", "replay", "--all"]) == 1
    capsys.readouterr()
    assert planted.untouched()


# -- the Python API ---------------------------------------------------------------------------


async def test_dead_letters_api_refuses_planted_entries(
    store: SQLiteDeadLetterStore, planted: Planted
) -> None:
    entries = plant_letters(store, planted)
    report = await DeadLetters(store).replay(None, run_dead_letter)
    assert sorted((o.entry_id, o.status, o.message) for o in report.outcomes) == sorted(
        (e.id, "refused", refusal(e.func_ref, "none")) for e in entries
    )
    for entry in entries:  # the runner itself refuses too, whoever calls it
        with pytest.raises(LookupError, match=r"^refused: task .* is not a registered task"):
            await run_dead_letter(entry)
    assert sorted_by_id(store.list()) == sorted_by_id(entries)
    assert planted.untouched()


async def test_recover_interrupted_tasks_refuses_planted_journal_rows(
    store: SQLiteDeadLetterStore, planted: Planted
) -> None:
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    rows = [planted_journal(ref, planted.command) for ref in attacks(planted)]
    for row in rows:
        store.journal_add(row)
    report = await recover_interrupted_tasks(mode="rerun", store=store)
    assert (report.refused, report.rerun_succeeded, report.rerun_failed) == (len(rows), 0, 0)
    assert {e.id for e in store.list()} == {row.task_id for row in rows}
    assert planted.untouched()


async def test_registered_tasks_still_replay_and_recover(store: SQLiteDeadLetterStore) -> None:
    """The rule is strict, not blind: decorated tasks and plain functions of a declared
    module run; what the declared module merely imported does not."""
    from otel_bgtasks.registry import declare_task_modules

    declare_task_modules(TASKS)
    ok = [
        planted_letter(f"{TASKS}:record", 1, task_name="record"),
        planted_letter(f"{TASKS}:undecorated", 2, task_name="undecorated"),
    ]
    for entry in ok:
        store.put(entry)
    report = await DeadLetters(store).replay(None, run_dead_letter)
    assert [o.status for o in report.outcomes] == ["replayed", "replayed"]
    assert sorted(app_tasks.RAN) == [("record", 1), ("undecorated", 2)]


# -- the admin router, over a real uvicorn -------------------------------------------------------


def test_admin_router_refuses_planted_entries(
    store: SQLiteDeadLetterStore, planted: Planted, instrument: Any
) -> None:
    instrument(dead_letter_store=store)
    entries = plant_letters(store, planted)
    app = FastAPI()
    app.include_router(bgtasks_router(auth=bearer_token_auth("admin-token-0123")))
    auth = {"Authorization": "Bearer admin-token-0123"}
    with UvicornThread(app) as server, server.client() as client:
        one = client.post(f"/bgtasks/dead-letters/{entries[0].id}/replay", headers=auth)
        everything = client.post("/bgtasks/dead-letters/replay", headers=auth)
        listed = client.get("/bgtasks/dead-letters", headers=auth)

    assert (one.status_code, one.json()) == (
        200,
        {"id": entries[0].id, "status": "refused", "message": refusal("os:system", "none")},
    )
    assert everything.status_code == 200
    body = everything.json()
    assert body["replayed"] == 0
    assert sorted((o["id"], o["status"]) for o in body["outcomes"]) == sorted(
        (e.id, "refused") for e in entries
    )
    assert sorted(e["id"] for e in listed.json()) == sorted(e.id for e in entries)
    assert planted.untouched()


def test_a_task_the_app_scheduled_stays_replayable_in_that_process(
    store: SQLiteDeadLetterStore, instrument: Any
) -> None:
    from starlette.background import BackgroundTask

    from otel_bgtasks.registry import isolated

    async def fail_then_replay() -> list[str]:
        await BackgroundTask(app_tasks.undecorated_fail, 1)()
        report = await DeadLetters(store).replay(None, run_dead_letter)
        return [o.status for o in report.outcomes]

    with isolated():  # a fresh process: nothing registered, nothing declared
        instrument(dead_letter_store=store)
        assert asyncio.run(fail_then_replay()) == ["failed"]  # it ran again, in this process
    assert app_tasks.RAN == [("undecorated_fail", 1), ("undecorated_fail", 1)]
    (entry,) = store.list()

    # another process (the CLI) without --tasks has not scheduled it: refused there
    url = f"sqlite:///{store.path}"
    cli = subprocess.run(
        [sys.executable, "-m", "otel_bgtasks.cli", "--store", url, "dlq", "replay", "--all"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (cli.returncode, cli.stdout) == (1, "replay: 1 refused\n")
    assert store.list() == [entry]


def test_cli_task_modules_that_cannot_be_imported_are_a_usage_error(
    capsys: pytest.CaptureFixture[str], store: SQLiteDeadLetterStore
) -> None:
    code = main(
        ["--store", f"sqlite:///{store.path}", "--tasks", "no_such_module_xyz", "dlq", "list"]
    )
    assert code == 2
    assert capsys.readouterr().err == (
        "otel-bgtasks: error: task module 'no_such_module_xyz' cannot be imported:"
        " ModuleNotFoundError: No module named 'no_such_module_xyz'\n"
    )
