"""Zero-code instrumentation: ``opentelemetry-instrument uvicorn app:app`` in a subprocess.

The distro configures the SDK from the OTEL_* variables and loads every registered
``opentelemetry_instrumentor`` entry point: upstream's FastAPI instrumentation and ours
(``bgtasks = otel_bgtasks.instrumentor:BackgroundTasksInstrumentor``). Spans go to the console
exporter (stdout, one JSON document per span) and are flushed at exit, after SIGINT.

SIGINT, not SIGTERM: uvicorn (>= 0.29) re-raises the signal it shut down on; SIGINT then ends
the interpreter normally (atexit flushes the SDK), SIGTERM kills it before atexit, so spans
still queued in the batch processor are lost. That is the SDK's and uvicorn's behaviour, not
this package's, and is why the schedule delay here is longer than the test: only the exit flush
can deliver the spans.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from importlib.metadata import entry_points
from typing import Any

import httpx
from tests.integration._server import REPO_ROOT, VENV_BIN, AppProcess
from tests.support.ports import free_port

SERVICE = "bgtasks-auto"


def console_spans(text: str) -> list[dict[str, Any]]:
    """The JSON span documents in the console exporter's output (other lines skipped)."""
    decoder = json.JSONDecoder()
    spans: list[dict[str, Any]] = []
    pos = 0
    while (start := text.find("{", pos)) != -1:
        try:
            doc, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        if isinstance(doc, dict) and "context" in doc and "kind" in doc:
            spans.append(doc)
        pos = end
    return spans


