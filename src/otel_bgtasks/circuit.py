"""Circuit breaker: decides "may I call?" for a task or a shared downstream.

    CircuitBreaker()                               # one breaker per task, named after it
    CircuitBreaker("payments-api")                 # one breaker for every task using that name
    CircuitBreaker("payments-api", backend=RedisCircuitBackend(client))   # shared by replicas

closed --(failure_threshold consecutive failed tasks)--> open --(open_duration)--> half_open
half_open --(a probe succeeds)--> closed;  half_open --(a probe fails)--> open.
At most `half_open_max_calls` probes run at once while half open.

The state machine is a pure function (`transition`) over a `CircuitSnapshot`; a backend only
stores snapshots (in memory, or in Redis with optimistic transactions), so every replica
using one Redis opens and closes together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal, Protocol

import anyio.to_thread
import structlog

from otel_bgtasks.errors import ConfigurationError

__all__ = [
    "CircuitBackend",
    "CircuitBreaker",
    "CircuitSnapshot",
    "CircuitState",
    "MemoryCircuitBackend",
    "RedisCircuitBackend",
    "TransitionListener",
    "transition",
]

_log = structlog.get_logger("otel_bgtasks")

Clock = Callable[[], float]
Event = Literal["allow", "success", "failure", "retry_failure"]
"""``retry_failure``: a later attempt of a task whose first failed attempt already counted: a
task counts once however many attempts its retry policy makes (it re-opens a half-open
circuit like any failure)."""


class CircuitState(IntEnum):
    """Breaker states; the values are those of the `bgtasks.circuit.state` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class CircuitSnapshot:
    """Everything a breaker remembers; what a backend stores."""

    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probes: int = 0


@dataclass(frozen=True, slots=True)
class _Config:
    failure_threshold: int
    open_duration: float
    half_open_max_calls: int


def transition(
    snap: CircuitSnapshot, event: Event, now: float, config: _Config
) -> tuple[CircuitSnapshot, bool]:
    """Apply one event; returns the new snapshot and, for "allow", whether the call may run."""
    if event == "allow":
        if snap.state is CircuitState.OPEN:
            if now - snap.opened_at < config.open_duration:
                return snap, False
            snap = CircuitSnapshot(CircuitState.HALF_OPEN, snap.failures, snap.opened_at, 0)
        if snap.state is CircuitState.HALF_OPEN:
            if snap.probes >= config.half_open_max_calls:
                return snap, False
            return dataclasses.replace(snap, probes=snap.probes + 1), True
        return snap, True
    if event == "success":
        if snap.state is CircuitState.CLOSED and snap.failures == 0:
            return snap, True
        if snap.state is CircuitState.OPEN:  # a call allowed before the breaker opened
            return snap, True
        return CircuitSnapshot(), True
    # failure
    if event == "retry_failure" and snap.state is CircuitState.CLOSED:
        return snap, True  # the task already counted once
    if snap.state is CircuitState.HALF_OPEN:
        return CircuitSnapshot(CircuitState.OPEN, snap.failures + 1, now, 0), True
    if snap.state is CircuitState.OPEN:
        return snap, True
    failures = snap.failures + 1
    if failures >= config.failure_threshold:
        return CircuitSnapshot(CircuitState.OPEN, failures, now, 0), True
    return dataclasses.replace(snap, failures=failures), True


class CircuitBackend(Protocol):
    """Stores snapshots by breaker name and applies a change atomically."""

    def apply(
        self, name: str, change: Callable[[CircuitSnapshot], tuple[CircuitSnapshot, bool]]
    ) -> tuple[CircuitSnapshot, CircuitSnapshot, bool]:
        """Apply `change` to the stored snapshot; returns (before, after, allowed)."""
        ...

    def get(self, name: str) -> CircuitSnapshot:
        """The stored snapshot (closed when unknown)."""
        ...


class MemoryCircuitBackend:
    """Snapshots in this process's memory (the default)."""

    def __init__(self) -> None:
        self._snaps: dict[str, CircuitSnapshot] = {}
        self._lock = threading.Lock()

    def apply(
        self, name: str, change: Callable[[CircuitSnapshot], tuple[CircuitSnapshot, bool]]
    ) -> tuple[CircuitSnapshot, CircuitSnapshot, bool]:
        with self._lock:
            before = self._snaps.get(name, _CLOSED)
            after, allowed = change(before)
            if after is not before:
                self._snaps[name] = after
            return before, after, allowed

    def get(self, name: str) -> CircuitSnapshot:
        return self._snaps.get(name, _CLOSED)


