"""Replay: the operator API over a store (`DeadLetters`) and the runner that re-runs an entry.

A replay is a `process {task}` span in a new trace linked to the original failed span; it
counts in `bgtasks.dlq.replays` by outcome and is never dead-lettered again (the entry is
updated instead).

Each entry is taken with a claim (a lease with an owner and an expiry, renewed while the task
runs), then deleted (success) or updated and released (failure) only if the claim is still
ours: two replayers never run one entry, a failed replay never brings back an entry another
deleted, and a replayer that crashes leaves a lease that expires (the entry is replayed later).

A dead letter of a task that went through a remote dispatcher records its route; when a
dispatcher for that route is registered in the replaying process (`register_dispatcher`), the
entry is sent back through it (`Dispatcher.resend`, status ``sent``) and deleted once
published: it runs on a worker, as it did the first time, not in the replaying process.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import structlog

from otel_bgtasks import attributes as attr
from otel_bgtasks._execution import Executor, active_executor, standalone_executor
from otel_bgtasks._ids import from_hex, new_task_id
from otel_bgtasks._tracebacks import exception_fields
from otel_bgtasks.attributes import Outcome
from otel_bgtasks.calls import DecodedCall, decode_call
from otel_bgtasks.claims import DEAD_LETTERS, Claim, hold
from otel_bgtasks.errors import CircuitOpenError, CorruptEntryError, UntrustedEntryError
from otel_bgtasks.identity import process_identity
from otel_bgtasks.records import DeadLetter, DeadLetterReason
from otel_bgtasks.routes import Dispatcher, dispatcher_for
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = [
    "REPLAY_LEASE",
    "DeadLetters",
    "ReplayOutcome",
    "ReplayReport",
    "ReplayResult",
    "ReplayRunner",
    "ReplayStatus",
    "run_dead_letter",
    "standalone_executor",
]

_T = TypeVar("_T")

REPLAY_LEASE = 60.0
"""Seconds a replay's claim lasts without renewal (renewed every third of it while running):
how long an entry stays blocked after its replayer crashed."""

_log = structlog.get_logger("otel_bgtasks")


async def run_dead_letter(
    entry: DeadLetter, call: DecodedCall | None = None, *, executor: Executor | None = None
) -> ReplayResult:
    """Replay one dead letter; the entry itself is deleted or updated by the caller.

    Args:
        call: the entry's call, decoded (and verified) by `DeadLetters.replay`; decoded here
            when None.

    Raises:
        UntrustedEntryError: unsigned or tampered while a signing key is set, or not one of
            the app's registered tasks: nothing ran (the entry is kept).
        TaskImportError: the entry has no function reference (the entry is kept).
        NotReplayableError: the entry was kept for inspection only.
        ValueError: the payload cannot be decoded by its serializer.
    """
    if executor is None:
        executor = active_executor() or standalone_executor()
    func, args, kwargs = call if call is not None else decode_call(entry)
    state = executor.prepare(func, args, kwargs, link=from_hex(entry.trace_id, entry.span_id))
    state.replay = True
    state.first_failure = entry.first_failure
    await executor.run(state, dead_letter=False)
    outcome = state.outcome or Outcome.FAILURE
    executor.instruments.dlq_replays.add(
        1, {attr.TASK_NAME: entry.task_name, attr.TASK_OUTCOME: outcome.value}
    )
    if outcome is Outcome.SUCCESS:
        return ReplayResult(ok=True)
    if isinstance(state.exception, CircuitOpenError):  # refused: nothing ran
        return ReplayResult(ok=False, rejected_by=state.exception.circuit or entry.task_name)
    return ReplayResult(
        ok=False,
        entry=entry.with_failure(
            state.exception,
            attempts=max(state.attempt, 1),
            category=str(state.category) if state.category is not None else None,
        ),
    )


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay runner reports for one entry.

    Attributes:
        ok: the task succeeded; the entry is deleted.
        entry: on failure, the updated entry to store (attempts, last error); None keeps the
            stored entry with one more attempt and `last_failure` now.
    """

    ok: bool
    entry: DeadLetter | None = None
    rejected_by: str | None = None
    """The circuit that refused the run: nothing ran, the entry is kept unchanged and
    `DeadLetters.replay` stops (the entries after it are reported ``not_run``)."""


ReplayRunner = Callable[[DeadLetter, DecodedCall], Awaitable[ReplayResult]]
"""Re-runs a dead letter's task, given the entry and its call (decoded once, after its
signature and function were checked), as a new span linked to the original; reports the
result (`run_dead_letter`)."""

