"""The package's shape: one retry decision, typed options, one exception base, lazy imports."""

from __future__ import annotations

import json
import math

import pytest
from opentelemetry.trace import StatusCode
from starlette.background import BackgroundTask
from tenacity import retry_if_exception_type, stop_after_attempt, wait_none

import otel_bgtasks
from otel_bgtasks import (
    BackgroundTasksInstrumentor,
    BgTasksError,
    CircuitBreaker,
    CircuitOpenError,
    ConfigurationError,
    CorruptEntryError,
    ErrorCategory,
    NotReplayableError,
    RetryPolicy,
    SerializationError,
    StoreUnavailableError,
    TaskImportError,
    TaskTimeoutError,
    background_task,
    retry_if_category,
)
from otel_bgtasks.alerting import AlertingConfigError
from otel_bgtasks.calls import EncodedCall, JSONSerializer, decode_call, describe_call
from otel_bgtasks.instrumentor import InstrumentOptions
from otel_bgtasks.records import JournalEntry
from otel_bgtasks.registry import register_task
from tests.unit.test_resilience import Flaky

# -- one retry decision -------------------------------------------------------------------------


async def test_a_retry_strategy_alone_decides(telemetry, instrument):
    # KeyError is "unknown", a category the default policy does not retry: before, the
    # category check ran first and tenacity's retry= was never asked.
    instrument(retry=RetryPolicy(retry=retry_if_exception_type(KeyError), wait=wait_none()))
    task = Flaky(2, KeyError("cache miss"))
    await BackgroundTask(task)()
    span = telemetry.span("process Flaky")
    assert task.calls == 3
    assert span.attributes["bgtasks.task.outcome"] == "success"
    assert span.status.status_code is StatusCode.UNSET
    assert [e.attributes["bgtasks.retry.attempt"] for e in span.events] == [2, 3]


async def test_a_retry_strategy_alone_also_declines(telemetry, instrument):
    # A connection error is retried by default; a strategy that only names KeyError says no.
    instrument(retry=RetryPolicy(retry=retry_if_exception_type(KeyError), wait=wait_none()))
    task = Flaky(5, ConnectionResetError("reset"))
    await BackgroundTask(task)()
    span = telemetry.span("process Flaky")
    assert task.calls == 1
    assert span.attributes["bgtasks.task.outcome"] == "failure"


async def test_categories_compose_with_tenacity_strategies(telemetry, instrument):
    strategy = retry_if_category(ErrorCategory.VALIDATION) | retry_if_exception_type(KeyError)
    policy = RetryPolicy(retry=strategy, stop=stop_after_attempt(4), wait=wait_none())
    instrument(retry=policy)
    by_validation = Flaky(1, ValueError("bad"))
    by_type = Flaky(1, KeyError("k"))
    neither = Flaky(1, RuntimeError("boom"))
    for task in (by_validation, by_type, neither):
        await BackgroundTask(task)()
    assert (by_validation.calls, by_type.calls, neither.calls) == (2, 2, 1)
    assert policy.retries(ValueError())
    assert policy.retries(KeyError())
    assert not policy.retries(RuntimeError())


def test_an_open_circuit_is_never_retried_whatever_the_strategy():
    policy = RetryPolicy(retry=retry_if_exception_type(Exception))
    assert policy.retries(RuntimeError())
    assert not policy.retries(CircuitOpenError("open"))


def test_retry_if_category_uses_the_given_classifier():
    strategy = retry_if_category(
        ErrorCategory.BUSINESS, classifier=lambda exc: ErrorCategory.BUSINESS
    )
    policy = RetryPolicy(retry=strategy)
    assert policy.retries(RuntimeError())
    assert repr(strategy) == "retry_if_category(business)"


# -- typed options --------------------------------------------------------------------------


def test_an_unknown_instrument_keyword_names_it_and_the_valid_ones():
    instrumentor = BackgroundTasksInstrumentor()
    with pytest.raises(TypeError) as raised:
        instrumentor.instrument(retries=3, dead_letter_store=None)  # type: ignore[call-arg]
    message = str(raised.value)
    assert message.startswith("instrument() got unexpected keyword argument(s) 'retries';")
    for valid in ("retry", "dead_letter_store", "trace_mode", "error_classifier"):
        assert valid in message
    assert not instrumentor.is_instrumented_by_opentelemetry


