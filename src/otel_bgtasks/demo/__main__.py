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
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from otel_bgtasks.alerting import (
    Alert,
    CircuitOpened,
    ConsecutiveFailures,
    DeadLetterMoves,
    Notifier,
    install_alerting,
)

__all__ = ["main"]

_OUTCOME_STYLE = {
    "success": "green",
    "failure": "red",
    "dead_lettered": "magenta",
    "rejected": "yellow",
    "timeout": "red",
}


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


def _short(attributes: Any) -> str:
    """Attributes without the `bgtasks.` prefixes, so the table fits a terminal."""
    return ", ".join(
        f"{k.removeprefix('bgtasks.').removeprefix('task.')}="
        + (f"{v:.3f}" if isinstance(v, float) else f"{v!s}")
        for k, v in sorted(attributes.items())
        if k != "exception.message"
    )


def _configure_logs() -> None:
    """Warnings and errors only, one line each: the report is the main output."""
    import logging

    import structlog

    from otel_bgtasks.logs import TraceContextProcessor

    def one_line(sio: Any, exc_info: Any) -> None:
        sio.write(f"\n    {exc_info[0].__name__}: {exc_info[1]}")

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            TraceContextProcessor(),
            structlog.dev.ConsoleRenderer(exception_formatter=one_line),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )


def _describe(span: ReadableSpan) -> str:
    attrs = span.attributes or {}
    outcome = str(attrs.get("bgtasks.task.outcome", "?"))
    style = _OUTCOME_STYLE.get(outcome, "white")
    duration = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
    extra = ""
    if outcome != "success":
        extra = f" {attrs.get('error.type', '')} [{attrs.get('bgtasks.error.category', '')}]"
    return (
        f"[bold]{span.name}[/] [{style}]{outcome}[/]{extra} "
        f"attempts={attrs.get('bgtasks.task.attempts')} {duration:.1f} ms "
        f"[dim]trace {span.context.trace_id:032x}[/]"
    )


def _add_task(node: Tree, span: ReadableSpan, spans: Sequence[ReadableSpan]) -> None:
    branch = node.add(_describe(span))
    for event in span.events:
        if event.name == "exception":
            continue
        details = _short(event.attributes or {})
        branch.add(f"[cyan]{event.name}[/] [dim]{details}[/]")
    for child in spans:
        if child.parent is not None and child.parent.span_id == span.context.span_id:
            branch.add(f"{child.name} [dim](child span)[/]")


def _report(
    console: Console,
    spans: Sequence[ReadableSpan],
    reader: InMemoryMetricReader,
    dead_before: list[Any],
    dead_after: list[Any],
    alerts: list[str],
) -> None:
    tasks = [s for s in spans if s.name.startswith("process ")]
    by_link: dict[int, list[ReadableSpan]] = {}
    for task in tasks:
        for link in task.links:
            by_link.setdefault(link.context.span_id, []).append(task)
    requests = sorted(
        (s for s in spans if s.kind is SpanKind.SERVER), key=lambda s: s.start_time or 0
    )
    tree = Tree("[bold]Requests and the background tasks they scheduled[/]")
    for request in requests:
        node = tree.add(
            f"[bold blue]{request.name}[/] [dim]trace {request.context.trace_id:032x}[/]"
        )
        for task in by_link.get(request.context.span_id, []):
            _add_task(node, task, spans)
            for replay in by_link.get(task.context.span_id, []):
                _add_task(node.add("[italic]replayed from the dead letters:[/]"), replay, spans)
    console.print(tree)

    table = Table(title="Metrics (as exported)", show_lines=False)
    for column in ("instrument", "attributes", "value"):
        table.add_column(column)
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    attrs = _short(point.attributes or {})
                    if isinstance(point, HistogramDataPoint):
                        mean = point.sum / point.count if point.count else 0.0
                        value = f"count={point.count} mean={mean * 1000:.1f} ms"
                    else:
                        value = str(getattr(point, "value", ""))
                    table.add_row(f"{metric.name} [dim]{metric.unit}[/]", attrs, value)
    console.print(table)

    dlq = Table(
        title=f"Dead letters: {len(dead_before)} stored, {len(dead_after)} left after replay"
    )
    for column in ("task", "reason", "category", "error", "attempts"):
        dlq.add_column(column)
    for entry in dead_before:
        dlq.add_row(
            entry.task_name,
            entry.reason.value,
            entry.category,
            f"{entry.error_type}: {entry.error_message}"[:60],
            str(entry.attempts),
        )
    console.print(dlq)
    if alerts:
        console.print("[bold]In-process alerts[/]")
        for line in alerts:
            console.print(f"  {line}")


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
    parser.parse_args(argv)
    import uvicorn

    from otel_bgtasks import BackgroundTasksInstrumentor, configure_telemetry
    from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore

    console = Console()
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
        try:
            before, after = asyncio.run(
                _traffic(f"http://127.0.0.1:{port}", current_executor(), breaker_wait=1.1)
            )
        finally:
            server.should_exit = True
            thread.join(5)
        telemetry.tracer_provider.force_flush()
        alerting.force_flush()
        _report(console, exporter.get_finished_spans(), reader, before, after, alerts)
        instrumentor.uninstrument()
        store.close()
    telemetry.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
