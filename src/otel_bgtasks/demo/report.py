"""The demo's terminal report: requests and their tasks, the task metrics, the dead letters.

Values are rendered in each instrument's own unit (UCUM, as OpenTelemetry declares it): a
histogram in `s` or `ms` shows durations, one in `By` shows bytes, `{task}`-style units are
plain counts. The package's own `bgtasks.*` instruments come first; the upstream HTTP
instrumentation's metrics are summarised in a line, or listed in full with ``--http``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from otel_bgtasks import CircuitState, DeadLetter

__all__ = [
    "METRIC_ORDER",
    "MetricRow",
    "format_point",
    "format_quantity",
    "http_summary",
    "metric_rows",
    "render_report",
]

METRIC_ORDER: tuple[str, ...] = (
    "bgtasks.task.duration",
    "bgtasks.task.wait",
    "bgtasks.task.retries",
    "bgtasks.task.active",
    "bgtasks.task.skipped",
    "bgtasks.task.pending",
    "bgtasks.dlq.moves",
    "bgtasks.dlq.replays",
    "bgtasks.dlq.depth",
    "bgtasks.dlq.write_errors",
    "bgtasks.circuit.state",
    "bgtasks.circuit.transitions",
    "bgtasks.alerts.sent",
)
"""The order of the package's instruments in the table; other `bgtasks.*` ones follow."""

_OWN_PREFIX = "bgtasks."
_SECONDS_PER = {"ns": 1e-9, "us": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
_BYTES_PER = {"By": 1, "KiBy": 1024, "MiBy": 1024**2, "GiBy": 1024**3, "kBy": 1000, "MBy": 10**6}
_HTTP_DURATIONS = ("http.server.request.duration", "http.server.duration")
_STATUS_KEYS = ("http.response.status_code", "http.status_code")

_OUTCOME_STYLE = {
    "success": "green",
    "failure": "red",
    "dead_lettered": "magenta",
    "rejected": "yellow",
    "timeout": "red",
}


@dataclass(frozen=True, slots=True)
class MetricRow:
    """One data point of the metric table, rendered."""

    instrument: str
    unit: str
    attributes: str
    value: str


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    size = abs(seconds)
    if size == 0:
        return "0 ms"
    if size < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if size < 1:
        return f"{seconds * 1e3:.1f} ms"
    if size < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


def _bytes(count: float) -> str:
    size = abs(count)
    if size < 1024:
        return f"{count:.0f} B"
    if size < 1024**2:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024**2:.1f} MiB"


def format_quantity(value: float, unit: str) -> str:
    """`value` measured in `unit`, for a reader: durations in µs/ms/s/min, sizes in B/KiB/MiB,
    annotations like ``{task}`` and ``1`` as plain numbers, anything else with its unit."""
    if unit in _SECONDS_PER:
        return _duration(value * _SECONDS_PER[unit])
    if unit in _BYTES_PER:
        return _bytes(value * _BYTES_PER[unit])
    if unit in ("", "1") or (unit.startswith("{") and unit.endswith("}")):
        return _number(value)
    return f"{_number(value)} {unit}"


def format_point(point: Any, unit: str, *, instrument: str = "") -> str:
    """A histogram point as count, mean and max; a counter or gauge as its value."""
    if isinstance(point, HistogramDataPoint):
        if not point.count:
            return "count=0"
        mean = point.sum / point.count
        return (
            f"count={point.count} mean={format_quantity(mean, unit)} "
            f"max={format_quantity(point.max, unit)}"
        )
    value = getattr(point, "value", None)
    if not isinstance(value, int | float):
        return "?"
    text = format_quantity(value, unit)
    if instrument == "bgtasks.circuit.state" and int(value) in CircuitState._value2member_map_:
        text += f" ({CircuitState(int(value)).label})"
    return text


def _short(attributes: Mapping[str, Any] | None) -> str:
    """Attributes without the `bgtasks.` prefixes, so the table fits a terminal."""
    return ", ".join(
        f"{k.removeprefix('bgtasks.').removeprefix('task.')}="
        + (f"{v:.3f}" if isinstance(v, float) else f"{v!s}")
        for k, v in sorted((attributes or {}).items())
        if k != "exception.message"
    )


def _metrics(data: MetricsData | None) -> list[Metric]:
    if data is None:
        return []
    return [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]


def _rank(name: str) -> tuple[int, int, str]:
    if name in METRIC_ORDER:
        return (0, METRIC_ORDER.index(name), name)
    return (1 if name.startswith(_OWN_PREFIX) else 2, 0, name)


def _rows_of(metric: Metric) -> Iterable[MetricRow]:
    unit = metric.unit or ""
    points: list[Any] = list(metric.data.data_points)
    if metric.name in ("bgtasks.task.active", "bgtasks.task.pending") and all(
        isinstance(p, NumberDataPoint) and p.value == 0 for p in points
    ):
        # One row instead of a zero per task name: nothing is running (or waiting) any more.
        yield MetricRow(metric.name, unit, f"({len(points)} tasks)", "0")
        return
    for point in points:
        yield MetricRow(
            metric.name,
            unit,
            _short(point.attributes),
            format_point(point, unit, instrument=metric.name),
        )


def metric_rows(data: MetricsData | None, *, include_http: bool = False) -> list[MetricRow]:
    """The table's rows: the package's `bgtasks.*` instruments first (in `METRIC_ORDER`),
    then, with `include_http`, every other instrument (upstream's HTTP metrics) by name."""
    metrics = sorted(_metrics(data), key=lambda m: _rank(m.name))
    return [
        row
        for metric in metrics
        if include_http or metric.name.startswith(_OWN_PREFIX)
        for row in _rows_of(metric)
    ]


