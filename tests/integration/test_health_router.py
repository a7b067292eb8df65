"""The opt-in router: task health, and dead-letter admin behind a bearer token, over real HTTP.

The app runs in a real uvicorn (in a thread, instrumented with the test's providers and a
SQLite dead-letter store); failures come from real tasks, so the dead letters, their span ids
and the replay links are those the package produced itself.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.routing import APIRoute
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from tests.integration._server import UvicornThread, wait_for_tasks
from tests.integration.apps import tasks
from tests.support.waiting import wait_until

from otel_bgtasks import CircuitBreaker
from otel_bgtasks.health import bearer_token_auth, bgtasks_router
from otel_bgtasks.records import DeadLetter, DeadLetterReason
from otel_bgtasks.stores import BufferedStore
from otel_bgtasks.stores.base import DeadLetterStore
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GONE_REF = "tests.integration.apps.gone:vanished"


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/fail")
    async def fail(bg: BackgroundTasks) -> dict[str, str]:
        bg.add_task(tasks.import_contacts, "no-comma")
        return {}

    @app.get("/hold")
    async def hold(bg: BackgroundTasks) -> dict[str, str]:
        bg.add_task(tasks.hold)  # runs first and blocks ...
        bg.add_task(tasks.quick)  # ... so this one is pending meanwhile
        return {}

    @app.get("/charge")
    async def charge(bg: BackgroundTasks) -> dict[str, str]:
        bg.add_task(tasks.charge_card, "order-1")
        return {}

    app.include_router(bgtasks_router(auth=bearer_token_auth(TOKEN)))
    return app


@dataclass
class Served:
    client: httpx.Client
    store: DeadLetterStore
    telemetry: Any

    def hit(self, path: str) -> None:
        assert self.client.get(path).status_code == 200
        wait_for_tasks()

    def health(self) -> dict[str, Any]:
        response = self.client.get("/bgtasks/health")
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body

    def task_spans(self, name: str) -> list[ReadableSpan]:
        return sorted(
            (s for s in self.telemetry.spans() if s.name == f"process {name}"),
            key=lambda s: s.start_time,
        )


@pytest.fixture
def serve(tmp_path, telemetry, instrument) -> Iterator[Any]:
    """serve(**instrument_kwargs) -> Served, with a SQLite store in tmp_path."""
    tasks.reset()
    store = SQLiteDeadLetterStore(tmp_path / "dlq.db")
    stack: list[UvicornThread] = []

    def _serve(**kwargs: Any) -> Served:
        instrument(dead_letter_store=store, **kwargs)
        server = UvicornThread(build_app())
        server.start()
        stack.append(server)
        return Served(server.client(), store, telemetry)

    yield _serve
    tasks.release.set()  # never leave a worker thread blocked
    for server in stack:
        server.stop()
    store.close()


def test_admin_endpoints_never_mount_without_auth():
    with pytest.raises(ValueError, match="need an auth dependency"):
        bgtasks_router()
    with pytest.raises(ValueError, match="need an auth dependency"):
        bgtasks_router(admin=True, auth=None)
    with pytest.raises(ValueError, match="non-empty token"):
        bearer_token_auth("")

    health_only = bgtasks_router(admin=False)
    assert [(r.path, r.methods) for r in health_only.routes if isinstance(r, APIRoute)] == [
        ("/bgtasks/health", {"GET"})
    ]
    full = bgtasks_router(auth=bearer_token_auth(TOKEN), prefix="/ops")
    assert sorted(
        (r.path, m) for r in full.routes if isinstance(r, APIRoute) for m in r.methods
    ) == [
        ("/ops/dead-letters", "GET"),
        ("/ops/dead-letters/replay", "POST"),
        ("/ops/dead-letters/{entry_id}", "DELETE"),
        ("/ops/dead-letters/{entry_id}", "GET"),
        ("/ops/dead-letters/{entry_id}/replay", "POST"),
        ("/ops/health", "GET"),
    ]


def test_health_reports_running_pending_failures_and_depth(serve):
    served = serve()
    assert served.health() == {
        "status": "ok",
        "running": 0,
        "pending": 0,
        "pending_by_task": {},
        "oldest_running_seconds": 0.0,
        "recent_failures": [],
        "circuits": {},
        "dead_letter_depth": 0,
        "dead_letter_buffer": None,
    }

    served.hit("/fail")
    (failed,) = served.task_spans("import_contacts")
    health = served.health()
    (failure,) = health.pop("recent_failures")
    assert failure.pop("at") > 0
    assert failure == {
        "task_name": "import_contacts",
        "task_id": failed.attributes["bgtasks.task.id"],
        "outcome": "dead_lettered",
        "attempts": 1,
        "error_type": "ValueError",
        "trace_id": format(failed.context.trace_id, "032x"),
    }
    assert health == {
        "status": "ok",
        "running": 0,
        "pending": 0,
        "pending_by_task": {},
        "oldest_running_seconds": 0.0,
        "circuits": {},
        "dead_letter_depth": 1,
        "dead_letter_buffer": None,
    }

    assert served.client.get("/hold").status_code == 200
    busy = wait_until(
        lambda: (h := served.health())["running"] == 1 and h, what="the held task to run"
    )
    assert busy["pending"] == 1  # quick waits behind hold in the same response
    assert busy["pending_by_task"] == {"quick": 1}
    assert busy["oldest_running_seconds"] > 0
    assert busy["status"] == "ok"
    assert len(busy["recent_failures"]) == 1
    tasks.release.set()
    wait_for_tasks()
    after = served.health()
    assert (after["running"], after["pending"], after["oldest_running_seconds"]) == (0, 0, 0.0)
    assert [s.attributes["bgtasks.task.outcome"] for s in served.task_spans("hold")] == ["success"]


def test_health_reports_circuit_states_and_rejections(serve):
    served = serve(circuit=CircuitBreaker("payments", failure_threshold=1, open_duration=600))
    assert served.health()["circuits"] == {}

    served.hit("/charge")  # refused: the breaker opens
    served.hit("/charge")  # not run: rejected by the open circuit
    health = served.health()
    assert health["status"] == "degraded"
    assert health["circuits"] == {"payments": "open"}
    assert health["dead_letter_depth"] == 2
    assert [(f["outcome"], f["error_type"]) for f in health["recent_failures"]] == [
        ("dead_lettered", "ConnectionRefusedError"),
        ("rejected", "otel_bgtasks.errors.CircuitOpenError"),
    ]
    first, second = served.task_spans("charge_card")
    assert [e.name for e in first.events] == [
        "bgtasks.circuit.state_change",
        "bgtasks.dlq.moved",
        "exception",
    ]
    assert dict(first.events[0].attributes) == {
        "bgtasks.circuit.name": "payments",
        "bgtasks.circuit.from": "closed",
        "bgtasks.circuit.to": "open",
    }
    assert [e.name for e in second.events] == [
        "bgtasks.circuit.rejected",
        "bgtasks.dlq.moved",
        "exception",
    ]
    assert second.attributes["bgtasks.task.attempts"] == 0
    assert second.attributes["bgtasks.task.outcome"] == "rejected"
    assert sorted(e.reason.value for e in served.store.list()) == ["circuit_open", "exhausted"]


ADMIN_CALLS = [
    ("GET", "/bgtasks/dead-letters"),
    ("GET", "/bgtasks/dead-letters/{id}"),
    ("POST", "/bgtasks/dead-letters/{id}/replay"),
    ("POST", "/bgtasks/dead-letters/replay"),
    ("DELETE", "/bgtasks/dead-letters/{id}"),
]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["no-token", "wrong-token", "wrong-scheme"],
)
def test_admin_endpoints_reject_missing_or_wrong_token(serve, headers):
    served = serve()
    served.hit("/fail")
    (entry,) = served.store.list()
    for method, path in ADMIN_CALLS:
        response = served.client.request(method, path.format(id=entry.id), headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
    # Nothing happened to the entry, and health stays open to all.
    assert served.store.get(entry.id) == entry
    assert served.client.get("/bgtasks/health").status_code == 200


def test_list_show_replay_delete_with_token(serve):
    served = serve()
    served.hit("/fail")
    (failed,) = served.task_spans("import_contacts")
    (entry,) = served.store.list()
    client = served.client

    listed = client.get("/bgtasks/dead-letters", headers=AUTH)
    assert listed.status_code == 200
    assert listed.json() == [entry.to_dict()]
    assert entry.func_ref == "tests.integration.apps.tasks:import_contacts"
    assert entry.reason is DeadLetterReason.PERMANENT
    assert (entry.error_type, entry.category, entry.attempts) == ("ValueError", "validation", 1)
    assert (entry.trace_id, entry.span_id) == (
        format(failed.context.trace_id, "032x"),
        format(failed.context.span_id, "016x"),
    )
    for query, expected in [
        ("task=import_contacts", 1),
        ("task=other", 0),
        ("reason=permanent", 1),
        ("reason=exhausted", 0),
    ]:
        assert len(client.get(f"/bgtasks/dead-letters?{query}", headers=AUTH).json()) == expected
    shown = client.get(f"/bgtasks/dead-letters/{entry.id}", headers=AUTH)
    assert shown.json() == entry.to_dict()
    assert client.get("/bgtasks/dead-letters/" + "0" * 32, headers=AUTH).status_code == 404

    # Still broken: the replay fails, the entry stays with one more attempt.
    again = client.post(f"/bgtasks/dead-letters/{entry.id}/replay", headers=AUTH)
    assert again.json() == {
        "id": entry.id,
        "status": "failed",
        "message": "ValueError: row 'no-comma' has no comma",
    }
    kept = served.store.get(entry.id)
    assert kept is not None
    assert kept.attempts == 2

    # Fixed: the replay succeeds, the entry goes, a new span links to the failed one.
    tasks.downstream["contacts_fixed"] = True
    replayed = client.post(f"/bgtasks/dead-letters/{entry.id}/replay", headers=AUTH)
    assert replayed.json() == {"id": entry.id, "status": "replayed", "message": ""}
    assert served.store.get(entry.id) is None
    assert client.get(f"/bgtasks/dead-letters/{entry.id}", headers=AUTH).status_code == 404
    assert client.get("/bgtasks/dead-letters", headers=AUTH).json() == []
    original, failed_replay, replay = served.task_spans("import_contacts")
    assert original.context == failed.context
    for span in (failed_replay, replay):
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is None
        assert [link.context.span_id for link in span.links] == [failed.context.span_id]
        assert [link.context.trace_id for link in span.links] == [failed.context.trace_id]
        assert span.context.trace_id != failed.context.trace_id
    assert failed_replay.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed_replay.events] == ["exception"]  # not dead-lettered again
    assert replay.status.status_code is StatusCode.UNSET
    assert replay.attributes["bgtasks.task.outcome"] == "success"
    replays = {
        tuple(sorted(p.attributes.items())): p.value
        for p in served.telemetry.points("bgtasks.dlq.replays")
    }
    assert replays == {
        (("bgtasks.task.name", "import_contacts"), ("bgtasks.task.outcome", "failure")): 1,
        (("bgtasks.task.name", "import_contacts"), ("bgtasks.task.outcome", "success")): 1,
    }

    # Delete: gone, and a second delete says so.
    tasks.downstream["contacts_fixed"] = False
    served.hit("/fail")
    (other,) = served.store.list()
    deleted = client.delete(f"/bgtasks/dead-letters/{other.id}", headers=AUTH)
    assert deleted.json() == {"deleted": True}
    assert served.store.count() == 0
    assert client.delete(f"/bgtasks/dead-letters/{other.id}", headers=AUTH).status_code == 404
    assert client.post(f"/bgtasks/dead-letters/{other.id}/replay", headers=AUTH).status_code == (
        404
    )


def test_replay_of_a_task_that_can_no_longer_be_imported_keeps_the_entry(serve):
    served = serve()
    gone = DeadLetter.from_exception(
        ValueError("it failed back then"),
        task_name="vanished",
        func_ref=GONE_REF,
        payload='{"args":[1],"kwargs":{}}',
        reason=DeadLetterReason.EXHAUSTED,
        attempts=3,
    )
    served.store.put(gone)
    served.hit("/fail")
    (broken,) = [e for e in served.store.list() if e.task_name == "import_contacts"]
    tasks.downstream["contacts_fixed"] = True
    client = served.client

    one = client.post(f"/bgtasks/dead-letters/{gone.id}/replay", headers=AUTH).json()
    assert one["id"] == gone.id
    assert one["status"] == "refused"  # not one of the app's tasks: never imported
    assert GONE_REF in one["message"]
    assert "is not a registered task of this app" in one["message"]
    assert served.store.get(gone.id) == gone  # kept, untouched

    # Replay all: the importable one runs and goes, the other is reported and kept.
    everything = client.post("/bgtasks/dead-letters/replay", headers=AUTH).json()
    assert everything["replayed"] == 1
    assert sorted((o["id"], o["status"]) for o in everything["outcomes"]) == sorted(
        [(gone.id, "refused"), (broken.id, "replayed")]
    )
    assert [e.id for e in served.store.list()] == [gone.id]
    assert [s.name for s in served.telemetry.spans() if "vanished" in s.name] == []


def test_health_is_degraded_with_the_buffer_while_the_store_is_locked(
    tmp_path, telemetry, instrument
):
    """Another process holds SQLite's write lock: the dead letter waits in memory, health
    says so at once (never waiting on the store), then drains in the background."""
    tasks.reset()
    path = tmp_path / "dlq.db"
    store = BufferedStore(SQLiteDeadLetterStore(path, timeout=0.2), retry_after=0.2)
    instrument(dead_letter_store=store)
    server = UvicornThread(build_app())
    server.start()
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        served = Served(server.client(), store, telemetry)
        locker.execute("BEGIN EXCLUSIVE")
        served.hit("/fail")
        health = served.health()
        buffer = health["dead_letter_buffer"]
        assert buffer.pop("pending_bytes") > 0
        assert buffer.pop("last_error").startswith("StoreUnavailableError(")
        buffer.pop("store_down")  # true for retry_after (0.2 s) after each failed attempt
        assert (health["status"], health["dead_letter_depth"], buffer) == (
            "degraded",
            None,
            {"pending": 1, "dropped": 0, "write_errors": 1},
        )
        locker.execute("ROLLBACK")
        wait_until(lambda: store.pending == 0, what="the buffer to drain by itself")
        health = served.health()
        assert (health["status"], health["dead_letter_depth"]) == ("ok", 1)
    finally:
        locker.close()
        server.stop()
        store.close()
