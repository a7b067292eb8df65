"""Shared pieces of the benchmarks: providers that export nowhere, worker processes, statistics.

Every figure a benchmark reports is a ratio against a baseline measured in the same run: the
machine is shared (other test runs load its two cores), so absolute times drift from minute to
minute. Variants are interleaved across rounds, each runs in its own process, and the median
over rounds is reported; per-round values are kept in the JSON so the spread can be judged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "NoopMetricExporter",
    "NoopSpanExporter",
    "WorkerError",
    "deadline_after",
    "emit",
    "interleaved",
    "median",
    "noop_providers",
    "per_round",
    "ratio",
    "rss_mb",
    "run_worker",
    "worker_main",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
_RESULT_PREFIX = "BENCH_RESULT "


class NoopSpanExporter(SpanExporter):
    """Accepts every batch and drops it: the SDK's whole pipeline runs, nothing leaves."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class NoopMetricExporter(MetricExporter):
    """A metric exporter that drops every collection (cumulative, like OTLP's default)."""

    def __init__(self) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})
        self._temporality = AggregationTemporality.CUMULATIVE

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


def noop_providers(
    *, export_interval_ms: int = 1000, simple: bool = False
) -> tuple[TracerProvider, MeterProvider, PeriodicExportingMetricReader]:
    """A tracer provider with a BatchSpanProcessor and a meter provider with a periodic reader,
    both exporting to in-process no-op exporters (the SDK does all its work, nothing is sent).

    `simple`: a SimpleSpanProcessor instead (spans exported on the thread that ends them, no
    export thread: what instruction counts use, as thread interleaving varies between runs).
    """
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    processor = SimpleSpanProcessor if simple else BatchSpanProcessor
    tracer_provider.add_span_processor(processor(NoopSpanExporter()))
    reader = PeriodicExportingMetricReader(
        NoopMetricExporter(), export_interval_millis=export_interval_ms
    )
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    return tracer_provider, meter_provider, reader


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def worker_main(
    doc: str | None,
    worker: Callable[[dict[str, Any]], Mapping[str, Any]],
    run: Callable[[], Mapping[str, Any]],
) -> None:
    """`python -m benchmarks.X`: the whole benchmark, or with --worker one variant."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--worker", help="JSON config: run one variant in this process")
    args = parser.parse_args()
    if args.worker:
        emit(worker(json.loads(args.worker)))
        return
    print(json.dumps(run(), indent=2))


def emit(result: Mapping[str, Any]) -> None:
    """Print a worker's result as the one line the parent parses."""
    sys.stdout.write(_RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


class WorkerError(RuntimeError):
    """A worker process failed or printed no result."""


def run_worker(module: str, config: Mapping[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run ``python -m <module> --worker <json config>`` in a fresh process; its result dict.

    Raises:
        WorkerError: the process failed, timed out, or printed no ``BENCH_RESULT`` line.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", module, "--worker", json.dumps(config)]
    try:
        proc = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise WorkerError(f"{module} {config} did not finish within {timeout}s") from exc
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            if proc.returncode != 0:
                break
            return dict(json.loads(line[len(_RESULT_PREFIX) :]))
    raise WorkerError(
        f"{module} {config} exited {proc.returncode} without a result;\n"
        f"stdout tail:\n{proc.stdout[-2000:]}\nstderr tail:\n{proc.stderr[-4000:]}"
    )


def interleaved(variants: Sequence[str], rounds: int) -> Iterable[tuple[int, str]]:
    """``(round, variant)`` pairs: each round runs every variant once, starting one further
    along (and reversed every other round) so no variant always runs first or after another."""
    count = len(variants)
    for r in range(rounds):
        order = [variants[(r + i) % count] for i in range(count)]
        if r % 2:
            order.reverse()
        for variant in order:
            yield r, variant


def median(values: Iterable[float]) -> float:
    """Median of the values (NaN when there are none)."""
    items = [v for v in values if v == v]  # drop NaN
    return statistics.median(items) if items else float("nan")


def per_round(
    samples: Mapping[str, Sequence[Mapping[str, Any]]],
    key: str,
    combine: Callable[[Mapping[str, float]], float],
) -> list[float]:
    """``combine({variant: sample[key]})`` for each round (rounds where every variant ran)."""
    rounds = min(len(v) for v in samples.values())
    return [combine({name: float(s[r][key]) for name, s in samples.items()}) for r in range(rounds)]


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is not positive."""
    return numerator / denominator if denominator > 0 else float("nan")


def deadline_after(seconds: float) -> float:
    """A time.monotonic() deadline."""
    return time.monotonic() + seconds
