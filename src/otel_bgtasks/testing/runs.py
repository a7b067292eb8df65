"""`TaskRun`: one finished background-task run as a test sees it, read back from its span.

Every field comes from the signal contract (the `process {name}` span, its attributes and
events), so an assertion on a `TaskRun` is an assertion on what Jaeger and the dashboards get.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind

from otel_bgtasks import DeadLetter, DeadLetterReason, ErrorCategory, Outcome

__all__ = ["RetryEvent", "TaskRun", "describe_runs"]

_PREFIX = "process "


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """One `bgtasks.retry` event: attempt `attempt` is about to run after `delay` seconds,
    because the previous one raised `error_type` (`message`)."""

    attempt: int
    delay: float
    error_type: str
    message: str


def _str(attrs: Mapping[str, Any], key: str) -> str | None:
    value = attrs.get(key)
    return None if value is None else str(value)


def _retry(attrs: Mapping[str, Any]) -> RetryEvent:
    return RetryEvent(
        attempt=int(str(attrs.get("bgtasks.retry.attempt", 0))),
        delay=float(str(attrs.get("bgtasks.retry.delay", 0.0))),
        error_type=str(attrs.get("error.type", "")),
        message=str(attrs.get("exception.message", "")),
    )


@dataclass(frozen=True, slots=True)
class TaskRun:
    """One finished run of a background task.

    Attributes:
        name, task_id: `bgtasks.task.name` and `bgtasks.task.id`.
        outcome: `success`, `failure`, `dead_lettered`, `rejected` or `timeout`.
        attempts: attempts made (0 when an open circuit refused the task).
        error_type, error_category, error_message: the final error, None on success.
        retries: the `bgtasks.retry` events, in order.
        dead_letter_reason: why it was moved to the dead-letter store, None if it was not;
            `dead_letter` is the stored entry when the test's store holds it.
        linked: the span context the task was scheduled under (the request's), or None.
        request: that span, when it was exported to the test's provider.
        span: the task span itself, for anything else.
    """

    name: str
    task_id: str
    outcome: Outcome
    attempts: int
    error_type: str | None
    error_category: ErrorCategory | None
    error_message: str | None
    retries: tuple[RetryEvent, ...]
    dead_letter_reason: DeadLetterReason | None
    dead_letter: DeadLetter | None
    linked: SpanContext | None
    request: ReadableSpan | None
    span: ReadableSpan

    @classmethod
    def from_span(
        cls,
        span: ReadableSpan,
        *,
        spans: Sequence[ReadableSpan] = (),
        dead_letters: Mapping[str, DeadLetter] | None = None,
    ) -> TaskRun:
        """Read a run back from its finished `process {name}` span.

        Args:
            spans: other spans exported to the same provider, to find the linked request.
            dead_letters: stored entries by id, to attach the run's dead letter.
        """
        attrs = span.attributes or {}
        retries: list[RetryEvent] = []
        reason: DeadLetterReason | None = None
        entry_id: str | None = None
        message: str | None = None
        for event in span.events:
            event_attrs = event.attributes or {}
            if event.name == "bgtasks.retry":
                retries.append(_retry(event_attrs))
            elif event.name == "bgtasks.dlq.moved":
                reason = DeadLetterReason(str(event_attrs.get("bgtasks.dlq.reason")))
                entry_id = _str(event_attrs, "bgtasks.dlq.entry_id")
            elif event.name == "exception":
                message = _str(event_attrs, "exception.message")
        linked = span.links[0].context if span.links else None
        request = None
        if linked is not None:
            request = next(
                (s for s in spans if s.context.span_id == linked.span_id and s is not span), None
            )
        category = _str(attrs, "bgtasks.error.category")
        return cls(
            name=str(attrs.get("bgtasks.task.name", span.name.removeprefix(_PREFIX))),
            task_id=str(attrs.get("bgtasks.task.id", "")),
            outcome=Outcome(str(attrs.get("bgtasks.task.outcome", Outcome.FAILURE.value))),
            attempts=int(str(attrs.get("bgtasks.task.attempts", 0))),
            error_type=_str(attrs, "error.type"),
            error_category=ErrorCategory(category) if category is not None else None,
            error_message=message,
            retries=tuple(retries),
            dead_letter_reason=reason,
            dead_letter=(dead_letters or {}).get(entry_id) if entry_id else None,
            linked=linked,
            request=request,
            span=span,
        )

    # -- reading -------------------------------------------------------------------------------

    def describe(self) -> str:
        """The run in a few lines, as assertion messages show it."""
        head = f"task {self.name!r}: outcome={self.outcome.value} attempts={self.attempts}"
        if self.error_type is not None:
            head += f" error={self.error_type}: {self.error_message or ''}".rstrip()
            if self.error_category is not None:
                head += f" [{self.error_category.value}]"
        lines = [head]
        for retry in self.retries:
            lines.append(
                f"  retry before attempt {retry.attempt} (after {retry.delay:.3f} s): "
                f"{retry.error_type}: {retry.message}"
            )
        if self.dead_letter_reason is not None:
            lines.append(f"  dead-lettered: {self.dead_letter_reason.value}")
        if self.request is not None:
            lines.append(f"  linked to {self.request.name!r} ({self.request.kind.name})")
        elif self.linked is not None:
            lines.append(f"  linked to span {self.linked.span_id:016x} (not exported here)")
        else:
            lines.append("  not linked to any span (scheduled outside a recording span)")
        return "\n".join(lines)

    # -- asserting -----------------------------------------------------------------------------

    def _check(self, problems: list[str]) -> TaskRun:
        if problems:
            raise AssertionError("; ".join(problems) + "\n" + self.describe())
        return self

    def assert_ran(
        self,
        *,
        outcome: Outcome | str | None = None,
        attempts: int | None = None,
        retries: int | None = None,
        error_type: type[BaseException] | str | None = None,
    ) -> TaskRun:
        """Assert the given facts about the run (those left None are not checked).

        `error_type` is an exception class or its `error.type` name (builtins unqualified,
        others module-qualified). Returns the run, so checks can be chained.

        Raises:
            AssertionError: naming every mismatch, followed by the whole run.
        """
        problems: list[str] = []
        if outcome is not None and self.outcome != Outcome(outcome):
            problems.append(f"expected outcome={Outcome(outcome).value}, got {self.outcome.value}")
        if attempts is not None and self.attempts != attempts:
            problems.append(f"expected attempts={attempts}, got {self.attempts}")
        if retries is not None and len(self.retries) != retries:
            problems.append(f"expected {retries} retries, got {len(self.retries)}")
        if error_type is not None:
            wanted = _error_type_name(error_type)
            if self.error_type != wanted:
                problems.append(f"expected error.type={wanted}, got {self.error_type}")
        return self._check(problems)

    def assert_succeeded(self, *, attempts: int | None = None) -> TaskRun:
        """Assert the run ended in `success` (after `attempts` attempts, when given)."""
        return self.assert_ran(outcome=Outcome.SUCCESS, attempts=attempts)

    def assert_dead_lettered(self, reason: DeadLetterReason | str | None = None) -> DeadLetter:
        """Assert the run was moved to the dead-letter store (for `reason`, when given) and
        return the stored entry.

        Raises:
            AssertionError: it was not dead-lettered, for another reason, or the entry is not
                in the test's store.
        """
        problems: list[str] = []
        if self.dead_letter_reason is None:
            problems.append(f"expected task {self.name!r} to be dead-lettered, it was not")
        elif reason is not None and self.dead_letter_reason != DeadLetterReason(reason):
            problems.append(
                f"expected dead-letter reason {DeadLetterReason(reason).value}, "
                f"got {self.dead_letter_reason.value}"
            )
        elif self.dead_letter is None:
            problems.append("the dead letter is not in the store the test instrumented with")
        self._check(problems)
        assert self.dead_letter is not None
        return self.dead_letter

    def assert_linked_to(self, span: ReadableSpan | SpanContext) -> TaskRun:
        """Assert the task was scheduled under `span` (its span link points there)."""
        context = span if isinstance(span, SpanContext) else span.context
        problems: list[str] = []
        if self.linked is None or self.linked.span_id != context.span_id:
            problems.append(f"expected a link to span {context.span_id:016x}")
        return self._check(problems)

    def assert_linked_to_request(self) -> ReadableSpan:
        """Assert the task is linked to a SERVER span exported here, and return that span.

        The request span is only exported to the test's provider when the app is instrumented
        with it (`BgTasks.instrument_app`).
        """
        problems: list[str] = []
        if self.linked is None:
            problems.append(f"expected task {self.name!r} to be linked to its request")
        elif self.request is None:
            problems.append(
                "the linked span was not exported to the test's tracer provider "
                "(instrument the app with bgtasks.instrument_app(app))"
            )
        elif self.request.kind is not SpanKind.SERVER:
            problems.append(
                f"expected the linked span to be a SERVER span, got {self.request.kind.name}"
            )
        self._check(problems)
        assert self.request is not None
        return self.request


def _error_type_name(error_type: type[BaseException] | str) -> str:
    if isinstance(error_type, str):
        return error_type
    if error_type.__module__ == "builtins":
        return error_type.__qualname__
    return f"{error_type.__module__}.{error_type.__qualname__}"


def describe_runs(runs: Sequence[TaskRun]) -> str:
    """One line per run (name and outcome), for messages listing what did run."""
    if not runs:
        return "no task has run"
    return ", ".join(f"{run.name!r} ({run.outcome.value})" for run in runs)
