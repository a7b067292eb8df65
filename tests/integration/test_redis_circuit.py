"""Circuit breakers shared by replicas through a real redis-server (`RedisCircuitBackend`).

Each "replica" has its own Redis client (its own connections), its own breaker object and, in
the executor test, its own tracer and meter: the only thing they share is Redis. Time is a
shared fake clock, injected into the breakers (wall time in production).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode
from tests.support.clock import Clock
from tests.support.telemetry import Telemetry

from otel_bgtasks import CircuitBreaker, CircuitState, RedisCircuitBackend
from otel_bgtasks._execution import Executor
from otel_bgtasks.metrics import Instruments

pytestmark = pytest.mark.redis

NAME = "payments"
KEY = f"bgtasks:circuit:{NAME}"
UNREACHABLE = "circuit state backend unreachable, using local state"


@pytest.fixture
def clients(redis_server) -> Iterator[list[redis.Redis]]:
    """One client per replica, plus one for the test to look at Redis; closed afterwards."""
    made: list[redis.Redis] = []

    def client() -> redis.Redis:
        c = redis.Redis.from_url(redis_server.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        made.append(c)
        return c

    yield client  # type: ignore[misc]
    for c in made:
        c.close()


def breaker(
    client: redis.Redis,
    clock: Clock,
    transitions: list[Any],
    *,
    retry_after: float = 0.0,
    health_clock: Clock | None = None,
) -> CircuitBreaker:
    backend = RedisCircuitBackend(client, retry_after=retry_after, clock=health_clock or clock)
    b = CircuitBreaker(NAME, failure_threshold=2, open_duration=30.0, clock=clock, backend=backend)
    b.listeners.append(lambda name, before, after: transitions.append((name, before, after)))
    return b


def stored(client: redis.Redis) -> dict[str, Any]:
    raw = client.get(KEY)
    assert raw is not None
    data: dict[str, Any] = json.loads(raw)
    return data


def test_two_replicas_open_and_close_together(clients):
    clock = Clock(1_000_000.0)
    seen_a: list[Any] = []
    seen_b: list[Any] = []
    a = breaker(clients(), clock, seen_a)
    b = breaker(clients(), clock, seen_b)
    look = clients()

    assert a.allow()
    assert b.allow()
    a.record_failure()
    assert stored(look) == {"state": 0, "failures": 1, "opened_at": 0.0, "probes": 0}
    b.record_failure()  # the second consecutive failure, counted across replicas: open
    assert stored(look) == {"state": 2, "failures": 2, "opened_at": clock.now, "probes": 0}
    assert (a.state, b.state) == (CircuitState.OPEN, CircuitState.OPEN)
    assert not a.allow()
    assert not b.allow()
    # Only the replica that made the change sees the transition (and reports it).
    assert seen_b == [(NAME, CircuitState.CLOSED, CircuitState.OPEN)]
    assert seen_a == []

    clock.now += 31.0  # past open_duration: one probe for both replicas together
    assert a.allow()
    assert (a.state, b.state) == (CircuitState.HALF_OPEN, CircuitState.HALF_OPEN)
    assert not b.allow()  # the probe is taken, by the other replica
    assert stored(look)["probes"] == 1
    a.record_success()
    assert (a.state, b.state) == (CircuitState.CLOSED, CircuitState.CLOSED)
    assert b.allow()
    assert seen_a == [
        (NAME, CircuitState.OPEN, CircuitState.HALF_OPEN),
        (NAME, CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]

    # A failed probe re-opens for everyone.
    a.record_failure()
    b.record_failure()
    clock.now += 31.0
    assert b.allow()
    b.record_failure()
    assert (a.state, b.state) == (CircuitState.OPEN, CircuitState.OPEN)
    assert stored(look)["opened_at"] == clock.now
    assert not a.allow()


@dataclass
class Replica:
    """One app process: its own telemetry (tracer and meter), its own Redis client, one
    executor."""

    executor: Executor
    telemetry: Telemetry

    @classmethod
    def start(cls, client: redis.Redis, clock: Clock) -> Replica:
        telemetry = Telemetry()
        executor = Executor(
            telemetry.tracer_provider.get_tracer("otel_bgtasks"),
            Instruments(telemetry.meter_provider.get_meter("otel_bgtasks")),
            circuit=CircuitBreaker(
                NAME,
                failure_threshold=2,
                open_duration=30.0,
                clock=clock,
                backend=RedisCircuitBackend(client),
            ),
        )
        return cls(executor, telemetry)

    async def run(self, func: Any, *args: Any) -> ReadableSpan:
        state = self.executor.prepare(func, args, {})
        await self.executor.run(state)
        return self.telemetry.spans()[-1]

    def gauge(self) -> dict[str, int]:
        return {
            p.attributes["bgtasks.circuit.name"]: p.value
            for p in self.telemetry.points("bgtasks.circuit.state")
        }

    def close(self) -> None:
        self.executor.close()
        self.telemetry.tracer_provider.shutdown()
        self.telemetry.meter_provider.shutdown()


calls: list[str] = []


def pay(order: str) -> None:
    calls.append(order)
    if order.startswith("down"):
        raise ConnectionRefusedError(f"payments refused {order}")


async def test_executors_of_two_replicas_share_one_breaker(clients):
    clock = Clock(1_000_000.0)
    calls.clear()
    a, b = Replica.start(clients(), clock), Replica.start(clients(), clock)
    try:
        first = await a.run(pay, "down-1")
        second = await a.run(pay, "down-2")
        assert [e.name for e in first.events] == ["exception"]
        assert [e.name for e in second.events] == ["bgtasks.circuit.state_change", "exception"]
        assert dict(second.events[0].attributes) == {
            "bgtasks.circuit.name": NAME,
            "bgtasks.circuit.from": "closed",
            "bgtasks.circuit.to": "open",
        }

        # Replica B never failed, yet its task is refused: the circuit is open in Redis.
        refused = await b.run(pay, "ok-1")
        assert calls == ["down-1", "down-2"]
        assert refused.attributes["bgtasks.task.outcome"] == "rejected"
        assert refused.attributes["bgtasks.task.attempts"] == 0
        assert refused.status.status_code is StatusCode.ERROR
        assert [e.name for e in refused.events] == ["bgtasks.circuit.rejected", "exception"]
        assert dict(refused.events[0].attributes) == {"bgtasks.circuit.name": NAME}
        assert b.gauge() == {NAME: 2}  # its gauge shows the shared state
        assert a.gauge() == {NAME: 2}

        # After open_duration B's probe succeeds and closes it for A as well.
        clock.now += 31.0
        probe = await b.run(pay, "ok-2")
        assert probe.attributes["bgtasks.task.outcome"] == "success"
        assert [
            (e.attributes["bgtasks.circuit.from"], e.attributes["bgtasks.circuit.to"])
            for e in probe.events
        ] == [("open", "half_open"), ("half_open", "closed")]
        assert b.gauge() == {NAME: 0}
        after = await a.run(pay, "ok-3")
        assert after.attributes["bgtasks.task.outcome"] == "success"
        assert after.events == ()
        assert calls == ["down-1", "down-2", "ok-2", "ok-3"]
    finally:
        a.close()
        b.close()


def test_redis_outage_falls_back_to_local_state_and_recovers(redis_server, clients):
    clock = Clock(1_000_000.0)
    seen_a: list[Any] = []
    a = breaker(clients(), clock, seen_a)
    b = breaker(clients(), clock, [])
    look = clients()
    a.record_failure()
    assert stored(look)["failures"] == 1

    redis_server.stop()
    with structlog.testing.capture_logs() as logs:
        # Nothing raises; each replica keeps its own local state meanwhile.
        assert a.allow()
        a.record_failure()
        assert a.allow()  # local: one failure only, the one before the outage is in Redis
        a.record_failure()
        assert not a.allow()  # local threshold reached: open locally
        assert a.state is CircuitState.OPEN
        assert b.allow()  # B's local state knows nothing of A's failures
        b.record_failure()
        b.record_success()
        assert b.state is CircuitState.CLOSED
    unreachable = [e for e in logs if e["event"] == UNREACHABLE]
    assert len(unreachable) == 8  # every call that needed Redis said so
    for entry in unreachable:
        assert entry["log_level"] == "error"
        assert entry["circuit"] == NAME
        assert str(redis_server.port) in entry["error"]
    assert seen_a == [(NAME, CircuitState.CLOSED, CircuitState.OPEN)]

    redis_server.start()  # same port, empty (no persistence)
    with structlog.testing.capture_logs() as logs:
        assert a.state is CircuitState.CLOSED  # Redis again, not the local "open"
        assert a.allow()
        assert b.allow()
        a.record_failure()
        b.record_failure()
        assert (a.state, b.state) == (CircuitState.OPEN, CircuitState.OPEN)
        assert not a.allow()
        assert not b.allow()
        assert stored(look)["state"] == 2
    assert [e for e in logs if e["event"] == UNREACHABLE] == []


def test_after_a_redis_failure_redis_is_left_alone_for_retry_after(redis_server, clients):
    """A black-holed Redis costs one timeout per interval, not one per task."""
    health = Clock(0.0)  # the backend's own interval clock (monotonic in production)
    a = breaker(clients(), Clock(1_000_000.0), [], retry_after=0.5, health_clock=health)
    redis_server.stop()
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            assert a.allow()
            a.record_success()
    assert len([e for e in logs if e["event"] == UNREACHABLE]) == 1
    redis_server.start()
    health.now += 0.6  # past the interval: Redis is asked again
    a.record_failure()
    assert stored(clients())["failures"] == 1
