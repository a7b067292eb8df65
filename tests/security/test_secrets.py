"""A task fails with secrets in its arguments and in its exception message: where they go.

The arguments (a card number, an API key) reach the dead-letter store and the operator's own
views of it (the authenticated admin listing, ``dlq show``) and nothing else: no log line (in
either logging set-up), span, metric point, alert payload or the health endpoint. The message
(a password) reaches the dead letter, the package's log line and the span's exception event
and status, bounded; with ``redact_exception_messages=True`` only the dead letter keeps it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from fastapi import BackgroundTasks, FastAPI
from tenacity import wait_none

from otel_bgtasks import RetryPolicy, configure_structlog_json
from otel_bgtasks.alerting import AlertingSpanProcessor
from otel_bgtasks.alerting.alerts import Alert
from otel_bgtasks.alerting.notifiers import Notifier, SlackNotifier, WebhookNotifier
from otel_bgtasks.alerting.rules import ConsecutiveFailures
from otel_bgtasks.cli import main
from otel_bgtasks.health import bearer_token_auth, bgtasks_router
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore
from tests.conftest import Telemetry
from tests.integration._server import UvicornThread, wait_for_tasks
from tests.security.app_tasks import API_KEY, CARD, PASSWORD, charge

ARGUMENTS = (CARD, API_KEY)
TOKEN = "admin-token-0123456789"


class Recording(Notifier):
    """Keeps what a webhook and a Slack notifier would send for each alert."""

    channel = "test"

    def __init__(self) -> None:
        self.payloads: list[str] = []

    def send(self, alert: Alert) -> None:
        for notifier in (
            WebhookNotifier("http://127.0.0.1:9/"),
            SlackNotifier("http://127.0.0.1:9/"),
        ):
            self.payloads.append(json.dumps(notifier.payload(alert)))
        self.payloads.append(repr(alert))


@pytest.fixture(params=["unconfigured", "json"])
def logging_setup(request: pytest.FixtureRequest) -> Iterator[str]:
    structlog.reset_defaults()
    if request.param == "json":
        configure_structlog_json()
        # same processors; without the cache, reset_defaults() reaches the package's loggers
        structlog.configure(cache_logger_on_first_use=False)
    yield request.param
    structlog.reset_defaults()


def build_app() -> FastAPI:
    app = FastAPI()

    @app.post("/checkout")
    async def checkout(bg: BackgroundTasks) -> dict[str, str]:
        bg.add_task(charge, CARD, API_KEY)
        return {"status": "accepted"}

    app.include_router(bgtasks_router(auth=bearer_token_auth(TOKEN)))
    return app


def span_texts(telemetry: Telemetry) -> dict[str, str]:
    """Every string of every span, by where it is."""
    out: dict[str, str] = {}
    for span in telemetry.spans():
        for key, value in (span.attributes or {}).items():
            out[f"{span.name} {key}"] = str(value)
        for event in span.events:
            for key, value in (event.attributes or {}).items():
                out[f"{span.name} {event.name}.{key}"] = str(value)
        out[f"{span.name} status"] = span.status.description or ""
    return out


def metric_texts(telemetry: Telemetry) -> str:
    data = telemetry.reader.get_metrics_data()
    assert data is not None
    return json.dumps(json.loads(data.to_json()))


def run_checkout(telemetry: Telemetry, instrument: Any, store: SQLiteDeadLetterStore, **kw: Any):
    notifier = Recording()
    alerting = AlertingSpanProcessor(
        [ConsecutiveFailures(1)], [notifier], meter_provider=telemetry.meter_provider
    )
    telemetry.tracer_provider.add_span_processor(alerting)
    instrument(dead_letter_store=store, retry=RetryPolicy(max_attempts=2, wait=wait_none()), **kw)
    with UvicornThread(build_app()) as server, server.client() as client:
        assert client.post("/checkout").status_code == 200
        wait_for_tasks()
        health = client.get("/bgtasks/health").text
        listing = client.get(
            "/bgtasks/dead-letters", headers={"Authorization": f"Bearer {TOKEN}"}
        ).json()
    assert alerting.force_flush(10_000)
    return notifier, health, listing


@pytest.mark.parametrize("redact", [False, True], ids=["default", "redacted"])
def test_secrets_reach_the_dead_letter_store_and_nothing_else(
    capsys: pytest.CaptureFixture[str],
    telemetry: Telemetry,
    instrument: Any,
    store: SQLiteDeadLetterStore,
    logging_setup: str,
    redact: bool,
) -> None:
    notifier, health, listing = run_checkout(
        telemetry, instrument, store, redact_exception_messages=redact
    )
    out, err = capsys.readouterr()
    logs = out + err

    # the dead letter: the operator's own data, arguments and message whole
    (entry,) = store.list()
    assert json.loads(entry.payload) == {"args": list(ARGUMENTS), "kwargs": {}}
    assert PASSWORD in entry.error_message
    (listed,) = listing  # the admin listing (behind auth) is a view of the store
    assert listed["payload"] == entry.payload

    # the log line: type, message (unless redacted), traceback without locals
    assert "background task failed" in logs
    assert "ConnectionError" in logs
    for secret in ARGUMENTS:
        assert secret not in logs
    assert (PASSWORD in logs) is not redact
    if logging_setup == "json":
        (line,) = [json.loads(x) for x in out.splitlines() if "background task failed" in x]
        assert sorted(line) == [
            "attempts", "category", "dlq_entry_id", "dlq_reason", "error_message",
            "error_type", "event", "exception", "level", "outcome", "span_id", "task_id",
            "task_name", "timestamp", "trace_id",
        ]  # fmt: skip
        assert line["dlq_entry_id"] == entry.id
        assert line["exception"].startswith("Traceback (most recent call last):\n")
        assert len(line["exception"]) <= 2_048  # the task's frames (the span keeps the whole)

    # spans: never the arguments; the message in the exception event, the status and the
    # retry event, unless redacted
    texts = span_texts(telemetry)
    for where, text in texts.items():
        for secret in ARGUMENTS:
            assert secret not in text, where
    with_password = sorted(where for where, text in texts.items() if PASSWORD in text)
    assert with_password == (
        []
        if redact
        else [
            "process charge bgtasks.retry.exception.message",
            "process charge exception.exception.message",
            "process charge exception.exception.stacktrace",
            "process charge status",
        ]
    )
    if redact:
        assert texts["process charge exception.exception.message"] == "<redacted>"
        assert texts["process charge status"] == "ConnectionError: <redacted>"

    # metrics, alerts and health: neither arguments nor message
    for secret in (*ARGUMENTS, PASSWORD):
        assert secret not in metric_texts(telemetry)
        assert secret not in health
        for payload in notifier.payloads:
            assert secret not in payload
    assert len(notifier.payloads) == 3  # the alert did fire


def test_the_cli_list_shows_the_message_and_show_the_arguments(
    capsys: pytest.CaptureFixture[str],
    telemetry: Telemetry,
    instrument: Any,
    store: SQLiteDeadLetterStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_checkout(telemetry, instrument, store)
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "400")
    url = f"sqlite:///{store.path}"
    assert main(["--store", url, "dlq", "list"]) == 0
    listed = capsys.readouterr().out
    assert PASSWORD in listed
    assert not any(secret in listed for secret in ARGUMENTS)
    (entry,) = store.list()
    assert main(["--store", url, "dlq", "show", entry.id]) == 0
    shown = capsys.readouterr().out
    assert all(secret in shown for secret in (*ARGUMENTS, PASSWORD))


def test_log_locals_is_an_opt_in(
    capsys: pytest.CaptureFixture[str],
    telemetry: Telemetry,
    instrument: Any,
    store: SQLiteDeadLetterStore,
) -> None:
    structlog.reset_defaults()
    try:
        run_checkout(telemetry, instrument, store, log_locals=True)
    finally:
        structlog.reset_defaults()
    logs = "".join(capsys.readouterr())
    assert CARD in logs  # structlog's console renderer shows the frames' locals, as asked


def broken_hook(span: Any, state: Any) -> None:
    card_in_a_local = state.args[0]
    raise RuntimeError(f"hook broke on a card of {len(card_in_a_local)} digits")


def test_every_log_line_of_the_package_leaves_locals_out(
    capsys: pytest.CaptureFixture[str],
    telemetry: Telemetry,
    instrument: Any,
    store: SQLiteDeadLetterStore,
    logging_setup: str,
) -> None:
    run_checkout(telemetry, instrument, store, start_hook=broken_hook)
    logs = "".join(capsys.readouterr())
    assert "bgtasks hook failed" in logs
    assert "hook broke on a card of 16 digits" in logs
    for secret in ARGUMENTS:
        assert secret not in logs
