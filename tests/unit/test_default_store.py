"""The default dead-letter store: a documented place, created at the first dead letter, logged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from starlette.background import BackgroundTask
from structlog.testing import capture_logs

from otel_bgtasks import BackgroundTasksInstrumentor
from otel_bgtasks._execution import active_executor
from otel_bgtasks.cli import main
from otel_bgtasks.stores import SQLiteDeadLetterStore, default_store_path, default_store_url
from tests.unit import tasks


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("OTEL_BGTASKS_DLQ_URL", raising=False)
    return tmp_path / "state"


def test_the_default_is_in_the_users_state_directory(state_home: Path) -> None:
    assert default_store_path() == state_home / "otel-bgtasks" / "dead-letters.db"
    assert default_store_url() == f"sqlite:///{state_home}/otel-bgtasks/dead-letters.db"


async def test_created_at_the_first_dead_letter_and_logged_once(telemetry, state_home: Path):
    path = state_home / "otel-bgtasks" / "dead-letters.db"
    instrumentor = BackgroundTasksInstrumentor()
    with capture_logs() as logs:
        instrumentor.instrument(tracer_provider=telemetry.tracer_provider)
        try:
            executor = active_executor()
            assert executor is not None
            assert executor.store is not None
            tasks.BROKEN["charge"] = False
            await BackgroundTask(tasks.charge, "ok", 1)()  # a success writes nothing
            tasks.BROKEN["charge"] = True
            assert executor.store.count() == 0
            assert executor.store.list() == []
            assert not path.parent.exists()  # nothing created by instrumenting or reading
            await BackgroundTask(tasks.charge, "a", 0)()  # fails (payments down): a dead letter
            await BackgroundTask(tasks.charge, "b", 0)()
            assert path.exists()
            assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
            assert executor.store.count() == 2
        finally:
            instrumentor.uninstrument()
            tasks.CALLS.clear()
    created = [log for log in logs if log["event"] == "dead-letter store created"]
    assert created == [
        {"event": "dead-letter store created", "path": str(path), "log_level": "info"}
    ]
    assert [e.task_name for e in SQLiteDeadLetterStore(path).list()] == ["charge", "charge"]


def test_a_lazy_store_sees_a_file_another_process_created(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dlq.db"
    lazy = SQLiteDeadLetterStore(path, lazy=True)
    assert lazy.count() == 0
    assert not path.parent.exists()
    os.makedirs(path.parent)
    SQLiteDeadLetterStore(path).heartbeat("other:1:x", at=5.0)  # another process wrote it
    assert lazy.last_seen() == {"other:1:x": 5.0}
    lazy.close()


def test_the_cli_defaults_to_the_default_store(capsys, state_home: Path) -> None:
    code = main(["dlq", "list"], environ={})
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert f"the default store '{state_home}/otel-bgtasks/dead-letters.db' does not exist" in err
    default_store_path().parent.mkdir(parents=True)
    SQLiteDeadLetterStore(default_store_path()).close()
    assert main(["dlq", "list"], environ={}) == 0
    assert capsys.readouterr().out == "No dead letters.\n"
