"""Memory over a million tasks through the instrumented path, in one process.

The package is instrumented (``dead_letter_store=None``) with a BatchSpanProcessor and a
periodic metric reader, both exporting to no-op exporters. Each iteration is a request span
scheduling one ``BackgroundTask`` and awaiting it; one task in 50 is a closure made for that
request (the per-request-closure pattern, which must not grow the executor's description cache
past its bound). RSS is sampled every ``sample_every`` tasks.

Reported: RSS after the warm-up and at the end, and their difference (target < 20 MB); then the
retention checks: ``Executor.inflight`` empty, the description cache within its bound (max
seen at any sample), the active-task counts back to zero, no live ``TaskCallState`` or
``BackgroundTask`` after ``gc.collect()``, and tracemalloc's net growth between two equal
batches run after the main loop (bytes retained per task, ~0 when nothing is kept).
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from typing import Any

from opentelemetry.trace import SpanKind
from starlette.background import BackgroundTask

from benchmarks import _tasks
from benchmarks._common import noop_providers, rss_mb, run_worker, worker_main

__all__ = ["run"]

FULL = {
    "tasks": 1_000_000,
    "warmup": 50_000,
    "sample_every": 50_000,
    "tracemalloc_batch": 10_000,
    "max_seconds": 420,
}
QUICK = {
    "tasks": 100_000,
    "warmup": 10_000,
    "sample_every": 10_000,
    "tracemalloc_batch": 3_000,
    "max_seconds": 90,
}
GROWTH_TARGET_MB = 20.0
CLOSURE_EVERY = 50


def _closure(n: int) -> Any:
    async def per_request_task(m: int) -> None:
        return None

    return per_request_task


async def _loop(tracer: Any, start: int, count: int) -> None:
    noop = _tasks.noop
    for i in range(start, start + count):
        func = _closure(i) if i % CLOSURE_EVERY == 0 else noop
        with tracer.start_as_current_span("GET /work", kind=SpanKind.SERVER):
            task = BackgroundTask(func, i)
            await task()


def _live(cls: type) -> int:
    return sum(1 for obj in gc.get_objects() if type(obj) is cls)


def worker(config: dict[str, Any]) -> dict[str, Any]:
    from otel_bgtasks import BackgroundTasksInstrumentor, TaskCallState
    from otel_bgtasks._execution import active_executor as current_executor

    tracer_provider, meter_provider, _reader = noop_providers()
    tracer = tracer_provider.get_tracer("bench.request")
    BackgroundTasksInstrumentor().instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider, dead_letter_store=None
    )
    executor = current_executor()
    assert executor is not None
    total = int(config["tasks"])
    warmup = int(config["warmup"])
    every = int(config["sample_every"])
    deadline = time.monotonic() + float(config["max_seconds"])
    rss_start = rss_mb()
    samples: list[tuple[int, float]] = []
    described_max = 0
    done = 0
    started = time.perf_counter()

    async def main() -> None:
        nonlocal done, described_max
        while done < total and time.monotonic() < deadline:
            step = min(every, total - done)
            await _loop(tracer, done, step)
            done += step
            described_max = max(described_max, len(executor._described))
            samples.append((done, rss_mb()))

    asyncio.run(main())
    elapsed = time.perf_counter() - started
    after_warmup = next((rss for n, rss in samples if n >= warmup), samples[0][1])
    rss_end = samples[-1][1]

    # Retention: live objects once the loop is done.
    tracer_provider.force_flush()
    gc.collect()
    live_states = _live(TaskCallState)
    live_tasks = _live(BackgroundTask)

    # Net allocation growth between two equal batches (tracemalloc, after the main loop).
    batch = int(config["tracemalloc_batch"])
    tracemalloc.start()
    # Flushing first empties the span processor's queue, whose fill level would be noise.
    asyncio.run(_loop(tracer, done, batch))
    tracer_provider.force_flush()
    gc.collect()
    first = tracemalloc.take_snapshot()
    asyncio.run(_loop(tracer, done + batch, batch))
    tracer_provider.force_flush()
    gc.collect()
    second = tracemalloc.take_snapshot()
    tracemalloc.stop()
    diff = second.compare_to(first, "lineno")
    net = sum(stat.size_diff for stat in diff)
    top = [
        {"where": str(stat.traceback), "size_diff": stat.size_diff, "count_diff": stat.count_diff}
        for stat in diff[:5]
    ]
    active = dict(executor.instruments.active_counts())
    return {
        "tasks": done,
        "completed": done >= total,
        "seconds": elapsed,
        "tasks_per_s": done / elapsed,
        "rss_start_mb": rss_start,
        "rss_after_warmup_mb": after_warmup,
        "rss_end_mb": rss_end,
        "growth_mb": rss_end - after_warmup,
        "rss_samples": samples,
        "inflight_at_end": len(executor.inflight),
        "described_cache_max": described_max,
        "described_cache_bound": 1024,
        "active_counts_nonzero": {k: v for k, v in active.items() if v},
        "active_names": len(active),
        "live_task_states": live_states,
        "live_background_tasks": live_tasks,
        "tracemalloc_batch": batch,
        "tracemalloc_net_bytes": net,
        "tracemalloc_bytes_per_task": net / batch,
        "tracemalloc_top": top,
    }


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    result = run_worker("benchmarks.memory", config, timeout=float(config["max_seconds"]) + 180)
    result["config"] = config
    result["growth_target_mb"] = GROWTH_TARGET_MB
    result["meets_growth_target"] = result["growth_mb"] < GROWTH_TARGET_MB
    result["nothing_retained"] = (
        result["inflight_at_end"] == 0
        and result["described_cache_max"] <= result["described_cache_bound"]
        and not result["active_counts_nonzero"]
        and result["live_task_states"] == 0
    )
    log(
        f"  memory: {result['tasks']} tasks, RSS {result['rss_after_warmup_mb']:.1f} -> "
        f"{result['rss_end_mb']:.1f} MiB"
    )
    return result


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (
            f"memory RSS growth over {figures['tasks']} tasks",
            f"{figures['growth_mb']:+.1f} MiB ({figures['rss_after_warmup_mb']:.1f} -> "
            f"{figures['rss_end_mb']:.1f})",
            f"< {GROWTH_TARGET_MB:.0f} MB",
        ),
        (
            "memory retained per task (tracemalloc)",
            f"{figures['tracemalloc_bytes_per_task']:.2f} B",
            "~0",
        ),
        (
            "memory inflight / cache max / live states",
            f"{figures['inflight_at_end']} / {figures['described_cache_max']} "
            f"(bound {figures['described_cache_bound']}) / {figures['live_task_states']}",
            "0 / <= bound / 0",
        ),
    ]


def main() -> None:
    worker_main(__doc__, worker, lambda: run(quick=True))


if __name__ == "__main__":
    main()
