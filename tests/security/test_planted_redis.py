"""The same planted entries in a real Redis store: the CLI refuses them, keeps them."""

from __future__ import annotations

import time

import pytest

from otel_bgtasks.cli import main
from otel_bgtasks.stores.redis import RedisDeadLetterStore
from tests.security.conftest import Planted
from tests.security.test_planted_entries import (
    DEAD_OWNER,
    TASKS,
    attacks,
    flat,
    planted_journal,
    planted_letter,
    refusal,
)
from tests.support.redis import RedisServer

pytestmark = pytest.mark.redis


def test_cli_refuses_entries_planted_in_redis(
    capsys: pytest.CaptureFixture[str], redis_server: RedisServer, planted: Planted
) -> None:
    with RedisDeadLetterStore(redis_server.url) as store:
        letters = [planted_letter(ref, planted.command) for ref in attacks(planted)]
        for entry in letters:
            store.put(entry)
        store.heartbeat(DEAD_OWNER, at=time.time() - 3600)
        rows = [planted_journal(ref, planted.command) for ref in attacks(planted)]
        for row in rows:
            store.journal_add(row)

        base = ["--store", redis_server.url, "--tasks", TASKS]
        assert main([*base, "dlq", "replay", "--all"]) == 1
        out, err = capsys.readouterr()
        assert out == f"replay: {len(letters)} refused\n"
        for entry in letters:
            assert f"refused: {entry.id} send_mail: {refusal(entry.func_ref, TASKS)}" in flat(err)

        assert main([*base, "recover", "--rerun"]) == 1
        out, _ = capsys.readouterr()
        assert out == f"recover: {len(rows)} refused (kept as dead letters)\n"
        kept = {e.id for e in store.list()}
        assert kept == {e.id for e in letters} | {r.task_id for r in rows}
    assert planted.untouched()
