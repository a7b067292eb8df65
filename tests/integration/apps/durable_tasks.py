"""A durable task that leaves a trace on disk: the crash test reads it back after a SIGKILL.

No import-time side effects: the test process imports this module to re-run or replay what
the server process journaled (the journal stores ``tests.integration.apps.durable_tasks:...``).
"""

from __future__ import annotations

import asyncio
import os
import time

from otel_bgtasks import background_task

__all__ = ["GATE_ENV", "GATE_FROM_ENV", "SECONDS_ENV", "read_results", "record_result"]

SECONDS_ENV = "BGTASKS_TEST_TASK_SECONDS"
"""How long the task works before writing its line; unset (0) in the test process."""
GATE_ENV = "BGTASKS_TEST_GATE"
"""A file path: the task then works until the test creates that file (an event across
processes, instead of a duration the test would race); unset in the test process."""
GATE_FROM_ENV = "BGTASKS_TEST_GATE_FROM"
"""With `GATE_ENV`: only tasks numbered at least this wait for the gate (default 0: all)."""


@background_task(durable=True)
async def record_result(task_no: int, results_path: str) -> None:
    """Work a while (or until the gate file exists), then append ``"<task_no> <pid>"`` to
    `results_path` in one write."""
    await asyncio.sleep(float(os.environ.get(SECONDS_ENV, "0")))
    gate = os.environ.get(GATE_ENV)
    if gate and task_no >= int(os.environ.get(GATE_FROM_ENV, "0")):
        await asyncio.to_thread(_wait_for, gate)
    fd = os.open(results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{task_no} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def _wait_for(path: str) -> None:
    while not os.path.exists(path):  # polled by the app, not the test: it decides nothing
        time.sleep(0.01)


def read_results(results_path: str) -> list[tuple[int, int]]:
    """(task_no, pid) of every complete line written so far."""
    try:
        with open(results_path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # a line cut by a crash has no newline yet
    return [(int(no), int(pid)) for no, pid in (line.split() for line in lines)]
