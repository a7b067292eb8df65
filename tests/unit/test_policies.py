"""Retry, classification and circuit breaker as pure functions with an injected clock."""

from __future__ import annotations

import httpx
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tenacity import RetryCallState, stop_after_delay, wait_fixed

from otel_bgtasks import BusinessError, CircuitBreaker, ErrorCategory, RetryPolicy, classify_error
from otel_bgtasks.circuit import CircuitSnapshot, CircuitState, _Config, transition
from tests.support.clock import Clock


class Model(pydantic.BaseModel):
    n: int


def _validation_error() -> pydantic.ValidationError:
    try:
        Model(n="x")  # type: ignore[arg-type]
    except pydantic.ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("exc", "category"),
    [
        (ConnectionRefusedError(), ErrorCategory.CONNECTION),
        (httpx.ConnectError("refused"), ErrorCategory.CONNECTION),
        (httpx.ReadTimeout("slow"), ErrorCategory.TIMEOUT),
        (TimeoutError(), ErrorCategory.TIMEOUT),
        (_validation_error(), ErrorCategory.VALIDATION),
        (ValueError("bad"), ErrorCategory.VALIDATION),
        (type("PaymentRefused", (BusinessError,), {})(), ErrorCategory.BUSINESS),
        (MemoryError(), ErrorCategory.SYSTEM),
        (PermissionError(), ErrorCategory.SYSTEM),
        (RuntimeError(), ErrorCategory.UNKNOWN),
    ],
)
def test_default_classifier(exc, category):
    assert classify_error(exc) is category


def _state(policy: RetryPolicy, attempt: int, exc: BaseException, elapsed: float = 0.0):
    state = RetryCallState(policy.retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    state.outcome_timestamp = state.start_time + elapsed
    return state


def test_retry_policy_defaults_retry_only_transient_errors():
    policy = RetryPolicy(max_attempts=3)
    assert policy.retry(_state(policy, 1, ConnectionResetError()))
    assert policy.retry(_state(policy, 1, TimeoutError()))
    assert not policy.retry(_state(policy, 1, ValueError()))
    assert not policy.retry(_state(policy, 1, BusinessError()))
    assert not policy.stop(_state(policy, 2, TimeoutError()))
    assert policy.stop(_state(policy, 3, TimeoutError()))


def test_backoff_is_exponential_capped_and_jittered():
    policy = RetryPolicy(initial_delay=1.0, multiplier=2.0, max_delay=5.0, jitter=0.5)
    delays = [policy.wait(_state(policy, n, TimeoutError())) for n in (1, 2, 3, 4)]
    assert 1.0 <= delays[0] <= 1.5
    assert 2.0 <= delays[1] <= 2.5
    assert 4.0 <= delays[2] <= 4.5
    assert delays[3] == 5.0


def test_tenacity_strategies_and_types_are_accepted():
    policy = RetryPolicy(stop=stop_after_delay(10), wait=wait_fixed(2), retry_on=[KeyError])
    assert policy.retry(_state(policy, 1, KeyError("k")))
    assert not policy.retry(_state(policy, 1, TimeoutError()))
    assert policy.wait(_state(policy, 1, KeyError())) == 2
    assert not policy.stop(_state(policy, 50, KeyError(), elapsed=9.0))
    assert policy.stop(_state(policy, 2, KeyError(), elapsed=11.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts=0"),
        ({"max_attempts": -1}, "max_attempts=-1"),
        ({"initial_delay": -1}, "initial_delay=-1"),
        ({"multiplier": 0.5}, "multiplier=0.5"),
    ],
)
def test_invalid_retry_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold=0"),
        ({"open_duration": 0}, "open_duration=0"),
        ({"half_open_max_calls": 0}, "half_open_max_calls=0"),
    ],
)
def test_invalid_breaker_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CircuitBreaker(**kwargs)


def test_breaker_opens_probes_and_closes():
    clock = Clock()
    changes: list[tuple[str, str, str]] = []
    breaker = CircuitBreaker("api", failure_threshold=2, open_duration=10, clock=clock)
    breaker.listeners.append(lambda n, a, b: changes.append((n, a.label, b.label)))
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    assert not breaker.allow()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert changes == [
        ("api", "closed", "open"),
        ("api", "open", "half_open"),
        ("api", "half_open", "closed"),
    ]


def test_failed_probe_reopens_for_a_full_duration():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, open_duration=5, clock=clock)
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    clock.now += 4.9
    assert not breaker.allow()


def test_success_resets_consecutive_failures():
    breaker = CircuitBreaker(failure_threshold=3, clock=Clock())
    for _ in range(5):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state is CircuitState.CLOSED


events = st.lists(
    st.tuples(st.sampled_from(["allow", "success", "failure"]), st.floats(0, 20)), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(events, st.integers(1, 4), st.floats(0.5, 10), st.integers(1, 3))
def test_breaker_state_machine_invariants(seq, threshold, duration, probes):
    config = _Config(threshold, duration, probes)
    snap, now = CircuitSnapshot(), 0.0
    for event, step in seq:
        now += step
        before = snap
        snap, allowed = transition(snap, event, now, config)
        if event == "allow":
            # never lets a call through while open within its duration
            if before.state is CircuitState.OPEN and now - before.opened_at < duration:
                assert not allowed
                assert snap == before
            # never more probes than allowed while half open
            if snap.state is CircuitState.HALF_OPEN:
                assert snap.probes <= probes
        if snap.state is CircuitState.CLOSED:
            assert snap.failures < threshold
        if before.state is CircuitState.CLOSED and snap.state is CircuitState.OPEN:
            assert event == "failure"
            assert before.failures + 1 >= threshold
            assert snap.opened_at == now
        if before.state is CircuitState.HALF_OPEN and event == "success":
            assert snap == CircuitSnapshot()
        if before.state is CircuitState.HALF_OPEN and event == "failure":
            assert snap.state is CircuitState.OPEN
            assert snap.opened_at == now
