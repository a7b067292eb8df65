"""End-to-end proof of issue 4: the demo app, real traffic, every backend checked by its own API.

One module-scoped stack (collector -> Jaeger, Prometheus -> Alertmanager -> webhook), once per
metrics path (Prometheus scrapes the collector, or the collector pushes OTLP to Prometheus),
and two replicas of the demo app, each served by real uvicorn in a subprocess, exporting OTLP
to the collector, sharing one dead-letter store in a real Redis. Both replicas report that
store's depth; the dashboard and the rules must show it once, and the sum of both replicas'
counters. The "peer" replica serves the plain traffic, the "app" replica the payments calls
(its in-memory downstream and breaker are the demo's). The `scenario` fixture drives the
story once:

1. successes (/ok, /sync), retried successes (/flaky), a permanent failure (/fail);
2. /downstream x3 while the payments downstream is down: three failures dead-lettered as
   `exhausted` open the "payments-api" circuit (the first one is scraped on its own, so the
   counters visibly grow afterwards, as the alert rules need), then /downstream x2 are rejected
   (`circuit_open`);
3. while the circuit is open: the metrics are snapshot and the alerts must reach the webhook;
4. POST /downstream/up, wait out the breaker's open duration, replay every dead letter through
   the admin endpoints: the first charge-card replay is the half-open probe that closes the
   circuit, the permanent failure fails again and stays. (The replays run in the app's process:
   the demo's downstream and breaker live in its memory, so `otel-bgtasks dlq replay`, another
   process, would find the downstream down; the CLI replays the entry left afterwards.)

Tests then assert what Jaeger, Prometheus, every dashboard panel and alert rule, Alertmanager's
webhook and the CLI (on the same Redis store) show, with the values the scenario implies. The
last tests run the CLI replay and crash the collector mid-traffic: they change state, so they
stay at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e._infra import (
    CONFIG_DIR,
    METRICS_PATHS,
    Redis,
    TelemetryStack,
    UvicornApp,
    dashboard_queries,
    eventually,
    telemetry_stack,
)

pytestmark = pytest.mark.e2e

# What the demo app (src/otel_bgtasks/demo/app.py) does; the expected values follow from it.
CIRCUIT = "payments-api"
FAILURE_THRESHOLD = 3  # PAYMENTS = CircuitBreaker("payments-api", failure_threshold=3, ...)
OPEN_DURATION = 30.0  # ... open_duration=30.0
FLAKY_FAILURES = 2  # sync_crm fails twice with ConnectionResetError, then succeeds
CIRCUIT_OPEN_ERROR = "otel_bgtasks.errors.CircuitOpenError"

N_OK = 3
N_SYNC = 2
N_FLAKY = 2
N_REJECTED = 2
N_FAILED_REQUESTS = 4  # /signup-fails: the endpoint raises after add_task
TASKS = ("send-welcome-email", "resize_avatar", "sync_crm", "import_contacts", "charge-card")

ADMIN_TOKEN = "scenario-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# The demo mounts only GET /bgtasks/health; an app replays dead letters through the opt-in admin
# router, mounted as the README shows. This module is the demo app plus that router.
APP_MODULE = '''\
"""The demo app with the dead-letter admin router mounted (README, "Dead letters")."""
import os

from otel_bgtasks.demo.app import app
from otel_bgtasks.health import bearer_token_auth, bgtasks_router

app.include_router(bgtasks_router(auth=bearer_token_auth(os.environ["BGTASKS_ADMIN_TOKEN"])))
'''

Labels = tuple[str, ...]
Values = dict[Labels, float]

# Every metric of the contract (DESIGN.md section 3) as Prometheus names it, with the labels
# that tell its series apart.
CONTRACT: dict[str, Labels] = {
    "bgtasks_task_duration_seconds_count": (
        "bgtasks_task_name",
        "bgtasks_task_outcome",
        "error_type",
    ),
    "bgtasks_task_wait_seconds_count": ("bgtasks_task_name",),
    "bgtasks_task_active": ("bgtasks_task_name",),
    "bgtasks_task_retries_total": ("bgtasks_task_name", "error_type"),
    "bgtasks_circuit_state": ("bgtasks_circuit_name",),
    "bgtasks_circuit_transitions_total": (
        "bgtasks_circuit_name",
        "bgtasks_circuit_from",
        "bgtasks_circuit_to",
    ),
    "bgtasks_dlq_moves_total": ("bgtasks_task_name", "bgtasks_dlq_reason"),
    "bgtasks_dlq_depth": (),
    "bgtasks_dlq_replays_total": ("bgtasks_task_name", "bgtasks_task_outcome"),
}

# Every replica reports these for state they share (the dead-letter store; a circuit, with a
# shared backend): the dashboard and the rules take the largest report, not the sum. The rest
# is per process and adds up.
SHARED_GAUGES = frozenset({"bgtasks_dlq_depth", "bgtasks_circuit_state"})
REPLICAS = 2

MOVES: Values = {
    ("import_contacts", "permanent"): 1,
    ("charge-card", "exhausted"): FAILURE_THRESHOLD,
    ("charge-card", "circuit_open"): N_REJECTED,
}
DEAD_LETTERS = int(sum(MOVES.values()))

OPEN_PHASE: dict[str, Values] = {
    "bgtasks_task_duration_seconds_count": {
        ("send-welcome-email", "success", ""): N_OK + 1,  # /fail schedules one as well
        ("resize_avatar", "success", ""): N_SYNC,
        ("sync_crm", "success", ""): N_FLAKY,
        ("import_contacts", "dead_lettered", "ValueError"): 1,
        ("charge-card", "dead_lettered", "ConnectionRefusedError"): FAILURE_THRESHOLD,
        ("charge-card", "rejected", CIRCUIT_OPEN_ERROR): N_REJECTED,
    },
    "bgtasks_task_wait_seconds_count": {
        ("send-welcome-email",): N_OK + 1,
        ("resize_avatar",): N_SYNC,
        ("sync_crm",): N_FLAKY,
        ("import_contacts",): 1,
        ("charge-card",): FAILURE_THRESHOLD + N_REJECTED,
    },
    "bgtasks_task_active": {(task,): 0 for task in TASKS},
    "bgtasks_task_retries_total": {("sync_crm", "ConnectionResetError"): FLAKY_FAILURES * N_FLAKY},
    "bgtasks_circuit_state": {(CIRCUIT,): 2},
    "bgtasks_circuit_transitions_total": {(CIRCUIT, "closed", "open"): 1},
    "bgtasks_dlq_moves_total": MOVES,
    "bgtasks_dlq_depth": {(): DEAD_LETTERS},
    "bgtasks_dlq_replays_total": {},
}

# After the replay: every charge-card dead letter succeeded (the first one as the half-open
# probe), import_contacts failed again and is still a dead letter.
CHARGES = FAILURE_THRESHOLD + N_REJECTED
FINAL: dict[str, Values] = {
    **OPEN_PHASE,
    "bgtasks_task_duration_seconds_count": {
        **OPEN_PHASE["bgtasks_task_duration_seconds_count"],
        ("import_contacts", "failure", "ValueError"): 1,
        ("charge-card", "success", ""): CHARGES,
    },
    "bgtasks_task_wait_seconds_count": {
        **OPEN_PHASE["bgtasks_task_wait_seconds_count"],
        ("import_contacts",): 2,
        ("charge-card",): 2 * CHARGES,
    },
    "bgtasks_circuit_state": {(CIRCUIT,): 0},
    "bgtasks_circuit_transitions_total": {
        (CIRCUIT, "closed", "open"): 1,
        (CIRCUIT, "open", "half_open"): 1,
        (CIRCUIT, "half_open", "closed"): 1,
    },
    "bgtasks_dlq_depth": {(): 1},
    "bgtasks_dlq_replays_total": {
        ("charge-card", "success"): CHARGES,
        ("import_contacts", "failure"): 1,
    },
}

ALERTS = {
    # alertname: (severity, the label naming what it is about, its value)
    "BgTaskCircuitOpen": ("critical", "bgtasks_circuit_name", CIRCUIT),
    "BgTaskFailureRatioHigh": ("warning", "bgtasks_task_name", "charge-card"),
    # one alert per application, whichever tasks dead-letter ("$job": the app's job)
    "BgTaskDeadLettersAccumulating": ("warning", "job", "$job"),
}


# --------------------------------------------------------------------------- helpers


def keyed(result: list[dict[str, Any]], labels: Labels) -> Values:
    """``{label values: value}`` of a query result (one series per key)."""
    found: Values = {}
    for series in result:
        key = tuple(series["metric"].get(label, "") for label in labels)
        assert key not in found, f"two series for {key}: {series['metric']}"
        found[key] = float(series["value"][1])
    return found


def values(stack: TelemetryStack, metric: str, job: str, labels: Labels | None = None) -> Values:
    """``{label values: value}`` of ``metric`` for one application, its replicas combined as
    the dashboard combines them (max for :data:`SHARED_GAUGES`, else sum)."""
    labels = CONTRACT[metric] if labels is None else labels
    how = "max" if metric in SHARED_GAUGES else "sum"
    expr = f'{how} by ({", ".join(labels)}) ({metric}{{job="{job}"}})'
    return keyed(stack.prometheus.query(expr), labels)


def replicas_reporting(stack: TelemetryStack, job: str) -> Values:
    """``{(instance,): depth}``: the dead-letter depth each replica reports."""
    return keyed(stack.prometheus.query(f'bgtasks_dlq_depth{{job="{job}"}}'), ("instance",))


def wait_for_depth(stack: TelemetryStack, job: str, depth: int) -> None:
    """Wait until every replica has reported ``depth`` entries in the shared store."""

    def reported() -> bool:
        reports = replicas_reporting(stack, job)
        return len(reports) == REPLICAS and set(reports.values()) == {depth}

    eventually(reported, message=f"every replica reports {depth} dead letters")


def contract_values(stack: TelemetryStack, job: str) -> dict[str, Values]:
    return {metric: values(stack, metric, job) for metric in CONTRACT}


def wait_for_values(
    stack: TelemetryStack, job: str, expected: dict[str, Values], what: str, timeout: float = 30
) -> dict[str, Values]:
    """Wait until Prometheus has scraped exactly ``expected`` for these metrics."""
    seen: list[dict[str, Values]] = []

    def probe() -> dict[str, Values] | None:
        got = {metric: values(stack, metric, job) for metric in expected}
        seen[:] = [got]
        return got if got == expected else None

    try:
        return eventually(probe, timeout=timeout, message=f"Prometheus shows {what}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nexpected: {expected}\nlast seen: {seen}") from None


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span["tags"]}


def logs(span: dict[str, Any]) -> list[dict[str, Any]]:
    """Span events as Jaeger shows them: ``{"event": name, attribute: value, ...}``."""
    return [{f["key"]: f["value"] for f in log["fields"]} for log in span["logs"]]


def events(span: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [log for log in logs(span) if log["event"] == name]


def follows_from(span: dict[str, Any]) -> tuple[str, str]:
    """``(trace id, span id)`` of the span's only reference, which must be FOLLOWS_FROM."""
    (ref,) = span["references"]
    assert ref["refType"] == "FOLLOWS_FROM", span["references"]
    return ref["traceID"], ref["spanID"]