ReplayStatus = Literal[
    "replayed",
    "sent",
    "failed",
    "not_run",
    "refused",
    "import_error",
    "missing",
    "corrupt",
    "error",
    "claimed",
]


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """The result of replaying one entry.

    `status`: ``replayed`` (succeeded, deleted), ``sent`` (published through the dispatcher of
    the entry's route, deleted: it runs on a worker), ``failed`` (task failed again, entry
    updated),
    ``refused`` (unsigned or tampered while a signing key is set, or not a registered task of
    this app: nothing ran, entry kept), ``import_error`` (no function reference, or its
    serializer unavailable here, entry kept), ``missing`` (no such id), ``corrupt`` (row
    cannot be decoded, kept), ``error`` (the runner itself raised; entry kept unchanged),
    ``claimed`` (another replayer holds it, or, replaying every entry, it was replayed and
    deleted by another meanwhile: not run here), ``not_run`` (an open circuit refused it, or
    it came after such a refusal: the replay stopped; kept unchanged).
    `traceback`: for ``failed``, the new failure's traceback (as stored in the entry).
    """

    entry_id: str
    status: ReplayStatus
    task_name: str = ""
    message: str = ""
    traceback: str = ""


@dataclass(slots=True)
class ReplayReport:
    """All outcomes of one `DeadLetters.replay` call, in replay order."""

    outcomes: list[ReplayOutcome] = field(default_factory=list)

    def by_status(self, status: ReplayStatus) -> list[ReplayOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def replayed(self) -> int:
        return len(self.by_status("replayed"))

    @property
    def sent(self) -> int:
        return len(self.by_status("sent"))

    @property
    def ok(self) -> bool:
        """True when every entry replayed successfully (here, sent to its route's workers,
        or by a concurrent replayer)."""
        return all(o.status in ("replayed", "sent", "claimed") for o in self.outcomes)


class DeadLetters:
    """Operator API over a store: inspect, delete, purge and replay dead letters."""

    def __init__(self, store: DeadLetterStore, *, lease: float = REPLAY_LEASE) -> None:
        self.store = store
        self.lease = lease
        # one owner per DeadLetters: two replays in one process exclude each other too
        self.owner = f"{process_identity()}/replay/{secrets.token_hex(4)}"
        self._offload = True

    def list(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Entries oldest first (see `DeadLetterStore.list`)."""
        return self.store.list(task=task, reason=reason, since=since, limit=limit)

    def show(self, entry_id: str) -> DeadLetter:
        """The entry with this id.

        Raises:
            KeyError: no entry has this id.
            CorruptEntryError: the row cannot be decoded.
        """
        entry = self.store.get(entry_id)
        if entry is None:
            raise KeyError(entry_id)
        return entry

    def delete(self, entry_id: str) -> bool:
        return self.store.delete(entry_id)

    def purge(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
    ) -> int:
        return self.store.purge(task=task, reason=reason, since=since)

    async def replay(
        self,
        ids: Iterable[str] | None,
        runner: ReplayRunner,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        on_outcome: Callable[[ReplayOutcome], None] | None = None,
        on_start: Callable[[int], None] | None = None,
        offload: bool = True,
        stop_on_open_circuit: bool = True,
    ) -> ReplayReport:
        """Replay entries one after the other (a recovering downstream gets no burst).

        Args:
            ids: entry ids, or None for every entry matching the filters (oldest first).
            runner: runs one entry, see `ReplayRunner`.
            on_start: called with the number of entries about to be replayed.
            on_outcome: called after each entry (progress display).
            offload: run store calls in a worker thread, so a server's event loop keeps
                serving; a process that owns its loop (the CLI) passes False: the thread hop
                costs more than the store call.
            stop_on_open_circuit: once a task's circuit breaker refuses a replay (its
                downstream is still failing), stop: that entry and every one after it are
                reported ``not_run`` and kept unchanged, instead of each being refused in turn.

        A `TaskImportError` or a runner exception affects only its entry, which is kept; the
        others continue.
        """
        report = ReplayReport()
        store = self.store
        self._offload = offload
        targets: list[DeadLetter | str]
        if ids is None:
            targets = list(await self._call(store.list, task=task, reason=reason, since=since))
        else:
            targets = list(dict.fromkeys(ids))
        if on_start is not None:
            on_start(len(targets))
        stopped: str | None = None
        for target in targets:
            if stopped is not None:
                outcome = ReplayOutcome(
                    target if isinstance(target, str) else target.id,
                    "not_run",
                    "" if isinstance(target, str) else target.task_name,
                    f"not attempted: {stopped}",
                )
            else:
                outcome = await self._replay_one(target, runner, listed=ids is None)
                if outcome.status == "not_run" and stop_on_open_circuit:
                    stopped = outcome.message
            report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
        return report

    async def _call(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        if self._offload:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    async def _replay_one(
        self, target: DeadLetter | str, runner: ReplayRunner, *, listed: bool = False
    ) -> ReplayOutcome:
        entry_id = target if isinstance(target, str) else target.id
        try:
            async with hold(
                DEAD_LETTERS,
                self.store,
                entry_id,
                self.owner,
                lease=self.lease,
                offload=self._offload,
            ) as claim:
                if claim is None:
                    return await self._not_claimed(entry_id, listed)
                return await self._run_claimed(claim, runner)
        except CorruptEntryError as exc:
            return ReplayOutcome(entry_id, "corrupt", message=str(exc))

    async def _not_claimed(self, entry_id: str, listed: bool) -> ReplayOutcome:
        try:
            exists = await self._call(self.store.get, entry_id) is not None
        except CorruptEntryError:
            exists = True
        if exists:
            return ReplayOutcome(entry_id, "claimed", message="being replayed by another replayer")
        if listed:  # listed a moment ago: another replayer ran and deleted it
            return ReplayOutcome(entry_id, "claimed", message="replayed by another replayer")
        return ReplayOutcome(entry_id, "missing", message=f"no dead letter {entry_id!r}")

    async def _run_claimed(self, claim: Claim[DeadLetter], runner: ReplayRunner) -> ReplayOutcome:
        entry = claim.row
        dispatcher = dispatcher_for(entry.route) if entry.route else None
        try:
            if dispatcher is not None and dispatcher.remote:  # back to its route's workers
                return await self._send(claim, dispatcher)
            call = decode_call(entry)  # once: signature, registered function, then payload
            result = await runner(entry, call)
        except UntrustedEntryError as exc:  # nothing of it ran or was imported
            _log.error("dead letter replay refused", entry_id=entry.id, error=str(exc))
            return ReplayOutcome(entry.id, "refused", entry.task_name, str(exc))
        except LookupError as exc:  # not importable, not replayable, or an unknown serializer
            _log.error("dead letter replay: task not importable", entry_id=entry.id, error=str(exc))
            return ReplayOutcome(entry.id, "import_error", entry.task_name, str(exc))
        except Exception as exc:  # undecodable, or the runner broke: keep the entry, go on
            _log.error(
                "dead letter replay: runner failed", entry_id=entry.id, **exception_fields(exc)
            )
            return ReplayOutcome(entry.id, "error", entry.task_name, f"{type(exc).__name__}: {exc}")
        if result.rejected_by is not None:
            await claim.release()  # unchanged: it did not run
            message = f"circuit {result.rejected_by!r} opened; replay again once it closes"
            return ReplayOutcome(entry.id, "not_run", entry.task_name, message)
        if result.ok:
            if not await claim.settle():
                _log.warning(
                    "dead letter replayed but its claim was lost (lease expired or deleted)",
                    entry_id=entry.id,
                    task_name=entry.task_name,
                )
            return ReplayOutcome(entry.id, "replayed", entry.task_name)
        updated = result.entry if result.entry is not None else entry.with_failure()
        # only if the row is still there and ours: an entry deleted meanwhile stays deleted
        await claim.release(entry=updated)
        message = (
            f"{updated.error_type}: {updated.error_message}" if updated.error_type else "failed"
        )
        return ReplayOutcome(entry.id, "failed", entry.task_name, message, updated.traceback)

    async def _send(self, claim: Claim[DeadLetter], dispatcher: Dispatcher) -> ReplayOutcome:
        """Publish a claimed entry through its route's dispatcher (a new task id; the
        dispatcher's `executor.message_from_call` checks it as a replay does), then delete
        it. A refused entry raises (mapped by the caller); a failed publish keeps it."""
        entry = claim.row
        executor = active_executor() or standalone_executor(self.store)
        try:
            await self._call(dispatcher.resend, executor, entry, task_id=new_task_id())
        except LookupError:  # refused, not importable: the caller reports it
            raise
        except Exception as exc:
            _log.error(
                "dead letter could not be sent to its route",
                entry_id=entry.id,
                route=entry.route,
                **exception_fields(exc),
            )
            return ReplayOutcome(entry.id, "error", entry.task_name, f"{type(exc).__name__}: {exc}")
        if not await claim.settle():
            _log.warning(
                "dead letter sent but its claim was lost (lease expired or deleted)",
                entry_id=entry.id,
                task_name=entry.task_name,
            )
        return ReplayOutcome(
            entry.id, "sent", entry.task_name, f"sent to route {entry.route!r} ({dispatcher.name})"
        )
