"""A durable task that leaves a trace on disk: the crash test reads it back after a SIGKILL.

No import-time side effects: the test process imports this module to re-run or replay what
the server process journaled (the journal stores ``tests.integration.apps.durable_tasks:...``).
"""

from __future__ import annotations

import asyncio
import os

from otel_bgtasks import background_task

__all__ = ["SECONDS_ENV", "read_results", "record_result"]

SECONDS_ENV = "BGTASKS_TEST_TASK_SECONDS"
"""How long the task works before writing its line; unset (0) in the test process."""


@background_task(durable=True)
async def record_result(task_no: int, results_path: str) -> None:
    """Work a while, then append ``"<task_no> <pid>"`` to `results_path` in one write."""
    await asyncio.sleep(float(os.environ.get(SECONDS_ENV, "0")))
    fd = os.open(results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{task_no} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def read_results(results_path: str) -> list[tuple[int, int]]:
    """(task_no, pid) of every complete line written so far."""
    try:
        with open(results_path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # a line cut by a crash has no newline yet
    return [(int(no), int(pid)) for no, pid in (line.split() for line in lines)]
