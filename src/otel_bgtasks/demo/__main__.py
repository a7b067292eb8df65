"""The demo: an instrumented FastAPI app on loopback, real traffic, a terminal report.

    python -m otel_bgtasks.demo          (or: otel-bgtasks demo)

No servers needed: spans and metrics are read back in memory and dead letters go to a SQLite
file in a temporary directory. With OTEL_EXPORTER_OTLP_ENDPOINT set, everything is exported
there too (e.g. to the collector of `docker compose up`).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rich.console import Console

from otel_bgtasks.alerting import (
    Alert,
    CircuitOpened,
    ConsecutiveFailures,
    DeadLetterMoves,
    Notifier,
    install_alerting,
)
from otel_bgtasks.demo.report import render_report

__all__ = ["main"]


class _ReportNotifier(Notifier):
    """Collects alerts for the report (a real app would use Slack, a webhook or e-mail)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def send(self, alert: Alert) -> None:
        style = "red" if alert.status == "firing" else "green"
        self.lines.append(
            f"[{style}]{alert.status}[/] {alert.severity} {alert.rule}: {alert.summary}"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _configure_logs() -> None:
    """Warnings and errors only, one line each: the report is the main output."""
    import logging

    import structlog

    from otel_bgtasks.logs import TraceContextProcessor

    def one_line(sio: Any, exc_info: Any) -> None:
        sio.write(f"\n    {exc_info[0].__name__}: {exc_info[1]}")

    def fewer_ids(logger: Any, method: str, event_dict: Any) -> Any:
        # The trace id is what a reader follows to Jaeger; span and task ids only add width.
        event_dict.pop("span_id", None)
        event_dict.pop("task_id", None)
        return event_dict

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            TraceContextProcessor(),
            fewer_ids,
            structlog.dev.ConsoleRenderer(exception_formatter=one_line, colors=sys.stdout.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )


async def _wait_idle(executor: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while executor.inflight and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a dict
        await asyncio.sleep(0.02)


async def _traffic(base: str, executor: Any, breaker_wait: float) -> tuple[list[Any], list[Any]]:
    from otel_bgtasks.replay import DeadLetters, run_dead_letter

    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for path in ("/ok", "/sync", "/fail", "/flaky", "/durable"):
            (await client.get(path)).raise_for_status()
        await _wait_idle(executor)
        for _ in range(5):  # three failures open the breaker, two are rejected
            (await client.get("/downstream")).raise_for_status()
            await _wait_idle(executor)
        letters = DeadLetters(executor.store)
        before = letters.list()
        (await client.post("/downstream/up")).raise_for_status()
        await asyncio.sleep(breaker_wait)  # let the breaker half-open before replaying
        await letters.replay(None, run_dead_letter, task="charge-card")
        await _wait_idle(executor)
        return before, letters.list()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and print the report; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="otel-bgtasks demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help="list every series of the upstream HTTP instrumentation (default: one summary line)",
    )
    args = parser.parse_args(argv)
    import uvicorn

    from otel_bgtasks import BackgroundTasksInstrumentor, configure_telemetry
    from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore

    console = Console()
    if not console.is_terminal:  # piped (make demo | less, CI logs): 80 columns cut the names
        console = Console(width=120)
    _configure_logs()
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = configure_telemetry(
        service_name="bgtasks-demo",
        span_processors=[SimpleSpanProcessor(exporter)],
        metric_readers=[reader],
    )
    alerts: list[str] = []
    alerting = install_alerting(
        telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        rules=[ConsecutiveFailures(2), CircuitOpened(), DeadLetterMoves(more_than=3)],
        notifiers=[_ReportNotifier(alerts)],
        tick_interval=0.1,
    )
    with tempfile.TemporaryDirectory(prefix="bgtasks-demo-") as tmp:
        store = SQLiteDeadLetterStore(str(Path(tmp) / "dead-letters.db"))
        instrumentor = BackgroundTasksInstrumentor()
        instrumentor.instrument(dead_letter_store=store)
        from otel_bgtasks._execution import active_executor as current_executor
        from otel_bgtasks.demo.app import PAYMENTS, create_app

        PAYMENTS.config = type(PAYMENTS.config)(3, 1.0, 1)  # a short open period for the demo
        app = create_app()
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        console.rule("[bold]otel-bgtasks demo")
        console.print(f"app on http://127.0.0.1:{port}; sending traffic ...")
        console.print(
            "[dim]The app's own log follows (warnings and errors): the failures are on purpose,"
            " each task is made to succeed, fail, retry or trip the breaker.[/]"
        )
        try:
            before, after = asyncio.run(
                _traffic(f"http://127.0.0.1:{port}", current_executor(), breaker_wait=1.1)
            )
        finally:
            server.should_exit = True
            thread.join(5)
        telemetry.tracer_provider.force_flush()
        alerting.force_flush()
        render_report(
            console,
            exporter.get_finished_spans(),
            reader.get_metrics_data(),
            before,
            after,
            alerts,
            include_http=args.http,
        )
        instrumentor.uninstrument()
        store.close()
    telemetry.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
