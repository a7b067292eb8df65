"""Durable tasks survive a SIGKILL: every task the server acknowledged is accounted for.

A real uvicorn (``tests.integration.apps.durable_app``) with a SQLite store gets a burst of
requests, each scheduling a durable task that works a while and then appends its number to a
results file. Half-way through the burst, once some tasks have finished, the server is killed
with SIGKILL. The test then recovers the journal of the dead process, as a restarted app would
at startup, and checks that each acknowledged task (HTTP 200 received) finished before the
crash, re-ran, or is a dead letter with reason ``interrupted``. Run with ``-s`` to see counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from opentelemetry.trace import SpanKind, StatusCode
from starlette.background import BackgroundTask
from tests.integration._server import durable_app
from tests.integration.apps.durable_tasks import read_results, record_result
from tests.support.waiting import wait_until

from otel_bgtasks._execution import active_executor as current_executor
from otel_bgtasks.errors import SerializationError
from otel_bgtasks.records import DeadLetterReason, JournalEntry
from otel_bgtasks.recovery import RecoveryReport, recover_interrupted_tasks
from otel_bgtasks.replay import DeadLetters, run_dead_letter
from otel_bgtasks.stores import open_store
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore

N = 40  # requests in the burst
FIRST = 20  # sent and acknowledged first; their tasks finish at once
KILL_AT = 25  # acknowledgements after which the server is killed (the burst still going)
# Tasks numbered FIRST or more hold until a gate file that is never created: when the server
# is killed, the acknowledged ones among them surely are unfinished (no race with the kill).
FUNC_REF = "tests.integration.apps.durable_tasks:record_result"


@dataclass
class Crash:
    store_url: str
    results: Path
    server_pid: int
    acked: dict[int, tuple[str, str]]  # task number -> (trace_id, span_id) of its request
    completed_before: set[int]


def crash_mid_burst(tmp_path: Path) -> Crash:
    server, store_url, results = durable_app(
        tmp_path, name="durable", gate=tmp_path / "never", gate_from=FIRST
    )
    acked: dict[int, tuple[str, str]] = {}
    lock = threading.Lock()

    def post(task_no: int) -> None:
        try:
            response = httpx.post(f"{server.url}/work/{task_no}", timeout=10.0)
        except httpx.HTTPError:  # killed before or while answering: not acknowledged
            return
        if response.status_code == 200:
            body = response.json()
            assert body["task_no"] == task_no
            with lock:
                acked[task_no] = (body["trace_id"], body["span_id"])

    with server:
        server_pid = httpx.get(f"{server.url}/ready").json()["pid"]
        assert server_pid == server.pid
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(post, range(FIRST)))
            assert sorted(acked) == list(range(FIRST))
            wait_until(lambda: read_results(str(results)), what="a first task to finish")
            rest = [pool.submit(post, n) for n in range(FIRST, N)]
            wait_until(lambda: len(acked) >= KILL_AT, what=f"{KILL_AT} acknowledgements")
            server.stop(signal.SIGKILL)  # reaped: its pid is gone when recovery looks
            for future in rest:
                future.result()
    lines = read_results(str(results))
    assert {pid for _, pid in lines} == {server_pid}
    return Crash(store_url, results, server_pid, dict(acked), {n for n, _ in lines})


def task_no_of(entry_payload: str) -> int:
    payload = json.loads(entry_payload)
    assert payload["kwargs"] == {}
    task_no, _results_path = payload["args"]
    return int(task_no)


def check_journal(crash: Crash, journaled: list[JournalEntry]) -> dict[int, JournalEntry]:
    """The dead server's journal: one entry per unfinished task, ids of its request."""
    by_no = {task_no_of(j.payload): j for j in journaled}
    assert len(by_no) == len(journaled)
    for task_no, entry in by_no.items():
        assert entry.func_ref == FUNC_REF
        assert entry.task_name == "record_result"
        assert entry.owner.split(":")[-2] == str(crash.server_pid)
        if task_no in crash.acked:
            assert (entry.trace_id, entry.span_id) == crash.acked[task_no]
    # The crash interrupted acknowledged work, or this test proved nothing.
    assert set(by_no) & (set(crash.acked) - crash.completed_before)
    return by_no


