"""One resolved configuration (`Settings`): code over variables, the refusal policy, and the
same defaults for every process that runs tasks (the CLI, replay, recovery, a worker)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from otel_bgtasks import BackgroundTasksInstrumentor, RetryPolicy
from otel_bgtasks._execution import active_executor
from otel_bgtasks.config import DEFAULT_STORE, resolve_settings
from otel_bgtasks.errors import ConfigurationError, UnsafeConfigurationError
from otel_bgtasks.instrumentor import AutoInstrumentor
from otel_bgtasks.replay import standalone_executor
from otel_bgtasks.stores import SQLiteDeadLetterStore


def test_code_wins_over_the_variables_and_the_sources_are_known():
    env = {"OTEL_BGTASKS_TRACE_MODE": "child", "OTEL_BGTASKS_TIMEOUT": "7"}
    settings = resolve_settings({"timeout": 3.0}, env)
    assert (settings.trace_mode, settings.timeout) == ("child", 3.0)
    assert settings.from_env == frozenset({"trace_mode"})
    assert settings.dead_letter_store is DEFAULT_STORE
    with pytest.raises(TypeError, match=r"'retries'.*valid ones: circuit"):
        resolve_settings({"retries": 3}, {})


def test_a_store_url_from_the_environment_that_cannot_open_refuses(tmp_path):
    url = f"sqlite:///{tmp_path}/missing/dir/dlq.db"
    settings = resolve_settings({}, {"OTEL_BGTASKS_DLQ_URL": url})
    with pytest.raises(UnsafeConfigurationError, match=r"^OTEL_BGTASKS_DLQ_URL: .*=none"):
        settings.open_store()
    # the same URL in code: the caller's own error, not a refusal
    with pytest.raises(ConfigurationError) as in_code:
        resolve_settings({"dead_letter_store": url}, {}).open_store()
    assert not isinstance(in_code.value, UnsafeConfigurationError)


def test_durable_without_a_store_names_the_variable_that_removed_it():
    with pytest.raises(ConfigurationError, match=r"OTEL_BGTASKS_DLQ_URL=none"):
        resolve_settings({"durable": True}, {"OTEL_BGTASKS_DLQ_URL": "none"})


def test_the_standalone_executor_has_the_environment_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_BGTASKS_RETRY_ATTEMPTS", "4")
    monkeypatch.setenv("OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES", "true")
    monkeypatch.setenv("OTEL_BGTASKS_TRACE_MODE", "child")
    with SQLiteDeadLetterStore(tmp_path / "dlq.db") as store:
        executor = standalone_executor(store)
        assert isinstance(executor.defaults.retry, RetryPolicy)
        assert executor.defaults.retry.max_attempts == 4
        assert executor.redact_exception_messages is True
        assert executor.trace_mode == "child"
        assert executor.store is store


def test_the_entry_point_refuses_to_start_on_a_guarantee(monkeypatch, capsys):
    monkeypatch.setenv("OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES", "maybe")
    with pytest.raises(SystemExit) as stopped:
        AutoInstrumentor().instrument(dead_letter_store=None)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith(
        "otel-bgtasks: refusing to start: OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES='maybe'"
    )
    assert active_executor() is None


def test_the_entry_point_never_raises_into_the_distro(telemetry):
    with capture_logs() as logs:
        AutoInstrumentor().instrument(dead_letter_store=42)  # a TypeError
    assert active_executor() is None
    assert not BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry
    (error,) = [e for e in logs if e["log_level"] == "error"]
    assert "NOT instrumented" in error["event"]
    assert error["error_type"] == "TypeError"


def test_the_entry_point_instruments_through_the_one_instrumentor(telemetry):
    AutoInstrumentor().instrument(dead_letter_store=None, tracer_provider=telemetry.tracer_provider)
    try:
        assert BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry
        assert active_executor() is not None
    finally:
        AutoInstrumentor().uninstrument()
    assert active_executor() is None