def operation_spans(
    stack: TelemetryStack, service: str, operation: str, **params: str
) -> list[dict[str, Any]]:
    """Spans named ``operation`` of ``service``, each with its trace's ``serviceName``."""
    spans = []
    for trace in stack.jaeger.traces(service, operation=operation, limit="500", **params):
        for span in trace["spans"]:
            if span["operationName"] == operation:
                span = dict(span, serviceName=trace["processes"][span["processID"]]["serviceName"])
                spans.append(span)
    return spans


def wait_for_spans(
    stack: TelemetryStack, service: str, operation: str, count: int
) -> list[dict[str, Any]]:
    """Exactly ``count`` spans named ``operation`` of ``service``, once Jaeger has them all."""
    seen: list[int] = []

    def probe() -> list[dict[str, Any]] | None:
        spans = operation_spans(stack, service, operation)
        seen[:] = [len(spans)]
        return spans if len(spans) == count else None

    try:
        spans: list[dict[str, Any]] = eventually(probe, timeout=20, message="spans in Jaeger")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {count} {operation!r} of {service}, saw {seen}") from None
    return spans


def find_span(stack: TelemetryStack, trace_id: str, span_id: str) -> dict[str, Any]:
    trace = eventually(
        lambda: stack.jaeger.trace(trace_id), message=f"trace {trace_id} in Jaeger", timeout=20
    )
    (span,) = [s for s in trace["spans"] if s["spanID"] == span_id]
    return dict(span, serviceName=trace["processes"][span["processID"]]["serviceName"])


def jaeger_micros(epoch: float) -> str:
    return str(int(epoch * 1_000_000))


# --------------------------------------------------------------------------- the scenario


@dataclass
class Scenario:
    stack: TelemetryStack
    redis: Redis
    app: UvicornApp
    client: httpx.Client
    peer: UvicornApp
    peer_client: httpx.Client
    service: str
    workdir: Path
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    replay: dict[str, Any] = field(default_factory=dict)
    open_phase: dict[str, Values] = field(default_factory=dict)
    open_phase_rules: dict[str, Values] = field(default_factory=dict)
    fired: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, path: str, client: httpx.Client | None = None) -> httpx.Response:
        response = (client or self.client).get(path)
        assert response.status_code == 200, (path, response.text)
        return response

    def health(self, client: httpx.Client | None = None) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/bgtasks/health", client).json()
        return body

    def settle(self, client: httpx.Client | None = None) -> dict[str, Any]:
        """Wait until no task of a replica (default: app) is pending or running; returns its
        health report."""
        return eventually(
            lambda: (h := self.health(client))["running"] == 0 and h["pending"] == 0 and h,
            message="every background task finished",
        )

    def hit(self, path: str, times: int = 1, client: httpx.Client | None = None) -> None:
        """Request ``path`` and let its tasks finish, one request after the other."""
        for _ in range(times):
            self.get(path, client)
            self.settle(client)

    def entries(self, reason: str | None = None, task: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.dead_letters
            if (reason is None or e["reason"] == reason)
            and (task is None or e["task_name"] == task)
        ]


@pytest.fixture(scope="module", params=sorted(METRICS_PATHS))
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TelemetryStack]:
    path = str(request.param)
    with telemetry_stack(tmp_path_factory.mktemp(f"stack-{path}"), metrics_path=path) as running:
        yield running


