"""Claims under real concurrency: replayers and recoverers in several processes at once, on a
real SQLite file and a real redis-server, a real uvicorn for the admin router.

Exactly once between concurrent replayers and recoverers; at least once across crashes (a
killed replayer's lease expires, and the entry is replayed then).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tests.integration._server import REPO_ROOT, UvicornThread, durable_app
from tests.integration.apps.claim_tasks import (
    FAIL_ENV,
    GATE_ENV,
    HOLD_AFTER_ENV,
    SECONDS_ENV,
    read_lines,
)
from tests.integration.apps.durable_tasks import read_results
from tests.support.redis import running_redis
from tests.support.waiting import wait_until

from otel_bgtasks.health import bearer_token_auth, bgtasks_router
from otel_bgtasks.identity import process_identity
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry
from otel_bgtasks.recovery import recover_interrupted_tasks
from otel_bgtasks.registry import TASK_MODULES_ENV, declare_task_modules
from otel_bgtasks.replay import DeadLetters, run_dead_letter
from otel_bgtasks.stores import open_store
from otel_bgtasks.stores.base import DeadLetterStore

TASKS = "tests.integration.apps.claim_tasks"
# The task modules replay and recovery may run from (the store is untrusted: issue 10).
MODULES = f"{TASKS},tests.integration.apps.durable_tasks"


@pytest.fixture(autouse=True)
def _declared_tasks() -> None:
    declare_task_modules(MODULES)  # in this process; undone by the registry fixture


ENTRIES = 300


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dlq.db'}"
        return
    with running_redis(tmp_path) as server:
        yield server.url


def dead_letter(func: str, key: str, results: Path) -> DeadLetter:
    return DeadLetter(
        id=uuid.uuid4().hex,
        task_name=func,
        func_ref=f"{TASKS}:{func}",
        payload=json.dumps({"args": [key, str(results)], "kwargs": {}}),
        error_type="ConnectionError",
        error_message="down",
        traceback="",
        category="connection",
        attempts=1,
        first_failure=time.time(),
        last_failure=time.time(),
        reason=DeadLetterReason.EXHAUSTED,
    )


def fill(store: DeadLetterStore, func: str, results: Path, count: int = ENTRIES) -> list[str]:
    keys = [f"k{i}" for i in range(count)]
    for key in keys:
        store.put(dead_letter(func, key, results))
    return keys


def cli(url: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "otel_bgtasks.cli", "--store", url, *argv],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), TASK_MODULES_ENV: MODULES, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def runs(results: Path, what: str = "ran") -> collections.Counter[str]:
    return collections.Counter(key for w, key, _ in read_lines(str(results)) if w == what)


def test_two_cli_replays_run_each_entry_exactly_once(store_url: str, tmp_path: Path) -> None:
    results = tmp_path / "results.txt"
    store = open_store(store_url)
    keys = fill(store, "count_run", results)
    first, second = (cli(store_url, "dlq", "replay", "--all") for _ in range(2))
    outputs = [finish(first), finish(second)]
    assert [code for code, _ in outputs] == [0, 0], outputs
    ran = runs(results)
    assert sorted(ran) == sorted(keys)
    assert set(ran.values()) == {1}  # each exactly once
    assert (store.count(), store.list()) == (0, [])  # nothing left, nothing back
    pids = {pid for _, _, pid in read_lines(str(results))}
    print(f"\n[two replays] {len(keys)} entries, run once each, split over {len(pids)} processes")
    store.close()


def test_a_failing_replay_racing_a_successful_one_never_brings_entries_back(
    store_url: str, tmp_path: Path
) -> None:
    results = tmp_path / "results.txt"
    store = open_store(store_url)
    keys = fill(store, "maybe_fail", results)
    failing = cli(store_url, "dlq", "replay", "--all", env={FAIL_ENV: "1"})
    succeeding = cli(store_url, "dlq", "replay", "--all")
    finish(failing)
    code, output = finish(succeeding)
    assert code == 0, output
    succeeded = runs(results)
    assert set(succeeded.values()) <= {1}  # never twice
    remaining = {json.loads(e.payload)["args"][0]: e for e in store.list()}
    assert set(succeeded).isdisjoint(remaining)  # a replayed entry never comes back
    assert set(succeeded) | set(remaining) == set(keys)  # and none is lost
    failed = runs(results, "failed")
    assert all(remaining[key].attempts == 1 + failed[key] for key in remaining)
    print(f"\n[fail vs ok] succeeded={len(succeeded)} still dead-lettered={len(remaining)}")
    store.close()


def test_ten_router_replays_of_one_entry_run_it_once(
    store_url: str, tmp_path: Path, instrument: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results.txt"
    store = open_store(store_url)
    entry = dead_letter("slow_count", "only", results)
    store.put(entry)
    entry_id = entry.id
    instrument(dead_letter_store=store)
    app = FastAPI()
    app.include_router(bgtasks_router(auth=bearer_token_auth("t0ken")))
    monkeypatch.setenv(SECONDS_ENV, "0.3")  # the task runs in this process: hold the claim
    statuses: list[tuple[int, str]] = []
    lock = threading.Lock()
    with UvicornThread(app) as server:

        def replay() -> None:
            response = httpx.post(
                f"{server.url}/bgtasks/dead-letters/{entry_id}/replay",
                headers={"Authorization": "Bearer t0ken"},
                timeout=30.0,
            )
            body = response.json()
            with lock:
                statuses.append((response.status_code, body.get("status", "missing")))

        threads = [threading.Thread(target=replay) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert runs(results) == {"only": 1}
    counted = collections.Counter(statuses)
    assert counted[(200, "replayed")] == 1
    assert set(counted) <= {(200, "replayed"), (200, "claimed"), (404, "missing")}
    assert store.count() == 0
    store.close()


def journal_entry(key: str, results: Path, owner: str, at: float) -> JournalEntry:
    return JournalEntry(
        task_id=uuid.uuid4().hex,
        task_name="count_run",
        func_ref=f"{TASKS}:count_run",
        payload=json.dumps({"args": [key, str(results)], "kwargs": {}}),
        owner=owner,
        enqueued_at=at,
    )


def test_two_recoverers_at_once_rerun_each_task_exactly_once(
    store_url: str, tmp_path: Path
) -> None:
    results = tmp_path / "results.txt"
    store = open_store(store_url)
    dead = "another-host:7:gone"
    keys = [f"j{i}" for i in range(100)]
    for key in keys:
        store.journal_add(journal_entry(key, results, dead, time.time() - 3600))
    store.heartbeat(dead, at=time.time() - 3600)
    procs = [cli(store_url, "recover", "--rerun", "--stale-after", "60") for _ in range(2)]
    outputs = [finish(p) for p in procs]
    assert [code for code, _ in outputs] == [0, 0], outputs
    ran = runs(results)
    assert sorted(ran) == sorted(keys)
    assert set(ran.values()) == {1}
    assert store.journal_list() == []
    assert dead not in store.last_seen()
    store.close()


def test_recovery_racing_a_live_process_leaves_its_tasks_alone(tmp_path: Path) -> None:
    """The live server's heartbeat may be older than `stale_after` (it beats every 10 s):
    recovery still sees the process is running (same machine, pid and start time). The task
    runs until the test creates its gate file, so the CLI never races it."""
    gate = tmp_path / "gate"
    server, store_url, results = durable_app(tmp_path, name="live", gate=gate)
    store = open_store(store_url)
    with server:
        assert httpx.post(f"{server.url}/work/1", timeout=10.0).status_code == 200
        (journaled,) = store.journal_list()
        code, output = finish(cli(store_url, "recover", "--rerun", "--stale-after", "0.01"))
        assert (code, output.strip()) == (0, "recover: no interrupted durable tasks")
        assert store.journal_list() == [journaled]
        assert journaled.owner in store.last_seen()
        assert read_results(str(results)) == []  # still running: nobody ran it
        gate.touch()
        wait_until(lambda: read_results(str(results)), what="the live task to finish")
        wait_until(lambda: not store.journal_list(), what="its journal row to go")
    assert [n for n, _ in read_results(str(results))] == [1]
    store.close()


REPLAYER = """
import asyncio, sys
from otel_bgtasks.replay import DeadLetters, run_dead_letter
from otel_bgtasks.stores import open_store
store = open_store(sys.argv[1])
asyncio.run(DeadLetters(store, lease=float(sys.argv[2])).replay(None, run_dead_letter))
"""


def kill_mid_replay(store_url: str, results: Path, lease: float) -> None:
    """Replay in another process; SIGKILL it once 3 entries ran and the 4th is running (the
    4th holds until then: no race between the kill and a replay finishing)."""
    replayer = subprocess.Popen(
        [sys.executable, "-c", REPLAYER, store_url, str(lease)],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            TASK_MODULES_ENV: MODULES,
            HOLD_AFTER_ENV: "3",
        },
    )
    wait_until(lambda: len(runs(results, "start")) >= 4, what="a fourth replay to start")
    replayer.send_signal(signal.SIGKILL)
    replayer.wait()


async def test_sigkill_mid_replay_then_lease_expiry_then_replay_again(
    store_url: str, tmp_path: Path, instrument: Any
) -> None:
    results = tmp_path / "results.txt"
    store = open_store(store_url)
    keys = fill(store, "slow_count", results, count=20)
    lease = 3600.0  # held for the whole test unless time is moved past it
    await asyncio.to_thread(kill_mid_replay, store_url, results, lease)
    started, done = runs(results, "start"), runs(results)
    assert len(done) == 3
    (in_flight,) = set(started) - set(done)  # killed mid-run: its claim is still held

    instrument(dead_letter_store=store)
    letters = DeadLetters(store, lease=lease)
    report = await letters.replay(None, run_dead_letter)
    assert [(o.status, o.message) for o in report.outcomes if o.status != "replayed"] == [
        ("claimed", "being replayed by another replayer")
    ]
    (held,) = store.list()
    assert json.loads(held.payload)["args"][0] == in_flight

    # The lease expires: as of a moment past it, the entry can be claimed by anyone (the
    # store's own clock argument, instead of waiting an hour), and replayed once let go.
    assert store.claim(held.id, "operator", lease=60.0) is None  # still held now
    later = time.time() + lease + 1.0
    assert store.claim(held.id, "operator", lease=60.0, now=later) == held
    assert store.release(held.id, "operator")
    again = await DeadLetters(store, lease=lease).replay([held.id], run_dead_letter)
    assert again.replayed == 1
    ran = runs(results)
    assert sorted(ran) == sorted(keys)  # at least once across the crash ...
    assert set(ran.values()) == {1}  # ... and here exactly once: killed before it finished
    assert store.count() == 0
    store.close()


BURST = 500


async def test_sigkill_mid_burst_of_500_durable_tasks_accounts_for_all(
    tmp_path: Path, instrument: Any
) -> None:
    # Tasks of the second half hold until a gate that never opens: acknowledged ones of them
    # are surely unfinished when the server is killed.
    server, store_url, results = durable_app(
        tmp_path, name="burst", gate=tmp_path / "never", gate_from=BURST // 2
    )
    acked: set[int] = set()
    lock = threading.Lock()

    def post(client: httpx.Client, task_no: int) -> None:
        try:
            response = client.post(f"/work/{task_no}")
        except httpx.HTTPError:
            return
        if response.status_code == 200:
            with lock:
                acked.add(task_no)

    def burst() -> None:
        with server, httpx.Client(base_url=server.url, timeout=10.0) as client:
            threads = [threading.Thread(target=lambda n=n: post(client, n)) for n in range(BURST)]
            for t in threads[: BURST // 2]:
                t.start()
            wait_until(lambda: len(acked) >= BURST // 4, what="a quarter acknowledged")
            for t in threads[BURST // 2 :]:
                t.start()
            wait_until(lambda: read_results(str(results)), what="a first task to finish")
            wait_until(lambda: max(acked) >= BURST // 2, what="a held task acknowledged")
            server.stop(signal.SIGKILL)
            for t in threads:
                t.join()

    await asyncio.to_thread(burst)
    completed = {n for n, _ in read_results(str(results))}
    store = open_store(store_url)
    journaled = store.journal_list()
    instrument(dead_letter_store=store)
    report = await recover_interrupted_tasks(
        mode="rerun", store=store, stale_after=3600.0, concurrency=16
    )
    rerun = {n for n, pid in read_results(str(results)) if pid == os.getpid()}
    lost = acked - completed - rerun
    print(
        f"\n[burst] sent={BURST} acknowledged={len(acked)} completed_before_kill="
        f"{len(completed)} journaled={len(journaled)} rerun={report.rerun_succeeded}"
        f" lost={len(lost)}"
    )
    assert lost == set()
    assert report.rerun_succeeded == len(journaled) > 0
    assert store.journal_list() == []
    assert process_identity() not in {j.owner for j in journaled}
    store.close()


def test_cli_and_router_replaying_everything_at_once_run_each_entry_once(
    store_url: str, tmp_path: Path, instrument: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results.txt"
    store = open_store(store_url)
    keys = fill(store, "slow_count", results, count=200)
    monkeypatch.setenv(SECONDS_ENV, "0.001")  # the router's runs, in this process
    instrument(dead_letter_store=store)
    app = FastAPI()
    app.include_router(bgtasks_router(auth=bearer_token_auth("t0ken")))
    gate = tmp_path / "gate"
    with UvicornThread(app) as server:
        # The CLI runs 5, then holds its 6th until the router has replayed the rest.
        replayer = cli(
            store_url, "dlq", "replay", "--all", env={HOLD_AFTER_ENV: "5", GATE_ENV: str(gate)}
        )
        wait_until(lambda: len(runs(results, "start")) >= 6, what="the CLI to hold a replay")
        response = httpx.post(
            f"{server.url}/bgtasks/dead-letters/replay",
            headers={"Authorization": "Bearer t0ken"},
            timeout=120.0,
        )
        gate.touch()
        code, output = finish(replayer)
    assert response.status_code == 200
    assert code == 0, output
    statuses = collections.Counter(o["status"] for o in response.json()["outcomes"])
    assert set(statuses) <= {"replayed", "claimed"}
    ran = runs(results)
    assert sorted(ran) == sorted(keys)
    assert set(ran.values()) == {1}
    assert store.count() == 0
    by_process = collections.Counter(pid for w, _, pid in read_lines(str(results)) if w == "ran")
    assert len(by_process) == 2  # both took part
    print(f"\n[cli vs router] runs per process: {sorted(by_process.values())}")
    store.close()
