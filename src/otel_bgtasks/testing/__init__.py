"""Test helpers for apps that use otel-bgtasks: in-memory telemetry, waits, assertions by name.

With pytest (the plugin is registered on install, and does nothing until a test asks for its
fixture)::

    def test_signup_sends_the_welcome_mail(bgtasks):
        client = TestClient(bgtasks.instrument_app(create_app()))
        client.post("/signup", json={"email": "a@example.com"})
        run = bgtasks.task("send-welcome-mail").assert_succeeded(attempts=1)
        run.assert_linked_to_request()

Elsewhere, ``with BgTasks(retry=RetryPolicy(max_attempts=3)) as bgtasks: ...`` does the same.
`fail_on(func, attempts=...)` makes a task fail on chosen attempts.
"""

from __future__ import annotations

from otel_bgtasks.testing.faults import fail_on
from otel_bgtasks.testing.harness import DEFAULT_TIMEOUT, BgTasks, TasksPendingError
from otel_bgtasks.testing.runs import RetryEvent, TaskRun
from otel_bgtasks.testing.store import InMemoryDeadLetterStore

__all__ = [
    "DEFAULT_TIMEOUT",
    "BgTasks",
    "InMemoryDeadLetterStore",
    "RetryEvent",
    "TaskRun",
    "TasksPendingError",
    "fail_on",
]
