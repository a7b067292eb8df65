"""Dead-letter replay throughput (entries/s) from an SQLite store, against its baselines.

Each variant runs in its own process with the same SDK setup (no-op exporters) and the package
instrumented (``dead_letter_store=None``: replays never dead-letter again):

- ``replay``: an ``SQLiteDeadLetterStore`` on a temp file holding N dead letters of a trivial
  module-level async task (filled before the clock starts), replayed with
  ``DeadLetters(store).replay(None, run_dead_letter, offload=False)`` as the CLI runs it:
  list, resolve, decode, run as a linked span, count the replay, delete the entry;
- ``executor``: the same N tasks through the executor alone (``prepare`` + ``run``, the path
  ``run_dead_letter`` takes), without the store;
- ``direct``: N plain ``await task(i)`` calls.

Reported: entries/s of each, and the ratios replay/executor and replay/direct (throughput), plus
the store's share per entry (1/replay - 1/executor, in microseconds).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _tasks
from benchmarks._common import (
    interleaved,
    median,
    noop_providers,
    per_round,
    ratio,
    run_worker,
    worker_main,
)

__all__ = ["VARIANTS", "run"]

VARIANTS = ("direct", "executor", "replay")
FULL = {"entries": 2_000, "rounds": 5, "warmup": 300}
QUICK = {"entries": 500, "rounds": 2, "warmup": 100}


def _fill(store: Any, count: int) -> None:
    from otel_bgtasks.calls import JSONSerializer, func_ref
    from otel_bgtasks.records import DeadLetter, DeadLetterReason

    serializer = JSONSerializer()
    ref = func_ref(_tasks.replay_target)
    now = time.time()
    for i in range(count):
        store.put(
            DeadLetter(
                id=f"{random.getrandbits(128):032x}",
                task_name="replay_target",
                func_ref=ref,
                payload=serializer.dumps((i,), {}),
                error_type="ConnectionRefusedError",
                error_message="downstream refused the connection",
                traceback="Traceback (most recent call last):\nConnectionRefusedError\n",
                category="connection",
                attempts=3,
                first_failure=now - 60,
                last_failure=now - 30 + i * 1e-6,
                reason=DeadLetterReason.EXHAUSTED,
                trace_id=f"{random.getrandbits(128):032x}",
                span_id=f"{random.getrandbits(64):016x}",
            )
        )


async def _executor_loop(count: int, link: Any) -> None:
    from otel_bgtasks._execution import active_executor as current_executor

    executor = current_executor()
    assert executor is not None
    func = _tasks.replay_target
    for i in range(count):
        state = executor.prepare(func, (i,), {}, link=link)
        await executor.run(state, dead_letter=False)


async def _direct_loop(count: int) -> None:
    func = _tasks.replay_target
    for i in range(count):
        await func(i)


def worker(config: dict[str, Any]) -> dict[str, Any]:
    from opentelemetry.trace import SpanContext, TraceFlags

    from otel_bgtasks import BackgroundTasksInstrumentor
    from otel_bgtasks.registry import declare_task_modules
    from otel_bgtasks.replay import DeadLetters, run_dead_letter
    from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore

    declare_task_modules(_tasks.__name__)  # the app's task module, as the CLI's --tasks
    variant = config["variant"]
    entries = int(config["entries"])
    tracer_provider, meter_provider, _reader = noop_providers()
    BackgroundTasksInstrumentor().instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider, dead_letter_store=None
    )
    link = SpanContext(
        trace_id=random.getrandbits(128),
        span_id=random.getrandbits(64),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    # The same warm-up everywhere: imports, caches, the SDK's first instruments.
    asyncio.run(_executor_loop(int(config["warmup"]), link))
    with tempfile.TemporaryDirectory(prefix="bgtasks-bench-") as tmp:
        extra: dict[str, Any] = {}
        if variant == "replay":
            store = SQLiteDeadLetterStore(Path(tmp) / "dlq.db")
            _fill(store, entries)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            report = asyncio.run(DeadLetters(store).replay(None, run_dead_letter, offload=False))
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            extra = {"replayed": report.replayed, "left_in_store": store.count()}
            if report.replayed != entries or extra["left_in_store"]:
                raise RuntimeError(f"replay did not replay every entry: {extra}")
            store.close()
        elif variant == "executor":
            wall0, cpu0 = time.perf_counter(), time.process_time()
            asyncio.run(_executor_loop(entries, link))
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        elif variant == "direct":
            wall0, cpu0 = time.perf_counter(), time.process_time()
            asyncio.run(_direct_loop(entries))
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        else:
            raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    return {
        "variant": variant,
        "entries": entries,
        "wall_s": wall,
        "cpu_s": cpu,
        "per_s": entries / wall,
        "per_s_cpu": entries / cpu if cpu > 0 else float("nan"),
        **extra,
    }


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    if rounds is not None:
        config["rounds"] = rounds
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for r, variant in interleaved(VARIANTS, int(config["rounds"])):
        result = run_worker("benchmarks.replay", {**config, "variant": variant}, timeout=300)
        samples[variant].append(result)
        log(f"  replay round {r + 1}: {variant:<9} {result['per_s']:10.0f} entries/s")
    per_s = {v: median(s["per_s"] for s in samples[v]) for v in VARIANTS}
    per_s_cpu = {v: median(s["per_s_cpu"] for s in samples[v]) for v in VARIANTS}
    return {
        "config": config,
        "entries_per_s": per_s,
        "entries_per_s_cpu": per_s_cpu,
        "replay_over_executor": median(
            per_round(samples, "per_s", lambda v: ratio(v["replay"], v["executor"]))
        ),
        "replay_over_direct": median(
            per_round(samples, "per_s", lambda v: ratio(v["replay"], v["direct"]))
        ),
        "store_cost_us_per_entry": median(
            per_round(samples, "per_s", lambda v: (1 / v["replay"] - 1 / v["executor"]) * 1e6)
        ),
        "samples": {v: [s["per_s"] for s in samples[v]] for v in VARIANTS},
    }


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    per_s = figures["entries_per_s"]
    return [(f"replay {v} throughput", f"{per_s[v]:.0f} /s", "") for v in VARIANTS] + [
        ("replay / executor (throughput)", f"{figures['replay_over_executor']:.2f}", "(report)"),
        ("replay / direct (throughput)", f"{figures['replay_over_direct']:.3f}", "(report)"),
        (
            "replay store+decode cost per entry",
            f"{figures['store_cost_us_per_entry']:.0f} us",
            "(report)",
        ),
    ]


def main() -> None:
    worker_main(__doc__, worker, run)


if __name__ == "__main__":
    main()
