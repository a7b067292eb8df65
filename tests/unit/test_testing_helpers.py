"""`otel_bgtasks.testing`: the `bgtasks` fixture, `TaskRun` assertions and `fail_on`."""

from __future__ import annotations

import asyncio
import re
import threading

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.trace import SpanKind
from tenacity import wait_none

from otel_bgtasks import (
    BackgroundTasksInstrumentor,
    DeadLetterReason,
    ErrorCategory,
    Outcome,
    RetryPolicy,
    SQLiteDeadLetterStore,
    background_task,
    schedule,
)
from otel_bgtasks.testing import BgTasks, RetryEvent, TasksPendingError, fail_on

FAST = RetryPolicy(max_attempts=3, wait=wait_none())
SENT: list[str] = []


@background_task(name="send-mail", retry=FAST)
async def send_mail(to: str) -> None:
    SENT.append(to)


def resize_avatar(user_id: int) -> None:
    return None


def make_app(*tasks: object) -> FastAPI:
    """An app whose POST /signup schedules `tasks` (each called with "a@example.com")."""
    app = FastAPI()

    @app.post("/signup")
    async def signup(background: BackgroundTasks) -> dict[str, bool]:
        for task in tasks:
            background.add_task(task, "a@example.com")  # type: ignore[arg-type]
        return {"ok": True}

    return app


