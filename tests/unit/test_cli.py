"""The otel-bgtasks CLI on a real SQLite store, with a fake replay runner passed in."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from otel_bgtasks import CircuitBreaker, background_task
from otel_bgtasks.calls import DecodedCall
from otel_bgtasks.cli import main, parse_since
from otel_bgtasks.records import DeadLetter, DeadLetterReason
from otel_bgtasks.replay import ReplayResult
from otel_bgtasks.stores import SQLiteDeadLetterStore
from tests.support.owners import dead_owner
from tests.unit.test_deadletter_contract import make_entry, make_journal

NOW = time.time()


def task_ok(value: int) -> None:
    """Replayed by the fake runner (must be importable)."""


@pytest.fixture
def url(store_path: Path) -> str:
    return f"sqlite:///{store_path}"


@pytest.fixture
def entries(store: SQLiteDeadLetterStore) -> list[DeadLetter]:
    made = [
        make_entry(
            task_name="send_mail",
            func_ref="tests.unit.test_cli:task_ok",
            reason=DeadLetterReason.EXHAUSTED,
            last_failure=NOW - 3 * 3600,
        ),
        make_entry(
            task_name="charge_card",
            func_ref="tests.unit.test_cli:task_ok",
            reason=DeadLetterReason.CIRCUIT_OPEN,
            error_type="PaymentDown",
            error_message="[bold]markup must print verbatim[/bold]",
            last_failure=NOW - 3600,
        ),
        make_entry(
            task_name="send_mail",
            func_ref="tests.unit.test_cli:task_ok",
            reason=DeadLetterReason.TIMEOUT,
            last_failure=NOW - 60,
        ),
    ]
    for e in made:
        store.put(e)
    return made


class FakeRunner:
    """Succeeds unless the entry id is in `fail`; records what it ran."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.fail = fail or set()
        self.ran: list[str] = []

    async def __call__(self, entry: DeadLetter, call: DecodedCall) -> ReplayResult:
        self.ran.append(entry.id)
        if entry.id in self.fail:
            return ReplayResult(
                ok=False, entry=entry.with_failure(ConnectionError("still down"), at=NOW)
            )
        return ReplayResult(ok=True)


def run(capsys: pytest.CaptureFixture[str], *argv: str, **kwargs: Any) -> tuple[int, str, str]:
    code = main(list(argv), **kwargs)
    out, err = capsys.readouterr()
    return code, out, err


# -- list ---------------------------------------------------------------------------------------


