"""Tasks of the dispatch app: work a while, then append one line to the results file.

No import-time side effects (the durable one is journaled as
``tests.integration.apps.dispatch_tasks:durable_work``).
"""

from __future__ import annotations

import asyncio
import os

from otel_bgtasks import background_task

__all__ = ["SECONDS_ENV", "durable_work", "plain_work", "read_lines"]

SECONDS_ENV = "BGTASKS_TEST_TASK_SECONDS"


def _append(results_path: str, line: str) -> None:
    fd = os.open(results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@background_task(name="dispatch-plain")
async def plain_work(task_no: int, results_path: str) -> None:
    await asyncio.sleep(float(os.environ.get(SECONDS_ENV, "0")))
    _append(results_path, f"plain {task_no}")


@background_task(name="dispatch-durable", durable=True)
async def durable_work(task_no: int, results_path: str) -> None:
    await asyncio.sleep(float(os.environ.get(SECONDS_ENV, "0")))
    _append(results_path, f"durable {task_no}")


def read_lines(results_path: str) -> list[str]:
    try:
        with open(results_path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []
