"""Alert rules as pure functions: signals in, alerts out, time injected (no threads, no sleep)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from otel_bgtasks.alerting import (
    DEFAULT_FAILURE_RATIO,
    Alert,
    AlertingConfig,
    AlertStatus,
    CircuitChange,
    CircuitOpened,
    ConsecutiveFailures,
    DeadLetterMove,
    DeadLetterMoves,
    FailureRatio,
    Rule,
    RuleEngine,
    Severity,
    SlowTask,
    TaskSignal,
    default_rules,
    parse_rules,
)
from otel_bgtasks.attributes import Outcome

FIRING, RESOLVED = AlertStatus.FIRING, AlertStatus.RESOLVED
REPO = Path(__file__).resolve().parents[2]


def sig(
    task: str = "send_invoice",
    outcome: str = "success",
    duration: float = 0.1,
    *,
    error_type: str | None = None,
    error_category: str | None = None,
    circuit: Sequence[tuple[str, str, str]] = (),
    dlq: Sequence[tuple[str | None, str | None]] = (),
) -> TaskSignal:
    return TaskSignal(
        task_name=task,
        outcome=outcome,
        duration=duration,
        started_at=1000.0,
        ended_at=1000.0 + duration,
        error_type=error_type,
        error_category=error_category,
        circuit_changes=tuple(CircuitChange(n, f, t, 1000.0) for n, f, t in circuit),
        dlq_moves=tuple(DeadLetterMove(e, r, 1000.0) for e, r in dlq),
        service="api",
    )


FAIL = sig(outcome="failure", error_type="ConnectionError", error_category="connection")
OK = sig()


def feed(rule: Rule, timeline: Iterable[tuple[float, TaskSignal | None]]) -> list[Alert]:
    """Feed `(time, signal)` pairs; a None signal is a `tick` at that time."""
    alerts: list[Alert] = []
    for now, signal in timeline:
        alerts.extend(rule.tick(now) if signal is None else rule.observe(signal, now))
    return alerts


def brief(alerts: Iterable[Alert]) -> list[tuple[float, str, str]]:
    return [(a.at, a.status.value, a.key) for a in alerts]


# -- ConsecutiveFailures ---------------------------------------------------------------------


def test_consecutive_failures_fires_on_the_nth_failure_with_the_whole_alert():
    rule = ConsecutiveFailures(3)
    assert feed(rule, [(1.0, FAIL), (2.0, FAIL)]) == []
    (alert,) = rule.observe(FAIL, 3.0)
    assert alert == Alert(
        rule="consecutive_failures",
        severity=Severity.ERROR,
        status=FIRING,
        key="task:send_invoice",
        summary="Task send_invoice failed 3 times in a row",
        at=3.0,
        labels={"task": "send_invoice", "service": "api"},
        details={
            "consecutive_failures": 3,
            "threshold": 3,
            "outcome": "failure",
            "error_type": "ConnectionError",
            "error_category": "connection",
        },
        signal=FAIL,
    )
    assert alert.title == "[FIRING] consecutive_failures: Task send_invoice failed 3 times in a row"
    assert rule.firing_keys() == {"task:send_invoice"}


def test_consecutive_failures_dedupes_while_failing_and_resolves_on_success():
    rule = ConsecutiveFailures(2)
    alerts = feed(rule, [(t, FAIL) for t in range(1, 6)] + [(6.0, OK), (7.0, OK)])
    assert brief(alerts) == [
        (2, "firing", "task:send_invoice"),
        (6.0, "resolved", "task:send_invoice"),
    ]
    resolved = alerts[1]
    assert resolved.summary == "Task send_invoice succeeded again after 5 failures"
    assert resolved.details == {"consecutive_failures": 5, "threshold": 2}
    assert resolved.signal is OK
    assert rule.firing_keys() == frozenset()


def test_consecutive_failures_resets_the_streak_on_success():
    rule = ConsecutiveFailures(3)
    assert feed(rule, [(1, FAIL), (2, FAIL), (3, OK), (4, FAIL), (5, FAIL)]) == []


@pytest.mark.parametrize("outcome", [o.value for o in Outcome if o is not Outcome.SUCCESS])
def test_every_outcome_but_success_is_a_failure(outcome):
    rule = ConsecutiveFailures(1)
    (alert,) = rule.observe(sig(outcome=outcome), 1.0)
    assert (alert.status, alert.details["outcome"]) == (FIRING, outcome)


def test_consecutive_failures_keys_tasks_apart():
    rule = ConsecutiveFailures(2)
    a, b = sig("a", "failure"), sig("b", "timeout")
    alerts = feed(rule, [(1, a), (2, b), (3, a), (4, sig("b")), (5, b), (6, b)])
    assert brief(alerts) == [(3, "firing", "task:a"), (6, "firing", "task:b")]


def test_cooldown_holds_a_refiring_back_and_tick_sends_it_when_it_ends():
    rule = ConsecutiveFailures(1, cooldown=60)
    alerts = feed(rule, [(0, FAIL), (10, OK), (20, FAIL), (30, None), (59.9, None)])
    assert brief(alerts) == [
        (0, "firing", "task:send_invoice"),
        (10, "resolved", "task:send_invoice"),
    ]
    assert brief(rule.tick(60)) == [(60, "firing", "task:send_invoice")]
    assert rule.tick(61) == []
    # It fired again after the hold, so its clearing is announced.
    assert brief(rule.observe(OK, 70)) == [(70, "resolved", "task:send_invoice")]


def test_a_refiring_that_clears_within_the_cooldown_sends_nothing():
    rule = ConsecutiveFailures(1, cooldown=60)
    alerts = feed(rule, [(0, FAIL), (10, OK), (20, FAIL), (30, OK), (100, None)])
    assert brief(alerts) == [
        (0, "firing", "task:send_invoice"),
        (10, "resolved", "task:send_invoice"),
    ]


def test_zero_cooldown_reports_every_flap():
    rule = ConsecutiveFailures(1, cooldown=0)
    alerts = feed(rule, [(0, FAIL), (0, OK), (0, FAIL), (0, OK)])
    assert [a.status for a in alerts] == [FIRING, RESOLVED, FIRING, RESOLVED]


def test_tasks_filter_and_custom_name_and_severity():
    rule = ConsecutiveFailures(1, name="mail-down", severity="critical", tasks={"send_mail"})
    assert rule.observe(FAIL, 1) == []
    (alert,) = rule.observe(sig("send_mail", "failure"), 2)
    assert (alert.rule, alert.severity) == ("mail-down", Severity.CRITICAL)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ConsecutiveFailures(0), "n=0"),
        (lambda: ConsecutiveFailures(cooldown=-1), "cooldown=-1"),
        (lambda: ConsecutiveFailures(name=" "), "non-empty"),
        (lambda: FailureRatio(0), "threshold=0"),
        (lambda: FailureRatio(1.5), "threshold=1.5"),
        (lambda: FailureRatio(window_seconds=0), "window_seconds=0"),
        (lambda: FailureRatio(min_runs=0), "min_runs=0"),
        (lambda: DeadLetterMoves(-1), "more_than=-1"),
        (lambda: DeadLetterMoves(window_seconds=-5), "window_seconds=-5"),
        (lambda: SlowTask(0), "threshold_seconds=0"),
    ],
)
def test_invalid_rule_settings_raise_with_the_setting_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unknown_severity_is_refused():
    with pytest.raises(ValueError, match="fatal"):
        SlowTask(1, severity="fatal")


def _expected_consecutive(n: int, outcomes: Sequence[tuple[str, bool]]) -> list[tuple[str, str]]:
    """Reference model: per task, a firing at the n-th failure of a streak, a resolve at the
    success ending a streak that fired."""
    streak: dict[str, int] = {}
    out = []
    for task, failed in outcomes:
        if failed:
            streak[task] = streak.get(task, 0) + 1
            if streak[task] == n:
                out.append(("firing", f"task:{task}"))
        else:
            if streak.pop(task, 0) >= n:
                out.append(("resolved", f"task:{task}"))
    return out


@given(
    n=st.integers(1, 4),
    outcomes=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.booleans()), max_size=60),
)
def test_consecutive_failures_matches_the_reference_model(n, outcomes):
    rule = ConsecutiveFailures(n, cooldown=0)
    alerts = []
    for i, (task, failed) in enumerate(outcomes):
        alerts += rule.observe(sig(task, "failure" if failed else "success"), float(i))
    assert [(a.status.value, a.key) for a in alerts] == _expected_consecutive(n, outcomes)


@given(
    cooldown=st.sampled_from([0.0, 5.0, 30.0]),
    steps=st.lists(st.tuples(st.floats(0, 20), st.booleans(), st.booleans()), max_size=60),
)
def test_any_rule_history_alternates_firing_and_resolved_and_respects_the_cooldown(cooldown, steps):
    rule = ConsecutiveFailures(2, cooldown=cooldown)
    now = 0.0
    alerts = []
    for delay, failed, tick in steps:
        now += delay
        signal = None if tick else sig(outcome="failure" if failed else "success")
        alerts += feed(rule, [(now, signal)])
    statuses = [a.status for a in alerts]
    assert statuses == [FIRING, RESOLVED] * (len(statuses) // 2) + [FIRING] * (len(statuses) % 2)
    firings = [a.at for a in alerts if a.status is FIRING]
    assert all(b - a >= cooldown for a, b in itertools.pairwise(firings))


# -- FailureRatio ----------------------------------------------------------------------------


def test_failure_ratio_waits_for_min_runs_then_fires():
    rule = FailureRatio(0.5, window_seconds=60, min_runs=4)
    assert feed(rule, [(1, FAIL), (2, FAIL), (3, FAIL)]) == []
    (alert,) = rule.observe(OK, 4)
    assert alert.status is FIRING
    assert alert.summary == (
        "Task send_invoice failed 3 of 4 runs in the last 60s (75%, threshold 50%)"
    )
    assert alert.details == {
        "runs": 4,
        "failures": 3,
        "threshold": 0.5,
        "window_seconds": 60.0,
        "failure_ratio": 0.75,
    }
    assert (alert.rule, alert.severity) == ("failure_ratio", Severity.WARNING)


def test_failure_ratio_defaults_to_the_shipped_prometheus_rules_threshold():
    rules = yaml.safe_load((REPO / "collector-config" / "alert-rules.yml").read_text())
    (expr,) = [
        rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("alert") == "BgTaskFailureRatioHigh"
    ]
    shipped = float(re.fullmatch(r"(?s).*\)\s*>\s*([0-9.]+)\s*", expr).group(1))
    assert DEFAULT_FAILURE_RATIO == shipped == 0.1
    assert FailureRatio().threshold == DEFAULT_FAILURE_RATIO
    (ratio,) = AlertingConfig(rules=parse_rules("failure_ratio")).build_rules()
    assert isinstance(ratio, FailureRatio)
    assert (ratio.threshold, ratio.window_seconds, ratio.min_runs) == (0.1, 300.0, 10)


def test_failure_ratio_resolves_when_the_ratio_drops_under_the_threshold():
    rule = FailureRatio(0.5, window_seconds=60, min_runs=2)
    # 2 of 4 is still 50%: at the threshold counts as firing.
    alerts = feed(rule, [(1, FAIL), (2, FAIL), (3, OK), (4, OK), (5, OK)])
    assert brief(alerts) == [
        (2, "firing", "task:send_invoice"),
        (5, "resolved", "task:send_invoice"),
    ]
    assert alerts[1].summary == (
        "Task send_invoice is back under the threshold: 2 of 5 runs in the last 60s"
        " (40%, threshold 50%)"
    )


def test_failure_ratio_counts_only_the_window_and_resolves_by_tick_when_it_empties():
    rule = FailureRatio(0.5, window_seconds=60, min_runs=2)
    alerts = feed(rule, [(0, FAIL), (1, FAIL)])
    assert brief(alerts) == [(1, "firing", "task:send_invoice")]
    # 61 s later both runs are out of the window: too few runs keeps the state...
    assert feed(rule, [(30, None), (60.5, None)]) == []
    # ...until the window holds no run at all.
    (resolved,) = rule.tick(61.5)
    assert (resolved.status, resolved.details["runs"]) == (RESOLVED, 0)
    assert resolved.summary == "Task send_invoice had no runs in the last 60s"
    assert resolved.signal is None


def test_failure_ratio_forgets_old_failures():
    rule = FailureRatio(0.5, window_seconds=10, min_runs=3)
    # Two old failures, then three fresh runs of which one fails: 1/3 < 50%.
    assert feed(rule, [(0, FAIL), (1, FAIL), (20, FAIL), (21, OK), (22, OK)]) == []


# -- CircuitOpened -------------------------------------------------------------------------------


def circuit(name: str, frm: str, to: str, task: str = "send_mail") -> TaskSignal:
    return sig(task, "rejected" if to == "open" else "success", circuit=[(name, frm, to)])


def test_circuit_opened_fires_on_open_dedupes_half_open_and_resolves_on_closed():
    rule = CircuitOpened()
    alerts = feed(
        rule,
        [
            (1, circuit("smtp", "closed", "open")),
            (2, circuit("smtp", "open", "half_open")),
            (3, circuit("smtp", "half_open", "open")),
            (4, circuit("smtp", "open", "half_open")),
            (5, circuit("smtp", "half_open", "closed")),
        ],
    )
    assert brief(alerts) == [(1, "firing", "circuit:smtp"), (5, "resolved", "circuit:smtp")]
    firing, resolved = alerts
    assert firing.summary == "Circuit smtp opened (task send_mail)"
    assert firing.labels == {"circuit": "smtp", "task": "send_mail", "service": "api"}
    assert firing.details == {"from": "closed", "to": "open", "outcome": "rejected"}
    assert (firing.rule, firing.severity) == ("circuit_opened", Severity.CRITICAL)
    assert resolved.summary == "Circuit smtp closed again (task send_mail)"


def test_circuit_opened_keys_circuits_apart_and_ignores_a_close_it_never_saw_open():
    rule = CircuitOpened(circuits={"smtp", "billing"})
    alerts = feed(
        rule,
        [
            (1, circuit("billing", "half_open", "closed")),
            (2, circuit("smtp", "closed", "open")),
            (3, circuit("billing", "closed", "open")),
            (4, circuit("other", "closed", "open")),
        ],
    )
    assert brief(alerts) == [(2, "firing", "circuit:smtp"), (3, "firing", "circuit:billing")]


def test_circuit_opened_reads_every_change_of_one_span_in_order():
    rule = CircuitOpened(cooldown=0)
    one_span = sig(circuit=[("smtp", "closed", "open"), ("smtp", "half_open", "closed")])
    assert [a.status for a in rule.observe(one_span, 1)] == [FIRING, RESOLVED]


# -- DeadLetterMoves -----------------------------------------------------------------------------


def moved(entry: str, reason: str = "retries_exhausted") -> TaskSignal:
    return sig(outcome="dead_lettered", error_type="TimeoutError", dlq=[(entry, reason)])


def test_each_dead_letter_move_notifies_with_its_entry():
    rule = DeadLetterMoves(cooldown=0)
    alerts = feed(rule, [(1, moved("e1")), (2, OK), (3, moved("e2"))])
    assert brief(alerts) == [(1, "firing", "task:send_invoice"), (3, "firing", "task:send_invoice")]
    assert alerts[0].summary == "Task send_invoice moved to the dead-letter store"
    assert alerts[0].details == {
        "moves": 1,
        "window_seconds": 300.0,
        "entry_id": "e1",
        "reason": "retries_exhausted",
        "outcome": "dead_lettered",
        "error_type": "TimeoutError",
    }
    assert alerts[1].summary == "Task send_invoice moved to the dead-letter store 2 times in 300s"
    assert alerts[1].details["entry_id"] == "e2"


def test_dead_letter_moves_resolve_once_the_window_is_quiet():
    rule = DeadLetterMoves(window_seconds=60, cooldown=0)
    assert brief(rule.observe(moved("e1"), 0)) == [(0, "firing", "task:send_invoice")]
    assert rule.tick(59) == []
    (resolved,) = rule.tick(60)
    assert resolved.status is RESOLVED
    assert resolved.summary == "Task send_invoice: no more dead-letter moves than 0 in 60s"


def test_each_mode_sums_a_burst_up_after_the_cooldown():
    rule = DeadLetterMoves(window_seconds=600, cooldown=60)
    alerts = feed(rule, [(0, moved("e1")), (5, moved("e2")), (10, moved("e3")), (30, None)])
    assert brief(alerts) == [(0, "firing", "task:send_invoice")]
    (later,) = rule.tick(60)
    assert later.summary == "Task send_invoice moved to the dead-letter store 3 times in 600s"
    assert later.details["entry_id"] == "e3"


def test_more_than_n_in_a_window():
    rule = DeadLetterMoves(more_than=2, window_seconds=60, cooldown=0)
    # Spread out: never more than 2 in 60 s.
    assert feed(rule, [(0, moved("a")), (40, moved("b")), (80, moved("c"))]) == []
    alerts = feed(rule, [(150, moved("d")), (160, moved("e")), (170, moved("f"))])
    assert brief(alerts) == [(170, "firing", "task:send_invoice")]
    assert alerts[0].details["moves"] == 3
    assert alerts[0].details["threshold"] == 2
    assert alerts[0].summary == "Task send_invoice moved to the dead-letter store 3 times in 60s"
    assert rule.tick(209) == []
    assert brief(rule.tick(210.5)) == [(210.5, "resolved", "task:send_invoice")]


def test_signals_without_moves_are_ignored():
    rule = DeadLetterMoves()
    assert feed(rule, [(0, FAIL), (1, OK), (2, None)]) == []


# -- SlowTask ------------------------------------------------------------------------------------


def test_slow_task_fires_over_the_threshold_and_resolves_within_it():
    rule = SlowTask(2.0)
    alerts = feed(
        rule,
        [
            (0, sig(duration=2.0)),
            (1, sig(duration=2.5)),
            (2, sig(duration=9)),
            (3, sig(duration=0.5)),
        ],
    )
    assert brief(alerts) == [
        (1, "firing", "task:send_invoice"),
        (3, "resolved", "task:send_invoice"),
    ]
    assert alerts[0].summary == "Task send_invoice took 2.5s (threshold 2s)"
    assert alerts[0].details == {
        "duration_seconds": 2.5,
        "threshold_seconds": 2.0,
        "outcome": "success",
    }
    assert alerts[1].summary == "Task send_invoice finished within 2s again (0.5s)"
    assert (alerts[0].rule, alerts[0].severity) == ("slow_task", Severity.WARNING)


# -- RuleEngine ----------------------------------------------------------------------------------


class Exploding(Rule):
    default_name = "exploding"

    def _check(self, signal, now):
        raise RuntimeError("bug in a custom rule")


def test_engine_runs_every_rule_at_the_clock_time_and_survives_a_broken_rule():
    times = iter([100.0, 200.0])
    engine = RuleEngine([Exploding(), ConsecutiveFailures(1)], clock=lambda: next(times))
    with capture_logs() as logs:
        (alert,) = engine.observe(FAIL)
    assert (alert.rule, alert.at) == ("consecutive_failures", 100.0)
    assert [(e["event"], e["rule"], e["log_level"]) for e in logs] == [
        ("bgtasks alert rule failed", "exploding", "error")
    ]
    assert engine.tick() == []


def test_engine_refuses_duplicate_rule_names():
    with pytest.raises(ValueError, match="consecutive_failures more than once: pass name="):
        RuleEngine([ConsecutiveFailures(1), ConsecutiveFailures(5)])
    RuleEngine([ConsecutiveFailures(1), ConsecutiveFailures(5, name="five_failures")])


def test_default_rules():
    assert [repr(r) for r in default_rules()] == [
        "ConsecutiveFailures(name='consecutive_failures', severity='error')",
        "CircuitOpened(name='circuit_opened', severity='critical')",
        "DeadLetterMoves(name='dead_letter_moves', severity='error')",
    ]


def test_alert_is_immutable():
    (alert,) = ConsecutiveFailures(1).observe(FAIL, 1)
    with pytest.raises(TypeError):
        alert.labels["task"] = "other"  # type: ignore[index]
    with pytest.raises(AttributeError):
        alert.rule = "x"  # type: ignore[misc]
    assert alert.timestamp == "1970-01-01T00:00:01+00:00"
