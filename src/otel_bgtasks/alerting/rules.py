"""Alert rules: small state machines fed with `TaskSignal`s and an injected clock.

A rule turns each signal into *conditions* per dedup key (`task:{name}` or `circuit:{name}`):
"holds" or "clear". The `Rule` base class turns condition changes into `Alert`s the same way
for every rule:

- a key whose condition starts to hold fires once (dedupe: no repeat while it keeps holding);
- a key fires at most once per `cooldown` seconds; a firing that falls inside the cooldown is
  held back and sent by `tick()` once the cooldown is over, if the condition still holds;
- a key that fired and whose condition clears gets one `resolved` notice (never delayed);
- time-based conditions (windows) are re-checked by `tick(now)`, which the processor calls
  about once a second.

Rules hold no I/O and read no clock: `observe(signal, now)` and `tick(now)` are deterministic,
so a rule is tested by feeding it a sequence of signals with chosen times.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog

from otel_bgtasks._tracebacks import exception_fields
from otel_bgtasks.alerting.alerts import Alert, AlertStatus, DetailValue, Severity
from otel_bgtasks.alerting.signals import TaskSignal
from otel_bgtasks.errors import ConfigurationError

__all__ = [
    "DEFAULT_FAILURE_RATIO",
    "CircuitOpened",
    "Clock",
    "Condition",
    "ConsecutiveFailures",
    "DeadLetterMoves",
    "FailureRatio",
    "Rule",
    "RuleEngine",
    "SlowTask",
    "default_rules",
]

Clock = Callable[[], float]
"""Returns the current Unix time in seconds (`time.time`, or a fake in tests)."""

DEFAULT_FAILURE_RATIO: Final = 0.1
"""`FailureRatio`'s default threshold: the one of the shipped Prometheus rule
`BgTaskFailureRatioHigh` (collector-config/alert-rules.yml), so both alerting paths page on the
same share of failed runs."""

_log = structlog.get_logger("otel_bgtasks.alerting")


@dataclass(frozen=True, slots=True)
class Condition:
    """A rule's verdict for one dedup key at one moment.

    Attributes:
        key: the dedup key (`task:{name}`, `circuit:{name}`).
        active: the alert condition holds.
        summary: one sentence for the notice this verdict would send (firing or resolved).
        labels, details: copied into the `Alert`.
        renotify: while already firing, notify again (subject to the cooldown): for rules
            where each occurrence matters, like every dead-letter move.
        signal: the run behind the verdict, if any.
    """

    key: str
    active: bool
    summary: str
    labels: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, DetailValue] = field(default_factory=dict)
    renotify: bool = False
    signal: TaskSignal | None = None


@dataclass(slots=True)
class _KeyState:
    firing: bool = False
    notified: bool = False  # a firing notice was sent for the current episode
    last_sent: float | None = None  # time of the last firing notice, across episodes
    pending: Condition | None = None  # a firing notice held back by the cooldown


class Rule(ABC):
    """Base of every rule: dedupe, cooldown and resolve over per-key `Condition`s.

    Args:
        name: the rule's name in alerts and in the `bgtasks.alert.rule` metric attribute;
            unique within one engine.
        severity: carried by every alert of the rule.
        cooldown: minimum seconds between two firing notices for the same key.
        tasks: only look at these task names (default: all tasks).
    """

    default_name: str = "rule"
    default_severity: Severity = Severity.ERROR

    def __init__(
        self,
        *,
        name: str | None = None,
        severity: Severity | str | None = None,
        cooldown: float = 300.0,
        tasks: Collection[str] | None = None,
    ) -> None:
        if cooldown < 0:
            raise ConfigurationError(
                f"{type(self).__name__}(cooldown={cooldown!r}): must be >= 0 s"
            )
        self.name = name if name is not None else self.default_name
        if not self.name.strip():
            raise ConfigurationError(f"{type(self).__name__}(name=...): must be a non-empty string")
        self.severity = Severity(severity) if severity is not None else self.default_severity
        self.cooldown = float(cooldown)
        self.tasks = frozenset(tasks) if tasks is not None else None
        self._states: dict[str, _KeyState] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, severity={self.severity.value!r})"

    def observe(self, signal: TaskSignal, now: float) -> list[Alert]:
        """Feed one finished task run; return the notices to send now."""
        if self.tasks is not None and signal.task_name not in self.tasks:
            return []
        return self._apply(self._check(signal, now), now)

    def tick(self, now: float) -> list[Alert]:
        """Re-check time-based conditions and send notices the cooldown held back."""
        alerts = self._apply(self._expire(now), now)
        for state in self._states.values():
            pending = state.pending
            if pending is not None and self._cooled_down(state, now):
                alerts.append(self._send_firing(state, pending, now))
        return alerts

    def firing_keys(self) -> frozenset[str]:
        """The dedup keys whose condition holds now."""
        return frozenset(key for key, state in self._states.items() if state.firing)

    @abstractmethod
    def _check(self, signal: TaskSignal, now: float) -> Iterable[Condition]:
        """The conditions one signal changes (in order)."""

    def _expire(self, now: float) -> Iterable[Condition]:
        """Conditions that changed with time alone (windows); none by default."""
        return ()

    # -- the shared state machine -------------------------------------------------------------

    def _apply(self, conditions: Iterable[Condition], now: float) -> list[Alert]:
        alerts: list[Alert] = []
        for condition in conditions:
            state = self._states.get(condition.key)
            if state is None:
                if not condition.active:
                    continue  # nothing fired, nothing to remember
                state = self._states[condition.key] = _KeyState()
            if condition.active:
                if not state.firing:
                    state.firing = True
                    state.notified = False
                    self._fire_or_hold(state, condition, now, alerts)
                elif condition.renotify or (
                    # a held-back notice takes the newest facts of a run, not of a tick
                    state.pending is not None and condition.signal is not None
                ):
                    self._fire_or_hold(state, condition, now, alerts)
            elif state.firing:
                state.firing = False
                state.pending = None
                if state.notified:
                    state.notified = False
                    alerts.append(self._alert(AlertStatus.RESOLVED, condition, now))
        return alerts

    def _fire_or_hold(
        self, state: _KeyState, condition: Condition, now: float, alerts: list[Alert]
    ) -> None:
        if self._cooled_down(state, now):
            alerts.append(self._send_firing(state, condition, now))
        else:
            state.pending = condition  # the latest facts go out when the cooldown ends

    def _cooled_down(self, state: _KeyState, now: float) -> bool:
        return state.last_sent is None or now - state.last_sent >= self.cooldown

    def _send_firing(self, state: _KeyState, condition: Condition, now: float) -> Alert:
        state.notified = True
        state.last_sent = now
        state.pending = None
        return self._alert(AlertStatus.FIRING, condition, now)

    def _alert(self, status: AlertStatus, condition: Condition, now: float) -> Alert:
        return Alert(
            rule=self.name,
            severity=self.severity,
            status=status,
            key=condition.key,
            summary=condition.summary,
            at=now,
            labels=condition.labels,
            details=condition.details,
            signal=condition.signal,
        )


def _task_key(signal: TaskSignal) -> str:
    return f"task:{signal.task_name}"


def _task_labels(signal: TaskSignal) -> dict[str, str]:
    labels = {"task": signal.task_name}
    if signal.service:
        labels["service"] = signal.service
    return labels


def _error_details(signal: TaskSignal) -> dict[str, DetailValue]:
    details: dict[str, DetailValue] = {"outcome": signal.outcome}
    if signal.error_type:
        details["error_type"] = signal.error_type
    if signal.error_category:
        details["error_category"] = signal.error_category
    return details


def _seconds(value: float) -> str:
    return f"{value:.3g}s"


class ConsecutiveFailures(Rule):
    """Fires when a task fails `n` times in a row; resolves on its next success.

    Every outcome but `success` is a failure (`failure`, `dead_lettered`, `rejected`,
    `timeout`). Dedup key: `task:{name}`.
    """

    default_name = "consecutive_failures"
    default_severity = Severity.ERROR

    def __init__(
        self,
        n: int = 3,
        *,
        name: str | None = None,
        severity: Severity | str | None = None,
        cooldown: float = 300.0,
        tasks: Collection[str] | None = None,
    ) -> None:
        if n < 1:
            raise ConfigurationError(f"ConsecutiveFailures(n={n!r}): must be >= 1")
        super().__init__(name=name, severity=severity, cooldown=cooldown, tasks=tasks)
        self.n = n
        self._streaks: dict[str, int] = {}

    def _check(self, signal: TaskSignal, now: float) -> Iterable[Condition]:
        key = _task_key(signal)
        labels = _task_labels(signal)
        if signal.failed:
            streak = self._streaks.get(key, 0) + 1
            self._streaks[key] = streak
            details: dict[str, DetailValue] = {"consecutive_failures": streak, "threshold": self.n}
            details.update(_error_details(signal))
            yield Condition(
                key,
                active=streak >= self.n,
                summary=f"Task {signal.task_name} failed {streak} times in a row",
                labels=labels,
                details=details,
                signal=signal,
            )
        else:
            streak = self._streaks.pop(key, 0)
            yield Condition(
                key,
                active=False,
                summary=f"Task {signal.task_name} succeeded again after {streak} failures",
                labels=labels,
                details={"consecutive_failures": streak, "threshold": self.n},
                signal=signal,
            )


@dataclass(slots=True)
class _Bucket:
    index: int
    runs: int = 0
    failures: int = 0


class FailureRatio(Rule):
    """Fires when failures / runs >= `threshold` over the last `window_seconds`.

    Decides only with at least `min_runs` runs in the window; with fewer, the alert keeps its
    state, and resolves once the window holds no run at all. The window slides in steps of
    `window_seconds / 60` (runs are counted in 60 buckets, so memory stays bounded however
    busy the task). Dedup key: `task:{name}`.
    """

    default_name = "failure_ratio"
    default_severity = Severity.WARNING
    buckets = 60

    def __init__(
        self,
        threshold: float = DEFAULT_FAILURE_RATIO,
        window_seconds: float = 300.0,
        min_runs: int = 10,
        *,
        name: str | None = None,
        severity: Severity | str | None = None,
        cooldown: float = 300.0,
        tasks: Collection[str] | None = None,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ConfigurationError(f"FailureRatio(threshold={threshold!r}): must be in (0, 1]")
        if not window_seconds > 0:
            raise ConfigurationError(
                f"FailureRatio(window_seconds={window_seconds!r}): must be > 0"
            )
        if min_runs < 1:
            raise ConfigurationError(f"FailureRatio(min_runs={min_runs!r}): must be >= 1")
        super().__init__(name=name, severity=severity, cooldown=cooldown, tasks=tasks)
        self.threshold = threshold
        self.window_seconds = float(window_seconds)
        self.min_runs = min_runs
        self._width = self.window_seconds / self.buckets
        self._runs: dict[str, deque[_Bucket]] = {}
        self._labels: dict[str, dict[str, str]] = {}

    def _check(self, signal: TaskSignal, now: float) -> Iterable[Condition]:
        key = _task_key(signal)
        buckets = self._runs.setdefault(key, deque())
        index = int(now // self._width)
        if not buckets or buckets[-1].index != index:
            buckets.append(_Bucket(index))
        bucket = buckets[-1]
        bucket.runs += 1
        bucket.failures += signal.failed
        self._labels[key] = _task_labels(signal)
        condition = self._evaluate(key, signal.task_name, now, signal)
        return () if condition is None else (condition,)

    def _expire(self, now: float) -> Iterable[Condition]:
        conditions = []
        for key in list(self._runs):
            condition = self._evaluate(key, key.removeprefix("task:"), now, None)
            if condition is not None:
                conditions.append(condition)
        return conditions

    def _evaluate(
        self, key: str, task: str, now: float, signal: TaskSignal | None
    ) -> Condition | None:
        buckets = self._runs[key]
        oldest = int((now - self.window_seconds) // self._width)  # buckets <= this are out
        while buckets and buckets[0].index <= oldest:
            buckets.popleft()
        runs = sum(b.runs for b in buckets)
        failures = sum(b.failures for b in buckets)
        labels = self._labels[key]
        if not buckets:
            del self._runs[key]
            del self._labels[key]
        window = _seconds(self.window_seconds)
        details: dict[str, DetailValue] = {
            "runs": runs,
            "failures": failures,
            "threshold": self.threshold,
            "window_seconds": self.window_seconds,
        }
        if runs == 0:
            return Condition(
                key, False, f"Task {task} had no runs in the last {window}", labels, details
            )
        if runs < self.min_runs:
            return None  # too few runs to decide either way
        ratio = failures / runs
        details["failure_ratio"] = round(ratio, 4)
        if signal is not None and signal.failed:
            details.update(_error_details(signal))
        verb = "failed" if ratio >= self.threshold else "is back under the threshold:"
        return Condition(
            key,
            active=ratio >= self.threshold,
            summary=f"Task {task} {verb} {failures} of {runs} runs in the last {window}"
            f" ({ratio:.0%}, threshold {self.threshold:.0%})",
            labels=labels,
            details=details,
            signal=signal,
        )


class CircuitOpened(Rule):
    """Fires when a circuit breaker opens (`to=open`); resolves when it closes (`to=closed`).

    Reads the `bgtasks.circuit.state_change` events of task spans; a half-open probe changes
    nothing. Dedup key: `circuit:{name}`.

    Args:
        circuits: only these circuit names (default: all).
    """

    default_name = "circuit_opened"
    default_severity = Severity.CRITICAL

    def __init__(
        self,
        *,
        name: str | None = None,
        severity: Severity | str | None = None,
        cooldown: float = 300.0,
        tasks: Collection[str] | None = None,
        circuits: Collection[str] | None = None,
    ) -> None:
        super().__init__(name=name, severity=severity, cooldown=cooldown, tasks=tasks)
        self.circuits = frozenset(circuits) if circuits is not None else None

    def _check(self, signal: TaskSignal, now: float) -> Iterable[Condition]:
        for change in signal.circuit_changes:
            if self.circuits is not None and change.name not in self.circuits:
                continue
            if change.to_state not in ("open", "closed"):
                continue
            labels = {"circuit": change.name, "task": signal.task_name}
            if signal.service:
                labels["service"] = signal.service
            details: dict[str, DetailValue] = {
                "from": change.from_state,
                "to": change.to_state,
            }
            if change.to_state == "open":
                details.update(_error_details(signal))
                summary = f"Circuit {change.name} opened (task {signal.task_name})"
            else:
                summary = f"Circuit {change.name} closed again (task {signal.task_name})"
            yield Condition(
                f"circuit:{change.name}",
                active=change.to_state == "open",
                summary=summary,
                labels=labels,
                details=details,
                signal=signal,
            )


class DeadLetterMoves(Rule):
    """Fires on dead-letter moves (`bgtasks.dlq.moved` events) of a task.

    With `more_than=None` (the default) every move notifies (within the cooldown, later moves
    are summed up in the next notice); with `more_than=N` the alert fires when more than N
    moves happened within `window_seconds`. It resolves when the window holds no move (or at
    most N). Dedup key: `task:{name}`.
    """

    default_name = "dead_letter_moves"
    default_severity = Severity.ERROR
    max_remembered = 10_000

    def __init__(
        self,
        more_than: int | None = None,
        window_seconds: float = 300.0,
        *,
        name: str | None = None,
        severity: Severity | str | None = None,
        cooldown: float = 60.0,
        tasks: Collection[str] | None = None,
    ) -> None:
        if more_than is not None and more_than < 0:
            raise ConfigurationError(
                f"DeadLetterMoves(more_than={more_than!r}): must be >= 0 or None"
            )
        if not window_seconds > 0:
            raise ConfigurationError(
                f"DeadLetterMoves(window_seconds={window_seconds!r}): must be > 0"
            )
        super().__init__(name=name, severity=severity, cooldown=cooldown, tasks=tasks)
        self.more_than = more_than
        self.window_seconds = float(window_seconds)
        self._moves: dict[str, deque[float]] = {}
        self._labels: dict[str, dict[str, str]] = {}

    @property
    def _limit(self) -> int:
        return 0 if self.more_than is None else self.more_than

    def _check(self, signal: TaskSignal, now: float) -> Iterable[Condition]:
        if not signal.dlq_moves:
            return ()
        key = _task_key(signal)
        moves = self._moves.setdefault(key, deque(maxlen=self.max_remembered))
        moves.extend(now for _ in signal.dlq_moves)
        self._labels[key] = _task_labels(signal)
        return (self._evaluate(key, signal.task_name, now, signal),)

    def _expire(self, now: float) -> Iterable[Condition]:
        return [
            self._evaluate(key, key.removeprefix("task:"), now, None) for key in list(self._moves)
        ]

    def _evaluate(self, key: str, task: str, now: float, signal: TaskSignal | None) -> Condition:
        moves = self._moves[key]
        while moves and moves[0] <= now - self.window_seconds:
            moves.popleft()
        count = len(moves)
        labels = self._labels[key]
        if not moves:
            del self._moves[key]
            del self._labels[key]
        window = _seconds(self.window_seconds)
        details: dict[str, DetailValue] = {"moves": count, "window_seconds": self.window_seconds}
        if self.more_than is not None:
            details["threshold"] = self.more_than
        active = count > self._limit
        if signal is not None and signal.dlq_moves:
            last = signal.dlq_moves[-1]
            if last.entry_id:
                details["entry_id"] = last.entry_id
            if last.reason:
                details["reason"] = last.reason
            details.update(_error_details(signal))
        if active:
            summary = f"Task {task} moved to the dead-letter store {count} times in {window}"
            if count == 1:
                summary = f"Task {task} moved to the dead-letter store"
        else:
            summary = f"Task {task}: no more dead-letter moves than {self._limit} in {window}"
        return Condition(
            key,
            active=active,
            summary=summary,
            labels=labels,
            details=details,
            renotify=self.more_than is None and signal is not None,
            signal=signal,
        )


class SlowTask(Rule):
    """Fires when a run takes longer than `threshold_seconds`; resolves on a run within it.

    Duration is the task span's, all attempts and retry delays included. Dedup key:
    `task:{name}`.
    """

    default_name = "slow_task"
    default_severity = Severity.WARNING

    def __init__(
        self,
        threshold_seconds: float,
        *,
        name: str | None = None,
        severity: Severity | str | None = None,
        cooldown: float = 300.0,
        tasks: Collection[str] | None = None,
    ) -> None:
        if not threshold_seconds > 0:
            raise ConfigurationError(
                f"SlowTask(threshold_seconds={threshold_seconds!r}): must be > 0"
            )
        super().__init__(name=name, severity=severity, cooldown=cooldown, tasks=tasks)
        self.threshold_seconds = float(threshold_seconds)

    def _check(self, signal: TaskSignal, now: float) -> Iterable[Condition]:
        slow = signal.duration > self.threshold_seconds
        limit = _seconds(self.threshold_seconds)
        took = _seconds(signal.duration)
        if slow:
            summary = f"Task {signal.task_name} took {took} (threshold {limit})"
        else:
            summary = f"Task {signal.task_name} finished within {limit} again ({took})"
        yield Condition(
            _task_key(signal),
            active=slow,
            summary=summary,
            labels=_task_labels(signal),
            details={
                "duration_seconds": round(signal.duration, 6),
                "threshold_seconds": self.threshold_seconds,
                "outcome": signal.outcome,
            },
            signal=signal,
        )


def default_rules() -> list[Rule]:
    """The rules `install_alerting` uses when given none.

    `ConsecutiveFailures(3)`, `CircuitOpened()` and `DeadLetterMoves()` (each move): the
    signals that need a person. Ratio and latency thresholds depend on the task, so
    `FailureRatio` and `SlowTask` are opt-in.
    """
    return [ConsecutiveFailures(3), CircuitOpened(), DeadLetterMoves()]


class RuleEngine:
    """Runs every rule over each signal with one clock; a rule that raises is logged and skipped.

    Raises:
        ConfigurationError: two rules share a name (alerts and metrics could not tell them apart).
    """

    def __init__(self, rules: Sequence[Rule], *, clock: Clock = time.time) -> None:
        names = [rule.name for rule in rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigurationError(
                f"alert rule names must be unique, got {', '.join(duplicates)} more than once: "
                "pass name=... to tell the rules apart"
            )
        self.rules = tuple(rules)
        self.clock = clock

    def observe(self, signal: TaskSignal) -> list[Alert]:
        """Feed one signal to every rule at `clock()`."""
        now = self.clock()
        alerts: list[Alert] = []
        for rule in self.rules:
            try:
                alerts.extend(rule.observe(signal, now))
            except Exception:  # a broken rule must not stop the others
                _log.error("bgtasks alert rule failed", rule=rule.name, **exception_fields())
        return alerts

    def tick(self) -> list[Alert]:
        """Let every rule re-check its windows and cooldowns at `clock()`."""
        now = self.clock()
        alerts: list[Alert] = []
        for rule in self.rules:
            try:
                alerts.extend(rule.tick(now))
            except Exception:  # a broken rule must not stop the others
                _log.error("bgtasks alert rule failed", rule=rule.name, **exception_fields())
        return alerts
