"""Retries, timeouts and circuit breakers on the task span and metrics."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from opentelemetry.trace import StatusCode
from starlette.background import BackgroundTask
from tenacity import wait_none

from otel_bgtasks import (
    CircuitBreaker,
    CircuitState,
    DeadLetterReason,
    RetryPolicy,
    TaskTimeoutError,
    background_task,
)
from otel_bgtasks._execution import Executor
from otel_bgtasks.metrics import Instruments
from tests.support.clock import Clock

FAST = RetryPolicy(max_attempts=3, wait=wait_none())


class Flaky:
    """Fails with `exc` the first `failures` calls, then succeeds."""

    def __init__(self, failures: int, exc: Exception) -> None:
        self.failures, self.exc, self.calls = failures, exc, 0
        self.__qualname__ = "Flaky"

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


async def test_success_after_retries_is_not_an_error(telemetry, instrument):
    instrument(retry=FAST)
    task = Flaky(2, ConnectionResetError("reset by peer"))
    await BackgroundTask(task)()
    span = telemetry.span("process Flaky")
    assert task.calls == 3
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes["bgtasks.task.attempts"] == 3
    assert span.attributes["bgtasks.task.outcome"] == "success"
    retries = [e for e in span.events if e.name == "bgtasks.retry"]
    assert [dict(e.attributes) for e in retries] == [
        {
            "bgtasks.retry.attempt": n,
            "bgtasks.retry.delay": 0.0,
            "error.type": "ConnectionResetError",
            "exception.message": "reset by peer",
        }
        for n in (2, 3)
    ]
    assert "exception" not in [e.name for e in span.events]
    (point,) = telemetry.points("bgtasks.task.retries")
    assert point.value == 2
    assert dict(point.attributes) == {
        "bgtasks.task.name": "Flaky",
        "error.type": "ConnectionResetError",
    }


async def test_exhausted_retries_fail_once_with_the_last_error(telemetry, instrument):
    instrument(retry=FAST)
    task = Flaky(10, TimeoutError("downstream slow"))
    await BackgroundTask(task)()
    span = telemetry.span("process Flaky")
    assert task.calls == 3
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["bgtasks.task.attempts"] == 3
    assert span.attributes["bgtasks.task.outcome"] == "failure"
    assert span.attributes["bgtasks.error.category"] == "timeout"
    assert [e.name for e in span.events] == ["bgtasks.retry", "bgtasks.retry", "exception"]


async def test_permanent_errors_are_not_retried(telemetry, instrument):
    instrument(retry=FAST)
    task = Flaky(10, ValueError("bad input"))
    await BackgroundTask(task)()
    assert task.calls == 1
    span = telemetry.span("process Flaky")
    assert span.attributes["bgtasks.error.category"] == "validation"
    assert telemetry.points("bgtasks.task.retries") == []


async def test_a_retry_waits_on_the_policys_sleep_while_the_loop_runs_on(telemetry, instrument):
    slept: list[float] = []
    waiting, proceed = asyncio.Event(), asyncio.Event()

    async def sleep(seconds: float) -> None:  # the policy's wait, ended by the test
        slept.append(seconds)
        waiting.set()
        await proceed.wait()

    instrument(retry=RetryPolicy(max_attempts=2, initial_delay=0.2, jitter=0, sleep=sleep))
    task = Flaky(1, ConnectionError("x"))
    run = asyncio.ensure_future(BackgroundTask(task)())
    await waiting.wait()  # this coroutine runs while the task waits for its retry
    assert (slept, task.calls, run.done()) == ([0.2], 1, False)
    proceed.set()
    await run
    assert task.calls == 2
    (event,) = [e for e in telemetry.span("process Flaky").events if e.name == "bgtasks.retry"]
    assert event.attributes["bgtasks.retry.delay"] == pytest.approx(0.2)
    assert RetryPolicy().sleep is anyio.sleep  # by default: never blocks the loop (any backend)


@background_task(timeout=0.01, retry=RetryPolicy(max_attempts=2, wait=wait_none()))
async def hangs() -> None:
    await asyncio.Event().wait()  # never ends: only the timeout can stop an attempt


async def test_async_timeout_cancels_and_retries(telemetry, instrument):
    instrument(dead_letter_store=telemetry.store)
    await BackgroundTask(hangs)()
    run = telemetry.task("hangs").assert_ran(
        outcome="timeout", attempts=2, retries=1, error_type=TaskTimeoutError
    )
    assert [e.name for e in run.span.events] == [
        "bgtasks.timeout",
        "bgtasks.retry",
        "bgtasks.timeout",
        "bgtasks.dlq.moved",
        "exception",
    ]
    assert run.assert_dead_lettered(DeadLetterReason.TIMEOUT).attempts == 2


CLOCK = Clock(0.0)


@background_task(timeout=0.01)
def slow_sync() -> None:
    CLOCK.now += 0.05  # 50 ms of the executor's time pass while it runs


async def test_sync_timeout_is_reported_not_killed(telemetry):
    executor = Executor(
        telemetry.tracer_provider.get_tracer("otel_bgtasks"),
        Instruments(telemetry.meter_provider.get_meter("otel_bgtasks")),
        clock=CLOCK,
    )
    await executor.run(executor.prepare(slow_sync, (), {}))
    span = telemetry.span("process slow_sync")
    assert span.attributes["bgtasks.task.outcome"] == "success"
    assert span.attributes["bgtasks.task.wait"] == 0.0
    (event,) = span.events
    assert event.name == "bgtasks.timeout"
    assert dict(event.attributes) == {
        "bgtasks.retry.attempt": 1,
        "bgtasks.timeout.seconds": 0.01,
        "bgtasks.timeout.elapsed": pytest.approx(0.05),
    }
    (duration,) = telemetry.points("bgtasks.task.duration")
    assert duration.sum == pytest.approx(0.05)


async def test_open_circuit_rejects_without_running(telemetry, instrument):
    breaker = CircuitBreaker("payments", failure_threshold=2, open_duration=60)
    instrument(circuit=breaker)
    task = Flaky(10, ConnectionRefusedError("refused"))
    for _ in range(3):
        await BackgroundTask(task)()
    assert task.calls == 2
    first, second, third = sorted(telemetry.spans(), key=lambda s: s.start_time)
    assert first.attributes["bgtasks.task.outcome"] == "failure"
    change = [e for e in second.events if e.name == "bgtasks.circuit.state_change"]
    assert [dict(e.attributes) for e in change] == [
        {
            "bgtasks.circuit.name": "payments",
            "bgtasks.circuit.from": "closed",
            "bgtasks.circuit.to": "open",
        }
    ]
    assert third.attributes["bgtasks.task.outcome"] == "rejected"
    assert third.attributes["bgtasks.task.attempts"] == 0
    assert [e.name for e in third.events] == ["bgtasks.circuit.rejected", "exception"]
    (state,) = telemetry.points("bgtasks.circuit.state")
    assert (dict(state.attributes), state.value) == ({"bgtasks.circuit.name": "payments"}, 2)
    (transitions,) = telemetry.points("bgtasks.circuit.transitions")
    assert transitions.value == 1
    assert dict(transitions.attributes) == {
        "bgtasks.circuit.name": "payments",
        "bgtasks.circuit.from": "closed",
        "bgtasks.circuit.to": "open",
    }


async def test_unnamed_breaker_is_per_task(telemetry, instrument):
    instrument(circuit=CircuitBreaker(failure_threshold=1))
    await BackgroundTask(Flaky(1, ConnectionError()))()
    ok = Flaky(0, ConnectionError())
    ok.__qualname__ = "Other"
    await BackgroundTask(ok)()
    assert ok.calls == 1  # "Flaky"'s open breaker does not stop "Other"
    names = {
        p.attributes["bgtasks.circuit.name"]: p.value
        for p in telemetry.points("bgtasks.circuit.state")
    }
    assert names == {"Flaky": 2, "Other": 0}


async def test_validation_errors_do_not_trip_the_breaker(telemetry, instrument):
    breaker = CircuitBreaker("db", failure_threshold=1)
    instrument(circuit=breaker)
    await BackgroundTask(Flaky(1, ValueError("bad row")))()
    assert breaker.allow()


class Downstream:
    """Answers each call from a script of outcomes: True succeeds, False refuses."""

    def __init__(self, script: list[bool]) -> None:
        self.script = list(script)
        self.calls = 0
        self.__qualname__ = "Downstream"

    async def __call__(self) -> None:
        self.calls += 1
        if not self.script.pop(0):
            raise ConnectionRefusedError("refused")


async def test_failure_threshold_counts_tasks_not_attempts(telemetry, instrument):
    """Issue 19: with 4 attempts and a threshold of 5 the breaker opened at a 50% task-failure
    rate (4 failed attempts of one task + the first of the next). A task counts once."""
    breaker = CircuitBreaker("crm", failure_threshold=5, open_duration=3600)
    instrument(circuit=breaker, retry=RetryPolicy(max_attempts=4, wait=wait_none()))
    # 20 tasks, every other one failing all 4 attempts, the others failing once, then fine
    script: list[bool] = []
    for n in range(20):
        script += [False] * 4 if n % 2 == 0 else [False, True]
    downstream = Downstream(script)
    for _ in range(20):
        await BackgroundTask(downstream)()
    assert downstream.calls == len(script)  # every attempt ran: the breaker never opened
    outcomes = [s.attributes["bgtasks.task.outcome"] for s in telemetry.spans()]
    assert outcomes == ["failure", "success"] * 10
    assert telemetry.points("bgtasks.circuit.transitions") == []

    # five failing tasks in a row open it: four with all their attempts, the fifth at its
    # first failed attempt (its retries are refused, as is the sixth task)
    telemetry.exporter.clear()
    down = Downstream([False] * 20)
    for _ in range(6):
        await BackgroundTask(down)()
    assert down.calls == 4 * 4 + 1
    outcomes = [s.attributes["bgtasks.task.outcome"] for s in telemetry.spans()]
    assert outcomes == ["failure"] * 4 + ["rejected"] * 2


async def test_a_failed_retry_still_reopens_a_half_open_circuit(telemetry, instrument):
    now = [0.0]
    breaker = CircuitBreaker("mail", failure_threshold=1, open_duration=10, clock=lambda: now[0])
    instrument(circuit=breaker, retry=RetryPolicy(max_attempts=2, wait=wait_none()))
    await BackgroundTask(Downstream([False, False]))()  # opens
    now[0] = 11.0  # half open: the next attempt is a probe
    probe = Downstream([False, False])
    await BackgroundTask(probe)()
    assert probe.calls == 1  # the probe failed: open again, its retry refused
    assert breaker.state is CircuitState.OPEN
