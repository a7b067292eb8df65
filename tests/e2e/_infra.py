"""Harness for the end-to-end tests: find, configure, start, probe and stop the real components.

The binaries come from ``scripts/infra.sh`` (which writes ``$OTEL_BGTASKS_CACHE/env.sh``) or from
``PATH``. A test that needs one calls :func:`require`, which skips the test when the binary is
missing, or fails it when ``OTEL_BGTASKS_REQUIRE_INFRA=1`` (CI sets it, so a broken cache cannot
turn the e2e suite into a row of skips).

Every process listens on free loopback ports, writes its log to a file in the test's work
directory (the tail is part of every start-up error), and is stopped with SIGTERM, then SIGKILL.
Configuration comes from the shipped files in ``collector-config/``: the collector and Jaeger
read environment variables, Prometheus and Alertmanager get a rendered copy in which only
addresses and intervals are replaced by plain text substitution.

Metrics reach Prometheus on one of the two paths collector-config/otelcol.yaml offers
(:data:`METRICS_PATHS`): ``scrape`` (Prometheus scrapes the collector's prometheus exporter) or
``push`` (the collector sends OTLP to Prometheus's own receiver; Prometheus then scrapes the
collector's own metrics as the ``otel-collector`` job, so ``up`` still tracks the collector).

Typical use::

    with telemetry_stack(tmp_path) as stack:
        send_otlp_to(stack.collector.otlp_grpc_endpoint)
        traces = eventually(lambda: stack.jaeger.traces("my-service"))
        series = eventually(lambda: stack.prometheus.query("bgtasks_task_active"))
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from tests.support.ports import free_port, free_ports
from tests.support.waiting import wait_until

__all__ = [
    "CONFIG_DIR",
    "CREATED_TIMESTAMPS_FLAG",
    "METRICS_PATHS",
    "QUEUE_ROW",
    "REPO_ROOT",
    "REQUIRE_INFRA_ENV",
    "AlertWebhook",
    "Alertmanager",
    "Collector",
    "InfraError",
    "Jaeger",
    "ManagedProcess",
    "Prometheus",
    "Redis",
    "TelemetryStack",
    "UvicornApp",
    "dashboard_queries",
    "eventually",
    "find_binary",
    "http_get",
    "http_get_json",
    "render_alert_rules",
    "render_alertmanager_config",
    "render_prometheus_config",
    "require",
    "telemetry_stack",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "collector-config"
REQUIRE_INFRA_ENV = "OTEL_BGTASKS_REQUIRE_INFRA"

# Addresses in the shipped configs that the rendered copies replace (docker compose names).
PROMETHEUS_COLLECTOR_TARGET = "otel-collector:8889"
PROMETHEUS_ALERTMANAGER_TARGET = "alertmanager:9093"
ALERTMANAGER_WEBHOOK_URL = "http://alert-webhook:5001/alerts"

# Prometheus feature flag: ingest the start (created) timestamp of counters and histograms as
# a 0 sample, from the collector's exporter (protobuf scrape) and from OTLP pushes alike.
CREATED_TIMESTAMPS_FLAG = "--enable-feature=created-timestamp-zero-ingestion"

# Collector exporter (OTELCOL_METRICS_EXPORTER) of each metrics path.
METRICS_PATHS = {"scrape": "prometheus", "push": "otlp_http/prometheus"}

STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0

T = TypeVar("T")


class InfraError(RuntimeError):
    """A component could not be configured, started or queried."""


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class _Binary:
    env_var: str
    names: tuple[str, ...]


_BINARIES: dict[str, _Binary] = {
    "otelcol": _Binary("OTELCOL_BIN", ("otelcol-bgtasks",)),
    "jaeger": _Binary("JAEGER_BIN", ("jaeger",)),
    "compose-check": _Binary("COMPOSE_CHECK_BIN", ("compose-check",)),
    "prometheus": _Binary("PROMETHEUS_BIN", ("prometheus",)),
    "promtool": _Binary("PROMTOOL_BIN", ("promtool",)),
    "alertmanager": _Binary("ALERTMANAGER_BIN", ("alertmanager",)),
    "amtool": _Binary("AMTOOL_BIN", ("amtool",)),
    "redis-server": _Binary("REDIS_SERVER_BIN", ("redis-server",)),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("OTEL_BGTASKS_CACHE", "~/.cache/otel-bgtasks")).expanduser()


def _env_file_values() -> dict[str, str]:
    """``VAR=value`` pairs of the ``export`` lines in the env file scripts/infra.sh writes."""
    path = _cache_dir() / "env.sh"
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            values[key] = value
    return values


def find_binary(name: str) -> Path | None:
    """Path of a component's executable, or None.

    Looked up in order: the environment variable (e.g. ``OTELCOL_BIN``), the env file written
    by scripts/infra.sh, then ``PATH`` and ``/usr/sbin``.
    """
    try:
        binary = _BINARIES[name]
    except KeyError:
        raise ValueError(f"unknown binary {name!r}; known: {sorted(_BINARIES)}") from None
    configured = os.environ.get(binary.env_var) or _env_file_values().get(binary.env_var)
    if configured:
        path = Path(configured)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    for candidate in binary.names:
        found = shutil.which(candidate, path=search_path)
        if found:
            return Path(found)
    return None


def require(name: str) -> Path:
    """Path of a component's executable; skip the test (fail under CI) when it is missing.

    Set ``OTEL_BGTASKS_REQUIRE_INFRA=1`` to turn the skip into a failure.
    """
    path = find_binary(name)
    if path is not None:
        return path
    reason = (
        f"{name} not found (${_BINARIES[name].env_var}, {_cache_dir() / 'env.sh'}, PATH): "
        "run scripts/infra.sh to build/install it"
    )
    if os.environ.get(REQUIRE_INFRA_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_INFRA_ENV}=1)")
    pytest.skip(reason)


# --------------------------------------------------------------------------- ports, HTTP, polling


def http_get(url: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a GET; HTTP error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def http_get_json(url: str, *, timeout: float = 5.0) -> Any:
    """Decoded JSON body of a GET that must answer 200."""
    status, body = http_get(url, timeout=timeout)
    if status != 200:
        raise InfraError(f"GET {url} answered {status}: {body[:500]!r}")
    return json.loads(body)


def _http_post(url: str, data: bytes = b"", *, timeout: float = 5.0) -> int:
    request = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        with error:
            return error.code


def _http_ok(url: str) -> bool:
    try:
        status, _ = http_get(url, timeout=2.0)
    except OSError:
        return False
    return status == 200


def eventually(
    probe: Callable[[], T],
    *,
    timeout: float = 30.0,
    message: str = "condition",
) -> T:
    """`wait_until` at a pace the components' HTTP APIs can take (four probes a second).

    A deadline for eventually-consistent pipelines, not a timing assertion: raises
    AssertionError naming ``message`` and the last result or exception.
    """
    return wait_until(probe, what=message, timeout=timeout, interval=0.25)


# --------------------------------------------------------------------------- processes


@dataclass
class ManagedProcess:
    """One child process whose output goes to ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    _popen: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        """Start the process (appending to its log, so restarts keep the history)."""
        if self.running:
            raise InfraError(f"{self.name} is already running")
        self._close_log()
        self._log = self.log_path.open("ab")
        self._log.write(f"\n=== starting: {shlex.join(self.argv)}\n".encode())
        self._log.flush()
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL at once: a crash, for fault-injection tests."""
        self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        popen = self._popen
        if popen is not None:
            if popen.poll() is None:
                popen.send_signal(sig)
                try:
                    popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()
            self._popen = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the process's log."""
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(
        self, probe: Callable[[], bool], what: str, timeout: float = STARTUP_TIMEOUT
    ) -> None:
        """Poll ``probe`` until it is true; raise InfraError with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if probe():
                    return
            code = self.returncode
            if code is not None:
                raise InfraError(
                    f"{self.name} exited with status {code} before {what}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise InfraError(
                    f"{self.name} not ready ({what}) within {timeout}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)


def _loopback(port: int) -> str:
    return f"127.0.0.1:{port}"


# --------------------------------------------------------------------------- config rendering


def _substitute(text: str, replacements: Mapping[str, str], source: Path) -> str:
    for old, new in replacements.items():
        if old not in text:
            raise InfraError(f"{source} no longer contains {old!r}: update tests/e2e/_infra.py")
        text = text.replace(old, new)
    return text


def render_alert_rules(
    dest_dir: Path,
    *,
    for_duration: str | None = "0s",
    replacements: Mapping[str, str] | None = None,
) -> Path:
    """Copy alert-rules.yml into ``dest_dir``, every ``for:`` set to ``for_duration``.

    ``for_duration=None`` keeps the production values. ``replacements`` are extra plain-text
    substitutions (e.g. ``{"[10m]": "[1m]"}``); each must occur in the file.
    """
    source = CONFIG_DIR / "alert-rules.yml"
    text = source.read_text()
    if for_duration is not None:
        text, count = re.subn(r"(?m)^(\s+for: )\S+$", rf"\g<1>{for_duration}", text)
        if count == 0:
            raise InfraError(f"{source} has no `for:` lines to rewrite")
    text = _substitute(text, replacements or {}, source)
    dest = dest_dir / "alert-rules.yml"
    dest.write_text(text)
    return dest


def render_prometheus_config(
    dest_dir: Path,
    *,
    collector_target: str,
    alertmanager_target: str,
    interval: str = "1s",
    for_duration: str | None = "0s",
    rule_replacements: Mapping[str, str] | None = None,
) -> Path:
    """Write prometheus.yml (and the alert-rules.yml it loads) into ``dest_dir``.

    Only the collector and Alertmanager addresses and the scrape/evaluation intervals differ
    from the shipped file.
    """
    source = CONFIG_DIR / "prometheus.yml"
    text = _substitute(
        source.read_text(),
        {
            PROMETHEUS_COLLECTOR_TARGET: collector_target,
            PROMETHEUS_ALERTMANAGER_TARGET: alertmanager_target,
        },
        source,
    )
    text, count = re.subn(
        r"(?m)^(\s+(?:scrape|evaluation)_interval: )\S+$", rf"\g<1>{interval}", text
    )
    if count != 2:
        raise InfraError(f"{source}: expected scrape_interval and evaluation_interval lines")
    render_alert_rules(dest_dir, for_duration=for_duration, replacements=rule_replacements)
    dest = dest_dir / "prometheus.yml"
    dest.write_text(text)
    return dest


def render_alertmanager_config(
    dest_dir: Path, *, webhook_url: str, group_interval: str = "1s"
) -> Path:
    """Write alertmanager.yml into ``dest_dir`` with the webhook URL and short grouping."""
    source = CONFIG_DIR / "alertmanager.yml"
    text = _substitute(source.read_text(), {ALERTMANAGER_WEBHOOK_URL: webhook_url}, source)
    text, count = re.subn(
        r"(?m)^(\s+group_(?:wait|interval): )\S+$", rf"\g<1>{group_interval}", text
    )
    if count != 2:
        raise InfraError(f"{source}: expected group_wait and group_interval lines")
    dest = dest_dir / "alertmanager.yml"
    dest.write_text(text)
    return dest


QUEUE_ROW = "Queue (remote dispatch)"
"""The dashboard row whose panels need a remote engine (Celery): proved by
tests/e2e/test_celery_pipeline.py, left out of the in-process scenarios."""


def dashboard_queries(
    path: Path | None = None,
    *,
    task: str = ".*",
    job: str = ".*",
    rate_interval: str = "1m",
    rows: Collection[str] | None = None,
    skip_rows: Collection[str] = (QUEUE_ROW,),
) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of the Grafana dashboard: of the panels
    under the rows titled `rows` (None: every row), less those under `skip_rows`.

    Grafana's variables are replaced so the queries run on Prometheus directly: ``$task`` by
    ``task``, ``$job`` by ``job`` and ``$__rate_interval`` by ``rate_interval``.
    """
    path = path or CONFIG_DIR / "grafana" / "dashboards" / "bgtasks-overview.json"
    dashboard = json.loads(path.read_text())
    queries: list[tuple[str, str]] = []
    for row, panel in _all_panels(dashboard["panels"]):
        if (rows is not None and row not in rows) or row in skip_rows:
            continue
        for target in panel.get("targets", []):
            expr = str(target["expr"])
            expr = expr.replace("$__rate_interval", rate_interval).replace("$task", task)
            expr = expr.replace("$job", job)
            queries.append((str(panel["title"]), expr))
    return queries