async def post_signup(app: FastAPI, times: int = 1) -> None:
    """POST /signup through httpx's ASGI transport: returns once the tasks have run."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(times):
            (await client.post("/signup")).raise_for_status()


# -- the fixture, through a real request --------------------------------------------------------


async def test_a_request_task_is_read_back_by_name(bgtasks):
    await post_signup(bgtasks.instrument_app(make_app(send_mail)))
    run = bgtasks.task("send-mail").assert_succeeded(attempts=1)
    request = run.assert_linked_to_request()
    assert (request.name, request.kind) == ("POST /signup", SpanKind.SERVER)
    assert (run.outcome, run.attempts, run.retries, run.error_type, run.dead_letter) == (
        Outcome.SUCCESS,
        1,
        (),
        None,
        None,
    )
    assert [e.name for e in request.events] == ["bgtasks.enqueued"]
    assert await bgtasks.wait_async() == [run]


async def test_retries_are_events_on_the_run(bgtasks):
    flaky = fail_on(send_mail, attempts={1, 2}, exc=ConnectionResetError)
    await post_signup(make_app(flaky))
    run = bgtasks.task("send-mail").assert_ran(outcome="success", attempts=3, retries=2)
    assert run.retries == tuple(
        RetryEvent(
            attempt=n,
            delay=0.0,
            error_type="ConnectionResetError",
            message=f"injected failure of send_mail on attempt {n - 1}",
        )
        for n in (2, 3)
    )
    assert run.linked is None  # no request span: the app was not instrumented here


async def test_exhausted_retries_are_dead_lettered_with_the_reason(bgtasks):
    always = fail_on(send_mail, attempts=range(1, 10), exc=ConnectionError("smtp down"))
    await post_signup(make_app(always))
    run = bgtasks.task("send-mail").assert_ran(
        outcome=Outcome.DEAD_LETTERED, attempts=3, error_type=ConnectionError
    )
    entry = run.assert_dead_lettered(DeadLetterReason.EXHAUSTED)
    assert (entry.task_name, entry.attempts, entry.error_message, entry.category) == (
        "send-mail",
        3,
        "smtp down",
        "connection",
    )
    assert run.error_category is ErrorCategory.CONNECTION
    assert bgtasks.dead_letters("send-mail") == [entry]


async def test_fixture_options_set_the_instrumentor_defaults(bgtasks):
    bgtasks.instrument(retry=RetryPolicy(max_attempts=2, wait=wait_none()))
    await post_signup(make_app(fail_on(resize_avatar, attempts=1)))
    # a sync task in the thread pool: the attempt comes from the running task there too
    bgtasks.task("resize_avatar").assert_succeeded(attempts=2)


class TestOverriddenOptions:
    @pytest.fixture
    def bgtasks_options(self):
        return {"trace_mode": "child", "retry": RetryPolicy(max_attempts=1)}

    async def test_the_override_applies(self, bgtasks):
        await post_signup(bgtasks.instrument_app(make_app(fail_on(resize_avatar))))
        run = bgtasks.task("resize_avatar").assert_ran(outcome="dead_lettered", attempts=1)
        request = run.assert_linked_to_request()
        assert run.span.parent is not None
        assert run.span.parent.span_id == request.context.span_id


# -- waiting --------------------------------------------------------------------------------------


async def test_wait_async_waits_for_scheduled_tasks(bgtasks):
    scheduled = schedule(send_mail, "b@example.com")
    pending = asyncio.create_task(scheduled.run())
    runs = await bgtasks.wait_async()
    assert pending.done()
    assert [(r.name, r.outcome) for r in runs] == [("send-mail", Outcome.SUCCESS)]


async def test_wait_refuses_to_block_the_event_loop(bgtasks):
    with pytest.raises(RuntimeError, match=r"await bgtasks.wait_async\(\)"):
        bgtasks.wait()


def test_wait_names_what_is_still_pending(bgtasks):
    started, release = threading.Event(), threading.Event()

    @background_task(name="slow-report")
    def slow_report() -> None:
        started.set()
        release.wait(10)

    thread = threading.Thread(target=schedule(slow_report).run_sync)
    thread.start()
    try:
        assert started.wait(5)
        with pytest.raises(TasksPendingError) as raised:
            bgtasks.wait("slow-report", "never-scheduled", timeout=0.2)
    finally:
        release.set()
        thread.join(5)
    message = str(raised.value)
    assert re.fullmatch(
        r"background tasks did not finish within 0.2 s: "
        r"1 still pending: 'slow-report' \(running for [\d.]+ s\); "
        r"no finished run of 'slow-report', 'never-scheduled'; finished: no task has run",
        message,
    ), message
    assert [r.name for r in bgtasks.wait("slow-report")] == ["slow-report"]


def test_wait_by_name_covers_a_task_not_started_yet(bgtasks):
    thread = threading.Thread(target=schedule(send_mail, "c@example.com").run_sync)
    thread.start()
    bgtasks.wait("send-mail")
    thread.join(5)
    bgtasks.task("send-mail").assert_succeeded()


# -- failure messages -----------------------------------------------------------------------------


async def test_a_mismatch_names_every_difference_and_shows_the_run(bgtasks):
    await post_signup(make_app(fail_on(send_mail, attempts=[1, 2, 3], exc=TimeoutError)))
    run = bgtasks.task("send-mail")
    with pytest.raises(AssertionError) as raised:
        run.assert_succeeded(attempts=1)
    assert str(raised.value) == (
        "expected outcome=success, got dead_lettered; expected attempts=1, got 3\n"
        "task 'send-mail': outcome=dead_lettered attempts=3 error=TimeoutError: "
        "injected failure of send_mail on attempt 3 [timeout]\n"
        "  retry before attempt 2 (after 0.000 s): TimeoutError: "
        "injected failure of send_mail on attempt 1\n"
        "  retry before attempt 3 (after 0.000 s): TimeoutError: "
        "injected failure of send_mail on attempt 2\n"
        "  dead-lettered: exhausted\n"
        "  not linked to any span (scheduled outside a recording span)"
    )
    with pytest.raises(
        AssertionError, match=r"^expected dead-letter reason permanent, got exhausted"
    ):
        run.assert_dead_lettered("permanent")
    with pytest.raises(AssertionError, match=r"^expected task 'send-mail' to be linked"):
        run.assert_linked_to_request()


async def test_an_unknown_name_lists_what_did_run(bgtasks):
    await post_signup(make_app(send_mail, resize_avatar))
    with pytest.raises(AssertionError) as raised:
        bgtasks.task("send_mail")
    assert str(raised.value) == (
        "task 'send_mail' has not run: 'send-mail' (success), 'resize_avatar' (success). "
        "A task is named by @background_task(name=...) or its function's __qualname__"
    )


async def test_a_task_that_ran_twice_is_not_one_run(bgtasks):
    await post_signup(make_app(send_mail), times=2)
    with pytest.raises(AssertionError, match=r"^task 'send-mail' ran 2 times; use bgtasks.runs"):
        bgtasks.task("send-mail")
    assert [r.outcome for r in bgtasks.runs("send-mail")] == [Outcome.SUCCESS] * 2
    with pytest.raises(AssertionError, match=r"^expected task 'send-mail' not to run, it ran 2"):
        bgtasks.assert_not_run("send-mail")
    bgtasks.assert_not_run("resize_avatar")
    bgtasks.clear()
    assert bgtasks.runs() == []


async def test_a_success_is_not_dead_lettered(bgtasks):
    await post_signup(make_app(send_mail))
    with pytest.raises(AssertionError, match=r"^expected task 'send-mail' to be dead-lettered"):
        bgtasks.task("send-mail").assert_dead_lettered()


# -- fail_on --------------------------------------------------------------------------------------


def test_fail_on_keeps_the_task_name_options_and_kind():
    wrapped = fail_on(send_mail, attempts=2)
    assert (wrapped.__qualname__, wrapped.__module__) == (send_mail.__qualname__, __name__)
    assert asyncio.iscoroutinefunction(wrapped)
    assert wrapped.__bgtasks_options__ is send_mail.__bgtasks_options__  # type: ignore[attr-defined]


def test_fail_on_outside_a_task_counts_its_own_calls():
    calls: list[int] = []
    flaky = fail_on(calls.append, attempts=[1, 3], exc=KeyError("boom"))
    with pytest.raises(KeyError, match="boom"):
        flaky(1)
    flaky(2)
    with pytest.raises(KeyError):
        flaky(3)
    flaky(4)
    assert calls == [2, 4]


@pytest.mark.parametrize("attempts", [0, [], [0, 1]])
def test_fail_on_attempts_start_at_one(attempts):
    with pytest.raises(ValueError, match="attempts are numbered from 1"):
        fail_on(send_mail, attempts=attempts)


# -- lifecycle ------------------------------------------------------------------------------------


def test_harness_refuses_an_app_that_instrumented_itself():
    instrumentor = BackgroundTasksInstrumentor()
    instrumentor.instrument(dead_letter_store=None)
    try:
        with pytest.raises(RuntimeError, match="already instrumented"), BgTasks():
            pass
    finally:
        instrumentor.uninstrument()


async def test_harness_uninstruments_on_exit():
    with BgTasks() as bgtasks:
        assert bgtasks.instrumentor.is_instrumented_by_opentelemetry
        app = bgtasks.instrument_app(make_app(send_mail))
        await post_signup(app)
        bgtasks.task("send-mail").assert_linked_to_request()
    assert not BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)


async def test_dead_letters_come_from_the_store_the_tasks_write_to(bgtasks, tmp_path):
    sqlite = SQLiteDeadLetterStore(tmp_path / "dlq.db")
    bgtasks.instrument(dead_letter_store=sqlite)
    await post_signup(make_app(fail_on(resize_avatar, exc=ValueError("bad id"))))
    entry = bgtasks.task("resize_avatar").assert_dead_lettered(DeadLetterReason.PERMANENT)
    assert bgtasks.dead_letters() == sqlite.list() == [entry]
    assert bgtasks.store.list() == []
    bgtasks.instrument(dead_letter_store=None)
    assert bgtasks.dead_letters() == []
    sqlite.close()