@pytest.fixture(scope="module")
def scenario(stack: TelemetryStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    workdir = tmp_path_factory.mktemp("app")
    (workdir / "scenario_app.py").write_text(APP_MODULE)
    service = f"bgtasks-scenario-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as cleanup:
        redis = Redis(workdir)
        cleanup.callback(redis.stop)
        redis.start()
        replicas = []
        for replica in ("app", "peer"):
            replica_dir = workdir / replica
            replica_dir.mkdir()
            (replica_dir / "scenario_app.py").write_text(APP_MODULE)
            server = UvicornApp(
                replica_dir,
                app="scenario_app:app",
                otlp_endpoint=stack.collector.otlp_grpc_endpoint,
                service_name=service,
                env={"OTEL_BGTASKS_DLQ_URL": redis.url, "BGTASKS_ADMIN_TOKEN": ADMIN_TOKEN},
            )
            cleanup.callback(server.stop)
            server.start()
            client = cleanup.enter_context(httpx.Client(base_url=server.url, timeout=10.0))
            replicas.append((server, client))
        (app, client), (peer, peer_client) = replicas
        run = Scenario(stack, redis, app, client, peer, peer_client, service, workdir)
        try:
            _drive(run)
        except BaseException:
            print(
                f"--- app log\n{app.process.log_tail(80)}\n"
                f"--- peer log\n{peer.process.log_tail(40)}\n{stack.logs()}"
            )
            raise
        yield run


def _drive(run: Scenario) -> None:
    stack, job, peer = run.stack, run.service, run.peer_client
    # Both replicas report the empty store before any traffic: the depth gauge grows from a
    # scraped 0.
    eventually(
        lambda: len(replicas_reporting(stack, job)) == REPLICAS,
        message="both replicas' first export",
    )
    wait_for_values(stack, job, {"bgtasks_dlq_depth": {(): 0}}, "the replicas' first export")

    run.hit("/ok", N_OK, peer)
    run.hit("/sync", N_SYNC, peer)
    run.hit("/flaky", N_FLAKY, peer)
    run.hit("/fail", client=peer)
    # A burst of failed requests: their tasks never run and are counted as skipped. The first
    # one on its own, exported before the others, so the counter grows inside Prometheus on
    # both paths (a series first seen at its final value is invisible to increase()).
    assert run.client.get("/signup-fails").status_code == 503
    skip_labels = ("bgtasks_task_name", "bgtasks_skip_reason")
    eventually(
        lambda: values(stack, "bgtasks_task_skipped_total", job, skip_labels)
        == {("send-welcome-email", "request_failed"): 1},
        message="Prometheus shows the first skipped task",
    )
    for _ in range(N_FAILED_REQUESTS - 1):
        assert run.client.get("/signup-fails").status_code == 503
    run.settle()

    # First failure on its own, scraped before the others: the moves and failure counters then
    # grow inside Prometheus (a series that first appears at its final value is invisible to
    # increase() and rate(), which the alert rules use).
    run.hit("/downstream")
    wait_for_values(
        stack,
        job,
        {
            "bgtasks_dlq_moves_total": {
                ("import_contacts", "permanent"): 1,
                ("charge-card", "exhausted"): 1,
            }
        },
        "the first charge-card dead letter",
    )
    run.hit("/downstream", FAILURE_THRESHOLD - 1)
    health = run.settle()
    assert health["circuits"] == {CIRCUIT: "open"}, health
    # The breaker opened during the last request's task: it may half-open from here on.
    probe_after = time.monotonic() + OPEN_DURATION
    run.hit("/downstream", N_REJECTED)

    # The last rejection scraped means everything before it was: snapshot the whole contract.
    wait_for_values(
        stack,
        job,
        {"bgtasks_dlq_moves_total": MOVES},
        "the rejected charge-card dead letters",
    )
    run.open_phase = contract_values(stack, job)

    # The rules must see the depth reported by both replicas.
    wait_for_depth(stack, job, DEAD_LETTERS)
    run.open_phase_rules = rule_values(stack, job)
    run.fired = {name: _wait_for_alert(run, name) for name in ALERTS}

    assert run.client.post("/downstream/up").status_code == 200
    response = run.client.get("/bgtasks/dead-letters", headers=AUTH)
    assert response.status_code == 200, response.text
    run.dead_letters = response.json()
    # The demo's breaker stays open for OPEN_DURATION seconds; only then is a probe let through.
    time.sleep(max(0.0, probe_after - time.monotonic()) + 0.5)
    response = run.client.post("/bgtasks/dead-letters/replay", headers=AUTH, timeout=60.0)
    assert response.status_code == 200, response.text
    run.replay = response.json()
    run.settle()
    eventually(
        lambda: stack.prometheus.query(
            f'sum(bgtasks_dlq_replays_total{{job="{job}"}}) == {DEAD_LETTERS}'
        ),
        message="every replay counted in Prometheus",
    )
    # The peer exports the store's new depth on its own schedule.
    wait_for_depth(stack, job, int(FINAL["bgtasks_dlq_depth"][()]))


def rule_exprs() -> dict[str, str]:
    """``{alertname: expr}`` of collector-config/alert-rules.yml."""
    rules = yaml.safe_load((CONFIG_DIR / "alert-rules.yml").read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


# The label naming what each rule's result is about (besides job).
RULE_SUBJECT = {
    "BgTaskFailureRatioHigh": "bgtasks_task_name",
    "BgTaskDeadLettersAccumulating": "job",
    "BgTaskCircuitOpen": "bgtasks_circuit_name",
    "BgTaskDurationP95High": "bgtasks_task_name",
    "BgTaskStuck": "bgtasks_task_name",
    "BgTaskTelemetryMissing": "instance",
    "BgTaskBacklog": "bgtasks_task_name",
    "BgTaskPublishBacklog": "messaging_destination_name",
    "BgTaskSkipped": "bgtasks_task_name",
}


def rule_values(stack: TelemetryStack, job: str) -> dict[str, Values]:
    """``{alertname: {(subject,): value}}``: each rule's expression evaluated now, for ``job``."""
    found: dict[str, Values] = {}
    for alertname, expr in rule_exprs().items():
        result = [
            series
            for series in stack.prometheus.query(expr)
            if series["metric"].get("job") in {job, "otel-collector"}
        ]
        found[alertname] = keyed(result, (RULE_SUBJECT[alertname],))
    return found


def _wait_for_alert(run: Scenario, alertname: str) -> dict[str, Any]:
    """The first firing notification of ``alertname`` for the app (with the expected subject)."""
    webhook = run.stack.webhook
    assert webhook is not None
    _, subject_label, subject = ALERTS[alertname]
    subject = run.service if subject == "$job" else subject

    def delivered() -> dict[str, Any] | None:
        for alert in webhook.alerts(alertname, status="firing"):
            labels = alert["labels"]
            if labels.get("job") == run.service and labels.get(subject_label) == subject:
                return alert
        return None

    alert: dict[str, Any] = eventually(
        delivered, timeout=60, message=f"{alertname} for {subject} delivered to the webhook"
    )
    return alert


# --------------------------------------------------------------------------- Jaeger


def test_task_trace_follows_from_the_request_trace_with_its_retries(scenario: Scenario) -> None:
    stack, service = scenario.stack, scenario.service

    tasks = wait_for_spans(stack, service, "process sync_crm", N_FLAKY)

    for task in tasks:
        assert task["serviceName"] == service
        request_trace_id, request_span_id = follows_from(task)
        assert request_trace_id != task["traceID"]  # link mode: a trace of its own
        request = find_span(stack, request_trace_id, request_span_id)
        assert request["operationName"] == "GET /flaky"
        assert request["serviceName"] == service
        assert tags(request)["span.kind"] == "server"
        assert request["references"] == []  # the request's root (server) span
        task_tags = tags(task)
        assert events(request, "bgtasks.enqueued") == [
            {
                "event": "bgtasks.enqueued",
                "bgtasks.task.name": "sync_crm",
                "bgtasks.task.id": task_tags["bgtasks.task.id"],
            }
        ]
        assert task_tags["span.kind"] == "consumer"
        assert task_tags["bgtasks.task.name"] == "sync_crm"
        assert task_tags["code.function.name"] == "otel_bgtasks.demo.app.sync_crm"
        assert task_tags["bgtasks.task.outcome"] == "success"
        assert task_tags["bgtasks.task.attempts"] == FLAKY_FAILURES + 1
        assert task_tags["bgtasks.task.wait"] >= 0
        assert "error" not in task_tags  # a success after retries is not an error
        retries = events(task, "bgtasks.retry")
        assert [r["bgtasks.retry.attempt"] for r in retries] == [2, 3]
        for retry in retries:
            assert retry["error.type"] == "ConnectionResetError"
            assert retry["exception.message"] == "crm connection reset by peer"
            assert 0 <= retry["bgtasks.retry.delay"] <= 1
        assert [log["event"] for log in logs(task)] == ["bgtasks.retry", "bgtasks.retry"]


def test_spans_a_task_creates_are_children_of_its_span(scenario: Scenario) -> None:
    stack, service = scenario.stack, scenario.service

    tasks = wait_for_spans(stack, service, "process resize_avatar", N_SYNC)

    for task in tasks:
        trace = eventually(lambda task=task: stack.jaeger.trace(task["traceID"]))
        assert {s["operationName"] for s in trace["spans"]} == {"process resize_avatar", "resize"}
        (child,) = [s for s in trace["spans"] if s["operationName"] == "resize"]
        assert child["references"] == [
            {"refType": "CHILD_OF", "traceID": task["traceID"], "spanID": task["spanID"]}
        ]


def test_failed_and_rejected_task_spans_carry_their_dead_letters(scenario: Scenario) -> None:
    stack = scenario.stack
    (permanent,) = scenario.entries("permanent")
    failed = find_span(stack, permanent["trace_id"], permanent["span_id"])

    failed_tags = tags(failed)
    assert failed["operationName"] == "process import_contacts"
    assert failed_tags["error"] is True
    assert failed_tags["otel.status_code"] == "ERROR"
    assert failed_tags["bgtasks.task.outcome"] == "dead_lettered"
    assert failed_tags["bgtasks.task.attempts"] == 1
    assert failed_tags["error.type"] == "ValueError"
    assert failed_tags["bgtasks.error.category"] == "validation"
    assert [log["event"] for log in logs(failed)] == ["bgtasks.dlq.moved", "exception"]
    assert events(failed, "bgtasks.dlq.moved") == [
        {
            "event": "bgtasks.dlq.moved",
            "bgtasks.dlq.entry_id": permanent["id"],
            "bgtasks.dlq.reason": "permanent",
        }
    ]
    (exception,) = events(failed, "exception")
    assert exception["exception.type"] == "ValueError"
    request = find_span(stack, *follows_from(failed))
    assert request["operationName"] == "GET /fail"

    rejected = scenario.entries("circuit_open")
    assert len(rejected) == N_REJECTED
    for entry in rejected:
        span = find_span(stack, entry["trace_id"], entry["span_id"])
        span_tags = tags(span)
        assert span["operationName"] == "process charge-card"
        assert span_tags["error"] is True
        assert span_tags["bgtasks.task.outcome"] == "rejected"
        assert span_tags["bgtasks.task.attempts"] == 0  # never run
        assert span_tags["error.type"] == CIRCUIT_OPEN_ERROR
        assert span_tags["bgtasks.error.category"] == "connection"
        assert [log["event"] for log in logs(span)] == [
            "bgtasks.circuit.rejected",
            "bgtasks.dlq.moved",
            "exception",
        ]
        assert events(span, "bgtasks.circuit.rejected")[0]["bgtasks.circuit.name"] == CIRCUIT
        (moved,) = events(span, "bgtasks.dlq.moved")
        assert moved["bgtasks.dlq.reason"] == "circuit_open"
        assert moved["bgtasks.dlq.entry_id"] == entry["id"]

    exhausted = scenario.entries("exhausted")
    assert len(exhausted) == FAILURE_THRESHOLD
    changes = []
    for entry in exhausted:
        span = find_span(stack, entry["trace_id"], entry["span_id"])
        span_tags = tags(span)
        assert span_tags["bgtasks.task.outcome"] == "dead_lettered"
        assert span_tags["bgtasks.task.attempts"] == 1  # charge-card has no retry policy
        assert span_tags["error.type"] == "ConnectionRefusedError"
        (moved,) = events(span, "bgtasks.dlq.moved")
        assert (moved["bgtasks.dlq.reason"], moved["bgtasks.dlq.entry_id"]) == (
            "exhausted",
            entry["id"],
        )
        changes += events(span, "bgtasks.circuit.state_change")
    # Only the third failure's span saw the breaker open.
    assert changes == [
        {
            "event": "bgtasks.circuit.state_change",
            "bgtasks.circuit.name": CIRCUIT,
            "bgtasks.circuit.from": "closed",
            "bgtasks.circuit.to": "open",
        }
    ]


def test_replays_are_new_spans_linked_to_the_failed_ones(scenario: Scenario) -> None:
    stack, service = scenario.stack, scenario.service
    assert len(scenario.dead_letters) == DEAD_LETTERS
    outcomes = {o["id"]: o["status"] for o in scenario.replay["outcomes"]}
    assert scenario.replay["replayed"] == CHARGES
    assert outcomes == {
        e["id"]: "replayed" if e["task_name"] == "charge-card" else "failed"
        for e in scenario.dead_letters
    }

    for task in ("charge-card", "import_contacts"):
        originals = {e["span_id"]: e for e in scenario.entries(task=task)}
        spans = wait_for_spans(stack, service, f"process {task}", 2 * len(originals))
        replays = [s for s in spans if s["spanID"] not in originals]
        # Each replay runs in a new trace, linked to the span of the run that failed.
        linked = {follows_from(s): s for s in replays}
        assert set(linked) == {(e["trace_id"], e["span_id"]) for e in originals.values()}
        for replay in replays:
            assert replay["traceID"] not in {e["trace_id"] for e in originals.values()}
            assert tags(replay)["bgtasks.task.outcome"] == (
                "success" if task == "charge-card" else "failure"
            )
        if task == "charge-card":
            changes = [
                (c["bgtasks.circuit.from"], c["bgtasks.circuit.to"])
                for s in replays
                for c in events(s, "bgtasks.circuit.state_change")
            ]
            assert changes == [("open", "half_open"), ("half_open", "closed")]


# --------------------------------------------------------------------------- Prometheus


def test_contract_metrics_while_the_circuit_is_open(scenario: Scenario) -> None:
    assert scenario.open_phase == OPEN_PHASE


def test_contract_metrics_after_the_replay(scenario: Scenario) -> None:
    stack, job = scenario.stack, scenario.service

    got = contract_values(stack, job)

    assert got == FINAL
    # Histograms: each series has the whole bucket ladder (16 bounds and +Inf), +Inf equal to
    # its count, and a sum.
    for histogram, labels in [
        ("bgtasks_task_duration_seconds", CONTRACT["bgtasks_task_duration_seconds_count"]),
        ("bgtasks_task_wait_seconds", CONTRACT["bgtasks_task_wait_seconds_count"]),
    ]:
        counts = got[f"{histogram}_count"]
        buckets = values(stack, f"{histogram}_bucket", job, (*labels, "le"))
        assert {k[:-1]: v for k, v in buckets.items() if k[-1] == "+Inf"} == counts, histogram
        ladders = {series: [k for k in buckets if k[:-1] == series] for series in counts}
        assert all(len(ladder) == 17 for ladder in ladders.values()), ladders
        sums = values(stack, f"{histogram}_sum", job, labels)
        assert set(sums) == set(counts), histogram
        assert all(v >= 0 for v in sums.values()), sums
    # The retried task's duration includes its two backoff sleeps.
    duration_sums = values(
        stack,
        "bgtasks_task_duration_seconds_sum",
        job,
        CONTRACT["bgtasks_task_duration_seconds_count"],
    )
    assert duration_sums[("sync_crm", "success", "")] > 0


def regroup(metric: str, by: Labels) -> Values:
    """FINAL's values of ``metric`` summed by the labels ``by``."""
    labels = CONTRACT[metric]
    grouped: Values = {}
    for key, value in FINAL[metric].items():
        group = tuple(key[labels.index(label)] for label in by)
        grouped[group] = grouped.get(group, 0) + value
    return grouped


def failure_ratios() -> Values:
    """Share of non-success runs per task, for the tasks that had one (the panel divides by
    the runs only where a non-success series exists)."""
    runs = regroup("bgtasks_task_duration_seconds_count", ("bgtasks_task_name",))
    failed: Values = {}
    for (task, outcome, _), value in FINAL["bgtasks_task_duration_seconds_count"].items():
        if outcome != "success":
            failed[(task,)] = failed.get((task,), 0) + value
    return {task: value / runs[task] for task, value in failed.items()}


def panel_figures(job: str, store: str) -> dict[str, list[Values | None]]:
    """What each panel target shows once the scenario is over, with rate(x[...]) read as x:
    the panel's aggregation over the whole scenario. None: only which series (histogram
    quantiles, whose values are durations)."""
    return {
        "Tasks/s by outcome": [
            regroup("bgtasks_task_duration_seconds_count", ("bgtasks_task_outcome",))
        ],
        "Failure ratio": [failure_ratios()],
        "Task duration p50 / p95 / p99": [None, None, None],
        "Task wait p50 / p95 / p99": [None, None, None],
        "Active tasks": [FINAL["bgtasks_task_active"]],
        "Retries/s": [FINAL["bgtasks_task_retries_total"]],
        "Pending tasks": [{(task,): 0.0 for task in TASKS}],
        "Skipped tasks/s by reason": [
            {("send-welcome-email", "request_failed"): N_FAILED_REQUESTS}
        ],
        # the demo runs its tasks inline: no back-pressure, the panel's explicit 0
        "Tasks run inline by back-pressure/s": [{("",): 0.0}],
        "Circuit state": [FINAL["bgtasks_circuit_state"]],
        "Circuit transitions/s": [
            regroup(
                "bgtasks_circuit_transitions_total", ("bgtasks_circuit_name", "bgtasks_circuit_to")
            )
        ],
        # one line per store (`bgtasks_dlq_store`), the replicas sharing it counted once
        "Dead-letter depth": [{(job, store): FINAL["bgtasks_dlq_depth"][()]}],
        "Dead-letter moves and replays": [MOVES, FINAL["bgtasks_dlq_replays_total"]],
    }


RATE = re.compile(r"rate\(([^()\[\]]*)\[1m\]\)")
GROUPING = re.compile(r"(?:sum|max) by \(([^)]*)\)")


def test_every_dashboard_panel_shows_the_scenario_figures(scenario: Scenario) -> None:
    """Both replicas' series, combined as each panel combines them, give the scenario's
    figures: counters add up, the shared store's depth counts once."""
    stack = scenario.stack
    store = f"redis://127.0.0.1:{scenario.redis.port}/0/bgtasks"  # its identity: no password
    expected = panel_figures(scenario.service, store)
    seen: dict[str, list[Values]] = {}

    queries = dashboard_queries(task="|".join(TASKS), job=scenario.service, rate_interval="1m")
    for title, expr in queries:
        # The panel as Grafana runs it answers ...
        eventually(
            lambda expr=expr: stack.prometheus.query(expr),
            timeout=15,
            message=f"data for panel {title!r}: {expr}",
        )
        # ... and its aggregation of the cumulative series gives the scenario's figures.
        grouping = GROUPING.search(expr)
        assert grouping, expr
        labels = tuple(
            label.strip() for label in grouping.group(1).split(",") if label.strip() != "le"
        )
        seen.setdefault(title, []).append(
            keyed(stack.prometheus.query(RATE.sub(r"(\1)", expr)), labels)
        )

    assert set(seen) == set(expected)
    for title, figures in expected.items():
        for got, expected in zip(seen[title], figures, strict=True):
            if expected is None:
                assert set(got) == {(task,) for task in TASKS}, title
            else:
                assert got == expected, title


def test_every_replica_reports_the_shared_store(scenario: Scenario) -> None:
    reports = replicas_reporting(scenario.stack, scenario.service)

    assert len(reports) == REPLICAS
    assert set(reports.values()) == {FINAL["bgtasks_dlq_depth"][()]}


def test_every_alert_rule_gives_the_scenario_figures_while_the_circuit_is_open(
    scenario: Scenario,
) -> None:
    rules = dict(scenario.open_phase_rules)
    dead_letters = rules.pop("BgTaskDeadLettersAccumulating")
    # The failed-request burst's skips, within the rule's 10 minutes (an extrapolated increase).
    assert set(rules.pop("BgTaskSkipped")) == {("send-welcome-email",)}

    assert rules == {
        # Every charge-card run failed, and import_contacts's only run: its counter was born
        # with that failure, which Prometheus sees from the counter's start time
        # (created-timestamp-zero-ingestion; before, a rate of 0/0 hid it).
        "BgTaskFailureRatioHigh": {("charge-card",): 1.0, ("import_contacts",): 1.0},
        "BgTaskCircuitOpen": {(CIRCUIT,): 2},
        "BgTaskDurationP95High": {},
        "BgTaskStuck": {},
        "BgTaskTelemetryMissing": {},
        "BgTaskBacklog": {},
        "BgTaskPublishBacklog": {},  # no remote dispatcher in this scenario
    }
    # One figure for the app: its moves grew (charge-card's, import_contacts's).
    assert set(dead_letters) == {(scenario.service,)}
    assert dead_letters[(scenario.service,)] > 0


def test_a_failed_request_burst_shows_as_skipped_tasks(scenario: Scenario) -> None:
    stack, job = scenario.stack, scenario.service
    reason = ("bgtasks_task_name", "bgtasks_skip_reason")

    skipped = eventually(
        lambda: values(stack, "bgtasks_task_skipped_total", job, reason),
        message="bgtasks_task_skipped_total in Prometheus",
    )
    assert skipped == {("send-welcome-email", "request_failed"): N_FAILED_REQUESTS}
    # Nothing waits: every scheduled task ran or was skipped.
    pending = values(stack, "bgtasks_task_pending", job, ("bgtasks_task_name",))
    assert pending == {(task,): 0 for task in TASKS}


# --------------------------------------------------------------------------- alerts


@pytest.mark.parametrize("alertname", sorted(ALERTS))
def test_alert_fired_and_reached_the_webhook(scenario: Scenario, alertname: str) -> None:
    severity, subject_label, subject = ALERTS[alertname]
    subject = scenario.service if subject == "$job" else subject

    alert = scenario.fired[alertname]

    labels, annotations = alert["labels"], alert["annotations"]
    assert labels["alertname"] == alertname
    assert labels["severity"] == severity
    assert labels["job"] == scenario.service
    assert labels[subject_label] == subject
    # The templates were rendered with the alert's labels.
    named = scenario.service if alertname == "BgTaskDeadLettersAccumulating" else subject
    assert named in annotations["summary"], annotations
    assert subject in annotations["description"], annotations
    assert scenario.service in annotations["description"], annotations
    assert annotations["runbook_url"] == f"collector-config/RUNBOOK.md#{alertname.lower()}"


def test_circuit_open_alert_resolves_once_the_replay_closed_the_circuit(
    scenario: Scenario,
) -> None:
    webhook = scenario.stack.webhook
    assert webhook is not None

    eventually(
        lambda: [
            a
            for a in webhook.alerts("BgTaskCircuitOpen", status="resolved")
            if a["labels"].get("job") == scenario.service
        ],
        timeout=60,
        message="BgTaskCircuitOpen resolved notification",
    )


# --------------------------------------------------------------------------- the CLI


@dataclass
class CLIReplay:
    before: list[dict[str, Any]]
    result: subprocess.CompletedProcess[str]
    after: list[dict[str, Any]]
    service: str


def otel_bgtasks(scenario: Scenario, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "otel_bgtasks.cli", "--store", scenario.redis.url, *args],
        cwd=scenario.workdir,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def cli_replay(scenario: Scenario) -> CLIReplay:
    """``otel-bgtasks dlq replay --all`` on the app's store, exporting to the collector."""

    def listing() -> list[dict[str, Any]]:
        listed = otel_bgtasks(scenario, "dlq", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        entries: list[dict[str, Any]] = json.loads(listed.stdout)
        return entries

    service = f"{scenario.service}-cli"
    before = listing()
    result = otel_bgtasks(
        scenario,
        "dlq",
        "replay",
        "--all",
        env={
            "OTEL_SERVICE_NAME": service,
            "OTEL_EXPORTER_OTLP_ENDPOINT": scenario.stack.collector.otlp_grpc_endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            # Import the demo's tasks without the demo app configuring telemetry on import,
            # as any application's task module: the CLI has to set up the export itself.
            "OTEL_BGTASKS_DEMO_NO_INSTRUMENT": "1",
            # The app's task module, imported on purpose (entries never choose what is imported)
            "OTEL_BGTASKS_TASK_MODULES": "otel_bgtasks.demo.app",
        },
    )
    return CLIReplay(before, result, listing(), service)


def test_cli_replays_the_dead_letter_left_in_the_shared_store(
    scenario: Scenario, cli_replay: CLIReplay
) -> None:
    (permanent,) = scenario.entries("permanent")

    (before,) = cli_replay.before
    assert before["id"] == permanent["id"]
    assert before["task_name"] == "import_contacts"
    assert before["reason"] == "permanent"
    assert before["attempts"] == 2  # the run, then the replay through the admin endpoint
    assert cli_replay.result.returncode == 1, cli_replay.result.stderr  # 1: a replay failed
    assert cli_replay.result.stdout.strip() == "replay: 1 failed"
    (after,) = cli_replay.after
    assert after["id"] == permanent["id"]
    assert after["attempts"] == 3
    assert after["error_type"] == "ValueError"


def test_cli_replay_is_exported(scenario: Scenario, cli_replay: CLIReplay) -> None:
    (permanent,) = scenario.entries("permanent")

    spans = eventually(
        lambda: operation_spans(scenario.stack, cli_replay.service, "process import_contacts"),
        timeout=8,
        message=f"the CLI's replay span ({cli_replay.service}) in Jaeger",
    )

    assert [follows_from(s)[1] for s in spans] == [permanent["span_id"]]
    wait_for_values(
        scenario.stack,
        cli_replay.service,
        {"bgtasks_dlq_replays_total": {("import_contacts", "failure"): 1}},
        "the CLI's replay count",
    )


# --------------------------------------------------------------------------- fault injection


# Last in this module: it restarts the collector, which drops the exporter's series.
def test_collector_crash_mid_traffic_leaves_the_app_and_its_tasks_untouched(
    scenario: Scenario,
) -> None:
    stack, job, app = scenario.stack, scenario.service, scenario.app
    webhook = stack.webhook
    assert webhook is not None
    before = scenario.settle()
    counts_before = values(stack, "bgtasks_task_duration_seconds_count", job)
    retries_before = values(stack, "bgtasks_task_retries_total", job)
    log_offset = len(app.process.log_text())
    responses: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=app.url, timeout=10.0) as client:
            for path in itertools.cycle(["/ok", "/sync", "/flaky"]):
                if stop.is_set():
                    return
                try:
                    responses.append((path, client.get(path).status_code))
                except Exception as exc:  # reported below, with every other response
                    errors.append(exc)
                time.sleep(0.05)

    sender = threading.Thread(target=traffic, name="traffic")
    sender.start()
    try:
        eventually(lambda: len(responses) >= 6, message="traffic before the crash")
        stack.collector.kill()
        sent_before_crash = len(responses)
        # The outage lasts until Prometheus has noticed it and paged.
        eventually(
            lambda: webhook.alerts("BgTaskTelemetryMissing", status="firing"),
            timeout=60,
            message="BgTaskTelemetryMissing delivered while the collector is down",
        )
        eventually(
            lambda: len(responses) >= sent_before_crash + 12, message="traffic during the outage"
        )
    finally:
        stop.set()
        sender.join(timeout=30)

    assert not errors
    assert responses
    assert all(status == 200 for _, status in responses), responses
    after = scenario.settle()
    assert app.process.running
    assert after["recent_failures"] == before["recent_failures"]
    assert after["dead_letter_depth"] == before["dead_letter_depth"]
    assert after["circuits"] == {CIRCUIT: "closed"}
    outage_log = app.process.log_text()[log_offset:]
    assert "Traceback" not in outage_log, outage_log[-3000:]
    assert "Exception in ASGI application" not in outage_log, outage_log[-3000:]

    stack.collector.start()
    restarted_at = time.time()
    scenario.get("/ok")
    new_tasks = eventually(
        lambda: operation_spans(
            stack, job, "process send-welcome-email", start=jaeger_micros(restarted_at)
        ),
        timeout=45,
        message="a task span sent after the collector came back",
    )
    requests = {
        s["spanID"]
        for s in operation_spans(stack, job, "GET /ok", start=jaeger_micros(restarted_at))
    }
    assert any(follows_from(s)[1] in requests for s in new_tasks)
    # Cumulative metrics come back with the restarted collector: every task run during the
    # outage is counted, with its (unchanged) outcome.
    sent = {path: sum(1 for p, _ in responses if p == path) for path in ("/ok", "/sync", "/flaky")}
    expected_counts = {
        **counts_before,
        ("send-welcome-email", "success", ""): counts_before[("send-welcome-email", "success", "")]
        + sent["/ok"]
        + 1,
        ("resize_avatar", "success", ""): counts_before[("resize_avatar", "success", "")]
        + sent["/sync"],
        ("sync_crm", "success", ""): counts_before[("sync_crm", "success", "")] + sent["/flaky"],
    }
    expected_retries = {
        key: value + FLAKY_FAILURES * sent["/flaky"] for key, value in retries_before.items()
    }
    wait_for_values(
        stack,
        job,
        {
            "bgtasks_task_duration_seconds_count": expected_counts,
            "bgtasks_task_retries_total": expected_retries,
        },
        "every task of the outage counted after the restart",
        timeout=45,
    )
