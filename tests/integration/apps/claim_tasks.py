"""Tasks the claim tests replay and recover from several processes at once; each run appends
one line ``"<what> <key> <pid>"`` to a results file in one write (atomic with O_APPEND).

No import-time side effects: replayers and recoverers import this module by its func_ref.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = [
    "FAIL_ENV",
    "GATE_ENV",
    "HOLD_AFTER_ENV",
    "SECONDS_ENV",
    "count_run",
    "maybe_fail",
    "read_lines",
    "slow_count",
]

FAIL_ENV = "BGTASKS_TEST_FAIL"
SECONDS_ENV = "BGTASKS_TEST_TASK_SECONDS"
HOLD_AFTER_ENV = "BGTASKS_TEST_HOLD_AFTER"
"""N: once N runs have finished, `slow_count` starts and then holds (the process is killed
mid-run, or let go, at a point the test knows instead of at a moment it races)."""
GATE_ENV = "BGTASKS_TEST_GATE"
"""With `HOLD_AFTER_ENV`: a held run goes on once the test creates this file (else never)."""


def _append(results_path: str, what: str, key: str) -> None:
    fd = os.open(results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {key} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def count_run(key: str, results_path: str) -> None:
    _append(results_path, "ran", key)


def maybe_fail(key: str, results_path: str) -> None:
    """Fails in a process with ``BGTASKS_TEST_FAIL=1``, succeeds elsewhere."""
    if os.environ.get(FAIL_ENV) == "1":
        _append(results_path, "failed", key)
        raise ConnectionError(f"downstream refused {key}")
    _append(results_path, "ran", key)


def slow_count(key: str, results_path: str) -> None:
    hold_after = os.environ.get(HOLD_AFTER_ENV)
    hold = hold_after is not None and len(
        [w for w, _, _ in read_lines(results_path) if w == "ran"]
    ) >= int(hold_after)
    _append(results_path, "start", key)
    if hold:
        gate = os.environ.get(GATE_ENV)
        if gate is None:
            threading.Event().wait()  # until the test kills this process
        while gate is not None and not os.path.exists(gate):
            time.sleep(0.01)  # polled by the task, not the test: it decides nothing
    time.sleep(float(os.environ.get(SECONDS_ENV, "0")))
    _append(results_path, "ran", key)


def read_lines(results_path: str) -> list[tuple[str, str, int]]:
    """(what, key, pid) of every complete line."""
    try:
        with open(results_path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return [
        (what, key, int(pid)) for what, key, pid in (line.split() for line in text.split("\n")[:-1])
    ]
