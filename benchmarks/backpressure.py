"""Memory of the ``local`` pool under 100k requests while every slot is busy (back-pressure).

    python -m benchmarks.backpressure          # bounded (the default max_queued) and unbounded

A Starlette app, instrumented with ``dispatch="local"``, ``max_concurrency=4`` and no store,
is driven through its ASGI interface directly (its lifespan running, no HTTP): first four
requests whose tasks hold the four slots until the end, then `requests` requests each
scheduling one quick task. With the default ``max_queued`` the queue fills to its bound and
every later response runs its task inline (Starlette's behaviour, counted in
``bgtasks.task.inlined``); with an unbounded queue (``max_queued`` = 10**9, how the pool
behaved before the bound) every task waits in memory. RSS is sampled every `sample_every`
requests; reported: its growth after the warm-up (target: flat, < 5 MiB with the bound), the
tasks inlined, queued, and that the drain at shutdown accounted for every task.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import anyio.lowlevel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.routing import Route

from benchmarks._common import noop_providers, rss_mb, run_worker, worker_main

__all__ = ["run"]

FULL = {"requests": 100_000, "warmup": 10_000, "sample_every": 10_000, "slots": 4}
QUICK = {"requests": 20_000, "warmup": 5_000, "sample_every": 5_000, "slots": 4}
UNBOUNDED = 10**9
FLAT_TARGET_MB = 5.0


async def quick(n: int) -> None:
    return None


def worker(config: dict[str, Any]) -> dict[str, Any]:
    from otel_bgtasks import BackgroundTasksInstrumentor
    from otel_bgtasks._execution import active_executor
    from otel_bgtasks.dispatch import DEFAULT_MAX_QUEUED

    tracer_provider, _, _ = noop_providers()
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    max_queued = DEFAULT_MAX_QUEUED if config["bounded"] else UNBOUNDED
    BackgroundTasksInstrumentor().instrument(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        dead_letter_store=None,
        dispatch="local",
        max_concurrency=int(config["slots"]),
        max_queued=max_queued,
        drain_timeout=0,
    )
    executor = active_executor()
    assert executor is not None
    requests, warmup, every = (int(config[k]) for k in ("requests", "warmup", "sample_every"))
    samples: list[tuple[int, float]] = []
    result: dict[str, Any] = {}

    async def main() -> None:
        release = anyio.Event()

        async def hold() -> None:
            await release.wait()

        async def held(request: Any) -> Response:
            return Response("held", background=BackgroundTask(hold))

        async def work(request: Any) -> Response:
            return Response("ok", background=BackgroundTask(quick, request.path_params["n"]))

        app = Starlette(routes=[Route("/held", held), Route("/work/{n:int}", work)])
        to_app, from_server = anyio.create_memory_object_stream[dict[str, Any]](10)
        to_server, from_app = anyio.create_memory_object_stream[dict[str, Any]](10)

        async def lifespan() -> None:
            scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
            await app(scope, from_server.receive, to_server.send)

        async def call(path: str) -> None:
            scope = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.4"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": [(b"host", b"bench")],
                "client": ("127.0.0.1", 5000),
                "server": ("127.0.0.1", 80),
            }

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                return None

            await app(scope, receive, send)

        async with anyio.create_task_group() as group:
            group.start_soon(lifespan)
            await to_app.send({"type": "lifespan.startup"})
            assert (await from_app.receive())["type"] == "lifespan.startup.complete"
            for _ in range(int(config["slots"])):
                await call("/held")
            await anyio.lowlevel.checkpoint()  # the workers take the held groups
            started = time.perf_counter()
            for n in range(requests):
                await call(f"/work/{n}")
                if (n + 1) % every == 0:
                    samples.append((n + 1, rss_mb()))
            result["seconds"] = time.perf_counter() - started
            result["pending_before_shutdown"] = executor.pending_count()
            release.set()
            await to_app.send({"type": "lifespan.shutdown"})
            assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"

    anyio.run(main)
    inlined, skipped, durations = _counted(reader)
    after_warmup = next(rss for n, rss in samples if n >= warmup)
    result.update(
        {
            "bounded": bool(config["bounded"]),
            "max_queued": max_queued,
            "requests": requests,
            "rss_after_warmup_mb": after_warmup,
            "rss_end_mb": samples[-1][1],
            "growth_mb": samples[-1][1] - after_warmup,
            "rss_samples": samples,
            "inflight_at_end": len(executor.inflight),
            "inlined": inlined,
            "skipped": skipped,
            "ran": durations,
            "accounted": durations + skipped == requests + int(config["slots"]),
        }
    )
    return result


def _counted(reader: InMemoryMetricReader) -> tuple[int, int, int]:
    """(tasks inlined, tasks skipped, task runs) from the metrics."""
    inlined = skipped = ran = 0
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points = list(metric.data.data_points)
                if metric.name == "bgtasks.task.inlined":
                    inlined += sum(int(p.value) for p in points)
                elif metric.name == "bgtasks.task.skipped":
                    skipped += sum(int(p.value) for p in points)
                elif metric.name == "bgtasks.task.duration":
                    ran += sum(int(p.count) for p in points)
    return inlined, skipped, ran


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    figures: dict[str, Any] = {"config": config, "flat_target_mb": FLAT_TARGET_MB}
    for bounded in (True, False):
        result = run_worker("benchmarks.backpressure", {**config, "bounded": bounded}, timeout=900)
        figures["bounded" if bounded else "unbounded"] = result
        log(
            f"  backpressure ({'bounded' if bounded else 'unbounded'}, max_queued"
            f" {result['max_queued']}): RSS {result['rss_after_warmup_mb']:.1f} ->"
            f" {result['rss_end_mb']:.1f} MiB"
            f" ({result['growth_mb']:+.1f}) over {result['requests']} requests,"
            f" {result['pending_before_shutdown']} waiting at the end,"
            f" {result['inlined']} inlined, {result['ran']} ran, {result['skipped']} skipped"
        )
    figures["flat"] = figures["bounded"]["growth_mb"] < FLAT_TARGET_MB
    return figures


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    bounded, unbounded = figures["bounded"], figures["unbounded"]
    return [
        (
            f"local pool RSS growth, {bounded['requests']} requests, slots busy",
            f"{bounded['growth_mb']:+.1f} MiB bounded (max_queued={bounded['max_queued']}),"
            f" {unbounded['growth_mb']:+.1f} MiB unbounded",
            f"< {FLAT_TARGET_MB:.0f} MiB bounded",
        ),
    ]


def main() -> None:
    worker_main(__doc__, worker, lambda: run(quick=False))


if __name__ == "__main__":
    main()
