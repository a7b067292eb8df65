"""A new user's zero-code run, as the README tells it, against the real pipeline.

The README's ``app.py`` and its shell block (``opentelemetry-instrument uvicorn app:app``; and
the gunicorn variant it names) run as pasted, with only the collector's address, the store
directory and the listen address replaced. The SDK's periodic exports are set an hour apart,
so only the shutdown flush can deliver anything: ten orders, SIGTERM as soon as the tenth
response is in (what Docker and Kubernetes send), and then every span must be in Jaeger and
every series in Prometheus, on both metrics paths.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.e2e._infra import eventually, free_port, http_get, telemetry_stack
from tests.readme.blocks import README, block, substitute

pytestmark = pytest.mark.e2e

ORDERS = 10
SERVICE = "shop"
TASKS = ("send-confirmation", "sync-crm")
VENV_BIN = Path(sys.executable).parent
NEVER = "3600000"  # ms: no periodic export within the test
UVICORN = "opentelemetry-instrument uvicorn app:app"
GUNICORN = "opentelemetry-instrument gunicorn -k uvicorn.workers.UvicornWorker app:app"


def _post(url: str) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def _script(server: str, port: int, store_dir: Path, otlp: str) -> str:
    """The README's shell block; its last line becomes the server, exec'd so that SIGTERM
    reaches it as it would from an orchestrator."""
    assert f"`{GUNICORN}`" in README.read_text(), "the README names the gunicorn command"
    server_line = {
        "uvicorn": f"exec {UVICORN} --port {port}",
        "gunicorn": f"exec {GUNICORN} --bind 127.0.0.1:{port}",
    }[server]
    return substitute(
        block("mkdir -p /var/lib/shop", "sh").text,
        {"/var/lib/shop": str(store_dir), "http://localhost:4317": otlp, UVICORN: server_line},
    )


def _expected_series() -> dict[str, float]:
    job = f'job="{SERVICE}"'
    return {
        f'sum(bgtasks_task_duration_seconds_count{{{job},bgtasks_task_name="send-confirmation",'
        'bgtasks_task_outcome="success"})': ORDERS,
        f'sum(bgtasks_task_duration_seconds_count{{{job},bgtasks_task_name="sync-crm",'
        'bgtasks_task_outcome="dead_lettered"})': ORDERS,
        f"sum(bgtasks_task_wait_seconds_count{{{job}}})": ORDERS * len(TASKS),
        f'sum(bgtasks_task_retries_total{{{job},bgtasks_task_name="sync-crm"}})': ORDERS,
        f'sum(bgtasks_dlq_moves_total{{{job},bgtasks_task_name="sync-crm",'
        'bgtasks_dlq_reason="exhausted"})': ORDERS,
        f"max(bgtasks_dlq_depth{{{job}}})": ORDERS,
        # upstream's FastAPI instrumentation: the same flush delivers its metrics too
        # (the POSTs: the readiness probe's GET /docs counts too)
        f'sum(http_server_duration_milliseconds_count{{{job},http_method="POST"}})': ORDERS,
    }


@pytest.mark.parametrize(
    ("server", "metrics_path"),
    [("uvicorn", "scrape"), ("uvicorn", "push"), ("gunicorn", "scrape")],
)
def test_a_new_users_zero_code_run_loses_nothing_at_sigterm(tmp_path, server, metrics_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "app.py").write_text(block("# app.py", "python").text)
    store_dir = tmp_path / "var-lib-shop"
    with telemetry_stack(tmp_path / "stack", alerting=False, metrics_path=metrics_path) as stack:
        port = free_port()
        script = _script(server, port, store_dir, stack.collector.otlp_grpc_endpoint)
        # A new user's shell: none of the test run's own OTEL_* variables.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            OTEL_BSP_SCHEDULE_DELAY=NEVER,
            OTEL_METRIC_EXPORT_INTERVAL=NEVER,
        )
        log_path = tmp_path / f"{server}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                ["bash", "-ec", script],
                cwd=project,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                eventually(
                    lambda: process.poll() is None
                    and http_get(f"http://127.0.0.1:{port}/docs", timeout=2.0)[0] == 200,
                    timeout=60,
                    message=f"{server} answering GET /docs",
                )
                for order in range(ORDERS):
                    assert _post(f"http://127.0.0.1:{port}/orders/{order}") == 200
                process.send_signal(signal.SIGTERM)  # as soon as the last response is in
                code = process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        log = log_path.read_text(errors="replace")
        # uvicorn re-raises the signal after a graceful shutdown; gunicorn's master exits 0
        assert code in (0, -signal.SIGTERM), log[-3000:]
        assert "telemetry flush at shutdown incomplete" not in log, log[-3000:]
        assert "Failed to auto initialize OpenTelemetry" not in log, log[-3000:]

        # -- every span in Jaeger --------------------------------------------------------
        def spans() -> list[dict]:
            traces = stack.jaeger.traces(SERVICE, limit="200")
            found = [span for t in traces for span in t["spans"]]
            requests = [s for s in found if s["operationName"] == "POST /orders/{order_id}"]
            tasks = [s for s in found if s["operationName"].startswith("process ")]
            return found if (len(requests), len(tasks)) == (ORDERS, ORDERS * len(TASKS)) else []

        try:
            found = eventually(spans, timeout=60, message="all spans in Jaeger")
        except AssertionError:
            traces = stack.jaeger.traces(SERVICE, limit="200")
            names = [s["operationName"] for t in traces for s in t["spans"]]
            requests_seen = names.count("POST /orders/{order_id}")
            tasks_seen = sum(n.startswith("process ") for n in names)
            raise AssertionError(
                f"in Jaeger: {requests_seen}/{ORDERS} request spans,"
                f" {tasks_seen}/{ORDERS * len(TASKS)} task spans; app log:\n{log[-3000:]}"
            ) from None
        requests = {s["spanID"] for s in found if s["operationName"] == "POST /orders/{order_id}"}
        tasks = [s for s in found if s["operationName"].startswith("process ")]
        assert sorted(s["operationName"] for s in tasks) == sorted(
            f"process {t}" for t in TASKS for _ in range(ORDERS)
        )
        links = [ref["spanID"] for t in tasks for ref in t["references"]]
        assert [ref["refType"] for t in tasks for ref in t["references"]] == ["FOLLOWS_FROM"] * (
            ORDERS * len(TASKS)
        )
        assert set(links) == requests  # each task links to its order's request span

        # -- from a request to its tasks, as the README shows (link mode) --------------------
        request = next(s for s in found if s["operationName"] == "POST /orders/{order_id}")
        task_ids = [
            field["value"]
            for log in request["logs"]
            for field in log["fields"]
            if field["key"] == "bgtasks.task.id"
        ]
        assert len(task_ids) == len(TASKS)  # one bgtasks.enqueued event per task
        for task_id in task_ids:
            # the tag matches the task span's attribute and the request's event field: the
            # search finds the task's trace and the request's own
            traces = stack.jaeger.traces(SERVICE, tags=json.dumps({"bgtasks.task.id": task_id}))
            assert len(traces) == 2
            (task,) = [
                s for t in traces for s in t["spans"] if s["operationName"].startswith("process ")
            ]
            (ref,) = task["references"]
            assert ref["spanID"] == request["spanID"]

        # -- every series in Prometheus ---------------------------------------------------
        expected = _expected_series()

        def observed() -> dict[str, float | None]:
            seen: dict[str, float | None] = {}
            for expr in expected:
                result = stack.prometheus.query(expr)
                seen[expr] = float(result[0]["value"][1]) if result else None
            return seen

        last: list[dict[str, float | None]] = [{}]

        def arrived() -> bool:
            last[0] = observed()
            return last[0] == expected

        try:
            eventually(arrived, timeout=60, message=f"every series in Prometheus ({metrics_path})")
        finally:
            assert last[0] == expected
