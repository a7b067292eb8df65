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

Rows handed to a remote dispatcher (owner ``route:<route>``, `Executor.hand_off`) have no
process to die: once their deadline has passed on the store's clock (no worker finished the
task), they are re-sent through `dispatcher_for(route).resend` and handed off again with a
new deadline: never run here. Without a registered dispatcher for the route they stay
(logged once per route); in ``dead_letter`` mode they become dead letters (``worker_lost``).
`start_recovery(every=...)` repeats the pass, so a row is re-sent within about `every`
seconds of its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import structlog

from otel_bgtasks._execution import Executor, active_executor, standalone_executor
from otel_bgtasks._ids import from_hex
from otel_bgtasks.attributes import Outcome
from otel_bgtasks.calls import decode_call
from otel_bgtasks.claims import JOURNAL, hold
from otel_bgtasks.errors import ConfigurationError, CorruptEntryError, UntrustedEntryError
from otel_bgtasks.identity import owner_is_dead, process_identity
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry, route_owner
from otel_bgtasks.routes import dispatcher_for
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = [
    "RECOVERY_LEASE",
    "RESEND_DEADLINE",
    "RecoveryMode",
    "RecoveryReport",
    "RecoveryTask",
    "recover_interrupted",
    "recover_interrupted_tasks",
    "start_recovery",
]

RECOVERY_LEASE = 60.0
"""Seconds a recoverer's claim on a journal row lasts without renewal (renewed every third)."""

RESEND_DEADLINE = 300.0
"""Seconds until a re-sent row's next deadline when its dispatcher's `resend` names none."""

RecoveryMode = Literal["rerun", "dead_letter"]

_unrouted_logged: set[str] = set()  # routes whose waiting rows were reported (once each)

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
    resent: int = 0
    """Handed-off rows past their deadline re-sent through their route's dispatcher."""

    @property
    def total(self) -> int:
        return (
            self.rerun_succeeded
            + self.rerun_failed
            + self.dead_lettered
            + self.refused
            + self.resent
        )


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
                async with hold(JOURNAL, store, task_id, me, lease=lease, offload=offload) as claim:
                    if claim is None:
                        return  # finished, or another recoverer holds it
                    await handle(claim.row, owner)
                    # handled before removed: a crash in between leaves a duplicate, not a loss
                    await claim.settle()
            except CorruptEntryError:
                return  # logged by the store; an operator deletes it

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


