"""No argument on any failure path, no message with redaction on (issue 18, cases 3 and 4).

`charge(card, api_key)` fails with a password in its message. Each failure path is driven
with structlog unconfigured (its console renderer shows every frame's locals for an
``exc_info``) and with `configure_structlog_json()`: the run (``propagate_exceptions`` off and
on), a replay (the same), recovery (a re-run that fails, and recovery itself failing while the
decoded journal rows are in its frames), the admin router (replay outcomes, a store failing),
the CLI (``dlq replay``, ``recover --rerun``) and alerting (a rule and a notifier that raise).
Everything written to file descriptors 1 and 2 and every outcome returned is checked: the
arguments never appear; with ``redact_exception_messages=True`` the password never either.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.background import BackgroundTask

from otel_bgtasks import DeadLetters, recover_interrupted_tasks, run_dead_letter
from otel_bgtasks._execution import standalone_executor
from otel_bgtasks.alerting import AlertingSpanProcessor
from otel_bgtasks.alerting.alerts import Alert
from otel_bgtasks.alerting.notifiers import Notifier
from otel_bgtasks.alerting.rules import ConsecutiveFailures
from otel_bgtasks.cli import main
from otel_bgtasks.errors import StoreUnavailableError
from otel_bgtasks.health import bearer_token_auth, bgtasks_router
from otel_bgtasks.recovery import start_recovery
from otel_bgtasks.registry import declare_task_modules
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore
from tests.conftest import Telemetry
from tests.integration._server import UvicornThread, wait_for_tasks
from tests.security.app_tasks import API_KEY, CARD, PASSWORD, charge
from tests.security.test_planted_entries import DEAD_OWNER, TASKS, planted_journal
from tests.security.test_secrets import logging_setup  # noqa: F401 - a fixture

REDACT_ENV = "OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES"
TOKEN = "admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=[False, True], ids=["messages", "redacted"])
def redact(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture(params=[False, True], ids=["kept", "propagated"])
def propagate(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def assert_clean(text: str, redact: bool) -> None:
    """No argument in `text`; no exception message either when redacted."""
    for argument in (CARD, API_KEY):
        assert argument not in text
    if redact:
        assert PASSWORD not in text


async def dead_letter_of_charge(store: SQLiteDeadLetterStore) -> None:
    with contextlib.suppress(ConnectionError):  # raised only with propagate_exceptions
        await BackgroundTask(charge, CARD, API_KEY)()
    assert store.count() == 1


class FailingRemoval(SQLiteDeadLetterStore):
    """Recovery handles a row, then the store fails to remove it (while the decoded row and
    its arguments are in the frames of the recovery loop)."""

    def journal_remove_claimed(self, task_id: str, owner: str, **kwargs: Any) -> bool:
        raise StoreUnavailableError("disk I/O error")


class StoreDownDuringReplay(SQLiteDeadLetterStore):
    def delete_claimed(self, entry_id: str, owner: str, **kwargs: Any) -> bool:
        raise StoreUnavailableError("database is locked")

    def release(self, entry_id: str, owner: str, **kwargs: Any) -> bool:
        raise StoreUnavailableError("database is locked")


# -- run --------------------------------------------------------------------------------------


async def test_run(
    capfd: pytest.CaptureFixture[str],
    store: SQLiteDeadLetterStore,
    instrument: Any,
    logging_setup: str,  # noqa: F811
    redact: bool,
    propagate: bool,
) -> None:
    instrument(
        dead_letter_store=store, redact_exception_messages=redact, propagate_exceptions=propagate
    )
    await dead_letter_of_charge(store)
    logs = "".join(capfd.readouterr())
    assert "background task failed" in logs
    assert_clean(logs, redact)


# -- replay -----------------------------------------------------------------------------------


async def test_replay(
    capfd: pytest.CaptureFixture[str],
    store: SQLiteDeadLetterStore,
    instrument: Any,
    logging_setup: str,  # noqa: F811
    redact: bool,
    propagate: bool,
) -> None:
    instrument(
        dead_letter_store=store, redact_exception_messages=redact, propagate_exceptions=propagate
    )
    await dead_letter_of_charge(store)
    capfd.readouterr()
    report = await DeadLetters(store).replay(None, run_dead_letter)
    (outcome,) = report.outcomes
    assert outcome.status == "failed"  # ran again and failed again, whatever propagates
    expected = "ConnectionError: <redacted>" if redact else "ConnectionError: gateway refused"
    assert outcome.message.startswith(expected)
    (updated,) = store.list()
    assert updated.attempts == 2  # the run, then the replay
    logs = "".join(capfd.readouterr())
    assert "background task failed" in logs
    assert_clean(logs + outcome.message, redact)


# -- recovery ---------------------------------------------------------------------------------


async def test_recovery_rerun(
    capfd: pytest.CaptureFixture[str],
    store: SQLiteDeadLetterStore,
    instrument: Any,
    logging_setup: str,  # noqa: F811
    redact: bool,
) -> None:
    declare_task_modules(TASKS)
    instrument(dead_letter_store=store, redact_exception_messages=redact)
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    store.journal_add(planted_journal(f"{TASKS}:charge", CARD, API_KEY))
    report = await recover_interrupted_tasks(mode="rerun", store=store)
    assert report.rerun_failed == 1
    logs = "".join(capfd.readouterr())
    assert "background task failed" in logs
    assert_clean(logs, redact)


async def test_recovery_itself_failing(
    capfd: pytest.CaptureFixture[str],
    tmp_path: Any,
    instrument: Any,
    logging_setup: str,  # noqa: F811
    redact: bool,
) -> None:
    declare_task_modules(TASKS)
    with FailingRemoval(tmp_path / "dlq.db") as store:
        instrument(dead_letter_store=store, redact_exception_messages=redact)
        store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
        store.journal_add(planted_journal(f"{TASKS}:record", [CARD, API_KEY]))
        recovery = start_recovery(mode="rerun", store=store)
        with pytest.raises(Exception) as raised:  # noqa: PT011 - checked below
            await recovery.wait()
        await recovery.stop()
    failure = raised.value
    members = failure.exceptions if isinstance(failure, BaseExceptionGroup) else (failure,)
    assert [type(e) for e in members] == [StoreUnavailableError]
    logs = "".join(capfd.readouterr())
    assert "recovery of interrupted durable tasks failed" in logs
    assert "disk I/O error" in logs or redact
    assert_clean(logs, redact)


def test_a_failed_background_recovery_is_never_reported_unretrieved(
    capfd: pytest.CaptureFixture[str],
    tmp_path: Any,
    logging_setup: str,  # noqa: F811
) -> None:
    """Nobody awaits it: asyncio must not log it again with its frames (`exc_info`)."""
    declare_task_modules(TASKS)

    async def start_and_forget() -> None:
        with FailingRemoval(tmp_path / "dlq.db") as store:
            store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
            store.journal_add(planted_journal(f"{TASKS}:record", [CARD, API_KEY]))
            recovery = start_recovery(mode="rerun", store=store)
            await asyncio.wait([recovery.task])

    asyncio.run(start_and_forget())
    import gc

    gc.collect()
    logs = "".join(capfd.readouterr())
    assert "never retrieved" not in logs
    assert_clean(logs, False)


# -- the admin router -----------------------------------------------------------------------


def router_app(store: SQLiteDeadLetterStore) -> FastAPI:
    app = FastAPI()
    app.include_router(bgtasks_router(auth=bearer_token_auth(TOKEN), store=store))
    return app


def test_router(
    capfd: pytest.CaptureFixture[str],
    store: SQLiteDeadLetterStore,
    instrument: Any,
    logging_setup: str,  # noqa: F811
    redact: bool,
    propagate: bool,
) -> None:
    instrument(
        dead_letter_store=store, redact_exception_messages=redact, propagate_exceptions=propagate
    )
    asyncio.run(dead_letter_of_charge(store))
    (entry,) = store.list()
    capfd.readouterr()
    with UvicornThread(router_app(store)) as server, server.client() as client:
        one = client.post(f"/bgtasks/dead-letters/{entry.id}/replay", headers=AUTH)
        every = client.post("/bgtasks/dead-letters/replay", headers=AUTH)
        wait_for_tasks()
    assert (one.status_code, one.json()["status"]) == (200, "failed")
    assert [o["status"] for o in every.json()["outcomes"]] == ["failed"]
    logs = "".join(capfd.readouterr())
    assert_clean(logs + one.text + every.text, redact)


def test_router_with_a_store_failing_mid_replay(
    capfd: pytest.CaptureFixture[str],
    tmp_path: Any,
    instrument: Any,
    logging_setup: str,  # noqa: F811
    redact: bool,
) -> None:
    with StoreDownDuringReplay(tmp_path / "dlq.db") as store:
        instrument(dead_letter_store=store, redact_exception_messages=redact)
        asyncio.run(dead_letter_of_charge(store))
        (entry,) = store.list()
        with UvicornThread(router_app(store)) as server, server.client() as client:
            one = client.post(f"/bgtasks/dead-letters/{entry.id}/replay", headers=AUTH)
            wait_for_tasks()
    assert one.status_code == 503
    assert one.json() == {"detail": "dead-letter store unavailable: database is locked"}
    logs = "".join(capfd.readouterr())
    assert_clean(logs + one.text, redact)


# -- the CLI ----------------------------------------------------------------------------------


def test_cli(
    capfd: pytest.CaptureFixture[str],
    store: SQLiteDeadLetterStore,
    logging_setup: str,  # noqa: F811
    redact: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(REDACT_ENV, "true" if redact else "false")  # the app's, and the CLI's
    executor = standalone_executor(store)  # the app that failed, without instrumentation
    asyncio.run(executor.run(executor.prepare(charge, (CARD, API_KEY), {})))
    assert store.count() == 1
    store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
    store.journal_add(planted_journal(f"{TASKS}:charge", CARD, API_KEY))
    capfd.readouterr()
    base = ["--store", f"sqlite:///{store.path}", "--tasks", TASKS]
    assert main([*base, "dlq", "replay", "--all"]) == 1
    assert main([*base, "recover", "--rerun"]) == 1
    out, err = capfd.readouterr()
    assert "failed: " in err
    assert_clean(out + err, redact)


# -- alerting ---------------------------------------------------------------------------------


class BrokenRule(ConsecutiveFailures):
    """A rule that raises on every signal (its message holds what it saw)."""

    def observe(self, signal: Any, now: float) -> list[Alert]:
        raise RuntimeError(f"rule broke on {signal!r}")


class BrokenNotifier(Notifier):
    channel = "broken"

    def send(self, alert: Alert) -> None:
        raise RuntimeError(f"webhook refused {alert!r}")


def test_alerting(
    capfd: pytest.CaptureFixture[str],
    store: SQLiteDeadLetterStore,
    telemetry: Telemetry,
    instrument: Any,
    logging_setup: str,  # noqa: F811
    redact: bool,
) -> None:
    alerting = AlertingSpanProcessor(
        [ConsecutiveFailures(1), BrokenRule(name="broken")],
        [BrokenNotifier()],
        meter_provider=telemetry.meter_provider,
    )
    telemetry.tracer_provider.add_span_processor(alerting)
    instrument(dead_letter_store=store, redact_exception_messages=redact)
    asyncio.run(dead_letter_of_charge(store))
    assert alerting.force_flush(10_000)
    alerting.shutdown()
    logs = "".join(capfd.readouterr())
    assert "bgtasks alert rule failed" in logs
    assert "broken" in logs
    assert_clean(logs, redact)


# -- every log call of the package ---------------------------------------------------------------


def test_no_log_call_of_the_package_passes_an_exception_for_rendering() -> None:
    """`exc_info=...` or a structlog ``.exception(...)`` would let the app's renderer format
    frames and their locals; the package logs `exception_fields(...)` instead (its own
    `SafeLogger.exception` does that too)."""
    import ast
    from pathlib import Path

    import otel_bgtasks

    root = Path(otel_bgtasks.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        # the package's own logger (`otel_bgtasks._logger`), whose exception() renders bounded
        safe = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "otel_bgtasks._logger"
            for alias in node.names
        } | {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", "") == "SafeLogger"
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            if any(k.arg == "exc_info" for k in node.keywords):
                found.append(f"{where} exc_info=")
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "exception"
                and isinstance(func.value, ast.Name)
                and func.value.id.endswith("log")
                and func.value.id not in safe
            ):
                found.append(f"{where} {func.value.id}.exception()")
    assert found == []
