"""Accounting: every scheduled task is in flight, pending, running, or has left with a
reason (ran, skipped, released); counts are made at metric collection, not per task."""

from __future__ import annotations

from otel_bgtasks import attributes as attr
from otel_bgtasks._logger import log
from otel_bgtasks.attributes import SkipReason
from otel_bgtasks.journal import Journal
from otel_bgtasks.metrics import Instruments
from otel_bgtasks.state import TaskCallState

__all__ = ["Accounting"]


class Accounting:
    """The tasks one executor scheduled or runs.

    Attributes:
        inflight: scheduled or running tasks by id (the health endpoint, the shutdown
            report); those with `started_at` set are running (`bgtasks.task.active`).
        unstarted: ids of scheduled tasks not started yet (`bgtasks.task.pending`).
        ran, scheduled: task names that ever ran / were ever scheduled (their series stay,
            at 0).
    """

    def __init__(self, instruments: Instruments, journal: Journal | None) -> None:
        self.instruments = instruments
        self.journal = journal
        self.inflight: dict[str, TaskCallState] = {}
        self.unstarted: set[str] = set()
        self.ran: set[str] = set()
        self.scheduled: set[str] = set()
        instruments.set_active_source(self.active_counts)
        instruments.set_pending_source(self.pending_counts)

    def skip(self, state: TaskCallState, reason: SkipReason) -> None:
        """Account for a scheduled task that will never run: counted in `bgtasks.task.skipped`,
        one log line, and it leaves `inflight` at once.

        A durable task's journal row is removed when its request failed (its side effects
        belong to a request the client saw fail); for `previous_task_failed` and `shutdown`
        it stays journaled, and recovery runs it later. Skipping twice counts once.
        """
        if self.inflight.pop(state.task_id, None) is None:
            return
        self.unstarted.discard(state.task_id)
        self.instruments.skipped.add(
            1, {attr.TASK_NAME: state.name, attr.SKIP_REASON: reason.value}
        )
        if state.journaled and self.journal is not None:
            self.journal.finished(state, keep=reason is not SkipReason.REQUEST_FAILED)
        log.warning(
            "background task skipped",
            task_name=state.name,
            task_id=state.task_id,
            reason=reason.value,
            durable=state.journaled,
        )

    def leave(self, state: TaskCallState) -> bool:
        """`state` leaves this process without running here; False if it had left already."""
        if self.inflight.pop(state.task_id, None) is None:
            return False
        self.unstarted.discard(state.task_id)  # absent: a replay, a recovery, already started
        return True

    def active_counts(self) -> dict[str, int]:
        """Tasks running now by task name; every name that ran is there (0 when none runs).

        Counted from `inflight` at each metric collection instead of per task: a copy of the
        dict and of the set is atomic under the GIL, whichever thread runs tasks.
        """
        counts = dict.fromkeys(self.ran, 0)
        for state in list(self.inflight.values()):
            if state.started_at is not None:
                counts[state.name] = counts.get(state.name, 0) + 1
        return counts

    def pending_counts(self) -> dict[str, int]:
        """Tasks scheduled and not started, by task name; every name ever scheduled is there
        (0 when none waits). Counted at collection, like `active_counts`."""
        counts = dict.fromkeys(self.scheduled, 0)
        unstarted = set(self.unstarted)
        for state in list(self.inflight.values()):
            if state.task_id in unstarted:
                counts[state.name] = counts.get(state.name, 0) + 1
        return counts

    def report_pending(self, *, sample: int = 5) -> None:
        """Log one summary of the tasks still scheduled or running (at shutdown: never
        dropped silently): counts by task, running/pending/durable counts, a few ids."""
        pending = list(self.inflight.values())
        if not pending:
            return
        by_task: dict[str, int] = {}
        for s in pending:
            by_task[s.name] = by_task.get(s.name, 0) + 1
        running = sum(1 for s in pending if s.task_id not in self.unstarted)
        log.warning(
            "background tasks still pending or running at shutdown",
            count=len(pending),
            running=running,
            pending=len(pending) - running,
            durable=sum(1 for s in pending if s.journaled),
            by_task=dict(sorted(by_task.items(), key=lambda kv: (-kv[1], kv[0]))[:20]),
            sample_ids=[s.task_id for s in pending[:sample]],
            hint="durable tasks stay journaled and are recovered by `otel-bgtasks recover`",
        )
