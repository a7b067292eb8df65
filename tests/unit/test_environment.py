"""OTEL_BGTASKS_* variables: every plain-valued instrument() option, code arguments win."""

from __future__ import annotations

import re

import pytest
from structlog.testing import capture_logs
from tenacity import RetryCallState

from otel_bgtasks import BackgroundTasksInstrumentor, RetryPolicy
from otel_bgtasks._execution import active_executor
from otel_bgtasks.environment import VARIABLES, options_from_env
from otel_bgtasks.errors import UnsafeConfigurationError
from otel_bgtasks.stores import BufferedStore, SQLiteDeadLetterStore


def test_nothing_set_means_no_options():
    assert options_from_env({}) == {}
    assert options_from_env({name: "  " for name in VARIABLES}) == {}


def test_every_plain_option_has_a_variable():
    options = options_from_env(
        {
            "OTEL_BGTASKS_TRACE_MODE": "Child",
            "OTEL_BGTASKS_PROPAGATE_EXCEPTIONS": "true",
            "OTEL_BGTASKS_TIMEOUT": "2.5",
            "OTEL_BGTASKS_DURABLE": "no",
            "OTEL_BGTASKS_DLQ_URL": "sqlite:///x.db",
            "OTEL_BGTASKS_RETRY_ATTEMPTS": "5",
            "OTEL_BGTASKS_RETRY_INITIAL_DELAY": "0.25",
            "OTEL_BGTASKS_RETRY_MAX_DELAY": "4",
            "OTEL_BGTASKS_RETRY_MULTIPLIER": "3",
            "OTEL_BGTASKS_RETRY_JITTER": "0",
            "OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES": "true",
            "OTEL_BGTASKS_LOG_LOCALS": "false",
        }
    )
    retry = options.pop("retry")
    assert options == {
        "trace_mode": "child",
        "propagate_exceptions": True,
        "timeout": 2.5,
        "durable": False,
        "dead_letter_store": "sqlite:///x.db",
        "redact_exception_messages": True,
        "log_locals": False,
    }
    assert isinstance(retry, RetryPolicy)
    assert retry.max_attempts == 5
    delays = []
    for attempt in (1, 2, 3, 4):
        state = RetryCallState(retry.retrying(), fn=None, args=(), kwargs={})
        state.attempt_number = attempt
        delays.append(retry.wait(state))
    assert delays == [0.25, 0.75, 2.25, 4.0]  # 0.25 * 3**(n-1), capped at 4, no jitter


def test_backoff_alone_retries_three_times_and_none_disables_the_store():
    options = options_from_env({"OTEL_BGTASKS_RETRY_JITTER": "0", "OTEL_BGTASKS_DLQ_URL": "NONE"})
    assert options["retry"].max_attempts == 3
    assert options["dead_letter_store"] is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "OTEL_BGTASKS_TRACE_MODE",
            "parent",
            r"^OTEL_BGTASKS_TRACE_MODE='parent' is not valid; expected link or child$",
        ),
        (
            "OTEL_BGTASKS_PROPAGATE_EXCEPTIONS",
            "maybe",
            r"^OTEL_BGTASKS_PROPAGATE_EXCEPTIONS='maybe' is not valid; expected true or false$",
        ),
        (
            "OTEL_BGTASKS_DURABLE",
            "2",
            r"^OTEL_BGTASKS_DURABLE='2' is not valid; expected true or false$",
        ),
        (
            "OTEL_BGTASKS_TIMEOUT",
            "nan",
            r"^OTEL_BGTASKS_TIMEOUT='nan' is not valid; expected a number of seconds > 0$",
        ),
        (
            "OTEL_BGTASKS_TIMEOUT",
            "0",
            r"^OTEL_BGTASKS_TIMEOUT='0' is not valid; expected a number of seconds > 0$",
        ),
        ("OTEL_BGTASKS_TIMEOUT", "-1", r"^OTEL_BGTASKS_TIMEOUT='-1' is not valid"),
        (
            "OTEL_BGTASKS_RETRY_ATTEMPTS",
            "0",
            r"^OTEL_BGTASKS_RETRY_ATTEMPTS='0' is not valid; expected an integer >= 1$",
        ),
        ("OTEL_BGTASKS_RETRY_ATTEMPTS", "2.5", r"^OTEL_BGTASKS_RETRY_ATTEMPTS='2.5' is not valid"),
        (
            "OTEL_BGTASKS_RETRY_MAX_DELAY",
            "inf",
            r"^OTEL_BGTASKS_RETRY_MAX_DELAY='inf' is not valid",
        ),
        (
            "OTEL_BGTASKS_RETRY_MULTIPLIER",
            "0.5",
            r"OTEL_BGTASKS_RETRY_MULTIPLIER.*multiplier=0.5\): must be a finite number >= 1",
        ),
    ],
)
def test_a_bad_value_warns_naming_the_variable_and_the_default_applies(name, value, message):
    if name == "OTEL_BGTASKS_DURABLE":  # a guarantee: refused (see below)
        return
    with capture_logs() as logs:
        assert options_from_env({name: value, "OTEL_BGTASKS_LOG_LOCALS": "false"}) == {
            "log_locals": False  # the rest applies
        }
    (warning,) = logs
    assert warning["log_level"] == "warning"
    rendered = f"{warning['variable']}={warning['value']!r} is not valid; {warning['problem']}"
    assert re.search(message, rendered), rendered


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_BGTASKS_DURABLE", "2"),
        ("OTEL_BGTASKS_DURABLE", "ture"),
        ("OTEL_BGTASKS_REDACT_EXCEPTION_MESSAGES", "yes please"),
    ],
)
def test_a_bad_value_of_a_guarantee_refuses_naming_the_variable(name, value):
    with pytest.raises(UnsafeConfigurationError) as refused:
        options_from_env({name: value})
    assert str(refused.value).startswith(f"{name}={value!r} is not valid; expected true or false.")
    assert "Refusing to start" in str(refused.value)


@pytest.fixture
def instrumentor(telemetry):
    instrumentor = BackgroundTasksInstrumentor()
    yield instrumentor
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


def test_instrument_reads_the_variables_and_code_wins(
    telemetry, instrumentor, monkeypatch, tmp_path
):
    monkeypatch.setenv("OTEL_BGTASKS_TRACE_MODE", "child")
    monkeypatch.setenv("OTEL_BGTASKS_TIMEOUT", "7")
    monkeypatch.setenv("OTEL_BGTASKS_DLQ_URL", f"sqlite:///{tmp_path}/env.db")
    instrumentor.instrument(tracer_provider=telemetry.tracer_provider, timeout=3.0)
    executor = active_executor()
    assert executor is not None
    assert executor.trace_mode == "child"  # from the variable
    assert executor.defaults.timeout == 3.0  # code wins
    assert isinstance(executor.store, BufferedStore)
    assert isinstance(executor.store.store, SQLiteDeadLetterStore)
    assert executor.store.store.path == f"{tmp_path}/env.db"


def test_a_bad_guarantee_variable_stops_instrumentation(telemetry, instrumentor, monkeypatch):
    monkeypatch.setenv("OTEL_BGTASKS_DURABLE", "sometimes")
    with pytest.raises(UnsafeConfigurationError, match="OTEL_BGTASKS_DURABLE='sometimes'"):
        instrumentor.instrument(tracer_provider=telemetry.tracer_provider, dead_letter_store=None)
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert active_executor() is None
