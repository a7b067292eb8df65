"""Recover durable tasks whose process died (crash, SIGKILL, OOM) before they finished.

Call it at startup, e.g. in the FastAPI lifespan::

    @asynccontextmanager
    async def lifespan(app):
        await recover_interrupted_tasks(mode="rerun")
        yield

or from the shell: ``otel-bgtasks recover --store URL [--rerun]``.

Both modes walk the journal the same way (one loop): for each dead owner, each of its entries
is handled (re-run, or moved to the dead letters with reason `interrupted`), then removed; the
owner is forgotten once its entries are done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import structlog

from otel_bgtasks._execution import Executor, active_executor
from otel_bgtasks._ids import from_hex
from otel_bgtasks.attributes import Outcome
from otel_bgtasks.calls import decode_call
from otel_bgtasks.errors import ConfigurationError, UntrustedEntryError
from otel_bgtasks.records import DeadLetter, JournalEntry
from otel_bgtasks.replay import standalone_executor
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = ["RecoveryMode", "RecoveryReport", "recover_interrupted", "recover_interrupted_tasks"]

RecoveryMode = Literal["rerun", "dead_letter"]

_T = TypeVar("_T")
_log = structlog.get_logger("otel_bgtasks")


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What recovery did with the journal entries of dead processes."""

    rerun_succeeded: int = 0
    rerun_failed: int = 0
    dead_lettered: int = 0
    refused: int = 0
    """Entries not re-run (unsigned/tampered, or not a registered task): kept as dead letters."""

    @property
    def total(self) -> int:
        return self.rerun_succeeded + self.rerun_failed + self.dead_lettered + self.refused


Handler = Callable[[JournalEntry, str], Awaitable[None]]


async def _recover(
    store: DeadLetterStore,
    stale_after: float,
    handle: Handler,
    *,
    now: float | None = None,
    offload: bool = True,
) -> list[str]:
    """The one recovery loop; returns the dead owners it recovered."""

    async def call(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        return await asyncio.to_thread(fn, *args, **kwargs) if offload else fn(*args, **kwargs)

    owners = await call(store.dead_owners, stale_after, now=now)
    for owner in owners:
        for journaled in await call(store.journal_list, owner=owner):
            # handled before removed: a crash in between leaves a duplicate, not a loss
            await handle(journaled, owner)
            await call(store.journal_remove, journaled.task_id)
        await call(store.forget_owner, owner)
    return owners


def _dead_letterer(
    store: DeadLetterStore, moved: list[DeadLetter], at: float | None, offload: bool
) -> Handler:
    async def handle(journaled: JournalEntry, owner: str) -> None:
        entry = DeadLetter.from_journal(journaled, at=time.time() if at is None else at)
        if offload:
            await asyncio.to_thread(store.put, entry)
        else:
            store.put(entry)
        moved.append(entry)
        _log.warning(
            "durable task interrupted, moved to dead letters",
            task_name=entry.task_name,
            task_id=entry.id,
            owner=owner,
        )

    return handle


def recover_interrupted(
    store: DeadLetterStore, *, stale_after: float, now: float | None = None
) -> list[DeadLetter]:
    """Move the journal entries of dead owners to the dead letters (reason `interrupted`).

    Synchronous (from async code use ``recover_interrupted_tasks(mode="dead_letter")``).
    Safe to run from several processes at once: the dead letter's id is the task id, so a
    race stores the same entry twice, not two entries. Returns the entries moved here.
    """
    moved: list[DeadLetter] = []
    handle = _dead_letterer(store, moved, now, offload=False)
    asyncio.run(_recover(store, stale_after, handle, now=now, offload=False))
    return moved


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
        ConfigurationError: `mode` is unknown, or no store is given or configured (a
            `ValueError`).
    """
    if mode not in ("rerun", "dead_letter"):
        raise ConfigurationError(f"mode={mode!r}: use 'rerun' or 'dead_letter'")
    if executor is None:
        executor = active_executor()
    store = store or (executor.store if executor else None)
    if store is None:
        raise ConfigurationError(
            "no dead-letter store: pass store= or instrument with dead_letter_store="
        )
    if mode == "dead_letter":
        moved: list[DeadLetter] = []
        await _recover(store, stale_after, _dead_letterer(store, moved, None, offload=True))
        return RecoveryReport(dead_lettered=len(moved))
    # Without an instrumented app (the CLI), re-runs that fail still reach the dead letters.
    runner = executor if executor is not None and executor.store is store else None
    runner = runner or standalone_executor(store)
    counts = {"ok": 0, "failed": 0, "dead": 0, "refused": 0}

    async def rerun(journaled: JournalEntry, owner: str) -> None:
        counts[await _rerun(runner, store, journaled)] += 1

    owners = await _recover(store, stale_after, rerun)
    report = RecoveryReport(counts["ok"], counts["failed"], counts["dead"], counts["refused"])
    if report.total:
        _log.warning(
            "recovered interrupted durable tasks",
            owners=owners,
            rerun=report.rerun_succeeded,
            rerun_failed=report.rerun_failed,
            dead_lettered=report.dead_lettered,
            refused=report.refused,
        )
    return report


async def _rerun(
    executor: Executor, store: DeadLetterStore, journaled: JournalEntry
) -> Literal["ok", "failed", "dead", "refused"]:
    """Re-run one entry: "ok"/"failed" by its result; "dead": it could not be re-run and was
    dead-lettered instead; "refused": the same, for an untrusted entry (nothing of it ran)."""
    try:
        func, args, kwargs = decode_call(journaled)
    except Exception as exc:  # gone, undecodable or refused: keep it where an operator looks
        # from_journal keeps the row's signature: a refused row stays refused, never laundered
        entry = DeadLetter.from_journal(journaled, at=time.time())
        await asyncio.to_thread(
            store.put, entry.replace(error_type=type(exc).__name__, error_message=str(exc))
        )
        if isinstance(exc, UntrustedEntryError):
            _log.error("durable task refused", task_id=journaled.task_id, error=str(exc))
            return "refused"
        return "dead"
    state = executor.prepare(
        func, args, kwargs, link=from_hex(journaled.trace_id, journaled.span_id)
    )
    await executor.run(state)
    return "ok" if state.outcome is Outcome.SUCCESS else "failed"
