"""Per-task cost of the instrumented path against uninstrumented, upstream and the bare contract.

Each variant runs in its own process with the same SDK setup (a BatchSpanProcessor with a no-op
exporter, a periodic metric reader with a no-op exporter) and the same loop: inside a recording
SERVER span, ``task = BackgroundTask(noop, i); await task()``, N times after a warm-up, timed in
batches (median batch). Variants:

- ``none``: nothing patched (the request span and Starlette's BackgroundTask only);
- ``upstream``: opentelemetry-instrumentation-fastapi's bare task span
  (``FastAPIInstrumentor.instrument_app`` patches ``BackgroundTask.__call__``);
- ``floor``: the signal contract's SDK calls written inline in the request loop, with no
  patching or wrapping of BackgroundTask (issue 13): the ``bgtasks.enqueued`` event on the
  request span, one CONSUMER span started with its link and four attributes, attached while
  Starlette's own task runs, the wait and duration histograms recorded in the task span's
  context (``context=``, as the package does, so exemplars count on both sides), two
  attributes set at the end, ``end()``. The floor ``ours`` is measured against;
- ``contract``: the same SDK calls from a patched ``BackgroundTask.__init__``/``__call__``,
  histograms recorded without a context (the older floor; the difference with ``floor`` is
  the patching layer plus exemplar handling);
- ``ours``: ``BackgroundTasksInstrumentor().instrument(..., dead_letter_store=None)``;
- ``ours_retry``: the same plus ``retry=RetryPolicy()`` (no task fails);
- ``ours_durable``: ``durable=True`` with a ``SQLiteDeadLetterStore`` on a temp file.

Reported: ns per task (process CPU time, all threads, and wall time), overhead = variant - none
in the same round, and overhead ratios (median over rounds of the per-round ratio).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from starlette.background import BackgroundTask

from benchmarks import _tasks
from benchmarks._common import (
    RESULTS_DIR,
    interleaved,
    median,
    noop_providers,
    per_round,
    ratio,
    run_worker,
    worker_main,
)

__all__ = ["VARIANTS", "run"]

VARIANTS = ("none", "upstream", "floor", "contract", "ours", "ours_retry", "ours_durable")

FULL = {"tasks": 20_000, "batches": 5, "warmup": 2_000, "rounds": 5}
QUICK = {"tasks": 3_000, "batches": 3, "warmup": 500, "rounds": 2}
PROFILE_TASKS = {"full": 60_000, "quick": 15_000}

# Targets from the issues: informational figures for the table, never assertions.
TARGETS = {
    "ours_over_upstream": 2.0,
    "ours_over_floor": 1.05,
    "ours_retry_over_ours": 1.02,
}


# -- variants (worker side) -------------------------------------------------------------------


CONTRACT_PARTS = ("event", "link", "attributes", "wait_histogram", "duration_histogram")
"""The pieces of the contract floor; `contract_parts` prices them one by one."""


def _install_contract(
    tracer_provider: TracerProvider,
    meter_provider: MeterProvider,
    parts: frozenset[str] = frozenset(CONTRACT_PARTS),
) -> None:
    """Patch BackgroundTask with the minimal code the signal contract requires.

    With every part (the default) this is the `contract` floor; fewer parts leave a span
    around the task (attached as the current span) plus what `parts` names.
    """
    from otel_bgtasks import attributes as attr
    from otel_bgtasks.metrics import DURATION_BUCKETS

    unknown = parts - set(CONTRACT_PARTS)
    if unknown:
        raise ValueError(f"unknown contract parts {sorted(unknown)}; known: {CONTRACT_PARTS}")
    event = "event" in parts
    with_link = "link" in parts
    with_attributes = "attributes" in parts
    tracer = tracer_provider.get_tracer("bench.contract")
    meter = meter_provider.get_meter("bench.contract")
    duration = (
        meter.create_histogram(
            "bgtasks.task.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS
        )
        if "duration_histogram" in parts
        else None
    )
    wait = (
        meter.create_histogram(
            "bgtasks.task.wait", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS
        )
        if "wait_histogram" in parts
        else None
    )
    original_init = BackgroundTask.__init__
    original_call = BackgroundTask.__call__

    def __init__(self: BackgroundTask, func: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, func, *args, **kwargs)
        current = trace.get_current_span()
        name = func.__qualname__
        task_id = f"{random.getrandbits(128):032x}"
        if event:
            current.add_event(attr.EVENT_ENQUEUED, {attr.TASK_NAME: name, attr.TASK_ID: task_id})
        self._contract = (name, task_id, current.get_span_context(), time.perf_counter())  # type: ignore[attr-defined]

    async def __call__(self: BackgroundTask) -> None:
        name, task_id, link, enqueued = self._contract  # type: ignore[attr-defined]
        started = time.perf_counter()
        func = self.func
        span = tracer.start_span(
            attr.SPAN_NAME_PREFIX + name,
            context=otel_context.Context(),
            kind=SpanKind.CONSUMER,
            links=[Link(link)] if with_link else None,
            attributes={
                attr.TASK_NAME: name,
                attr.TASK_ID: task_id,
                attr.CODE_FUNCTION_NAME: f"{func.__module__}.{func.__qualname__}",
                attr.TASK_WAIT: started - enqueued,
            }
            if with_attributes
            else None,
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        outcome = "success"
        try:
            await original_call(self)
        except Exception as exc:
            outcome = "failure"
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR))
        finally:
            otel_context.detach(token)
        if with_attributes:
            span.set_attribute(attr.TASK_ATTEMPTS, 1)
            span.set_attribute(attr.TASK_OUTCOME, outcome)
        if wait is not None:
            wait.record(started - enqueued, {attr.TASK_NAME: name})
        if duration is not None:
            duration.record(
                time.perf_counter() - started, {attr.TASK_NAME: name, attr.TASK_OUTCOME: outcome}
            )
        span.end()

    BackgroundTask.__init__ = __init__  # type: ignore[method-assign]
    BackgroundTask.__call__ = __call__  # type: ignore[method-assign]


def install(
    variant: str, tracer_provider: TracerProvider, meter_provider: MeterProvider, tmp: Path
) -> None:
    """Instrument this process as `variant` says."""
    if variant == "none":
        return
    if variant == "upstream":
        from fastapi import FastAPI
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            FastAPI(), tracer_provider=tracer_provider, meter_provider=meter_provider
        )
        return
    if variant == "floor":
        return  # written inline in `floor_loop`
    if variant == "contract":
        _install_contract(tracer_provider, meter_provider)
        return
    if variant.startswith("contract:"):  # contract:part+part (see contract_parts.py)
        parts = frozenset(p for p in variant.removeprefix("contract:").split("+") if p)
        _install_contract(tracer_provider, meter_provider, parts)
        return
    from otel_bgtasks import BackgroundTasksInstrumentor, CircuitBreaker, RetryPolicy

    kwargs: dict[str, Any] = {"dead_letter_store": None}
    if variant == "ours_retry":
        kwargs["retry"] = RetryPolicy()
    elif variant == "ours_circuit":  # not in VARIANTS: benchmarks/instructions.py prices it
        kwargs["circuit"] = CircuitBreaker()
    elif variant == "ours_timeout":  # likewise
        kwargs["timeout"] = 30.0
    elif variant == "ours_durable":
        from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore

        kwargs["durable"] = True
        kwargs["dead_letter_store"] = SQLiteDeadLetterStore(tmp / "durable.db")
    elif variant != "ours":
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    BackgroundTasksInstrumentor().instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider, **kwargs
    )


async def request_loop(tracer: trace.Tracer, count: int, start: int = 0) -> None:
    """`count` requests, each scheduling and running one background task inside its span."""
    func = _tasks.noop
    for i in range(start, start + count):
        with tracer.start_as_current_span("GET /work", kind=SpanKind.SERVER):
            task = BackgroundTask(func, i)
            await task()


Loop = Callable[[trace.Tracer, int, int], Awaitable[None]]


def floor_loop(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> Loop:
    """The `floor` request loop: the contract's SDK calls inline, nothing patched."""
    from otel_bgtasks import attributes as attr
    from otel_bgtasks.metrics import DURATION_BUCKETS

    task_tracer = tracer_provider.get_tracer("bench.floor")
    meter = meter_provider.get_meter("bench.floor")
    duration = meter.create_histogram(
        "bgtasks.task.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS
    )
    wait = meter.create_histogram(
        "bgtasks.task.wait", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS
    )
    func = _tasks.noop
    # Once per function, as any implementation would: names, the span name, metric attributes.
    name = func.__qualname__
    function = f"{func.__module__}.{func.__qualname__}"
    span_name = attr.SPAN_NAME_PREFIX + name
    wait_attrs = {attr.TASK_NAME: name}
    success_attrs = {attr.TASK_NAME: name, attr.TASK_OUTCOME: "success"}
    getrandbits = random.getrandbits
    perf_counter = time.perf_counter

    async def loop(tracer: trace.Tracer, count: int, start: int = 0) -> None:
        for i in range(start, start + count):
            with tracer.start_as_current_span("GET /work", kind=SpanKind.SERVER) as request:
                task = BackgroundTask(func, i)
                task_id = f"{getrandbits(128):032x}"
                request.add_event(
                    attr.EVENT_ENQUEUED, {attr.TASK_NAME: name, attr.TASK_ID: task_id}
                )
                link = request.get_span_context()
                enqueued = perf_counter()
                # (the response is sent here; the task runs after it)
                started = perf_counter()
                span = task_tracer.start_span(
                    span_name,
                    context=otel_context.Context(),
                    kind=SpanKind.CONSUMER,
                    links=[Link(link)],
                    attributes={
                        attr.TASK_NAME: name,
                        attr.TASK_ID: task_id,
                        attr.CODE_FUNCTION_NAME: function,
                        attr.TASK_WAIT: started - enqueued,
                    },
                )
                span_context = trace.set_span_in_context(span)
                wait.record(started - enqueued, wait_attrs, context=span_context)
                token = otel_context.attach(span_context)
                try:
                    await task()
                finally:
                    otel_context.detach(token)
                duration.record(perf_counter() - started, success_attrs, context=span_context)
                span.set_attribute(attr.TASK_ATTEMPTS, 1)
                span.set_attribute(attr.TASK_OUTCOME, "success")
                span.end()

    return loop


