"""Celery on the dispatch seam: what it costs against plain Celery, measured in one run.

    python -m benchmarks.celery_dispatch          # or: python benchmarks/run.py --only celery

Figures (ratios against baselines of the same run; medians over interleaved rounds):

- ``web_cpu``: CPU per task in the web process (every thread: our outbox thread publishes),
  ``ours`` (schedule -> encode, sign, PRODUCER span, outbox, publish, hand-off) over plain
  ``apply_async`` with opentelemetry-instrumentation-celery on (``upstream``), and over plain
  ``apply_async`` alone (``plain``). Target: ours/upstream <= 1.15.
- ``loop``: event-loop CPU per ``add_task`` in a FastAPI request (the loop thread's CPU time
  with one task per request, minus the same requests without a task), CeleryDispatcher over
  ``dispatch="local"``. Target <= 1.2.
- ``throughput``: tasks per second end to end with a prefork worker of 2 children (publish to
  the last task done), and worker CPU per task (main process and children), ours over plain
  Celery with upstream's instrumentation on both sides. Targets >= 0.9 and <= 1.2.
- ``async``: worker CPU per task of an async task function over a sync one in a child (one
  event loop per child). Target <= 20 us.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import redis
from fastapi import BackgroundTasks, FastAPI  # module level: the endpoint's annotations resolve

from benchmarks._common import (
    REPO_ROOT,
    interleaved,
    median,
    noop_providers,
    per_round,
    ratio,
    run_worker,
    worker_main,
)

FULL = {"rounds": 5, "web_tasks": 3000, "loop_requests": 2000, "e2e_tasks": 3000}
QUICK = {"rounds": 2, "web_tasks": 500, "loop_requests": 300, "e2e_tasks": 500}
PAYLOAD = "x" * 64
TASKS_PER_REQUEST = 10  # the loop time of add_task stands out of the request's own


# -- servers ----------------------------------------------------------------------------------


def _redis_binary() -> str:
    for path in (os.environ.get("REDIS_SERVER_BIN", ""), "/usr/bin/redis-server"):
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError("redis-server not found: scripts/infra.sh apt")


@contextmanager
def _redis(directory: Path):  # type: ignore[no-untyped-def]
    from tests.support.redis import RedisServer

    server = RedisServer(_redis_binary(), directory)
    if not server.try_start():
        raise RuntimeError("redis-server did not start")
    try:
        yield server
    finally:
        server.stop()


def _cpu_of(pid: int) -> float:
    """utime + stime of a process in seconds (0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.env = {**os.environ, **env, "BENCH_RUN": self.run, "PYTHONPATH": str(REPO_ROOT)}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Worker:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", "benchmarks._celery_bench", "worker",
                    "-P", "prefork", "-c", "2", "-Q", "bench", "-l", "WARNING",
                    "--without-gossip", "--without-mingle", "--without-heartbeat",
                    "-n", f"bench-{self.run}@%h",
                ],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        results = redis.Redis.from_url(self.env["BENCH_RESULTS"])
        if results.blpop([f"ready:{self.run}"], timeout=120) is None:
            self.__exit__()
            raise RuntimeError(f"bench worker not ready:\n{self.log.read_text()[-3000:]}")
        return self

    def pids(self) -> list[int]:
        assert self.proc is not None
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return [pid, *map(int, children)]

    def cpu(self) -> float:
        return sum(_cpu_of(pid) for pid in self.pids())

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


# -- one variant per process ------------------------------------------------------------------


def worker(config: dict[str, Any]) -> dict[str, Any]:
    os.environ["BENCH_BROKER"] = config["broker"]
    os.environ["BENCH_RESULTS"] = config["results"]
    kind = config["kind"]
    if kind == "web":
        return _web(config)
    if kind == "loop":
        return asyncio.run(_loop(config))
    return _e2e(config)


def _instrument(variant: str) -> tuple[Any, Any]:
    tracer_provider, meter_provider, _ = noop_providers()
    if variant == "upstream":
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument(
            tracer_provider=tracer_provider, meter_provider=meter_provider
        )
    elif variant in ("ours", "celery", "local", "none"):
        from otel_bgtasks import BackgroundTasksInstrumentor

        BackgroundTasksInstrumentor().instrument(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            dead_letter_store=None,
            dispatch="local" if variant == "local" else "inline",
        )
    return tracer_provider, meter_provider


