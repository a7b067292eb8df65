"""Stopping an app that set itself up with `configure_telemetry()`: nothing recorded is lost.

The demo app, as the README runs it (``uvicorn otel_bgtasks.demo.app:app``), exports OTLP/HTTP
to a receiver in this test. The batch span processor and the metric reader are given intervals
longer than the test, so only the flush at shutdown can deliver what the app recorded.

SIGINT is Ctrl-C; SIGTERM is what ``docker stop``, Kubernetes and systemd send. After a
graceful SIGTERM shutdown uvicorn re-raises the signal, which ends the process without running
`atexit` handlers: the flush has to happen in the app's lifespan (`Telemetry.lifespan`).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tests.integration._server import AppProcess
from tests.support.ports import LOOPBACK, free_port
from tests.support.waiting import wait_until

SERVICE = "bgtasks-shutdown"


class OTLPReceiver:
    """An OTLP/HTTP (protobuf) endpoint on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def spans(self) -> list[Any]:
        out = []
        for path, body in self.requests:
            if path == "/v1/traces":
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        out.extend(scope_spans.spans)
        return out

    def metric_names(self) -> set[str]:
        names = set()
        for path, body in self.requests:
            if path == "/v1/metrics":
                request = ExportMetricsServiceRequest.FromString(body)
                for resource_metrics in request.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        names.update(m.name for m in scope_metrics.metrics)
        return names


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    r = OTLPReceiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_spans_and_metrics_recorded_before_a_stop_signal_are_exported(tmp_path, receiver, stop):
    port = free_port()
    app = AppProcess(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "otel_bgtasks.demo.app:app",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--no-access-log",
        ],
        workdir=tmp_path,
        port=port,
        env={
            "OTEL_SERVICE_NAME": SERVICE,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
            "OTEL_METRIC_EXPORT_INTERVAL": "600000",
            "OTEL_BGTASKS_DLQ_URL": f"sqlite:///{tmp_path / 'dlq.db'}",
        },
        ready_path="/bgtasks/health",
        name="demo",
    )
    with app:
        assert httpx.get(f"{app.url}/ok").status_code == 200

        def idle() -> bool:
            health = httpx.get(f"{app.url}/bgtasks/health").json()
            return bool(health["running"] == 0 and health["pending"] == 0)

        wait_until(idle, what="the task to finish")
        assert receiver.spans() == []  # nothing exported yet: only the flush can deliver
        code = app.stop(stop)
    assert code in (0, -stop), app.stderr()

    names = sorted(s.name for s in receiver.spans())
    assert "process send-welcome-email" in names, (
        f"spans received after {stop.name}: {names}; app stderr:\n{app.stderr()[-2000:]}"
    )
    (task,) = [s for s in receiver.spans() if s.name == "process send-welcome-email"]
    (request,) = [s for s in receiver.spans() if s.name == "GET /ok"]
    assert [(link.trace_id, link.span_id) for link in task.links] == [
        (request.trace_id, request.span_id)
    ]
    assert {"bgtasks.task.duration", "bgtasks.task.wait"} <= receiver.metric_names()