def http_summary(data: MetricsData | None) -> str | None:
    """Upstream's HTTP server metrics in one line (requests, mean and max duration, status
    codes), or None when there are none."""
    by_name = {m.name: m for m in _metrics(data)}
    metric = next((by_name[n] for n in _HTTP_DURATIONS if n in by_name), None)
    if metric is None:
        return None
    points = [p for p in metric.data.data_points if isinstance(p, HistogramDataPoint)]
    count = sum(p.count for p in points)
    if not count:
        return None
    unit = metric.unit or ""
    total = sum(p.sum for p in points)
    longest = max(p.max for p in points if p.count)
    statuses: dict[str, int] = {}
    for p in points:
        attrs = p.attributes or {}
        status = next((str(attrs[k]) for k in _STATUS_KEYS if k in attrs), "?")
        statuses[status] = statuses.get(status, 0) + p.count
    codes = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
    return (
        f"{count} requests (status {codes}), mean {format_quantity(total / count, unit)}, "
        f"max {format_quantity(longest, unit)} ({metric.name}; upstream counts the time of "
        "a request's background tasks in it)"
    )


def _describe(span: ReadableSpan) -> str:
    attrs = span.attributes or {}
    outcome = str(attrs.get("bgtasks.task.outcome", "?"))
    style = _OUTCOME_STYLE.get(outcome, "white")
    duration = ((span.end_time or 0) - (span.start_time or 0)) / 1e9
    extra = ""
    if outcome != "success":
        error = str(attrs.get("error.type", "")).rsplit(".", 1)[-1]
        category = str(attrs.get("bgtasks.error.category", ""))
        extra = f" {escape(error)} {escape(f'[{category}]')}"
    return (
        f"[bold]{escape(span.name)}[/] [{style}]{outcome}[/]{extra} "
        f"attempts={attrs.get('bgtasks.task.attempts')} {_duration(duration)} "
        f"[dim]trace {span.context.trace_id:032x}[/]"
    )


def _add_task(node: Tree, span: ReadableSpan, spans: Sequence[ReadableSpan]) -> None:
    branch = node.add(_describe(span))
    for event in span.events:
        if event.name == "exception":
            continue
        details = escape(_short(event.attributes))
        branch.add(f"[cyan]{escape(event.name)}[/] [dim]{details}[/]")
    for child in spans:
        if child.parent is not None and child.parent.span_id == span.context.span_id:
            branch.add(f"{escape(child.name)} [dim](child span)[/]")


def _tree(spans: Sequence[ReadableSpan]) -> Tree:
    tasks = [s for s in spans if s.name.startswith("process ")]
    by_link: dict[int, list[ReadableSpan]] = {}
    for task in tasks:
        for link in task.links:
            by_link.setdefault(link.context.span_id, []).append(task)
    requests = sorted(
        (s for s in spans if s.kind is SpanKind.SERVER), key=lambda s: s.start_time or 0
    )
    tree = Tree(
        "[bold]Requests and the background tasks they scheduled[/]\n"
        "[dim]each task runs in a trace of its own, linked to the request's trace[/]"
    )
    for request in requests:
        node = tree.add(
            f"[bold blue]{escape(request.name)}[/] [dim]trace {request.context.trace_id:032x}[/]"
        )
        for task in by_link.get(request.context.span_id, []):
            _add_task(node, task, spans)
            for replay in by_link.get(task.context.span_id, []):
                _add_task(node.add("[italic]replayed from the dead letters:[/]"), replay, spans)
    return tree


def _metric_table(data: MetricsData | None, include_http: bool) -> Table:
    table = Table(title="Metrics (as exported)")
    for column in ("instrument", "unit", "attributes", "value"):
        table.add_column(column)
    for row in metric_rows(data, include_http=include_http):
        table.add_row(row.instrument, escape(row.unit), escape(row.attributes), row.value)
    return table


def _dead_letter_table(before: Sequence[DeadLetter], after: Sequence[DeadLetter]) -> Table:
    table = Table(title=f"Dead letters: {len(before)} stored, {len(after)} left after replay")
    for column in ("task", "reason", "category", "error", "attempts"):
        table.add_column(column)
    for entry in before:
        error = f"{entry.error_type.rsplit('.', 1)[-1]}: {entry.error_message}"
        table.add_row(
            entry.task_name,
            entry.reason.value,
            entry.category,
            escape(error if len(error) <= 60 else error[:59] + "…"),
            str(entry.attempts),
        )
    return table


def render_report(
    console: Console,
    spans: Sequence[ReadableSpan],
    metrics: MetricsData | None,
    dead_before: Sequence[DeadLetter],
    dead_after: Sequence[DeadLetter],
    alerts: Sequence[str],
    *,
    include_http: bool = False,
) -> None:
    """Print the whole report: the span tree, the metric table, the dead letters, alerts."""
    console.print(_tree(spans))
    console.print(_metric_table(metrics, include_http))
    if not include_http:
        summary = http_summary(metrics)
        if summary is not None:
            console.print(
                f"[bold]HTTP[/] (upstream instrumentation): {escape(summary)}; "
                "[dim]--http lists every HTTP series[/]"
            )
    console.print(_dead_letter_table(dead_before, dead_after))
    if alerts:
        console.print("[bold]In-process alerts[/]")
        for line in alerts:
            console.print(f"  {line}")