async def _measure(
    tracer: trace.Tracer, config: dict[str, Any], loop: Loop | None = None
) -> dict[str, Any]:
    if loop is None:
        loop = request_loop
    batches = int(config["batches"])
    per_batch = max(1, int(config["tasks"]) // batches)
    await loop(tracer, int(config["warmup"]), 0)
    cpu_ns: list[float] = []
    wall_ns: list[float] = []
    for b in range(batches):
        wall0, cpu0 = time.perf_counter_ns(), time.process_time_ns()
        await loop(tracer, per_batch, b * per_batch)
        cpu_ns.append((time.process_time_ns() - cpu0) / per_batch)
        wall_ns.append((time.perf_counter_ns() - wall0) / per_batch)
    return {
        "cpu_ns": median(cpu_ns),
        "wall_ns": median(wall_ns),
        "cpu_ns_batches": cpu_ns,
        "wall_ns_batches": wall_ns,
        "tasks": per_batch * batches,
    }


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """Run one variant in this process; with ``profile`` write a pyinstrument report."""
    # Counting instructions: no time-dependent work (periodic collections, an export thread
    # whose interleaving with the loop varies from run to run).
    count_only = bool(config.get("count_only"))
    tracer_provider, meter_provider, _reader = noop_providers(
        export_interval_ms=10**9 if count_only else 1000, simple=count_only
    )
    tracer = tracer_provider.get_tracer("bench.request")
    with tempfile.TemporaryDirectory(prefix="bgtasks-bench-") as tmp:
        install(config["variant"], tracer_provider, meter_provider, Path(tmp))
        if config.get("profile"):
            return _profile(tracer, config)
        loop = floor_loop(tracer_provider, meter_provider) if config["variant"] == "floor" else None
        if config.get("count_only"):  # benchmarks/instructions.py: run, time nothing
            asyncio.run((loop or request_loop)(tracer, int(config["tasks"]), 0))
            return {"variant": config["variant"], "tasks": int(config["tasks"])}
        result = asyncio.run(_measure(tracer, config, loop))
    result["variant"] = config["variant"]
    return result


# -- profile ----------------------------------------------------------------------------------


def _category(path: str) -> str:
    if "/otel_bgtasks/" in path:
        return "otel_bgtasks"
    if "/opentelemetry/sdk/" in path:
        return "opentelemetry-sdk"
    if "/opentelemetry/" in path:
        return "opentelemetry-api"
    if "/starlette/" in path:
        return "starlette"
    if "/benchmarks/" in path:
        return "benchmark loop"
    if "/asyncio/" in path:
        return "asyncio"
    return "other (stdlib, builtins)"


def _split_identifier(identifier: str) -> tuple[str, str, str]:
    """(function, file, class) of a pyinstrument frame identifier."""
    parts = identifier.split("\x00")
    function = parts[0]
    path = parts[1] if len(parts) > 1 else ""
    cls = ""
    if len(parts) > 2:
        for attr in parts[2].split("\x01")[1:]:
            if attr.startswith("c"):
                cls = attr[1:]
    return function, path, cls


def self_time_summary(frame_records: list[tuple[list[str], float]]) -> dict[str, Any]:
    """Self time per frame and per category from pyinstrument's raw samples.

    A built-in function's time goes to the built-in frame, but its category is that of the
    nearest Python caller (``dict.get`` called from the SDK counts as SDK).
    """
    by_frame: dict[tuple[str, str, str], float] = {}
    by_category: dict[str, float] = {}
    total = 0.0
    for stack, seconds in frame_records:
        if not stack:
            continue
        total += seconds
        leaf = _split_identifier(stack[-1])
        category = "other (stdlib, builtins)"
        for identifier in reversed(stack):
            _, path, _ = _split_identifier(identifier)
            if path and not path.startswith("<"):
                category = _category(path)
                break
        key = (category, f"{leaf[2] + '.' if leaf[2] else ''}{leaf[0]}", leaf[1])
        by_frame[key] = by_frame.get(key, 0.0) + seconds
        by_category[category] = by_category.get(category, 0.0) + seconds
    top = sorted(by_frame.items(), key=lambda item: item[1], reverse=True)
    return {
        "total_s": total,
        "categories": {
            k: {"self_s": v, "share": ratio(v, total)}
            for k, v in sorted(by_category.items(), key=lambda item: -item[1])
        },
        "top": [
            {
                "category": c,
                "function": f,
                "file": _short(p),
                "self_s": s,
                "share": ratio(s, total),
            }
            for (c, f, p), s in top[:40]
        ],
    }


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _profile(tracer: trace.Tracer, config: dict[str, Any]) -> dict[str, Any]:
    from pyinstrument import Profiler

    asyncio.run(request_loop(tracer, int(config["warmup"])))
    profiler = Profiler(interval=0.0001, async_mode="disabled")
    tasks = int(config["tasks"])

    async def profiled() -> None:
        profiler.start()
        try:
            await request_loop(tracer, tasks)
        finally:
            profiler.stop()

    asyncio.run(profiled())
    session = profiler.last_session
    assert session is not None
    summary = self_time_summary(session.frame_records)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / str(config.get("output", "profile.txt"))
    lines = [
        f"pyinstrument profile of the per_task `{config['variant']}` variant: {tasks} requests,",
        "each scheduling and running one no-op async BackgroundTask inside a recording span",
        "(BatchSpanProcessor + no-op exporter, periodic metric reader + no-op exporter).",
        "Main thread only (the span processor's export thread is not sampled).",
        "",
        "== Self time by category (built-ins count for their nearest Python caller) ==",
    ]
    for name, row in summary["categories"].items():
        lines.append(f"{row['share'] * 100:6.1f}%  {row['self_s']:8.3f}s  {name}")
    lines += ["", "== Top self-time frames =="]
    for row in summary["top"]:
        lines.append(
            f"{row['share'] * 100:6.1f}%  {row['self_s']:8.3f}s  [{row['category']}] "
            f"{row['function']}  {row['file']}"
        )
    lines += [
        "",
        "== Call tree (pyinstrument, all frames) ==",
        profiler.output_text(unicode=True, color=False, show_all=True),
    ]
    out.write_text("\n".join(lines) + "\n")
    summary["report"] = str(out.relative_to(RESULTS_DIR.parents[1]))
    summary["tasks"] = tasks
    summary["per_task_us_profiled"] = summary["total_s"] / tasks * 1e6
    summary["top"] = summary["top"][:15]
    return summary


# -- orchestration (parent side) --------------------------------------------------------------


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    """Run every variant in its own process, interleaved over rounds; figures and ratios."""
    config = dict(QUICK if quick else FULL)
    if rounds is not None:
        config["rounds"] = rounds
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r, variant in interleaved(VARIANTS, int(config["rounds"])):
        result = run_worker(
            "benchmarks.per_task",
            {**config, "variant": variant},
            timeout=300,
        )
        samples[variant].append(result)
        log(f"  per_task round {r + 1}: {variant:<13} {result['cpu_ns'] / 1000:8.1f} us cpu/task")
    return summarize(samples, config)


RATIOS = {
    "ours_over_upstream": ("ours", "upstream"),
    "ours_over_floor": ("ours", "floor"),
    "contract_over_floor": ("contract", "floor"),
    "ours_over_contract": ("ours", "contract"),
    "ours_retry_over_ours": ("ours_retry", "ours"),
    "ours_durable_over_ours": ("ours_durable", "ours"),
}


def _clock_figures(samples: dict[str, list[dict[str, Any]]], clock: str) -> dict[str, Any]:
    """Per-task times, overheads (variant - none, per round) and ratios for one clock."""

    def overhead(values: dict[str, float], name: str) -> float:
        return values[name] - values["none"]

    per_task_us = {v: median(s[clock] for s in samples[v]) / 1000 for v in VARIANTS}
    overhead_us = {
        v: median(per_round(samples, clock, lambda vals, v=v: overhead(vals, v))) / 1000
        for v in VARIANTS
        if v != "none"
    }
    ratios: dict[str, Any] = {}
    for key, (a, b) in RATIOS.items():
        per_round_overhead = per_round(
            samples, clock, lambda vals, a=a, b=b: ratio(overhead(vals, a), overhead(vals, b))
        )
        ratios[key] = {
            "overhead_ratio": median(per_round_overhead),
            "overhead_ratio_per_round": per_round_overhead,
            "total_time_ratio": median(
                per_round(samples, clock, lambda vals, a=a, b=b: ratio(vals[a], vals[b]))
            ),
        }
    return {"per_task_us": per_task_us, "overhead_us": overhead_us, "ratios": ratios}


def summarize(samples: dict[str, list[dict[str, Any]]], config: dict[str, Any]) -> dict[str, Any]:
    """Figures for both clocks (process CPU time is the primary one) plus the raw samples."""
    return {
        "config": config,
        "primary_clock": "cpu",
        "clocks": {
            "cpu": _clock_figures(samples, "cpu_ns"),
            "wall": _clock_figures(samples, "wall_ns"),
        },
        "samples": {
            v: [{"cpu_ns": s["cpu_ns"], "wall_ns": s["wall_ns"]} for s in samples[v]]
            for v in VARIANTS
        },
    }


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows (figure, value, target) for the summary table."""
    rows: list[tuple[str, str, str]] = []
    cpu = figures["clocks"]["cpu"]
    wall = figures["clocks"]["wall"]
    for v in VARIANTS:
        extra = ""
        if v != "none":
            extra = f", overhead {cpu['overhead_us'][v]:.1f} us"
        rows.append(
            (
                f"per_task {v}",
                f"{cpu['per_task_us'][v]:.1f} us cpu (wall {wall['per_task_us'][v]:.1f}){extra}",
                "",
            )
        )
    targets = {
        "ours_over_upstream": "<= 2.0",
        "ours_over_floor": "<= 1.05",
        "contract_over_floor": "(report)",
        "ours_over_contract": "(report)",
        "ours_retry_over_ours": "<= 1.02",
        "ours_durable_over_ours": "(report)",
    }
    for key, target in targets.items():
        r = cpu["ratios"][key]
        rw = wall["ratios"][key]
        rows.append(
            (
                f"per_task {key} (overhead)",
                f"{r['overhead_ratio']:.2f} cpu, {rw['overhead_ratio']:.2f} wall "
                f"(total time {r['total_time_ratio']:.2f})",
                target,
            )
        )
    return rows


def main() -> None:
    worker_main(__doc__, worker, run)


if __name__ == "__main__":
    main()