_CLOSED = CircuitSnapshot()


class RedisCircuitBackend:
    """Snapshots in Redis, changed with WATCH/MULTI so replicas share one breaker.

    When Redis cannot be reached the breaker falls back to this process's memory (logged),
    so a Redis outage never stops tasks from running; for `retry_after` seconds after a
    failure Redis is not even tried (a black-holed Redis costs one timeout per interval, not
    one per task). Its calls block on the network (`blocking`): from async code the executor
    makes them in a worker thread, never on the event loop. `clock` measures that interval
    (`time.monotonic`; injectable for tests).
    """

    blocking = True

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "bgtasks:circuit:",
        retry_after: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._client = client
        self._clock = clock
        self._prefix = prefix
        self._fallback = MemoryCircuitBackend()
        self.retry_after = retry_after
        self._down_until = float("-inf")
        self._probing = False
        self._health_lock = threading.Lock()

    def _is_down(self) -> bool:
        """True while Redis is left alone: inside the interval after a failure, and after it
        while another call is the one probing Redis (one call waits on a dead Redis, not all)."""
        with self._health_lock:
            if self._down_until == float("-inf"):
                return False
            if self._clock() < self._down_until or self._probing:
                return True
            self._probing = True
            return False

    def _mark(self, ok: bool) -> None:
        with self._health_lock:
            self._probing = False
            self._down_until = float("-inf") if ok else self._clock() + self.retry_after

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisCircuitBackend:
        """Connect with short timeouts: a slow Redis must not hold tasks up.

        Raises:
            ImportError: the ``redis`` extra is not installed (the message says what to run).
        """
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - installed with the dev extra
            raise ImportError(
                "RedisCircuitBackend needs the redis package: pip install 'otel-bgtasks[redis]'"
            ) from exc

        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return cls(client, **kwargs)

    @staticmethod
    def _decode(raw: Any) -> CircuitSnapshot:
        if not raw:
            return _CLOSED
        data = json.loads(raw)
        return CircuitSnapshot(
            CircuitState(data["state"]), data["failures"], data["opened_at"], data["probes"]
        )

    @staticmethod
    def _encode(snap: CircuitSnapshot) -> str:
        return json.dumps(
            {
                "state": int(snap.state),
                "failures": snap.failures,
                "opened_at": snap.opened_at,
                "probes": snap.probes,
            }
        )

    def apply(
        self, name: str, change: Callable[[CircuitSnapshot], tuple[CircuitSnapshot, bool]]
    ) -> tuple[CircuitSnapshot, CircuitSnapshot, bool]:
        import redis

        if self._is_down():
            return self._fallback.apply(name, change)
        key = self._prefix + name
        try:
            with self._client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        before = self._decode(pipe.get(key))
                        after, allowed = change(before)
                        if after == before:
                            pipe.unwatch()
                            self._mark(True)
                            return before, after, allowed
                        pipe.multi()
                        pipe.set(key, self._encode(after))
                        pipe.execute()
                        self._mark(True)
                        return before, after, allowed
                    except redis.WatchError:
                        continue  # another replica changed it: recompute from its state
        except redis.RedisError as exc:
            self._mark(False)
            _log.error(
                "circuit state backend unreachable, using local state",
                circuit=name,
                error=str(exc),
                retry_after=self.retry_after,
            )
            return self._fallback.apply(name, change)
        except BaseException:  # a broken stored snapshot: never leave the probe taken
            self._mark(False)
            raise

    def get(self, name: str) -> CircuitSnapshot:
        import redis

        if self._is_down():
            return self._fallback.get(name)
        try:
            snap = self._decode(self._client.get(self._prefix + name))
        except redis.RedisError:
            self._mark(False)
            return self._fallback.get(name)
        except BaseException:
            self._mark(False)
            raise
        self._mark(True)
        return snap


def _check_count(label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"CircuitBreaker({label}={value!r}): must be an integer >= 1")


TransitionListener = Callable[[str, CircuitState, CircuitState], None]
"""Called with (breaker name, from, to) on every state change."""