def test_instrument_options_list_every_documented_keyword():
    assert set(InstrumentOptions.__annotations__) == {
        "tracer_provider",
        "meter_provider",
        "trace_mode",
        "propagate_exceptions",
        "start_hook",
        "end_hook",
        "retry",
        "circuit",
        "timeout",
        "durable",
        "dead_letter_store",
        "serializer",
        "error_classifier",
        "redact_exception_messages",
        "log_locals",
        "skip_dep_check",
        "raise_exception_on_conflict",
        "dispatch",
        "max_concurrency",
        "max_queued",
        "drain_timeout",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retry": "3"}, r"^retry='3': pass a RetryPolicy"),
        ({"circuit": 5}, r"^circuit=5: pass a CircuitBreaker"),
        ({"timeout": math.nan}, r"^timeout=nan: must be > 0 seconds and finite"),
        ({"timeout": "10"}, r"^timeout='10': must be a number of seconds"),
        ({"durable": "yes"}, r"^durable='yes': must be True or False"),
        ({"trace_mode": "parent"}, r"^trace_mode='parent' is not valid; use one of link, child"),
    ],
)
def test_bad_instrument_values_fail_at_once_naming_the_argument(kwargs, message):
    instrumentor = BackgroundTasksInstrumentor()
    with pytest.raises(ConfigurationError, match=message):
        instrumentor.instrument(dead_letter_store=None, **kwargs)
    assert not instrumentor.is_instrumented_by_opentelemetry


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RetryPolicy(max_attempts=math.nan), r"max_attempts=nan\): must be an integer"),
        (lambda: RetryPolicy(max_attempts=2.5), r"max_attempts=2.5\): must be an integer"),
        (lambda: RetryPolicy(max_delay=math.inf), r"max_delay=inf\): must be a finite number"),
        (lambda: RetryPolicy(jitter=math.nan), r"jitter=nan\): must be a finite number"),
        (lambda: CircuitBreaker(failure_threshold=math.nan), r"failure_threshold=nan\)"),
        (lambda: CircuitBreaker(open_duration=math.inf), r"open_duration=inf\)"),
        (lambda: background_task(timeout=math.nan), r"background_task\(timeout\)=nan"),
        (lambda: background_task(retry=3), r"background_task\(retry=3\): pass a RetryPolicy"),
    ],
)
def test_policies_reject_nan_inf_and_wrong_types(build, message):
    with pytest.raises(ConfigurationError, match=message):
        build()


async def test_options_are_resolved_once_per_function_with_defaults_applied(instrument):
    payments = CircuitBreaker("payments", failure_threshold=2)
    policy = RetryPolicy(max_attempts=2)

    @background_task(name="charge", timeout=5.0)
    async def charge() -> None: ...

    async def plain() -> None: ...

    instrument(retry=policy, circuit=payments, durable=False)
    executor = otel_bgtasks._execution.active_executor()
    assert executor is not None
    first = executor.options_for(charge)
    assert executor.options_for(charge) is first
    assert (first.name, first.retry, first.breaker, first.timeout, first.durable) == (
        "charge",
        policy,
        payments,
        5.0,
        False,
    )
    other = executor.options_for(plain)
    assert other.breaker is payments  # one named breaker shared by every task using it
    assert other.timeout is None
    assert other.is_async


# -- one exception base ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (ConfigurationError("x"), ValueError),
        (TaskTimeoutError("x"), TimeoutError),
        (CircuitOpenError("x"), RuntimeError),
        (TaskImportError("x"), LookupError),
        (NotReplayableError("x"), LookupError),
        (SerializationError("x"), TypeError),
        (CorruptEntryError("id", "x"), ValueError),
        (StoreUnavailableError("x"), RuntimeError),
        (AlertingConfigError("x"), ValueError),
    ],
)
def test_every_package_error_has_one_base_and_keeps_its_builtin(error, builtin):
    assert isinstance(error, BgTasksError)
    assert isinstance(error, builtin)


def test_business_error_is_the_users_not_ours():
    assert not issubclass(otel_bgtasks.BusinessError, BgTasksError)


# -- one encoding of a call -----------------------------------------------------------------


def module_task(*args: object, **kwargs: object) -> None: ...


register_task(module_task)  # what @background_task does: replayable by its reference


def _stored(call: EncodedCall) -> JournalEntry:
    return JournalEntry(
        task_id="t1",
        task_name="t",
        func_ref=call.func_ref,
        payload=call.payload,
        serializer=call.serializer,
        owner="o",
        enqueued_at=0.0,
    )


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


def _deep(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


def _recursive() -> list[object]:
    value: list[object] = []
    value.append(value)
    return value


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ((_deep(5000),), "nested deeper than 64"),
        ((_recursive(),), "nested deeper than 64"),
        ((10**5000,), "int too large"),
        ((Unprintable(),), "(Unprintable)"),
        (({1, 2},), "(set)"),
    ],
)
def test_a_call_that_cannot_be_stored_is_described_with_the_reason(args, why):
    call = describe_call(JSONSerializer(), module_task, args, {}, task_name="t")
    assert call.func_ref == "tests.unit.test_architecture:module_task"
    assert not call.replayable
    description = json.loads(call.payload)
    assert why in description["unreplayable"]
    assert len(call.payload) < 2_500
    with pytest.raises(NotReplayableError, match="the call cannot be replayed: argument"):
        decode_call(_stored(call))


def test_a_call_that_can_be_stored_round_trips():
    call = describe_call(JSONSerializer(), module_task, ("a", [1]), {"k": None}, task_name="t")
    assert call.replayable
    func, args, kwargs = decode_call(_stored(call))
    assert (func, args, kwargs) == (module_task, ("a", [1]), {"k": None})


# -- imports --------------------------------------------------------------------------------


def test_the_redis_store_is_still_a_public_name():
    from otel_bgtasks.stores.redis import RedisDeadLetterStore

    assert otel_bgtasks.RedisDeadLetterStore is RedisDeadLetterStore
    assert "RedisDeadLetterStore" in otel_bgtasks.__all__

