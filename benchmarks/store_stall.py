"""An unrelated endpoint's latency while the store stalls (issue 11): no store call on the loop.

One uvicorn process per scenario serves ``benchmarks/_stall_app.py`` (every task durable, so
each request writes a journal row and removes it; with Redis, every task also goes through a
Redis-backed circuit breaker). While four client threads keep requesting ``/durable`` and one
polls ``/bgtasks/health``, the main thread requests ``/ping`` every 10 ms and records its
latency. Scenarios:

- ``sqlite_healthy`` / ``sqlite_locked``: another process holds an exclusive lock on the
  SQLite file (``BEGIN EXCLUSIVE``) for the whole measurement;
- ``sqlite_locked_nogate``: the same with the response gate off (journal writes on the event loop,
  as before issue 11), for comparison;
- ``redis_healthy`` / ``redis_blackholed``: the redis-server is stopped with SIGSTOP
  (connections accepted by the kernel, never answered) for the whole measurement.

Figures: ``/ping`` p50/p99/max per scenario (from each request's send), its p99 from the
slot it was due at (``ping_sched_p99_ms``: a server frozen for 5 s delays the 500 pings due
meanwhile, not only the one waiting), ``/bgtasks/health`` p99, ``/durable`` requests served,
and ``p99_ratio``, the scheduled p99 of each faulted scenario over its healthy one (target
<= 2.0). Nothing asserts a time; the figures are printed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks._common import REPO_ROOT, median
from benchmarks.http_load import SkipBenchmark, workdir

__all__ = ["SCENARIOS", "run", "table"]

SCENARIOS = (
    "sqlite_healthy",
    "sqlite_locked",
    "sqlite_locked_nogate",
    "redis_healthy",
    "redis_blackholed",
)
FAULTED = {
    "sqlite_locked": "sqlite_healthy",
    "sqlite_locked_nogate": "sqlite_healthy",
    "redis_blackholed": "redis_healthy",
}
TARGET = 2.0
FULL = {"rounds": 2, "duration": 8.0, "warmup": 1.5}
QUICK = {"rounds": 1, "duration": 4.0, "warmup": 1.0}
PING_EVERY = 0.010


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextlib.contextmanager
def _process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def _redis(work: Path) -> Iterator[tuple[str, int]]:
    binary = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")
    if binary is None:
        raise SkipBenchmark("redis-server not found: apt-get install redis-server")
    port = _free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with _process(argv, work / f"redis-{port}.log") as proc:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc.pid


def _measure(base: str, duration: float) -> dict[str, Any]:
    stop = threading.Event()
    durable = [0]
    health: list[float] = []
    lock = threading.Lock()

    def durable_load() -> None:
        with httpx.Client(base_url=base, timeout=30.0) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    client.get("/durable")
                    with lock:
                        durable[0] += 1
                time.sleep(0.02)

    def health_poll() -> None:
        with httpx.Client(base_url=base, timeout=30.0) as client:
            while not stop.is_set():
                begin = time.perf_counter()
                with contextlib.suppress(httpx.HTTPError):
                    client.get("/bgtasks/health")
                    health.append(time.perf_counter() - begin)
                time.sleep(0.2)

    threads = [threading.Thread(target=durable_load, daemon=True) for _ in range(4)]
    threads.append(threading.Thread(target=health_poll, daemon=True))
    for t in threads:
        t.start()
    pings: list[float] = []
    sched: list[float] = []
    slow: list[tuple[float, float]] = []  # (seconds into the measurement, ms), the first 20
    errors = 0
    with httpx.Client(base_url=base, timeout=30.0) as client:
        start = slot = time.perf_counter()
        end = start + duration
        while slot < end:
            time.sleep(max(0.0, slot - time.perf_counter()))
            begin = time.perf_counter()
            try:
                client.get("/ping")
                done = time.perf_counter()
                pings.append(done - begin)
                # from the slot it was due at: a frozen server delays every slot it covers
                # (no coordinated omission), not just the one request that waited
                sched.append(done - slot)
                if done - slot > 0.05 and len(slow) < 20:
                    slow.append((round(slot - start, 2), round((done - slot) * 1000, 1)))
            except httpx.HTTPError:
                errors += 1
            slot += PING_EVERY
            while slot < time.perf_counter() - PING_EVERY:  # slots missed while waiting
                sched.append(time.perf_counter() - slot)
                slot += PING_EVERY
    stop.set()
    for t in threads:
        t.join(35)
    return {
        "ping_p50_ms": _pct(pings, 0.50) * 1000,
        "ping_p99_ms": _pct(pings, 0.99) * 1000,
        "ping_max_ms": max(pings) * 1000 if pings else float("nan"),
        "ping_sched_p99_ms": _pct(sched, 0.99) * 1000,
        "pings": len(pings),
        "ping_errors": errors,
        "health_p99_ms": _pct(health, 0.99) * 1000,
        "health_max_ms": max(health) * 1000 if health else float("nan"),
        "durable_requests": durable[0],
        "slow_pings": slow,
    }


def _scenario(name: str, work: Path, config: dict[str, Any], log: Callable[[str], None]) -> Any:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks._stall_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with contextlib.ExitStack() as stack:
        env = {"BENCH_GATE": "0" if name.endswith("nogate") else "1"}
        fault: Callable[[], None] = lambda: None  # noqa: E731
        if name.startswith("sqlite"):
            path = work / f"{name}.db"
            path.unlink(missing_ok=True)
            env["OTEL_BGTASKS_DLQ_URL"] = f"sqlite:///{path}"
            if "locked" in name:

                def fault() -> None:
                    locker = stack.enter_context(
                        _process(
                            [
                                sys.executable,
                                "-c",
                                "import sqlite3, sys, time\n"
                                "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                                "c.execute('BEGIN EXCLUSIVE')\n"
                                "print('locked', flush=True)\n"
                                "time.sleep(600)\n",
                                str(path),
                            ],
                            work / f"{name}-locker.log",
                        )
                    )
                    deadline = time.monotonic() + 10
                    while b"locked" not in (work / f"{name}-locker.log").read_bytes():
                        if locker.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError("the locker process did not take the lock")
                        time.sleep(0.02)
        else:
            url, redis_pid = stack.enter_context(_redis(work))
            env["OTEL_BGTASKS_DLQ_URL"] = url
            env["BENCH_REDIS_CIRCUIT"] = url
            if "blackholed" in name:

                def fault() -> None:
                    os.kill(redis_pid, signal.SIGSTOP)
                    stack.callback(os.kill, redis_pid, signal.SIGCONT)

        stack.enter_context(_process(argv, work / f"{name}-app.log", env))
        _wait_ready(base + "/ping")
        with httpx.Client(base_url=base, timeout=10.0) as client:  # warm up, store healthy
            end = time.monotonic() + config["warmup"]
            while time.monotonic() < end:
                client.get("/durable")
                client.get("/ping")
        fault()
        figures = _measure(base, config["duration"])
    log(
        f"  {name}: ping p50 {figures['ping_p50_ms']:.1f} ms p99 {figures['ping_p99_ms']:.1f} ms"
        f" max {figures['ping_max_ms']:.0f} ms, p99 from schedule"
        f" {figures['ping_sched_p99_ms']:.1f} ms, health p99 {figures['health_p99_ms']:.0f} ms,"
        f" durable requests {figures['durable_requests']}"
    )
    return figures


def run(
    *, quick: bool = False, rounds: int | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    if rounds:
        config["rounds"] = rounds
    work = workdir("store_stall")
    per: dict[str, list[dict[str, Any]]] = {name: [] for name in SCENARIOS}
    for round_no in range(config["rounds"]):
        log(f" round {round_no + 1}/{config['rounds']}")
        for name in SCENARIOS:
            per[name].append(_scenario(name, work, config, log))
    scenarios = {
        name: {key: median(r[key] for r in results) for key in results[0] if key != "slow_pings"}
        for name, results in per.items()
    }
    ratios = {
        name: median(
            f["ping_sched_p99_ms"] / h["ping_sched_p99_ms"]
            for f, h in zip(per[name], per[base], strict=True)
        )
        for name, base in FAULTED.items()
    }
    return {
        "config": config,
        "scenarios": scenarios,
        "rounds": per,
        "p99_ratio": ratios,
        "target": TARGET,
        "meets_target": {
            name: ratio <= TARGET for name, ratio in ratios.items() if not name.endswith("nogate")
        },
    }


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [
        (
            f"store_stall {name}",
            f"/ping p50 {s['ping_p50_ms']:.1f} ms, p99 {s['ping_p99_ms']:.1f} ms (from schedule"
            f" {s['ping_sched_p99_ms']:.1f}), max {s['ping_max_ms']:.0f} ms;"
            f" /bgtasks/health p99 {s['health_p99_ms']:.0f} ms",
            "",
        )
        for name, s in figures["scenarios"].items()
    ]
    for name, ratio in figures["p99_ratio"].items():
        target = "(before issue 11)" if name.endswith("nogate") else f"<= {TARGET}"
        rows.append((f"store_stall {name} /ping p99 vs healthy", f"{ratio:.2f}x", target))
    return rows