class CircuitBreaker:
    """A named circuit breaker.

    Args:
        name: the breaker's name (`bgtasks.circuit.name`); None: each task gets its own,
            named after the task.
        failure_threshold: consecutive failed tasks that open the circuit. A task counts once
            however many attempts its retry policy makes: with 4 attempts and a threshold of
            5, the fifth failing task in a row opens it (17 calls), not the second.
        open_duration: seconds the circuit stays open before letting probes through.
        half_open_max_calls: probes allowed at once while half open.
        clock: returns seconds; injectable for tests (wall time by default, as Redis-shared
            state is compared across hosts).
        backend: where the state lives; default in memory.

    Raises:
        ConfigurationError: a threshold or probe limit that is not an integer >= 1, a duration
            that is not a finite number > 0 (a `ValueError`).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        failure_threshold: int = 5,
        open_duration: float = 30.0,
        half_open_max_calls: int = 1,
        clock: Clock = time.time,
        backend: CircuitBackend | None = None,
    ) -> None:
        _check_count("failure_threshold", failure_threshold)
        if (
            isinstance(open_duration, bool)
            or not isinstance(open_duration, int | float)
            or not (math.isfinite(open_duration) and open_duration > 0)
        ):
            raise ConfigurationError(
                f"CircuitBreaker(open_duration={open_duration!r}): must be > 0 seconds, finite"
            )
        _check_count("half_open_max_calls", half_open_max_calls)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigurationError("CircuitBreaker(name=...) must be a non-empty string or None")
        self.name = name
        self.config = _Config(failure_threshold, open_duration, half_open_max_calls)
        self.clock = clock
        self.backend: CircuitBackend = backend if backend is not None else MemoryCircuitBackend()
        self.listeners: list[TransitionListener] = []
        self.last_state = CircuitState.CLOSED  # as last seen by this process, no store call

    def named(self, name: str) -> CircuitBreaker:
        """This breaker's settings under another name (how per-task breakers are made)."""
        clone = CircuitBreaker(
            name,
            failure_threshold=self.config.failure_threshold,
            open_duration=self.config.open_duration,
            half_open_max_calls=self.config.half_open_max_calls,
            clock=self.clock,
            backend=self.backend,
        )
        clone.listeners = self.listeners
        return clone

    @property
    def key(self) -> str:
        return self.name or "default"

    def _apply(self, event: Event) -> bool:
        now = self.clock()
        before, after, allowed = self.backend.apply(
            self.key, lambda snap: transition(snap, event, now, self.config)
        )
        self.last_state = after.state
        if before.state is not after.state:
            for listener in self.listeners:
                listener(self.key, before.state, after.state)
        return allowed

    @property
    def blocking(self) -> bool:
        """Its backend makes network calls (Redis): run them off the event loop."""
        return bool(getattr(self.backend, "blocking", False))

    async def _apply_async(self, event: Event) -> bool:
        if self.blocking:
            return await anyio.to_thread.run_sync(self._apply, event)  # asyncio or trio
        return self._apply(event)

    async def allow_async(self) -> bool:
        """`allow`, off the event loop when the backend blocks."""
        return await self._apply_async("allow")

    async def record_success_async(self) -> None:
        await self._apply_async("success")

    async def record_failure_async(self, *, retry: bool = False) -> None:
        """`record_failure`, off the event loop when the backend blocks."""
        await self._apply_async("retry_failure" if retry else "failure")

    def allow(self) -> bool:
        """May a call run now? (While half open this reserves one probe.)"""
        return self._apply("allow")

    def record_success(self) -> None:
        """A call succeeded."""
        self._apply("success")

    def record_failure(self, *, retry: bool = False) -> None:
        """A call failed; `retry`: a later attempt of a task whose earlier attempt failed
        already (it does not count again: `failure_threshold` counts tasks, not attempts)."""
        self._apply("retry_failure" if retry else "failure")

    @property
    def state(self) -> CircuitState:
        """The current state as stored (an open circuit past its duration still says open)."""
        return self.backend.get(self.key).state

    def __repr__(self) -> str:
        c = self.config
        return (
            f"CircuitBreaker({self.name!r}, failure_threshold={c.failure_threshold}, "
            f"open_duration={c.open_duration}, half_open_max_calls={c.half_open_max_calls})"
        )
