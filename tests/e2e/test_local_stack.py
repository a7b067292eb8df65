"""The stack without Docker (issue 19, item 5): `scripts/local-stack` on the shipped configs.

Jaeger's and the collector's default ports do not clash, the rendered Prometheus and
Alertmanager configs are valid, and the script runs the four real components on this host:
a span sent to localhost:4317 reaches Jaeger's HTTP API, the collector is a Prometheus target
that is up, and Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests.e2e._infra import CONFIG_DIR, REPO_ROOT, eventually, http_get_json, require

pytestmark = pytest.mark.e2e

SCRIPT = REPO_ROOT / "scripts" / "local-stack"
_DEFAULT = re.compile(r"\$\{env:[A-Z_]+:-(?:[\w.]+:)?(\d+)\}")


def default_ports(config: Path) -> set[int]:
    """The ports a config listens on (or, for the telemetry readers, serves) by default."""
    text = config.read_text()
    ports = {int(p) for p in _DEFAULT.findall(text)}
    ports |= {int(p) for p in re.findall(r"port: \$\{env:[A-Z_]+:-(\d+)\}", text)}
    return ports


def test_jaeger_and_the_collector_listen_on_different_ports_by_default() -> None:
    collector = default_ports(CONFIG_DIR / "otelcol.yaml") - {14317}  # it exports to Jaeger's
    jaeger = default_ports(CONFIG_DIR / "jaeger.yaml") - {100000}  # max_traces, not a port
    assert collector == {4317, 4318, 8888, 8889, 13133}
    assert jaeger == {14317, 14318, 14269, 16685, 16686}
    assert not collector & jaeger


def test_the_rendered_configs_are_valid(tmp_path: Path) -> None:
    promtool, amtool = require("promtool"), require("amtool")
    done = subprocess.run(
        [str(SCRIPT), "--render", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    prometheus = (tmp_path / "prometheus.yml").read_text()
    assert "127.0.0.1:8889" in prometheus
    assert "127.0.0.1:9093" in prometheus
    assert "http://127.0.0.1:5001/alerts" in (tmp_path / "alertmanager.yml").read_text()
    for argv in (
        [str(promtool), "check", "config", str(tmp_path / "prometheus.yml")],
        [str(amtool), "check-config", str(tmp_path / "alertmanager.yml")],
    ):
        checked = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def _busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_script_runs_the_stack_on_this_host(tmp_path: Path) -> None:
    for name in ("otelcol", "jaeger", "prometheus", "alertmanager"):
        require(name)
    ports = (4317, 4318, 8888, 8889, 13133, 14317, 14318, 14269, 16685, 16686, 9090, 9093)
    busy = [port for port in ports if _busy(port)]
    if busy:
        pytest.skip(f"the local stack's fixed ports are in use on this host: {busy}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = subprocess.Popen(
        [str(SCRIPT), str(tmp_path / "stack")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        eventually(
            lambda: http_get_json("http://127.0.0.1:16686/api/services") is not None
            and http_get_json("http://127.0.0.1:9090/api/v1/targets")["data"]["activeTargets"]
            and http_get_json("http://127.0.0.1:9093/api/v2/status"),
            timeout=60,
            message="Jaeger, Prometheus and Alertmanager answering",
        )
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "local-stack-check"}))
        provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint="http://localhost:4317", insecure=True))
        )
        eventually(lambda: _busy(4317), timeout=60, message="the collector's OTLP port")
        provider.get_tracer("t").start_span("process check").end()
        provider.shutdown()
        eventually(
            lambda: "local-stack-check" in http_get_json("http://127.0.0.1:16686/api/services")[
                "data"
            ],
            timeout=60,
            message="the span in Jaeger",
        )
        eventually(
            lambda: [
                t
                for t in http_get_json("http://127.0.0.1:9090/api/v1/targets")["data"][
                    "activeTargets"
                ]
                if t["health"] == "up" and t["scrapeUrl"].startswith("http://127.0.0.1:8889")
            ],
            timeout=60,
            message="the collector scraped by Prometheus",
        )
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
        output, _ = process.communicate(timeout=60)
    assert "local stack running" in output
    assert not [port for port in (4317, 16686, 9090, 9093) if _busy(port)], output