async def _resend_expired(
    store: DeadLetterStore,
    executor: Executor | None,
    *,
    now: float | None,
    offload: bool,
    lease: float = RECOVERY_LEASE,
) -> dict[str, int]:
    """Re-send (``executor`` given) or dead-letter (``worker_lost``, no executor) every row
    handed to a route whose deadline has passed; counts by what happened."""

    async def call(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        return await asyncio.to_thread(fn, *args, **kwargs) if offload else fn(*args, **kwargs)

    counts = {"resent": 0, "dead": 0, "refused": 0}
    moment = now if now is not None else await call(store.now)
    expired = await call(store.expired_hand_offs, now=moment)
    me = f"{process_identity()}/recover/{secrets.token_hex(4)}"
    for row in expired:
        route = row.route
        assert route is not None
        dispatcher = dispatcher_for(route)
        if executor is not None and (dispatcher is None or not dispatcher.remote):
            if route not in _unrouted_logged:
                _unrouted_logged.add(route)
                _log.warning(
                    "handed-off durable tasks past their deadline wait for a dispatcher of"
                    " their route (register_dispatcher in this process to re-send them)",
                    route=route,
                    task_id=row.task_id,
                )
            continue
        try:
            async with hold(JOURNAL, store, row.task_id, me, lease=lease, offload=offload) as claim:
                if claim is None:
                    continue  # finished, or another recoverer holds it
                claimed = claim.row
                if claimed.route != route or (claimed.deadline or moment) > moment:
                    continue  # handed off again meanwhile (re-sent elsewhere): given back
                if executor is None or dispatcher is None:
                    entry = DeadLetter.from_journal(
                        claimed, at=moment, reason=DeadLetterReason.WORKER_LOST
                    )
                    await call(store.put, entry)
                    await claim.settle()
                    counts["dead"] += 1
                    _log.warning(
                        "handed-off durable task past its deadline moved to dead letters",
                        task_name=entry.task_name,
                        task_id=entry.id,
                        route=route,
                    )
                    continue
                try:
                    deadline = await call(
                        dispatcher.resend, executor, claimed, task_id=claimed.task_id
                    )
                except LookupError as exc:  # untrusted, unregistered, not replayable
                    # never signed again for a worker: kept where an operator looks, refused
                    entry = DeadLetter.from_journal(
                        claimed, at=moment, reason=DeadLetterReason.REFUSED
                    )
                    await call(
                        store.put,
                        entry.replace(error_type=type(exc).__name__, error_message=str(exc)[:2000]),
                    )
                    await claim.settle()
                    counts["refused"] += 1
                    _log.error(
                        "handed-off durable task refused", task_id=row.task_id, error=str(exc)
                    )
                    continue
                except Exception:
                    _log.exception(
                        "handed-off durable task could not be re-sent; it stays journaled",
                        task_id=row.task_id,
                        route=route,
                    )
                    continue  # given back: the next pass tries again
                next_deadline = deadline if deadline is not None else moment + RESEND_DEADLINE
                owner = route_owner(route)
                signature = claimed.handed(owner, next_deadline).signed().signature
                # the hand-off releases the claim with the move
                await call(
                    store.journal_hand_off,
                    row.task_id,
                    owner=owner,
                    deadline=next_deadline,
                    signature=signature or None,
                )
                claim.done = True
                counts["resent"] += 1
        except CorruptEntryError:
            continue  # logged by the store; an operator deletes it
    if counts["resent"] or counts["refused"]:
        _log.warning(
            "re-sent handed-off durable tasks past their deadline",
            resent=counts["resent"],
            refused=counts["refused"],
        )
    return counts


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

    async def both() -> None:
        await _recover(store, stale_after, handle, now=now, offload=False)
        await _resend_expired(store, None, now=now, offload=False)

    asyncio.run(both())
    return moved


async def recover_interrupted_tasks(
    *,
    mode: RecoveryMode = "rerun",
    store: DeadLetterStore | None = None,
    executor: Executor | None = None,
    stale_after: float = 60.0,
    concurrency: int = 4,
    now: float | None = None,
) -> RecoveryReport:
    """Re-run, or dead-letter with reason `interrupted`, every journaled task of a dead process;
    re-send (or, ``dead_letter``, dead-letter as ``worker_lost``) every row handed to a remote
    dispatcher whose deadline has passed.

    A process is dead when it ran on this host and its pid is gone, or when it gave no sign of
    life for `stale_after` seconds (other hosts). Re-runs go through the normal path (span
    linked to the original request, policies, dead letters on failure), at most
    `concurrency` at a time. Each entry is claimed first (see the module docstring).
    To keep serving meanwhile, use `start_recovery`. `now` (epoch seconds) replaces the
    clocks (the local one for owners, the store's for deadlines): for tests.

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
            _dead_letterer(store, moved, now, offload=True),
            now=now,
            concurrency=concurrency,
        )
        lost = await _resend_expired(store, None, now=now, offload=True)
        return RecoveryReport(dead_lettered=len(moved) + lost["dead"])
    # Without an instrumented app (the CLI), re-runs that fail still reach the dead letters.
    runner = executor if executor is not None and executor.store is store else None
    runner = runner or standalone_executor(store)
    counts = {"ok": 0, "failed": 0, "dead": 0, "refused": 0}

    async def rerun(journaled: JournalEntry, owner: str) -> None:
        counts[await _rerun(runner, store, journaled)] += 1

    owners = await _recover(store, stale_after, rerun, now=now, concurrency=concurrency)
    handed = await _resend_expired(store, runner, now=now, offload=True)
    report = RecoveryReport(
        counts["ok"],
        counts["failed"],
        counts["dead"],
        counts["refused"] + handed["refused"],
        resent=handed["resent"],
    )
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
    every: float | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> RecoveryTask:
    """Start `recover_interrupted_tasks` as a background task and return at once.

    Use it in a lifespan (``async with start_recovery(): yield``): the app serves while
    tasks are re-run, and the shutdown interrupts recovery. Failures are logged.

    Args:
        every: repeat the pass every `every` seconds until stopped (rows handed to a remote
            dispatcher are then re-sent within about `every` seconds of their deadline; a
            failed pass is logged and the next one runs). None: one pass.
        sleep: awaited between passes (tests inject it).

    Raises:
        ConfigurationError: as `recover_interrupted_tasks`, or `every` is not > 0, before
            anything starts.
    """
    if mode not in ("rerun", "dead_letter"):
        raise ConfigurationError(f"mode={mode!r}: use 'rerun' or 'dead_letter'")
    if concurrency < 1:
        raise ConfigurationError(f"concurrency={concurrency!r}: must be >= 1")
    if every is not None and not every > 0:
        raise ConfigurationError(f"every={every!r}: a number of seconds > 0, or None")
    if store is None and (executor or active_executor()) is None:
        raise ConfigurationError(
            "no dead-letter store: pass store= or instrument with dead_letter_store="
        )

    async def once() -> RecoveryReport:
        return await recover_interrupted_tasks(
            mode=mode,
            store=store,
            executor=executor,
            stale_after=stale_after,
            concurrency=concurrency,
        )

    async def run() -> RecoveryReport:
        try:
            if every is None:
                return await once()
            total = RecoveryReport()
            while True:
                try:
                    report = await once()
                except Exception:
                    _log.exception("a recovery pass failed; the next one runs as planned")
                else:
                    total = _add(total, report)
                await sleep(every)
        except asyncio.CancelledError:
            _log.warning("recovery interrupted by shutdown; remaining tasks stay journaled")
            raise
        except Exception:
            _log.exception("recovery of interrupted durable tasks failed")
            raise

    return RecoveryTask(asyncio.create_task(run(), name="otel-bgtasks-recovery"))


def _add(a: RecoveryReport, b: RecoveryReport) -> RecoveryReport:
    return RecoveryReport(
        a.rerun_succeeded + b.rerun_succeeded,
        a.rerun_failed + b.rerun_failed,
        a.dead_lettered + b.dead_lettered,
        a.refused + b.refused,
        a.resent + b.resent,
    )