def _all_panels(
    panels: Sequence[dict[str, Any]], row: str = ""
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(row title, panel) for every panel: a row holds the panels after it (or, collapsed,
    its own `panels`)."""
    for panel in panels:
        if panel.get("type") == "row":
            row = str(panel.get("title", ""))
        yield row, panel
        for inner in panel.get("panels", []):
            yield row, inner


class Collector:
    """The OpenTelemetry Collector built by scripts/infra.sh, on collector-config/otelcol.yaml."""

    def __init__(
        self,
        workdir: Path,
        *,
        jaeger_otlp_grpc: str,
        metrics_path: str = "scrape",
        prometheus_otlp_endpoint: str | None = None,
        config: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``metrics_path`` is a key of :data:`METRICS_PATHS`; ``push`` needs
        ``prometheus_otlp_endpoint`` (:attr:`Prometheus.otlp_endpoint`)."""
        binary = require("otelcol")
        if metrics_path == "push" and prometheus_otlp_endpoint is None:
            raise ValueError("metrics_path='push' needs prometheus_otlp_endpoint")
        (
            self.otlp_grpc_port,
            self.otlp_http_port,
            self.prometheus_port,
            self.health_port,
            self.telemetry_port,
        ) = free_ports(5)
        self.config = config or CONFIG_DIR / "otelcol.yaml"
        self.process = ManagedProcess(
            name="otelcol",
            argv=[str(binary), f"--config={self.config}"],
            log_path=workdir / "otelcol.log",
            env={
                "OTELCOL_OTLP_GRPC_ENDPOINT": _loopback(self.otlp_grpc_port),
                "OTELCOL_OTLP_HTTP_ENDPOINT": _loopback(self.otlp_http_port),
                "OTELCOL_JAEGER_ENDPOINT": jaeger_otlp_grpc,
                "OTELCOL_METRICS_EXPORTER": METRICS_PATHS[metrics_path],
                "OTELCOL_PROMETHEUS_ENDPOINT": _loopback(self.prometheus_port),
                **(
                    {"OTELCOL_PROMETHEUS_OTLP_ENDPOINT": prometheus_otlp_endpoint}
                    if prometheus_otlp_endpoint
                    else {}
                ),
                "OTELCOL_HEALTH_ENDPOINT": _loopback(self.health_port),
                "OTELCOL_TELEMETRY_HOST": "127.0.0.1",
                "OTELCOL_TELEMETRY_PORT": str(self.telemetry_port),
                **(env or {}),
            },
        )

    @property
    def otlp_grpc_endpoint(self) -> str:
        """``http://127.0.0.1:port``, for OTEL_EXPORTER_OTLP_ENDPOINT / gRPC exporters."""
        return f"http://{_loopback(self.otlp_grpc_port)}"

    @property
    def otlp_http_endpoint(self) -> str:
        """``http://127.0.0.1:port``, base URL of the OTLP/HTTP receiver."""
        return f"http://{_loopback(self.otlp_http_port)}"

    @property
    def prometheus_target(self) -> str:
        """``127.0.0.1:port`` of the prometheus exporter, for Prometheus to scrape."""
        return _loopback(self.prometheus_port)

    @property
    def telemetry_target(self) -> str:
        """``127.0.0.1:port`` of the collector's own metrics (scraped on the push path)."""
        return _loopback(self.telemetry_port)

    def metrics_text(self) -> str:
        """What the prometheus exporter currently exposes (the text format)."""
        status, body = http_get(f"http://{self.prometheus_target}/metrics")
        if status != 200:
            raise InfraError(f"collector /metrics answered {status}")
        return body.decode()

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(
            lambda: _http_ok(f"http://{_loopback(self.health_port)}/"), "health_check is 200"
        )

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        """Crash the collector (SIGKILL); :meth:`start` brings it back on the same ports."""
        self.process.kill()

    def restart(self, *, crash: bool = False) -> None:
        """Stop (or with ``crash`` SIGKILL) and start again on the same ports."""
        if crash:
            self.kill()
        else:
            self.stop()
        self.start()


class Jaeger:
    """Jaeger v2 built by scripts/infra.sh, on collector-config/jaeger.yaml (memory storage)."""

    def __init__(self, workdir: Path) -> None:
        binary = require("jaeger")
        (
            self.otlp_grpc_port,
            self.otlp_http_port,
            self.query_http_port,
            self.query_grpc_port,
            self.telemetry_port,
        ) = free_ports(5)
        self.process = ManagedProcess(
            name="jaeger",
            argv=[str(binary), f"--config=file:{CONFIG_DIR / 'jaeger.yaml'}"],
            log_path=workdir / "jaeger.log",
            env={
                "JAEGER_OTLP_GRPC_ENDPOINT": _loopback(self.otlp_grpc_port),
                "JAEGER_OTLP_HTTP_ENDPOINT": _loopback(self.otlp_http_port),
                "JAEGER_QUERY_HTTP_ENDPOINT": _loopback(self.query_http_port),
                "JAEGER_QUERY_GRPC_ENDPOINT": _loopback(self.query_grpc_port),
                "JAEGER_TELEMETRY_HOST": "127.0.0.1",
                "JAEGER_TELEMETRY_PORT": str(self.telemetry_port),
            },
        )

    @property
    def otlp_grpc_address(self) -> str:
        """``127.0.0.1:port`` of Jaeger's OTLP/gRPC receiver (the collector exports here)."""
        return _loopback(self.otlp_grpc_port)

    @property
    def query_url(self) -> str:
        return f"http://{_loopback(self.query_http_port)}"

    def services(self) -> list[str]:
        return list(http_get_json(f"{self.query_url}/api/services")["data"] or [])

    def traces(self, service: str, **params: str) -> list[dict[str, Any]]:
        """``GET /api/traces?service=...``: Jaeger-format traces (spans, processes, references)."""
        query = urllib.parse.urlencode({"service": service, "limit": "100", **params})
        return list(http_get_json(f"{self.query_url}/api/traces?{query}")["data"] or [])

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """``GET /api/traces/{id}`` (hex id), or None when Jaeger does not have it (yet)."""
        status, body = http_get(f"{self.query_url}/api/traces/{trace_id}")
        if status == 404:
            return None
        if status != 200:
            raise InfraError(f"Jaeger /api/traces/{trace_id} answered {status}: {body[:500]!r}")
        data = json.loads(body)["data"] or []
        return dict(data[0]) if data else None

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(
            lambda: _http_ok(f"{self.query_url}/api/services"), "/api/services is 200"
        )

    def stop(self) -> None:
        self.process.stop()


class Prometheus:
    """Prometheus on a rendered copy of collector-config/prometheus.yml and alert-rules.yml."""

    def __init__(
        self,
        workdir: Path,
        *,
        collector_target: str,
        alertmanager_target: str,
        interval: str = "1s",
        for_duration: str | None = "0s",
        rule_replacements: Mapping[str, str] | None = None,
        otlp_receiver: bool = False,
        port: int | None = None,
    ) -> None:
        """``otlp_receiver`` enables the OTLP receiver (the push path); ``port`` is the
        listen port, chosen free when None."""
        binary = require("prometheus")
        self.port = port or free_port()
        config_dir = workdir / "prometheus"
        config_dir.mkdir(parents=True, exist_ok=True)
        self.config = render_prometheus_config(
            config_dir,
            collector_target=collector_target,
            alertmanager_target=alertmanager_target,
            interval=interval,
            for_duration=for_duration,
            rule_replacements=rule_replacements,
        )
        self.process = ManagedProcess(
            name="prometheus",
            argv=[
                str(binary),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={config_dir / 'data'}",
                f"--web.listen-address={_loopback(self.port)}",
                "--web.enable-lifecycle",
                # as shipped (docker-compose.yml): a counter born with its first increment
                # gets a 0 sample at its start time, so rate() and increase() see it
                CREATED_TIMESTAMPS_FLAG,
                *(["--web.enable-otlp-receiver"] if otlp_receiver else []),
            ],
            log_path=workdir / "prometheus.log",
        )

    @property
    def url(self) -> str:
        return f"http://{_loopback(self.port)}"

    @property
    def otlp_endpoint(self) -> str:
        """Base URL of the OTLP receiver (``/v1/metrics`` is appended by OTLP exporters)."""
        return f"{self.url}/api/v1/otlp"

    def _api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        payload = http_get_json(f"{self.url}/api/v1/{path}?{query}")
        if payload.get("status") != "success":
            raise InfraError(f"Prometheus {path} failed: {payload}")
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``).

        Raises InfraError when Prometheus rejects the expression.
        """
        data = self._api("query", query=expr)
        if data["resultType"] != "vector":
            raise InfraError(f"{expr!r} is a {data['resultType']}, not a vector")
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing) with their labels, annotations and state."""
        return list(self._api("alerts")["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self._api("targets")["activeTargets"])

    def reload(self) -> None:
        """Re-read the rendered config files (``--web.enable-lifecycle``)."""
        status = _http_post(f"{self.url}/-/reload")
        if status != 200:
            raise InfraError(f"Prometheus reload answered {status}:\n{self.process.log_tail()}")

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(lambda: _http_ok(f"{self.url}/-/ready"), "/-/ready is 200")

    def stop(self) -> None:
        self.process.stop()


class Alertmanager:
    """Alertmanager on a rendered copy of collector-config/alertmanager.yml."""

    def __init__(self, workdir: Path, *, webhook_url: str, group_interval: str = "1s") -> None:
        binary = require("alertmanager")
        self.port = free_port()
        config_dir = workdir / "alertmanager"
        config_dir.mkdir(parents=True, exist_ok=True)
        self.config = render_alertmanager_config(
            config_dir, webhook_url=webhook_url, group_interval=group_interval
        )
        self.process = ManagedProcess(
            name="alertmanager",
            argv=[
                str(binary),
                f"--config.file={self.config}",
                f"--storage.path={config_dir / 'data'}",
                f"--web.listen-address={_loopback(self.port)}",
                # No gossip: a single instance, and no port 9094 to collide on.
                "--cluster.listen-address=",
            ],
            log_path=workdir / "alertmanager.log",
        )

    @property
    def address(self) -> str:
        """``127.0.0.1:port``, the target Prometheus sends alerts to."""
        return _loopback(self.port)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def alerts(self) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts``: the alerts Alertmanager currently holds."""
        return list(http_get_json(f"{self.url}/api/v2/alerts"))

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(lambda: _http_ok(f"{self.url}/-/ready"), "/-/ready is 200")

    def stop(self) -> None:
        self.process.stop()


class Redis:
    """A throwaway redis-server on loopback, without persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = require("redis-server")
        self.port = free_port()
        data_dir = workdir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            name="redis",
            argv=[
                str(binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data_dir),
            ],
            log_path=workdir / "redis.log",
        )

    @property
    def url(self) -> str:
        return f"redis://{_loopback(self.port)}/0"

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(self.ping, "PING answers PONG")

    def stop(self) -> None:
        self.process.stop()


class UvicornApp:
    """An ASGI app served by a real uvicorn on loopback, exporting OTLP to ``otlp_endpoint``.

    The OpenTelemetry SDK is configured through the standard variables, with short export
    intervals so data shows up quickly. ``env`` adds or overrides variables.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        app: str = "otel_bgtasks.demo.app:app",
        otlp_endpoint: str,
        service_name: str,
        ready_path: str = "/bgtasks/health",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.ready_path = ready_path
        self.process = ManagedProcess(
            name=f"uvicorn-{service_name}",
            argv=[
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
            ],
            log_path=workdir / f"{service_name}.log",
            cwd=workdir,
            env={
                "OTEL_SERVICE_NAME": service_name,
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
                "OTEL_BLRP_SCHEDULE_DELAY": "200",
                **(env or {}),
            },
        )

    @property
    def url(self) -> str:
        return f"http://{_loopback(self.port)}"

    def get(self, path: str) -> tuple[int, bytes]:
        return http_get(f"{self.url}{path}")

    def post(self, path: str, data: bytes = b"") -> int:
        return _http_post(f"{self.url}{path}", data)

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(
            lambda: http_get(f"{self.url}{self.ready_path}", timeout=2.0)[0] < 500,
            f"GET {self.ready_path} answers",
        )

    def stop(self) -> None:
        """SIGTERM: uvicorn shuts down gracefully, so the app can flush its telemetry."""
        self.process.stop(timeout=30.0)


class AlertWebhook:
    """Records the notifications Alertmanager POSTs (a webhook receiver on loopback)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notifications: list[dict[str, Any]] = []
        webhook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with webhook._lock:
                    webhook._notifications.append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Keep request logs out of the test output."""

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="alert-webhook", daemon=True
        )

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}/alerts"

    @property
    def notifications(self) -> list[dict[str, Any]]:
        """Every POSTed body (Alertmanager webhook payloads), oldest first."""
        with self._lock:
            return list(self._notifications)

    def alerts(
        self, alertname: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        """The alerts in all notifications, optionally filtered by name and status."""
        return [
            alert
            for notification in self.notifications
            for alert in notification.get("alerts", [])
            if (alertname is None or alert["labels"].get("alertname") == alertname)
            and (status is None or alert.get("status") == status)
        ]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


# --------------------------------------------------------------------------- the whole stack


@dataclass
class TelemetryStack:
    """Collector -> Jaeger and Prometheus -> Alertmanager -> webhook, all on loopback."""

    workdir: Path
    metrics_path: str
    jaeger: Jaeger
    collector: Collector
    prometheus: Prometheus
    alertmanager: Alertmanager | None
    webhook: AlertWebhook | None

    def logs(self) -> str:
        """Log tails of every process, for assertion messages."""
        processes = [self.jaeger.process, self.collector.process, self.prometheus.process]
        if self.alertmanager is not None:
            processes.append(self.alertmanager.process)
        return "\n".join(f"--- {p.name} ({p.log_path})\n{p.log_tail()}" for p in processes)


@contextlib.contextmanager
def telemetry_stack(
    workdir: Path,
    *,
    alerting: bool = True,
    for_duration: str | None = "0s",
    rule_replacements: Mapping[str, str] | None = None,
    collector_env: Mapping[str, str] | None = None,
    metrics_path: str = "scrape",
) -> Iterator[TelemetryStack]:
    """Start Jaeger, the collector, Prometheus and (with ``alerting``) Alertmanager plus a
    webhook receiver; stop them all on exit, in reverse order.

    ``metrics_path`` (a key of :data:`METRICS_PATHS`) says how metrics reach Prometheus.

    Skips (or fails under ``OTEL_BGTASKS_REQUIRE_INFRA=1``) before starting anything when a
    binary is missing. ``for_duration`` and ``rule_replacements`` go to
    :func:`render_alert_rules`.
    """
    for name in ("jaeger", "otelcol", "prometheus", *(("alertmanager",) if alerting else ())):
        require(name)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        jaeger = Jaeger(workdir)
        stack.callback(jaeger.stop)
        jaeger.start()

        push = metrics_path == "push"
        prometheus_port = free_port()
        collector = Collector(
            workdir,
            jaeger_otlp_grpc=jaeger.otlp_grpc_address,
            metrics_path=metrics_path,
            prometheus_otlp_endpoint=f"http://{_loopback(prometheus_port)}/api/v1/otlp",
            env=collector_env,
        )
        stack.callback(collector.stop)
        collector.start()

        webhook: AlertWebhook | None = None
        alertmanager: Alertmanager | None = None
        if alerting:
            webhook = AlertWebhook()
            webhook.start()
            stack.callback(webhook.stop)
            alertmanager = Alertmanager(workdir, webhook_url=webhook.url)
            stack.callback(alertmanager.stop)
            alertmanager.start()

        prometheus = Prometheus(
            workdir,
            # Push: the otel-collector job scrapes the collector's own metrics instead.
            collector_target=collector.telemetry_target if push else collector.prometheus_target,
            # Without Alertmanager, point at a closed port: Prometheus only logs the failures.
            alertmanager_target=alertmanager.address if alertmanager else _loopback(free_port()),
            for_duration=for_duration,
            rule_replacements=rule_replacements,
            otlp_receiver=push,
            port=prometheus_port,
        )
        stack.callback(prometheus.stop)
        prometheus.start()

        yield TelemetryStack(
            workdir=workdir,
            metrics_path=metrics_path,
            jaeger=jaeger,
            collector=collector,
            prometheus=prometheus,
            alertmanager=alertmanager,
            webhook=webhook,
        )
