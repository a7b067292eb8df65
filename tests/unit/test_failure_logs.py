"""A failure's log line (issue 19, log volume): what an operator acts on, the task's own frames
only; a run refused by an open circuit is one WARNING without a traceback."""

from __future__ import annotations

from starlette.background import BackgroundTask
from structlog.testing import capture_logs

from otel_bgtasks import CircuitBreaker, background_task
from otel_bgtasks._tracebacks import LOG_FRAMES, LOG_TRACEBACK_LIMIT
from otel_bgtasks.testing import InMemoryDeadLetterStore

payments = CircuitBreaker("log-payments", failure_threshold=1, open_duration=3600)


def _deep(n: int) -> None:
    if n == 0:
        raise ConnectionRefusedError("payments-api refused the connection")
    _deep(n - 1)


@background_task(name="log-charge", circuit=payments)
async def charge(order_id: int) -> None:
    _deep(20)


async def test_a_failure_logs_its_fields_and_the_task_frames_a_rejection_no_traceback(
    instrument,
):
    store = InMemoryDeadLetterStore()
    instrument(dead_letter_store=store)
    with capture_logs() as logs:
        await BackgroundTask(charge, 1)()  # fails: the breaker opens
        await BackgroundTask(charge, 2)()  # refused: never runs
    opened, failed, rejected = (e for e in logs if e["log_level"] in ("error", "warning"))
    first, second = sorted(store.list(), key=lambda e: e.attempts, reverse=True)

    assert failed["event"] == "background task failed"
    assert failed["log_level"] == "error"
    exception = failed.pop("exception")
    assert {k: v for k, v in failed.items() if k not in ("trace_id", "span_id", "task_id")} == {
        "event": "background task failed",
        "log_level": "error",
        "task_name": "log-charge",
        "outcome": "dead_lettered",
        "attempts": 1,
        "category": "connection",
        "dlq_reason": "exhausted",
        "dlq_entry_id": first.id,
        "error_type": "ConnectionRefusedError",
        "error_message": "payments-api refused the connection",
    }
    assert len(exception) <= LOG_TRACEBACK_LIMIT
    lines = exception.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "frames of the executor and the thread pool cut" in lines[1]
    files = [line for line in lines if line.startswith('  File "')]
    assert len(files) == LOG_FRAMES  # the innermost frames: where it broke
    assert all("test_failure_logs.py" in line for line in files)
    assert lines[-1] == "ConnectionRefusedError: payments-api refused the connection"
    # the dead letter keeps the whole traceback, every frame down from the executor
    assert "otel_bgtasks" in first.traceback
    assert first.traceback.count('  File "') > LOG_FRAMES

    assert opened["event"] == "circuit breaker state change"
    assert {k: v for k, v in rejected.items() if k not in ("trace_id", "span_id", "task_id")} == {
        "event": "background task rejected: circuit open",
        "log_level": "warning",
        "circuit": "log-payments",
        "task_name": "log-charge",
        "outcome": "rejected",
        "attempts": 0,
        "category": "connection",
        "dlq_reason": "circuit_open",
        "dlq_entry_id": second.id,
    }