def _web(config: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import _celery_bench as bench
    from otel_bgtasks import schedule

    variant, tasks = config["variant"], config["tasks"]
    _instrument(variant)
    run = uuid.uuid4().hex[:8]

    def send(count: int) -> None:
        for _ in range(count):
            if variant == "ours":
                schedule(bench.bench_sync, run, tasks, PAYLOAD)
            else:
                bench.bench_plain.apply_async((run, tasks, PAYLOAD), queue=bench.QUEUE)
        if variant == "ours":
            bench.to_bench._outbox.join(120)

    send(200)  # warm-up: connections, caches
    start_cpu, start = time.process_time(), time.perf_counter()
    send(tasks)
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    redis.Redis.from_url(config["broker"]).flushdb()
    return {"variant": variant, "cpu_us": cpu / tasks * 1e6, "wall_us": wall / tasks * 1e6}


async def _loop(config: dict[str, Any]) -> dict[str, Any]:
    import httpx

    from benchmarks import _celery_bench as bench
    from otel_bgtasks import background_task
    from otel_bgtasks.instrumentor import BackgroundTasksInstrumentor

    variant, requests = config["variant"], config["requests"]
    _instrument(variant)
    local_task = background_task(name="bench-local", dispatch="local")(_noop)
    app = FastAPI()

    @app.get("/")
    async def endpoint(background_tasks: BackgroundTasks) -> dict[str, str]:
        for _ in range(TASKS_PER_REQUEST):
            if variant == "celery":
                background_tasks.add_task(bench.bench_sync, "loop", 0, PAYLOAD)
            elif variant == "local":
                background_tasks.add_task(local_task)
        return {}

    assert BackgroundTasksInstrumentor._seam is not None
    transport = httpx.ASGITransport(app=app)
    async with (
        _lifespan(app),  # the local pool lives with the app's lifespan
        httpx.AsyncClient(transport=transport, base_url="http://bench") as client,
    ):
        for _ in range(200):
            assert (await client.get("/")).status_code == 200
        start = time.thread_time()
        for _ in range(requests):
            await client.get("/")
    # after the lifespan's shutdown: the local pool drained (its tasks ran on this loop)
    cpu = time.thread_time() - start
    if variant == "celery":
        bench.to_bench._outbox.join(120)
    redis.Redis.from_url(config["broker"]).flushdb()
    return {"variant": variant, "loop_us": cpu / requests / TASKS_PER_REQUEST * 1e6}


def _noop() -> None:
    return None


@asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    """Run the ASGI lifespan of `app` around the block (httpx's transport sends none)."""
    messages: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    started, stopped = asyncio.Event(), asyncio.Event()
    await messages.put({"type": "lifespan.startup"})

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()
        elif message["type"] == "lifespan.shutdown.complete":
            stopped.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, messages.get, send))
    await started.wait()
    try:
        yield
    finally:
        await messages.put({"type": "lifespan.shutdown"})
        await stopped.wait()
        await task


def _e2e(config: dict[str, Any]) -> dict[str, Any]:
    """The producer side of one end-to-end run against a running worker."""
    from benchmarks import _celery_bench as bench
    from otel_bgtasks import schedule

    variant, tasks, run = config["variant"], config["tasks"], config["run"]
    _instrument("upstream" if variant == "plain" else "ours")
    r = redis.Redis.from_url(config["results"], socket_timeout=None)
    task = {"sync": bench.bench_sync, "async": bench.bench_async}.get(variant)
    start = time.perf_counter()
    for _ in range(tasks):
        if task is None:
            bench.bench_plain.apply_async((run, tasks, PAYLOAD), queue=bench.QUEUE)
        else:
            schedule(task, run, tasks, PAYLOAD)
    done = r.blpop([f"done:{run}"], timeout=300)
    wall = time.perf_counter() - start
    if done is None:
        raise RuntimeError(f"{variant}: not every task ran")
    return {"variant": variant, "per_s": tasks / wall}


# -- the benchmark ----------------------------------------------------------------------------


