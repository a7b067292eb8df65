"""Shared fixtures, built on tests/support (one of each): telemetry, instrumentation, a SQLite
store, a Redis server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_bgtasks.registry import isolated
from otel_bgtasks.stores import SQLiteDeadLetterStore
from tests.support.redis import RedisServer, running_redis
from tests.support.telemetry import Telemetry


@pytest.fixture(autouse=True)
def _state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default dead-letter store lives in the user's state directory: never the real one."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def _task_registry() -> Iterator[None]:
    """Task modules a test declares (the CLI's --tasks) do not leak into the next test."""
    with isolated():
        yield


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """Explicit providers with an in-memory exporter and reader (not instrumented)."""
    harness = Telemetry()
    yield harness
    harness.tracer_provider.shutdown()
    harness.meter_provider.shutdown()


@pytest.fixture
def instrument(telemetry: Telemetry) -> Iterator[Any]:
    """Call instrument(**kwargs) to instrument with the test's providers; undone afterwards.
    No dead-letter store unless the test passes one."""
    instrumentor = telemetry.instrumentor

    def _instrument(**kwargs: Any) -> Any:
        kwargs.setdefault("dead_letter_store", None)
        kwargs.setdefault("tracer_provider", telemetry.tracer_provider)
        kwargs.setdefault("meter_provider", telemetry.meter_provider)
        instrumentor.instrument(**kwargs)
        return instrumentor

    yield _instrument
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """Where the `store` fixture's SQLite file is."""
    return tmp_path / "dlq.db"


@pytest.fixture
def store(store_path: Path) -> Iterator[SQLiteDeadLetterStore]:
    """A real SQLite dead-letter store in the test's temporary directory."""
    with SQLiteDeadLetterStore(store_path) as opened:
        yield opened


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own on loopback (skips without the binary, fails
    under OTEL_BGTASKS_REQUIRE_INFRA=1)."""
    with running_redis(tmp_path) as server:
        yield server