async def test_rerun_after_sigkill_loses_no_acknowledged_task(tmp_path, telemetry, instrument):
    crash = await asyncio.to_thread(crash_mid_burst, tmp_path)
    store = open_store(crash.store_url)
    journaled = check_journal(crash, store.journal_list())
    dead_owner = next(iter(journaled.values())).owner
    instrument(dead_letter_store=store)

    report = await recover_interrupted_tasks(mode="rerun", store=store, stale_after=3600.0)

    assert report == RecoveryReport(rerun_succeeded=len(journaled), rerun_failed=0)
    after = read_results(str(crash.results))
    rerun = {n for n, pid in after if pid == os.getpid()}
    assert rerun == set(journaled)
    acked = set(crash.acked)
    lost = acked - crash.completed_before - rerun
    print(
        f"\n[rerun] acknowledged={len(acked)} of {N}"
        f" completed_before_crash={len(acked & crash.completed_before)}"
        f" rerun={len(acked & rerun)}"
        f" (of which already done before the crash: {len(acked & rerun & crash.completed_before)})"
        f" dead_lettered=0 unacknowledged_rerun={len(rerun - acked)} lost={len(lost)}"
    )
    assert lost == set()
    assert store.journal_list() == []
    assert store.count() == 0
    assert dead_owner not in store.last_seen()

    # Each re-run is one span, in a new trace, linked to the request that scheduled it.
    spans = [s for s in telemetry.spans() if s.name == "process record_result"]
    assert len(spans) == len(journaled)
    links = set()
    for span in spans:
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is None
        assert span.status.status_code is StatusCode.UNSET
        assert span.attributes["bgtasks.task.outcome"] == "success"
        assert span.attributes["bgtasks.task.attempts"] == 1
        (link,) = span.links
        links.add((format(link.context.trace_id, "032x"), format(link.context.span_id, "016x")))
    assert links == {(j.trace_id, j.span_id) for j in journaled.values()}
    assert {crash.acked[n] for n in rerun & acked} <= links

    # A second recovery finds nothing left to do.
    assert await recover_interrupted_tasks(mode="rerun", store=store) == RecoveryReport()


async def test_dead_letter_after_sigkill_keeps_every_acknowledged_task(
    tmp_path, telemetry, instrument
):
    crash = await asyncio.to_thread(crash_mid_burst, tmp_path)
    store = open_store(crash.store_url)
    journaled = check_journal(crash, store.journal_list())
    instrument(dead_letter_store=store)

    report = await recover_interrupted_tasks(mode="dead_letter", store=store, stale_after=3600.0)

    assert report == RecoveryReport(dead_lettered=len(journaled))
    letters = {task_no_of(e.payload): e for e in store.list()}
    assert set(letters) == set(journaled)
    for task_no, entry in letters.items():
        origin = journaled[task_no]
        assert entry.id == origin.task_id
        assert entry.reason is DeadLetterReason.INTERRUPTED
        assert entry.func_ref == FUNC_REF
        assert entry.task_name == "record_result"
        assert entry.category == "system"
        assert entry.attempts == 1
        assert origin.owner in entry.error_message
        assert (entry.trace_id, entry.span_id) == (origin.trace_id, origin.span_id)
    assert store.journal_list() == []
    # Nothing re-ran: the results file is as the crash left it.
    assert {n for n, _ in read_results(str(crash.results))} == crash.completed_before

    acked = set(crash.acked)
    dead = set(letters)
    lost = acked - crash.completed_before - dead
    print(
        f"\n[dead_letter] acknowledged={len(acked)} of {N}"
        f" completed_before_crash={len(acked & crash.completed_before)} rerun=0"
        f" dead_lettered={len(acked & dead)} unacknowledged_dead_lettered={len(dead - acked)}"
        f" lost={len(lost)}"
    )
    assert lost == set()

    # The operator replays them once the cause is understood: all run, all entries go.
    replay = await DeadLetters(store).replay(None, run_dead_letter)
    assert replay.ok
    assert replay.replayed == len(letters)
    assert store.count() == 0
    replayed = {n for n, pid in read_results(str(crash.results)) if pid == os.getpid()}
    assert replayed == dead
    spans = [s for s in telemetry.spans() if s.name == "process record_result"]
    assert {
        (format(s.links[0].context.trace_id, "032x"), format(s.links[0].context.span_id, "016x"))
        for s in spans
    } == {(e.trace_id, e.span_id) for e in letters.values()}


async def test_unserializable_durable_argument_fails_at_scheduling(tmp_path, telemetry, instrument):
    store = SQLiteDeadLetterStore(tmp_path / "dlq.db")
    instrument(dead_letter_store=store)
    tracer = telemetry.tracer_provider.get_tracer("test")

    class Order:  # not JSON
        pass

    with tracer.start_as_current_span("POST /orders"):
        with pytest.raises(TypeError, match=r"argument 'task_no' \(position 0\)") as positional:
            BackgroundTask(record_result, Order(), str(tmp_path / "r.txt"))
        with pytest.raises(TypeError, match=r"argument 'results_path'") as keyword:
            BackgroundTask(record_result, 1, results_path=Path("not-json"))

    for raised, value_type in ((positional, "Order"), (keyword, "PosixPath")):
        exc = raised.value
        assert isinstance(exc, SerializationError)
        assert "of task record_result" in str(exc)
        assert exc.value_type == value_type
    assert positional.value.position == 0
    assert keyword.value.keyword == "results_path"
    # Refused before anything happened: no journal entry, nothing in flight, no event.
    assert store.journal_list() == []
    executor = current_executor()
    assert executor is not None
    assert executor.inflight == {}
    (request,) = telemetry.spans()
    assert request.events == ()

    # The same task with serializable arguments is journaled, then unjournaled when done.
    with tracer.start_as_current_span("POST /orders/ok"):
        task = BackgroundTask(record_result, 1, str(tmp_path / "r.txt"))
    (entry,) = store.journal_list()
    assert entry.func_ref == FUNC_REF
    await task()
    assert store.journal_list() == []
    assert read_results(str(tmp_path / "r.txt")) == [(1, os.getpid())]
