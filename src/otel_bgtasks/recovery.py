"""Recover durable tasks whose process died (crash, SIGKILL, OOM) before they finished.

Start it in the background at startup, so the app serves while tasks are re-run, e.g. in the
FastAPI lifespan::

    @asynccontextmanager
    async def lifespan(app):
        async with start_recovery(mode="rerun"):  # returns at once; stopped at shutdown
            yield

or from the shell: ``otel-bgtasks recover --store URL [--rerun]``.

Both modes walk the journal the same way (one loop): for each dead owner, each of its entries
is claimed (a lease with an owner and an expiry, renewed while it runs), handled (re-run, or
moved to the dead letters with reason `interrupted`), then removed if the claim is still ours;
the owner's heartbeat is forgotten once its entries are done, unless it came back meanwhile.
Two recoverers never handle one entry; one that crashes leaves a lease that expires, and the
entry is recovered later. A shutdown stops recovery: entries not re-run stay journaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import structlog

from otel_bgtasks._execution import Executor, active_executor
from otel_bgtasks._ids import from_hex
from otel_bgtasks.attributes import Outcome
from otel_bgtasks.calls import decode_call
from otel_bgtasks.errors import ConfigurationError, CorruptEntryError, UntrustedEntryError
from otel_bgtasks.identity import owner_is_dead, process_identity
from otel_bgtasks.records import DeadLetter, JournalEntry
from otel_bgtasks.replay import renewing, standalone_executor
from otel_bgtasks.routes import dispatcher_for
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = [
    "RECOVERY_LEASE",
    "RecoveryMode",
    "RecoveryReport",
    "RecoveryTask",
    "Resender",
    "recover_interrupted",
    "recover_interrupted_tasks",
    "resend_expired",
    "start_recovery",
    "start_resender",
]

RECOVERY_LEASE = 60.0
"""Seconds a recoverer's claim on a journal row lasts without renewal (renewed every third)."""

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
    concurrency: int = 1,
    lease: float = RECOVERY_LEASE,
) -> list[str]:
    """The one recovery loop; returns the dead owners it recovered."""
    if concurrency < 1:
        raise ConfigurationError(f"concurrency={concurrency!r}: must be >= 1")

    async def call(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        return await asyncio.to_thread(fn, *args, **kwargs) if offload else fn(*args, **kwargs)

    me = f"{process_identity()}/recover/{secrets.token_hex(4)}"
    slots = asyncio.Semaphore(concurrency)

    async def one(task_id: str, owner: str) -> None:
        async with slots:
            try:
                journaled = await call(store.journal_claim, task_id, me, lease=lease)
            except CorruptEntryError:
                return  # logged by the store; an operator deletes it
            if journaled is None:
                return  # finished, or another recoverer holds it
            try:
                renew = functools.partial(store.journal_claim, task_id, me, lease=lease)
                async with renewing(renew, lease / 3):
                    await handle(journaled, owner)
            except BaseException:
                # cancelled (shutdown) or broken: it stays journaled for the next recovery
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.to_thread(store.journal_release, task_id, me))
                raise
            # handled before removed: a crash in between leaves a duplicate, not a loss
            await call(store.journal_remove_claimed, task_id, me)

    owners = await call(store.dead_owners, stale_after, now=now)
    for owner in owners:
        entries = await call(store.journal_list, owner=owner)
        async with asyncio.TaskGroup() as group:
            for journaled in entries:
                group.create_task(one(journaled.task_id, owner))
        if not await call(store.journal_list, owner=owner):
            moment = time.time() if now is None else now
            # judged by heartbeat age: if it heartbeat meanwhile it is alive, keep its heartbeat
            seen_before = None if owner_is_dead(owner) else moment - stale_after
            await call(store.forget_owner, owner, seen_before=seen_before)
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
    concurrency: int = 4,
) -> RecoveryReport:
    """Re-run, or dead-letter with reason `interrupted`, every journaled task of a dead process.

    A process is dead when it ran on this host and its pid is gone, or when it gave no sign of
    life for `stale_after` seconds (other hosts). Re-runs go through the normal path (span
    linked to the original request, policies, dead letters on failure), at most
    `concurrency` at a time. Each entry is claimed first (see the module docstring).
    To keep serving meanwhile, use `start_recovery`.

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
        await _recover(
            store,
            stale_after,
            _dead_letterer(store, moved, None, offload=True),
            concurrency=concurrency,
        )
        return RecoveryReport(dead_lettered=len(moved))
    # Without an instrumented app (the CLI), re-runs that fail still reach the dead letters.
    runner = executor if executor is not None and executor.store is store else None
    runner = runner or standalone_executor(store)
    counts = {"ok": 0, "failed": 0, "dead": 0, "refused": 0}

    async def rerun(journaled: JournalEntry, owner: str) -> None:
        counts[await _rerun(runner, store, journaled)] += 1

    owners = await _recover(store, stale_after, rerun, concurrency=concurrency)
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


def resend_expired(
    store: DeadLetterStore,
    executor: Executor | None = None,
    *,
    now: float | None = None,
    lease: float = RECOVERY_LEASE,
) -> int:
    """Re-send journal rows handed to a remote dispatcher whose deadline passed (the worker
    that took them died, or the broker lost them); never runs them here. Each row is claimed
    first (a worker running it holds its claim, so it is not re-sent), published again
    through `dispatcher_for(route).resend`, and handed off again with a new deadline. Rows
    of a route with no dispatcher registered in this process stay (logged once per route).
    Blocking: call it from a thread. Returns the rows re-sent.
    """
    executor = executor or active_executor()
    if executor is None:
        raise ConfigurationError("resend_expired needs an executor: instrument() first")
    moment = store.now() if now is None else now
    me = f"{process_identity()}/resend/{secrets.token_hex(4)}"
    sent = 0
    missing: set[str] = set()
    for row in store.expired_hand_offs(now=moment):
        route = row.route
        assert route is not None
        dispatcher = dispatcher_for(route)
        if dispatcher is None:
            if route not in missing:
                missing.add(route)
                _log.warning(
                    "handed-off durable tasks past their deadline, but no dispatcher for"
                    " their route in this process",
                    route=route,
                )
            continue
        try:
            claimed = store.journal_claim(row.task_id, me, lease=lease, now=moment)
        except CorruptEntryError:
            continue
        if claimed is None:
            continue  # finished meanwhile, or a worker holds it
        try:
            deadline = dispatcher.resend(executor, claimed, task_id=claimed.task_id)
        except Exception:
            store.journal_release(row.task_id, me)
            _log.warning(
                "re-sending a handed-off durable task failed; retried later",
                task_id=row.task_id,
                route=route,
            )
            continue
        if deadline is None:
            deadline = store.now() + RECOVERY_LEASE
        # handed off again (our claim released): a worker can claim it
        store.journal_hand_off(row.task_id, owner=row.owner, deadline=deadline)
        sent += 1
    if sent:
        _log.warning("re-sent handed-off durable tasks past their deadline", count=sent)
    return sent


class Resender:
    """`resend_expired` every `interval` seconds on a daemon thread (`start_resender`);
    `stop()` ends it. A failing pass is logged and the next one runs as usual."""

    def __init__(self, store: DeadLetterStore, executor: Executor, interval: float) -> None:
        self.store = store
        self.executor = executor
        self.interval = interval
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otel-bgtasks-resend", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sent += resend_expired(self.store, self.executor)
            except Exception:
                _log.exception("re-sending handed-off durable tasks failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 30)


def start_resender(
    *,
    store: DeadLetterStore | None = None,
    executor: Executor | None = None,
    interval: float = 10.0,
) -> Resender:
    """Keep re-sending journal rows handed to remote dispatchers (Celery) once their
    deadline passed, every `interval` s, in this process (the web app, e.g. in its lifespan):
    a durable task whose worker died, or whose message the broker lost, runs again within
    about its deadline plus `interval`, without a worker restart.

    Raises:
        ConfigurationError: no executor or store (instrument first), or a bad interval.
    """
    executor = executor or active_executor()
    if executor is None:
        raise ConfigurationError("start_resender needs an executor: instrument() first")
    store = store or executor.store
    if store is None:
        raise ConfigurationError("start_resender needs a dead-letter store")
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise ConfigurationError(f"interval={interval!r}: must be > 0 seconds")
    return Resender(store, executor, float(interval))


class RecoveryTask:
    """Recovery running in the background (`start_recovery`); an async context manager
    whose exit stops it (what was not re-run stays journaled for the next recovery)."""

    def __init__(self, task: asyncio.Task[RecoveryReport]) -> None:
        self.task = task

    def done(self) -> bool:
        return self.task.done()

    async def wait(self) -> RecoveryReport:
        """Wait for recovery to finish; its report."""
        return await asyncio.shield(self.task)

    async def stop(self) -> None:
        """Interrupt recovery (at shutdown) and wait for it to release its claims."""
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def start_recovery(
    *,
    mode: RecoveryMode = "rerun",
    store: DeadLetterStore | None = None,
    executor: Executor | None = None,
    stale_after: float = 60.0,
    concurrency: int = 4,
) -> RecoveryTask:
    """Start `recover_interrupted_tasks` as a background task and return at once.

    Use it in a lifespan (``async with start_recovery(): yield``): the app serves while
    tasks are re-run, and the shutdown interrupts recovery. Failures are logged.

    Raises:
        ConfigurationError: as `recover_interrupted_tasks`, before anything starts.
    """
    if mode not in ("rerun", "dead_letter"):
        raise ConfigurationError(f"mode={mode!r}: use 'rerun' or 'dead_letter'")
    if concurrency < 1:
        raise ConfigurationError(f"concurrency={concurrency!r}: must be >= 1")
    if store is None and (executor or active_executor()) is None:
        raise ConfigurationError(
            "no dead-letter store: pass store= or instrument with dead_letter_store="
        )

    async def run() -> RecoveryReport:
        try:
            return await recover_interrupted_tasks(
                mode=mode,
                store=store,
                executor=executor,
                stale_after=stale_after,
                concurrency=concurrency,
            )
        except asyncio.CancelledError:
            _log.warning("recovery interrupted by shutdown; remaining tasks stay journaled")
            raise
        except Exception:
            _log.exception("recovery of interrupted durable tasks failed")
            raise

    return RecoveryTask(asyncio.create_task(run(), name="otel-bgtasks-recovery"))