def instrumented_env(tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        OTEL_SERVICE_NAME=SERVICE,
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        # Longer than any test: the spans can only come from the flush at exit.
        OTEL_BSP_SCHEDULE_DELAY="60000",
        OTEL_BGTASKS_DLQ_URL=f"sqlite:///{tmp_path / 'dlq.db'}",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_instrumented(
    tmp_path, app: str, paths: list[str], ready: str, stop: signal.Signals, **extra_env: str
):
    """Serve `app` under opentelemetry-instrument, GET each path, stop it; returns the process."""
    instrument = VENV_BIN / "opentelemetry-instrument"
    assert instrument.exists(), f"{instrument} missing: pip install -e '.[dev]'"
    port = free_port()
    env = instrumented_env(tmp_path, **extra_env)
    process = AppProcess(
        [
            str(instrument),
            str(VENV_BIN / "uvicorn"),
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ],
        workdir=tmp_path,
        port=port,
        env=env,
        ready_path=ready,
        name="auto",
        inherit_env=False,  # no OTEL_* of the test run's own environment
    )
    with process:
        with httpx.Client(base_url=process.url, timeout=10.0) as client:
            for path in paths:
                assert client.get(path).status_code == 200
        code = process.stop(stop)
    # uvicorn re-raises the signal it shut down on, after a clean shutdown.
    assert code in (0, -stop), f"exit code {code}:\n{process.stderr()[-4000:]}"
    return process


def hexid(value: str) -> str:
    return value.removeprefix("0x")


def only(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, f"{name!r}: {len(found)} spans; all: {[s['name'] for s in spans]}"
    return found[0]


def assert_task_span(task: dict[str, Any], request: dict[str, Any], name: str, function: str):
    assert task["kind"] == "SpanKind.CONSUMER"
    assert task["parent_id"] is None
    assert task["context"]["trace_id"] != request["context"]["trace_id"]
    assert [link["context"] for link in task["links"]] == [
        {
            "trace_id": request["context"]["trace_id"],
            "span_id": request["context"]["span_id"],
            "trace_state": "[]",
        }
    ]
    assert task["status"] == {"status_code": "UNSET"}
    assert task["events"] == []
    attrs = dict(task["attributes"])
    assert attrs.pop("bgtasks.task.wait") >= 0
    assert attrs == {
        "bgtasks.task.name": name,
        "bgtasks.task.id": task["attributes"]["bgtasks.task.id"],
        "code.function.name": function,
        "bgtasks.task.attempts": 1,
        "bgtasks.task.outcome": "success",
    }
    assert task["resource"]["attributes"]["service.name"] == SERVICE


def test_entry_point_is_registered():
    (ep,) = [ep for ep in entry_points(group="opentelemetry_instrumentor") if ep.name == "bgtasks"]
    assert ep.value == "otel_bgtasks.instrumentor:AutoInstrumentor"
    from otel_bgtasks import BackgroundTasksInstrumentor
    from otel_bgtasks.instrumentor import AutoInstrumentor

    assert ep.load() is AutoInstrumentor
    assert issubclass(AutoInstrumentor, BackgroundTasksInstrumentor)


def test_a_typo_in_a_variable_never_switches_off_fastapi_or_the_tasks(tmp_path):
    """Entry points load in the order bgtasks, fastapi: an invalid value must warn, keep its
    default and let the FastAPI instrumentor load after ours (issues 18.9, 19.1)."""
    process = run_instrumented(
        tmp_path,
        "tests.integration.apps.plain_app:app",
        ["/report"],
        "/ready",
        signal.SIGINT,
        OTEL_BGTASKS_TRACE_MODE="childs",
        OTEL_BGTASKS_DISPATCH="locale",
    )
    spans = console_spans(process.stdout())
    request = only(spans, "GET /report")  # FastAPI's own instrumentation still loaded
    report = only(spans, "process send_report")
    assert_task_span(
        report, request, "send_report", "tests.integration.apps.plain_app.send_report"
    )  # the default trace mode, link
    output = process.stdout() + process.stderr()
    assert "OTEL_BGTASKS_TRACE_MODE" in output
    assert "OTEL_BGTASKS_DISPATCH" in output
    assert "Failed to auto initialize" not in output
    assert "Instrumenting of bgtasks failed" not in output


def test_a_bad_guarantee_variable_refuses_to_start_naming_it(tmp_path):
    """OTEL_BGTASKS_DURABLE=ture must not run the app without durability: the process exits
    before serving, with one line naming the variable."""
    instrument = VENV_BIN / "opentelemetry-instrument"
    env = instrumented_env(tmp_path, OTEL_BGTASKS_DURABLE="ture")
    argv = [str(instrument), str(VENV_BIN / "uvicorn"), "tests.integration.apps.plain_app:app"]
    argv += ["--port", str(free_port())]
    # The process ends by itself; the timeout only guards against a hang (it is never reached).
    done = subprocess.run(
        argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode != 0
    assert "otel-bgtasks: refusing to start: OTEL_BGTASKS_DURABLE='ture' is not valid" in (
        done.stderr
    )
    assert "Uvicorn running" not in done.stderr


def test_plain_app_gets_task_spans_linked_to_the_request(tmp_path):
    process = run_instrumented(
        tmp_path, "tests.integration.apps.plain_app:app", ["/report"], "/ready", signal.SIGINT
    )
    spans = console_spans(process.stdout())
    assert [s["name"] for s in spans if s["name"].startswith("BackgroundTask")] == []
    assert sorted(s["name"] for s in spans if s["name"].startswith("process ")) == [
        "process resize_avatar",
        "process send_report",
    ]
    request = only(spans, "GET /report")
    assert request["kind"] == "SpanKind.SERVER"
    module = "tests.integration.apps.plain_app"
    report = only(spans, "process send_report")
    resize = only(spans, "process resize_avatar")
    assert_task_span(report, request, "send_report", f"{module}.send_report")
    assert_task_span(resize, request, "resize_avatar", f"{module}.resize_avatar")
    assert [(e["name"], e["attributes"]) for e in request["events"]] == [
        (
            "bgtasks.enqueued",
            {"bgtasks.task.name": name, "bgtasks.task.id": span["attributes"]["bgtasks.task.id"]},
        )
        for name, span in (("send_report", report), ("resize_avatar", resize))
    ]
    assert "Traceback" not in process.stderr()


def test_demo_app_does_not_configure_telemetry_twice(tmp_path):
    process = run_instrumented(
        tmp_path, "otel_bgtasks.demo.app:app", ["/ok", "/sync"], "/bgtasks/health", signal.SIGINT
    )
    spans = console_spans(process.stdout())
    assert [s["name"] for s in spans if s["name"].startswith("BackgroundTask")] == []
    assert sorted(s["name"] for s in spans if s["name"].startswith("process ")) == [
        "process resize_avatar",
        "process send-welcome-email",
    ]
    welcome = only(spans, "process send-welcome-email")
    assert_task_span(
        welcome,
        only(spans, "GET /ok"),
        "send-welcome-email",
        "otel_bgtasks.demo.app.send_welcome_email",
    )
    resize = only(spans, "process resize_avatar")
    assert_task_span(
        resize, only(spans, "GET /sync"), "resize_avatar", "otel_bgtasks.demo.app.resize_avatar"
    )
    inner = only(spans, "resize")
    assert inner["parent_id"] == resize["context"]["span_id"]
    assert inner["context"]["trace_id"] == resize["context"]["trace_id"]
    # Everything in one provider, the distro's: the demo did not install its own on top.
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {SERVICE}
    stderr = process.stderr()
    assert "Overriding of current TracerProvider is not allowed" not in stderr
    assert "already instrumented" not in stderr
    assert "Traceback" not in stderr