def test_list_table(
    capsys: pytest.CaptureFixture[str], url: str, entries: list[DeadLetter]
) -> None:
    code, out, err = run(capsys, "--store", url, "dlq", "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].strip() == "3 dead letters"
    assert lines[1].split() == ["ID", "Task", "Function", "Reason", "Tries", "Check", "Error"]
    assert lines[-1] == "IDs are shortened: a unique prefix works; --json gives full ids"
    rows = [line.split() for line in lines[2:-1]]
    assert [r[0] for r in rows] == [e.id[:12] for e in entries]  # oldest first
    assert [r[2][:8] for r in rows] == ["tests.un"] * 3  # the function that would run, clipped
    assert [r[3] for r in rows] == ["exhausted", "circuit_open", "timeout"]
    assert [r[4:6] for r in rows] == [["3", "-"]] * 3  # no key, no --tasks: nothing to check
    assert rows[0][1].startswith("send_m")
    assert rows[1][1].startswith("charge")
    assert rows[1][6].startswith("Paym")  # clipped to the terminal width
    assert all(len(line) <= 80 for line in lines)


def test_list_table_on_a_wide_terminal_shows_the_last_failure(
    capsys: pytest.CaptureFixture[str],
    url: str,
    entries: list[DeadLetter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    code, out, _ = run(capsys, "--store", url, "--tasks", __name__, "dlq", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split() == [
        "ID", "Task", "Function", "Reason", "Tries", "Last", "failure", "UTC", "Check", "Error"
    ]  # fmt: skip
    first = lines[2].split()
    assert first[2] == "tests.unit.test_cli:task_ok"
    assert first[7] == "ok"  # signature not checked (no key), function registered


def test_list_table_prints_user_text_verbatim(
    capsys: pytest.CaptureFixture[str],
    url: str,
    store: SQLiteDeadLetterStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    store.put(make_entry(task_name="[red]t[/red]", error_type="", error_message="[bold]x[/bold]"))
    code, out, _ = run(capsys, "--store", url, "dlq", "list")
    assert code == 0
    assert "[red]t[/red]" in out
    assert "[bold]x[/bo" in out


def test_list_empty(capsys: pytest.CaptureFixture[str], url: str, store: Any) -> None:
    assert run(capsys, "--store", url, "dlq", "list") == (0, "No dead letters.\n", "")


def test_list_json_with_filters(
    capsys: pytest.CaptureFixture[str], url: str, entries: list[DeadLetter]
) -> None:
    code, out, _ = run(capsys, "dlq", "list", "--store", url, "--json", "--task", "send_mail")
    assert code == 0
    unchecked = {"check": "-", "check_reason": ""}
    assert json.loads(out) == [
        {**entries[0].to_dict(), **unchecked},
        {**entries[2].to_dict(), **unchecked},
    ]

    code, out, _ = run(capsys, "dlq", "list", "--store", url, "--json", "--since", "2h")
    assert [e["id"] for e in json.loads(out)] == [entries[1].id, entries[2].id]

    code, out, _ = run(capsys, "dlq", "list", "--store", url, "--json", "--reason", "timeout")
    assert [e["id"] for e in json.loads(out)] == [entries[2].id]

    code, out, _ = run(capsys, "dlq", "list", "--store", url, "--json", "--limit", "1")
    assert [e["id"] for e in json.loads(out)] == [entries[0].id]


def test_list_reports_corrupt_rows_on_stderr(
    capsys: pytest.CaptureFixture[str], url: str, store_path: Path, entries: list[DeadLetter]
) -> None:
    with sqlite3.connect(store_path) as conn:
        conn.execute("UPDATE dead_letters SET data = '{oops' WHERE id = ?", (entries[1].id,))
    conn.close()
    # a configured structlog printing to stdout (an app's config, or a test's leftover) must
    # not break --json: the store's error log goes to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory())
    try:
        code, out, err = run(capsys, "--store", url, "dlq", "list", "--json")
    finally:
        structlog.reset_defaults()
    assert code == 0
    assert [e["id"] for e in json.loads(out)] == [entries[0].id, entries[2].id]  # stdout is JSON
    assert "corrupt dead-letter entry skipped" in err
    assert f"warning: 1 corrupt entry skipped: {entries[1].id}" in err
    assert "otel-bgtasks dlq delete ID" in err

    code, _, err = run(capsys, "--store", url, "dlq", "show", entries[1].id)
    assert code == 2
    assert f"dead-letter entry '{entries[1].id}' is corrupt" in err
    assert f"remove it with 'otel-bgtasks dlq delete {entries[1].id}'" in err

    assert run(capsys, "--store", url, "dlq", "delete", entries[1].id)[:2] == (
        0,
        "deleted 1 dead letter\n",
    )
    assert run(capsys, "--store", url, "dlq", "list", "--json")[2] == ""


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e300"])
def test_a_row_with_an_impossible_timestamp_is_corrupt_not_a_crash(
    capsys: pytest.CaptureFixture[str],
    url: str,
    store_path: Path,
    entries: list[DeadLetter],
    bad: str,
) -> None:
    fields = entries[1].to_dict()
    fields["last_failure"] = float(bad.lower() if "e" in bad else bad)
    data = json.dumps(fields)  # Python writes NaN and Infinity as bare words
    assert bad in data or "1e+300" in data
    with sqlite3.connect(store_path) as conn:
        conn.execute("UPDATE dead_letters SET data = ? WHERE id = ?", (data, entries[1].id))
    conn.close()
    code, out, err = run(capsys, "--store", url, "dlq", "list", "--json")
    assert code == 0
    assert "NaN" not in out
    assert "Infinity" not in out
    assert [e["id"] for e in json.loads(out)] == [entries[0].id, entries[2].id]
    assert f"warning: 1 corrupt entry skipped: {entries[1].id}" in err
    code, out, err = run(capsys, "--store", url, "dlq", "list")
    assert code == 0
    assert "Traceback" not in out + err
    code, _, err = run(capsys, "--store", url, "dlq", "show", entries[1].id)
    assert code == 2
    assert "is not a valid timestamp" in err


# -- show / delete --------------------------------------------------------------------------------


def test_show(capsys: pytest.CaptureFixture[str], url: str, entries: list[DeadLetter]) -> None:
    entry = entries[1]
    code, out, err = run(capsys, "--store", url, "dlq", "show", entry.id)
    assert (code, err) == (0, "")
    for expected in (
        entry.id,
        "charge_card",
        "tests.unit.test_cli:task_ok",
        "circuit_open",
        "PaymentDown: [bold]markup must print verbatim[/bold]",
        entry.trace_id,
        entry.span_id,
        "traceback:",
        "ConnectionError: smtp down",
    ):
        assert expected in out

    code, out, _ = run(capsys, "--store", url, "dlq", "show", entry.id[:8], "--json")
    assert (code, json.loads(out)) == (0, {**entry.to_dict(), "check": "-", "check_reason": ""})


def test_show_unknown_and_ambiguous_ids(
    capsys: pytest.CaptureFixture[str], url: str, store: SQLiteDeadLetterStore
) -> None:
    store.put(make_entry(id="abcd" + "0" * 28))
    store.put(make_entry(id="abcd" + "1" * 28))
    code, out, err = run(capsys, "--store", url, "dlq", "show", "nope")
    assert (code, out) == (2, "")
    assert (
        err == "otel-bgtasks: error: no dead letter with id 'nope' (see: otel-bgtasks dlq list)\n"
    )
    code, _, err = run(capsys, "--store", url, "dlq", "show", "abcd")
    assert code == 2
    assert "id prefix 'abcd' is ambiguous" in err
    assert run(capsys, "--store", url, "dlq", "show", "abcd1", "--json")[0] == 0
    code, _, err = run(capsys, "--store", url, "dlq", "show", "ab")
    assert (code, err) == (
        2,
        "otel-bgtasks: error: no dead letter with id 'ab': an abbreviated id needs at least 4"
        " characters (see: otel-bgtasks dlq list)\n",
    )


def test_delete_checks_every_id_first(
    capsys: pytest.CaptureFixture[str], url: str, entries: list[DeadLetter]
) -> None:
    code, _, err = run(capsys, "--store", url, "dlq", "delete", entries[0].id, "f" * 32)
    assert code == 2
    assert "no dead letter with id 'fffff" in err
    assert run(capsys, "--store", url, "dlq", "delete", entries[0].id, entries[1].id[:6]) == (
        0,
        "deleted 2 dead letters\n",
        "",
    )
    with SQLiteDeadLetterStore(url.removeprefix("sqlite:///")) as check:
        assert check.list() == [entries[2]]


# -- replay -----------------------------------------------------------------------------------


def test_replay_ids(
    capsys: pytest.CaptureFixture[str], url: str, entries: list[DeadLetter], store_path: Path
) -> None:
    runner = FakeRunner()
    code, out, _ = run(
        capsys,
        "--store",
        url,
        "--tasks",
        __name__,
        "dlq",
        "replay",
        entries[2].id,
        entries[0].id[:10],
        runner=runner,
    )
    assert (code, out) == (0, "replay: 2 replayed\n")
    assert runner.ran == [entries[2].id, entries[0].id]
    with SQLiteDeadLetterStore(store_path) as check:
        assert check.list() == [entries[1]]


def test_replay_all_with_filter_and_failure(
    capsys: pytest.CaptureFixture[str], url: str, entries: list[DeadLetter], store_path: Path
) -> None:
    runner = FakeRunner(fail={entries[2].id})
    code, out, err = run(
        capsys,
        "--store",
        url,
        "dlq",
        "replay",
        "--all",
        "--task",
        "send_mail",
        runner=runner,
        environ={"OTEL_BGTASKS_TASK_MODULES": __name__},
    )
    assert code == 1
    assert out == "replay: 1 replayed, 1 failed\n"
    assert f"failed: {entries[2].id} send_mail: ConnectionError: still down" in err
    assert runner.ran == [entries[0].id, entries[2].id]
    with SQLiteDeadLetterStore(store_path) as check:
        kept = check.list()
    assert [e.id for e in kept] == [entries[1].id, entries[2].id]
    assert kept[1].attempts == entries[2].attempts + 1


def test_replay_reports_unimportable_task(
    capsys: pytest.CaptureFixture[str], url: str, store: SQLiteDeadLetterStore
) -> None:
    gone = make_entry(func_ref="tests.unit.test_cli:renamed_task")
    store.put(gone)
    runner = FakeRunner()
    code, out, err = run(
        capsys, "--store", url, "dlq", "replay", "--all", "--tasks", __name__, runner=runner
    )
    assert code == 1
    assert out == "replay: 1 refused\n"
    assert "refused: task 'tests.unit.test_cli:renamed_task' is not a registered task" in err
    assert runner.ran == []
    assert store.list() == [gone]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to replay: give entry ids or --all"),
        (["--all", "abc12345"], "give entry ids or --all, not both"),
        (["abc12345", "--task", "x"], "select entries for --all only"),
        (["0123456789"], "no dead letter with id '0123456789'"),
    ],
)
def test_replay_usage_errors(
    capsys: pytest.CaptureFixture[str], url: str, store: Any, argv: list[str], message: str
) -> None:
    runner = FakeRunner()
    code, out, err = run(capsys, "--store", url, "dlq", "replay", *argv, runner=runner)
    assert (code, out) == (2, "")
    assert err.startswith("otel-bgtasks: error: ")
    assert message in err
    assert runner.ran == []


CALLS: list[int] = []


def record_call(value: int) -> None:
    """Replayed through the default runner."""
    CALLS.append(value)


def test_replay_uses_the_default_runner(
    capsys: pytest.CaptureFixture[str], url: str, store: SQLiteDeadLetterStore
) -> None:
    entry = make_entry(
        func_ref="tests.unit.test_cli:record_call", payload='{"args":[7],"kwargs":{}}'
    )
    store.put(entry)
    CALLS.clear()
    code, out, _ = run(capsys, "--store", url, "dlq", "replay", entry.id, "--tasks", __name__)
    assert (code, out) == (0, "replay: 1 replayed\n")
    assert CALLS == [7]
    assert store.list() == []


# -- recover ----------------------------------------------------------------------------------


def test_recover_dead_letters_tasks_of_dead_processes(
    capsys: pytest.CaptureFixture[str], url: str, store: SQLiteDeadLetterStore
) -> None:
    assert run(capsys, "--store", url, "recover") == (
        0,
        "recover: no interrupted durable tasks\n",
        "",
    )
    crashed = dead_owner()
    lost = make_journal(owner=crashed, func_ref="tests.unit.test_cli:record_call")
    store.journal_add(lost)
    code, out, _ = run(capsys, "--store", url, "recover")
    assert (code, out) == (0, "recover: 1 dead-lettered\n")
    (entry,) = store.list()
    assert (entry.id, entry.reason, entry.task_name) == (
        lost.task_id,
        DeadLetterReason.INTERRUPTED,
        lost.task_name,
    )
    assert store.journal_list() == []


def test_recover_rerun(
    capsys: pytest.CaptureFixture[str], url: str, store: SQLiteDeadLetterStore
) -> None:
    stale_remote = "another-host:42:abcd"
    store.heartbeat(stale_remote, at=NOW - 3600)
    store.journal_add(
        make_journal(
            owner=stale_remote,
            func_ref="tests.unit.test_cli:record_call",
            payload='{"args":[11],"kwargs":{}}',
        )
    )
    CALLS.clear()
    code, out, _ = run(
        capsys, "--store", url, "--tasks", __name__, "recover", "--rerun", "--stale-after", "600"
    )
    assert (code, out) == (0, "recover: 1 re-run ok\n")
    assert CALLS == [11]
    assert store.journal_list() == []
    assert store.list() == []


# -- purge ------------------------------------------------------------------------------------


def test_purge(
    capsys: pytest.CaptureFixture[str], url: str, entries: list[DeadLetter], store_path: Path
) -> None:
    code, out, err = run(capsys, "--store", url, "dlq", "purge", "--reason", "exhausted")
    assert (code, out) == (2, "")
    assert "refusing to purge 1 dead letter without --yes" in err
    assert run(capsys, "--store", url, "dlq", "purge", "--reason", "exhausted", "--yes") == (
        0,
        "purged 1 dead letter\n",
        "",
    )
    assert run(capsys, "--store", url, "dlq", "purge", "--task", "nope") == (
        0,
        "nothing to purge\n",
        "",
    )
    assert run(capsys, "--store", url, "dlq", "purge", "-y")[1] == "purged 2 dead letters\n"
    with SQLiteDeadLetterStore(store_path) as check:
        assert check.count() == 0


# -- store selection and usage errors ---------------------------------------------------------


def test_store_from_environment(
    capsys: pytest.CaptureFixture[str], url: str, entries: list[DeadLetter]
) -> None:
    code, out, _ = run(capsys, "dlq", "list", "--json", environ={"OTEL_BGTASKS_DLQ_URL": url})
    assert [e["id"] for e in json.loads(out)] == [e.id for e in entries]
    # --store wins over the environment
    code, _, err = run(
        capsys,
        "dlq",
        "list",
        "--store",
        "sqlite:////nonexistent/x.store_path",
        environ={"OTEL_BGTASKS_DLQ_URL": url},
    )
    assert code == 2
    assert "file '/nonexistent/x.store_path' does not exist" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dlq", "list"], "no dead-letter store: pass --store URL or set OTEL_BGTASKS_DLQ_URL"),
        (["--store", "mongodb://x", "dlq", "list"], "unsupported dead-letter store URL"),
        (["--store", "sqlite:///", "dlq", "list"], "invalid SQLite URL"),
    ],
)
def test_store_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv, environ={})
    assert (code, out) == (2, "")
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dlq", "list", "--since", "yesterday"], "invalid time 'yesterday'"),
        (["dlq", "list", "--reason", "bored"], "invalid reason 'bored': use one of exhausted"),
        (["dlq", "list", "--limit", "0"], "expected a positive integer"),
        (["dlq"], "required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["recover", "--stale-after", "-1"], "expected a positive number, got '-1'"),
    ],
)
def test_argument_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv, environ={})
    assert (code, out) == (2, "")
    assert message in err


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "dlq" in out
    assert "recover" in out
    assert "demo" in out