def run(
    *,
    quick: bool = False,
    rounds: int | None = None,
    log: Any = print,
    parts: tuple[str, ...] = ("web", "loop", "e2e"),
) -> dict[str, Any]:
    import tempfile

    config: dict[str, Any] = dict(QUICK if quick else FULL)
    if rounds is not None:
        config["rounds"] = rounds
    n = int(config["rounds"])
    out: dict[str, Any] = {"config": config}
    with tempfile.TemporaryDirectory() as tmp, _redis(Path(tmp)) as server:
        broker = f"redis://127.0.0.1:{server.port}/0"
        results_url = f"redis://127.0.0.1:{server.port}/2"
        base = {"broker": broker, "results": results_url}

        web: dict[str, list[dict[str, Any]]] = {v: [] for v in ("plain", "upstream", "ours")}
        for r, variant in interleaved(list(web), n if "web" in parts else 0):
            got = run_worker(
                "benchmarks.celery_dispatch",
                {**base, "kind": "web", "variant": variant, "tasks": config["web_tasks"]},
                timeout=600,
            )
            web[variant].append(got)
            log(f"  celery web round {r + 1}: {variant:<9} {got['cpu_us']:8.1f} us CPU/task")
        out["web_cpu_us"] = {v: median(s["cpu_us"] for s in web[v]) for v in web}
        out["web_cpu_ours_over_upstream"] = median(
            per_round(web, "cpu_us", lambda v: ratio(v["ours"], v["upstream"]))
        )
        out["web_cpu_ours_over_plain"] = median(
            per_round(web, "cpu_us", lambda v: ratio(v["ours"], v["plain"]))
        )
        out["web_cpu_upstream_over_plain"] = median(
            per_round(web, "cpu_us", lambda v: ratio(v["upstream"], v["plain"]))
        )

        loop: dict[str, list[dict[str, Any]]] = {v: [] for v in ("none", "local", "celery")}
        for r, variant in interleaved(list(loop), n if "loop" in parts else 0):
            got = run_worker(
                "benchmarks.celery_dispatch",
                {**base, "kind": "loop", "variant": variant, "requests": config["loop_requests"]},
                timeout=600,
            )
            loop[variant].append(got)
            log(f"  celery loop round {r + 1}: {variant:<7} {got['loop_us']:8.1f} us loop/task")
        out["loop_us_per_task"] = {v: median(s["loop_us"] for s in loop[v]) for v in loop}
        out["loop_celery_over_local"] = median(
            per_round(
                loop,
                "loop_us",
                lambda v: ratio(v["celery"] - v["none"], v["local"] - v["none"]),
            )
        )

        e2e: dict[str, list[dict[str, Any]]] = {v: [] for v in ("plain", "sync")}
        kinds: dict[str, list[dict[str, Any]]] = {v: [] for v in ("sync", "async")}
        for r in range(n if "e2e" in parts else 0):
            for variant in ("plain", "sync") if r % 2 == 0 else ("sync", "plain"):
                e2e[variant].append(
                    _e2e_round(base, variant, config["e2e_tasks"], Path(tmp), log, r)
                )
            for variant in kinds:
                kinds[variant].append(
                    _e2e_round(base, variant, config["e2e_tasks"], Path(tmp), log, r)
                )
        out["throughput_per_s"] = {v: median(s["per_s"] for s in e2e[v]) for v in e2e}
        out["throughput_ours_over_upstream"] = median(
            per_round(e2e, "per_s", lambda v: ratio(v["sync"], v["plain"]))
        )
        out["worker_cpu_us"] = {v: median(s["worker_cpu_us"] for s in e2e[v]) for v in e2e}
        out["worker_cpu_ours_over_upstream"] = median(
            per_round(e2e, "worker_cpu_us", lambda v: ratio(v["sync"], v["plain"]))
        )
        out["worker_cpu_us_by_kind"] = {
            v: median(s["worker_cpu_us"] for s in kinds[v]) for v in kinds
        }
        out["async_over_sync_us"] = median(
            per_round(kinds, "worker_cpu_us", lambda v: v["async"] - v["sync"])
        )
    return out


def _e2e_round(
    base: dict[str, str], variant: str, tasks: int, tmp: Path, log: Any, r: int
) -> dict[str, Any]:
    mode = "upstream" if variant == "plain" else "ours"
    env = {"BENCH_BROKER": base["broker"], "BENCH_RESULTS": base["results"], "BENCH_MODE": mode}
    with _Worker(env, tmp / "worker.log") as w:
        before = w.cpu()
        got = run_worker(
            "benchmarks.celery_dispatch",
            {**base, "kind": "e2e", "variant": variant, "tasks": tasks, "run": w.run},
            timeout=900,
        )
        got["worker_cpu_us"] = (w.cpu() - before) / tasks * 1e6
    log(
        f"  celery e2e round {r + 1}: {variant:<11} {got['per_s']:8.0f} tasks/s"
        f" {got['worker_cpu_us']:8.1f} us worker CPU/task"
    )
    return got


if __name__ == "__main__":
    worker_main(__doc__, worker, run)
