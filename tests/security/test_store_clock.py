"""Claims and liveness on the store's clock (issue 18, case 6), against a real redis-server.

A replayer or recoverer on a host whose clock runs ahead must neither take a live lease nor
judge a live remote owner dead: Redis judges both by its own ``TIME``. (SQLite has no clock of
its own: every process using the file is on one host and shares its clock; the README says so.)
"""

from __future__ import annotations

import dataclasses
import time

import pytest
from structlog.testing import capture_logs

from otel_bgtasks import DeadLetters, recover_interrupted_tasks
from otel_bgtasks.registry import declare_task_modules
from otel_bgtasks.replay import ReplayResult
from otel_bgtasks.stores.redis import RedisDeadLetterStore
from tests.security import app_tasks
from tests.security.test_planted_entries import TASKS, planted_journal, planted_letter
from tests.support.redis import RedisServer

pytestmark = pytest.mark.redis

LIVE_OWNER = "other-host:77:feedface0000"


def ahead(seconds: float):
    return lambda: time.time() + seconds


async def test_a_replayer_whose_clock_runs_ahead_cannot_take_a_live_lease(
    redis_server: RedisServer,
) -> None:
    with (
        RedisDeadLetterStore(redis_server.url) as honest,
        RedisDeadLetterStore(redis_server.url, clock=ahead(5)) as skewed,
    ):
        entry = planted_letter(f"{TASKS}:record", 1, task_name="record")
        honest.put(entry)
        assert honest.claim(entry.id, "A", lease=2) == entry  # A runs it for 2 s
        assert skewed.claim(entry.id, "B", lease=2) is None  # 5 s ahead: still A's
        assert skewed.journal_claim("nope", "B", lease=2) is None

        # a whole replay from the skewed host: the entry is reported as held, not run
        ran: list[str] = []

        async def runner(e: object, call: object) -> ReplayResult:
            ran.append("B")
            return ReplayResult(ok=True)

        report = await DeadLetters(skewed).replay([entry.id], runner)
        assert [o.status for o in report.outcomes] == ["claimed"]
        assert ran == []
        assert honest.delete_claimed(entry.id, "A") is True


def test_the_journal_claim_is_judged_on_the_server_clock(redis_server: RedisServer) -> None:
    with (
        RedisDeadLetterStore(redis_server.url) as honest,
        RedisDeadLetterStore(redis_server.url, clock=ahead(5)) as skewed,
    ):
        row = planted_journal(f"{TASKS}:record", 1)
        honest.journal_add(row)
        assert honest.journal_claim(row.task_id, "A", lease=2) == row
        assert skewed.journal_claim(row.task_id, "B", lease=2) is None


async def test_a_host_whose_clock_runs_ahead_judges_no_live_owner_dead(
    redis_server: RedisServer,
) -> None:
    declare_task_modules(TASKS)
    with (
        RedisDeadLetterStore(redis_server.url) as live,
        RedisDeadLetterStore(redis_server.url, clock=ahead(50)) as skewed,
    ):
        live.heartbeat(LIVE_OWNER)  # the remote owner is alive: it just heartbeat
        live.journal_add(
            dataclasses.replace(planted_journal(f"{TASKS}:record", 1), owner=LIVE_OWNER)
        )
        with capture_logs() as logs:
            assert skewed.dead_owners(stale_after=30) == []
        report = await recover_interrupted_tasks(mode="rerun", store=skewed, stale_after=30)
        assert report.total == 0
        assert app_tasks.RAN == []
        assert [row.owner for row in live.journal_list()] == [LIVE_OWNER]
    (warning,) = [log for log in logs if log["event"].startswith("clock skew")]
    assert 49 < warning["skew_seconds"] < 51
