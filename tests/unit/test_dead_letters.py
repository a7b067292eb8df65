"""Dead-lettering, replay and durable journaling through the executor, on SQLite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.trace import SpanKind, StatusCode
from starlette.background import BackgroundTask
from structlog.testing import capture_logs

from otel_bgtasks import CircuitBreaker, schedule
from otel_bgtasks._execution import active_executor
from otel_bgtasks.attributes import SkipReason
from otel_bgtasks.errors import TaskImportError
from otel_bgtasks.identity import process_identity
from otel_bgtasks.records import DeadLetterReason
from otel_bgtasks.recovery import recover_interrupted_tasks
from otel_bgtasks.replay import DeadLetters, run_dead_letter
from tests.unit import tasks


@pytest.fixture(autouse=True)
def _reset_tasks() -> Iterator[None]:
    tasks.CALLS.clear()
    tasks.BROKEN["charge"] = True
    yield
    tasks.CALLS.clear()


async def test_final_failure_moves_to_the_store_with_event_and_metric(telemetry, instrument, store):
    instrument(dead_letter_store=store)
    with telemetry.tracer_provider.get_tracer("t").start_as_current_span("req"):
        task = BackgroundTask(tasks.charge, "o-1", 100)
    await task()
    span = telemetry.span("process charge")
    (entry,) = store.list()
    assert span.attributes["bgtasks.task.outcome"] == "dead_lettered"
    assert span.status.status_code is StatusCode.ERROR
    moved = [e for e in span.events if e.name == "bgtasks.dlq.moved"]
    assert [dict(e.attributes) for e in moved] == [
        {"bgtasks.dlq.entry_id": entry.id, "bgtasks.dlq.reason": "exhausted"}
    ]
    assert (entry.task_name, entry.func_ref, entry.reason) == (
        "charge",
        "tests.unit.tasks:charge",
        DeadLetterReason.EXHAUSTED,
    )
    assert (entry.error_type, entry.error_message, entry.category, entry.attempts) == (
        "ConnectionRefusedError",
        "payments down",
        "connection",
        1,
    )
    assert "ConnectionRefusedError: payments down" in entry.traceback
    assert (entry.trace_id, entry.span_id) == (
        format(span.context.trace_id, "032x"),
        format(span.context.span_id, "016x"),
    )
    (moves,) = telemetry.points("bgtasks.dlq.moves")
    assert (dict(moves.attributes), moves.value) == (
        {"bgtasks.task.name": "charge", "bgtasks.dlq.reason": "exhausted"},
        1,
    )
    (depth,) = telemetry.points("bgtasks.dlq.depth")
    # which store: the same in every replica sharing it, never a secret (bounded cardinality)
    assert (dict(depth.attributes), depth.value) == ({"bgtasks.dlq.store": store.identity}, 1)
    assert store.identity == f"sqlite:{store.path}"


async def test_replay_links_to_the_failed_span_and_deletes_on_success(telemetry, instrument, store):
    instrument(dead_letter_store=store)
    await BackgroundTask(tasks.charge, "o-2", 5)()
    failed = telemetry.span("process charge")
    tasks.BROKEN["charge"] = False
    telemetry.exporter.clear()

    report = await DeadLetters(store).replay(None, run_dead_letter)

    assert [o.status for o in report.outcomes] == ["replayed"]
    assert store.list() == []
    assert tasks.CALLS == [("o-2", 5)]
    replay = telemetry.span("process charge")
    assert replay.kind is SpanKind.CONSUMER
    assert replay.parent is None
    assert [link.context.span_id for link in replay.links] == [failed.context.span_id]
    assert replay.attributes["bgtasks.task.outcome"] == "success"
    (replays,) = telemetry.points("bgtasks.dlq.replays")
    assert (dict(replays.attributes), replays.value) == (
        {"bgtasks.task.name": "charge", "bgtasks.task.outcome": "success"},
        1,
    )


async def test_failed_replay_keeps_the_entry_with_attempts_updated(telemetry, instrument, store):
    instrument(dead_letter_store=store)
    await BackgroundTask(tasks.charge, "o-3", 5)()
    (before,) = store.list()
    report = await DeadLetters(store).replay([before.id], run_dead_letter)
    (after,) = store.list()
    assert [o.status for o in report.outcomes] == ["failed"]
    assert after.id == before.id
    assert after.attempts == before.attempts + 1
    assert after.last_failure >= before.last_failure
    assert len(store.list()) == 1  # a replay never adds a second dead letter


async def test_unimportable_task_is_reported_and_kept(telemetry, instrument, store):
    instrument(dead_letter_store=store)
    await BackgroundTask(tasks.charge, "o-4", 5)()
    (entry,) = store.list()
    store.update(entry.replace(func_ref="tests.unit.tasks:renamed_charge"))
    with pytest.raises(TaskImportError, match="renamed_charge"):
        await run_dead_letter(store.get(entry.id))
    report = await DeadLetters(store).replay(None, run_dead_letter)
    assert [o.status for o in report.outcomes] == ["refused"]  # not one of the app's tasks
    assert [e.id for e in store.list()] == [entry.id]


async def test_open_circuit_dead_letters_with_reason_circuit_open(telemetry, instrument, store):
    instrument(dead_letter_store=store, circuit=CircuitBreaker(failure_threshold=1))
    await BackgroundTask(tasks.charge, "a", 1)()
    await BackgroundTask(tasks.charge, "b", 1)()
    reasons = sorted(e.reason.value for e in store.list())
    assert reasons == ["circuit_open", "exhausted"]
    rejected = [s for s in telemetry.spans() if s.attributes["bgtasks.task.outcome"] == "rejected"]
    assert len(rejected) == 1


async def test_durable_task_is_journaled_until_it_finishes(telemetry, instrument, store):
    instrument(dead_letter_store=store)
    scheduled = schedule(tasks.durable_invoice, "o-5")
    (journaled,) = store.journal_list()
    assert (journaled.task_id, journaled.func_ref, journaled.owner) == (
        scheduled.state.task_id,
        "tests.unit.tasks:durable_invoice",
        process_identity(),
    )
    await scheduled.run()
    assert store.journal_list() == []
    assert tasks.CALLS == [("o-5", 0)]


async def test_unserializable_durable_argument_fails_at_scheduling(instrument, store):
    instrument(dead_letter_store=store)
    with pytest.raises(TypeError, match="argument 'user'") as info:
        BackgroundTask(tasks.durable_welcome, tasks.User())
    assert "durable_welcome" in str(info.value)
    assert store.journal_list() == []


async def test_recovery_dead_letters_tasks_of_a_dead_process(telemetry, instrument, store):
    instrument(dead_letter_store=store)
    schedule(tasks.durable_invoice, "o-6")  # never run: as if the process died
    (journaled,) = store.journal_list()
    dead_owner = "somehost:999999:deadbeef"
    store.journal_remove(journaled.task_id)
    from dataclasses import replace

    store.journal_add(replace(journaled, owner=dead_owner, enqueued_at=0.0))
    report = await recover_interrupted_tasks(mode="dead_letter", store=store, stale_after=60)
    assert report.dead_lettered == 1
    (entry,) = store.list()
    assert (entry.id, entry.reason) == (journaled.task_id, DeadLetterReason.INTERRUPTED)
    assert store.journal_list() == []


async def test_recovery_reruns_tasks_of_a_dead_process(telemetry, instrument, store):
    instrument(dead_letter_store=store)
    schedule(tasks.durable_invoice, "o-7")
    (journaled,) = store.journal_list()
    from dataclasses import replace

    store.journal_remove(journaled.task_id)
    store.journal_add(replace(journaled, owner="otherhost:1:abc", enqueued_at=0.0))
    report = await recover_interrupted_tasks(mode="rerun", store=store, stale_after=60)
    assert (report.rerun_succeeded, report.rerun_failed, report.dead_lettered) == (1, 0, 0)
    assert tasks.CALLS == [("o-7", 0)]
    assert store.journal_list() == []


async def test_recovery_rejects_unknown_mode(store):
    with pytest.raises(ValueError, match="'rerun' or 'dead_letter'"):
        await recover_interrupted_tasks(mode="replay", store=store)  # type: ignore[arg-type]


def test_unknown_store_url_and_value(telemetry):
    from otel_bgtasks import BackgroundTasksInstrumentor

    with pytest.raises(ValueError, match="valid forms"):
        BackgroundTasksInstrumentor().instrument(dead_letter_store="mysql://x")
    with pytest.raises(TypeError, match="DeadLetterStore, a URL"):
        BackgroundTasksInstrumentor().instrument(dead_letter_store=42)
    assert not BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry


def test_a_refused_setting_leaves_nothing_instrumented(tmp_path, telemetry):
    from otel_bgtasks import BackgroundTasksInstrumentor

    with pytest.raises(ValueError, match=r"timeout=-1: must be > 0"):
        BackgroundTasksInstrumentor().instrument(
            dead_letter_store=f"sqlite:///{tmp_path / 'dlq.db'}", timeout=-1
        )
    assert not BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry
    assert BackgroundTasksInstrumentor._owned_store is None


@pytest.mark.parametrize(
    ("reason", "journal_kept"),
    [
        (SkipReason.REQUEST_FAILED, False),
        (SkipReason.PREVIOUS_TASK_FAILED, True),
        (SkipReason.SHUTDOWN, True),
    ],
)
async def test_a_skipped_task_is_counted_once_and_let_go(
    telemetry, instrument, store, reason, journal_kept
):
    instrument(dead_letter_store=store)
    executor = active_executor()
    assert executor is not None
    scheduled = schedule(tasks.durable_invoice, "o-9")
    with capture_logs() as logs:
        executor.skip(scheduled.state, reason)
        executor.skip(scheduled.state, reason)  # accounted once
    assert executor.inflight == {}
    assert [e.task_id for e in store.journal_list()] == (
        [scheduled.state.task_id] if journal_kept else []
    )
    (point,) = telemetry.points("bgtasks.task.skipped")
    assert (point.value, dict(point.attributes)) == (
        1,
        {"bgtasks.task.name": "durable_invoice", "bgtasks.skip.reason": reason.value},
    )
    assert [(log["event"], log["reason"], log["durable"]) for log in logs] == [
        ("background task skipped", reason.value, True)
    ]
    assert tasks.CALLS == []
