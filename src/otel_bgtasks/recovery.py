"""Recover durable tasks whose process died (crash, SIGKILL, OOM) before they finished.

Call it at startup, e.g. in the FastAPI lifespan::

    @asynccontextmanager
    async def lifespan(app):
        await recover_interrupted_tasks(mode="rerun")
        yield

or from the shell: ``otel-bgtasks recover --store URL [--rerun]``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

import structlog

from otel_bgtasks._execution import Executor
from otel_bgtasks.deadletter import (
    DeadLetter,
    DeadLetterReason,
    DeadLetterStore,
    JournalEntry,
    get_serializer,
    recover_interrupted,
    resolve,
)
from otel_bgtasks.replay_runner import _span_context, standalone_executor

__all__ = ["RecoveryMode", "RecoveryReport", "recover_interrupted_tasks"]

RecoveryMode = Literal["rerun", "dead_letter"]

_log = structlog.get_logger("otel_bgtasks")


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What recovery did with the journal entries of dead processes."""

    rerun_succeeded: int = 0
    rerun_failed: int = 0
    dead_lettered: int = 0

    @property
    def total(self) -> int:
        return self.rerun_succeeded + self.rerun_failed + self.dead_lettered


async def recover_interrupted_tasks(
    *,
    mode: RecoveryMode = "rerun",
    store: DeadLetterStore | None = None,
    executor: Executor | None = None,
    stale_after: float = 60.0,
) -> RecoveryReport:
    """Re-run, or dead-letter with reason `interrupted`, every journaled task of a dead process.

    A process is dead when it ran on this host and its pid is gone, or when it gave no sign of
    life for `stale_after` seconds (other hosts). Re-runs go through the normal path (span
    linked to the original request, policies, dead letters on failure).

    Raises:
        ValueError: `mode` is unknown, or no store is given or configured.
    """
    if mode not in ("rerun", "dead_letter"):
        raise ValueError(f"mode={mode!r}: use 'rerun' or 'dead_letter'")
    if executor is None:
        from otel_bgtasks.instrumentor import current_executor

        executor = current_executor()
    store = store or (executor.store if executor else None)
    if store is None:
        raise ValueError("no dead-letter store: pass store= or instrument with dead_letter_store=")
    if mode == "dead_letter":
        moved = await asyncio.to_thread(recover_interrupted, store, stale_after=stale_after)
        return RecoveryReport(dead_lettered=len(moved))
    # Without an instrumented app (the CLI), re-runs that fail still reach the dead letters.
    runner = executor if executor is not None and executor.store is store else None
    runner = runner or standalone_executor(store)
    succeeded = failed = dead = 0
    owners = await asyncio.to_thread(store.dead_owners, stale_after)
    for owner in owners:
        for journaled in await asyncio.to_thread(store.journal_list, owner=owner):
            ok = await _rerun(runner, store, journaled)
            if ok is None:
                dead += 1
            elif ok:
                succeeded += 1
            else:
                failed += 1
            await asyncio.to_thread(store.journal_remove, journaled.task_id)
        await asyncio.to_thread(store.forget_owner, owner)
    report = RecoveryReport(succeeded, failed, dead)
    if report.total:
        _log.warning(
            "recovered interrupted durable tasks",
            owners=owners,
            rerun=succeeded,
            rerun_failed=failed,
            dead_lettered=dead,
        )
    return report


async def _rerun(
    executor: Executor, store: DeadLetterStore, journaled: JournalEntry
) -> bool | None:
    """True/False: re-ran with that result; None: could not re-run, dead-lettered instead."""
    try:
        func = resolve(journaled.func_ref)
        args, kwargs = get_serializer(journaled.serializer).loads(journaled.payload)
    except Exception as exc:  # gone or undecodable: keep it where an operator will see it
        entry = DeadLetter.from_journal(
            journaled, at=time.time(), reason=DeadLetterReason.INTERRUPTED
        )
        await asyncio.to_thread(
            store.put, entry.replace(error_type=type(exc).__name__, error_message=str(exc))
        )
        return None
    state = executor.prepare(
        func, tuple(args), kwargs, link=_span_context(journaled.trace_id, journaled.span_id)
    )
    state.extra["recovered"] = True
    await executor.run(state)
    return state.outcome == "success"