def test_demo_is_dispatched_with_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0
    assert out.startswith("usage: otel-bgtasks demo")


def test_parse_since() -> None:
    now = 1_700_000_000.0
    assert parse_since("90s", now=now) == now - 90
    assert parse_since("5m", now=now) == now - 300
    assert parse_since("2h", now=now) == now - 7200
    assert parse_since("1.5d", now=now) == now - 1.5 * 86400
    assert parse_since("1w", now=now) == now - 604800
    assert parse_since("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert parse_since("2023-11-14T23:13:20+01:00") == 1_700_000_000.0


def test_task_modules_are_found_from_the_current_directory_like_celerys_a(
    capsys: pytest.CaptureFixture[str],
    url: str,
    store: SQLiteDeadLetterStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``otel-bgtasks`` is a console script: its sys.path starts with its bin directory, not
    the project directory the operator runs it from (issue 19: `No module named 'shop'`)."""
    project = tmp_path / "project"
    (project / "cwdshop").mkdir(parents=True)
    (project / "cwdshop" / "__init__.py").write_text("")
    (project / "cwdshop" / "tasks.py").write_text("def sync_crm(order_id):\n    pass\n")
    store.put(make_entry(task_name="sync-crm", func_ref="cwdshop.tasks:sync_crm"))
    monkeypatch.chdir(project)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.delitem(sys.modules, "cwdshop", raising=False)
    monkeypatch.delitem(sys.modules, "cwdshop.tasks", raising=False)
    try:
        code, out, err = run(
            capsys, "--store", url, "--tasks", "cwdshop.tasks", "dlq", "list", "--json"
        )
    finally:
        for name in ("cwdshop.tasks", "cwdshop"):
            sys.modules.pop(name, None)
    assert (code, err) == (0, "")
    (listed,) = json.loads(out)
    assert (listed["func_ref"], listed["check"]) == ("cwdshop.tasks:sync_crm", "ok")


_replay_breaker = CircuitBreaker("cli-replay-payments", failure_threshold=2, open_duration=3600)


@background_task(name="cli-charge", circuit=_replay_breaker)
def still_down(order_id: int) -> None:
    """Its downstream is still down: every replay fails until the breaker opens."""
    raise ConnectionRefusedError(f"payments-api refused order {order_id}")


@background_task(name="cli-charge-once")
def down_once(order_id: int) -> None:
    raise ConnectionRefusedError(f"payments-api refused order {order_id}")


def test_replay_stops_when_a_breaker_opens_and_prints_one_line_per_failure(
    capsys: pytest.CaptureFixture[str], url: str, store: SQLiteDeadLetterStore, store_path: Path
) -> None:
    """Issue 19: `dlq replay --all` ploughed on after its own breaker opened (187 refusals
    that never ran, 5,579 lines of tracebacks). Now: the failures (one line each), then one
    line for the refusal, and the rest reported as not run, kept unchanged."""
    made = [
        make_entry(
            task_name="cli-charge",
            func_ref="tests.unit.test_cli:still_down",
            payload=json.dumps({"args": [n], "kwargs": {}}),
            last_failure=NOW - 100 + n,
        )
        for n in range(6)
    ]
    for entry in made:
        store.put(entry)
    code, out, err = run(capsys, "--store", url, "--tasks", __name__, "dlq", "replay", "--all")
    assert (code, out) == (1, "replay: 2 failed, 4 not run\n")
    # the breaker's own warning (it opened), then the CLI's lines: one per failure, one for
    # the refusal, one summary
    (opened,) = [line for line in err.splitlines() if "circuit breaker state change" in line]
    assert "to_state=open" in opened
    lines = [line for line in err.splitlines() if line not in (opened, "")]
    assert lines[:2] == [
        f"failed: {made[0].id} cli-charge: ConnectionRefusedError: payments-api refused order 0",
        f"failed: {made[1].id} cli-charge: ConnectionRefusedError: payments-api refused order 1",
    ]
    assert len(lines) == 4
    assert [line for line in lines if line.startswith("stopped")] == [
        f"stopped: {made[2].id} cli-charge: circuit 'cli-replay-payments' opened; replay again"
        " once it closes",
        "stopped after circuit 'cli-replay-payments' opened; replay again once it closes: 4"
        " entries not run (kept unchanged)",
    ]
    assert "Traceback" not in err
    with SQLiteDeadLetterStore(store_path) as check:
        kept = {e.id: e for e in check.list()}
    assert [kept[e.id].attempts for e in made] == [4, 4, 3, 3, 3, 3]  # the rest unchanged
    assert [kept[e.id] for e in made[2:]] == made[2:]


def test_replay_prints_tracebacks_on_request(
    capsys: pytest.CaptureFixture[str], url: str, store: SQLiteDeadLetterStore
) -> None:
    entry = make_entry(
        task_name="cli-charge-once",
        func_ref="tests.unit.test_cli:down_once",
        payload=json.dumps({"args": [7], "kwargs": {}}),
    )
    store.put(entry)
    code, _out, err = run(
        capsys, "--store", url, "--tasks", __name__, "dlq", "replay", entry.id, "--traceback"
    )
    assert code == 1
    assert err.startswith(
        f"failed: {entry.id} cli-charge-once: ConnectionRefusedError: payments-api refused"
        " order 7\n"
        "Traceback (most recent call last):\n"
    )
    assert err.rstrip().endswith("ConnectionRefusedError: payments-api refused order 7")


def test_a_redis_url_without_the_redis_extra_is_a_usage_error_not_a_traceback() -> None:
    """README: exit 2, a message, no traceback (issue 19 saw a traceback and exit 1). The
    missing package is simulated in a child interpreter."""
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from otel_bgtasks.cli import main\n"
        "sys.exit(main(['--store', 'redis://127.0.0.1:1/0', 'dlq', 'list']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "otel-bgtasks: error: RedisDeadLetterStore needs the redis package:"
        " pip install 'otel-bgtasks[redis]'\n"
    )
