"""HTTP load from a second process, bounded in time and in count, on loopback only.

Two kinds of load:

- ``drive()``, closed loop at saturation: ``wrk`` (``apt-get install wrk``) with a fixed number
  of connections for a fixed duration, capped at a maximum number of responses
  (``wrk_report.lua``); without wrk it runs this module as a subprocess: an async httpx client
  with the same fixed concurrency. Each connection sends its next request as soon as the
  previous answer arrives, so the server runs flat out: the figure is its throughput, and its
  latency is mostly queueing (a faster server sees more contention per request).
- ``drive_rate()``, open loop at a fixed offered rate: this module as a subprocess, an asyncio
  + httpx client that starts request ``i`` at ``start + i / rate`` whatever the server does
  (Debian's wrk has no constant-rate mode). Latency is then compared at equal load. In-flight
  requests are bounded: a send that would exceed the bound is skipped and counted as
  ``missed``; a send that starts more than ``late_ms`` after its slot is counted as ``late``,
  and the driver's lag behind its timetable and its own CPU use are reported, so a driver (or
  a server) that cannot keep the rate is visible in the figures instead of silently lowering
  the load.

Either way the result is requests, req/s, latency p50/p90/p99 and error counts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks._common import REPO_ROOT, emit, run_worker

__all__ = ["MAX_RATE", "drive", "drive_rate", "load_tool"]

_LUA = Path(__file__).with_name("wrk_report.lua")
MAX_RATE = 5_000.0  # safety cap on the open-loop driver's offered rate (requests/s)
_MAX_DURATION = 300.0  # and on its duration (s)
_PRIME = 4  # requests sent (concurrently, not measured) to open connections before the clock


def load_tool() -> str:
    return "wrk" if shutil.which("wrk") else "httpx"


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"refusing to send load to {url!r}: loopback only")


def drive(url: str, *, duration: float, connections: int, max_requests: int) -> dict[str, Any]:
    """Load `url` for `duration` seconds (at most `max_requests` responses)."""
    _check_loopback(url)
    if load_tool() == "wrk":
        return _wrk(url, duration=duration, connections=connections, max_requests=max_requests)
    return run_worker(
        "benchmarks._load",
        {
            "url": url,
            "duration": duration,
            "connections": connections,
            "max_requests": max_requests,
        },
        timeout=duration + 60,
    )


def drive_rate(
    url: str,
    *,
    rate: float,
    duration: float,
    max_in_flight: int = 64,
    late_ms: float = 5.0,
    client: str = "raw",
    cpu: int | None = None,
) -> dict[str, Any]:
    """Send GET `url` at a fixed `rate` (requests/s) for `duration` seconds, open loop.

    At most ``rate * duration`` requests, at most `max_in_flight` at once; runs in its own
    process. Latency is timed from the actual send (``p50_ms``...) and from the scheduled slot
    (``sched_p50_ms``..., which adds the driver's own lag). `client`: ``raw`` (a minimal
    HTTP/1.1 client on asyncio streams, the default: cheap) or ``httpx``.
    """
    _check_loopback(url)
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"rate {rate} outside (0, {MAX_RATE}]")
    if not 0 < duration <= _MAX_DURATION:
        raise ValueError(f"duration {duration} outside (0, {_MAX_DURATION}]")
    return run_worker(
        "benchmarks._load",
        {
            "mode": "rate",
            "url": url,
            "rate": rate,
            "duration": duration,
            "max_in_flight": max_in_flight,
            "late_ms": late_ms,
            "client": client,
            "cpu": cpu,
        },
        timeout=duration + 60,
    )


def _wrk(url: str, *, duration: float, connections: int, max_requests: int) -> dict[str, Any]:
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(_LUA),
        url,
    ]
    env = {**os.environ, "WRK_MAX_REQUESTS": str(max_requests)}
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration + 60,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            raw = json.loads(line[len("WRK_JSON ") :])
            break
    else:
        raise RuntimeError(
            f"wrk printed no summary (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    seconds = raw["duration_us"] / 1e6
    return {
        "tool": "wrk",
        "requests": raw["requests"],
        "seconds": seconds,
        "rps": raw["requests"] / seconds,
        "capped": raw["requests"] >= max_requests,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "non_2xx": raw["status_errors"],
        "socket_errors": raw["connect_errors"]
        + raw["read_errors"]
        + raw["write_errors"]
        + raw["timeouts"],
    }


# -- the httpx drivers (each run as its own process) -----------------------------------------


def _pct(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted seconds, in ms (NaN when empty)."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _httpx_load(config: dict[str, Any]) -> dict[str, Any]:
    import httpx

    url = config["url"]
    max_requests = int(config["max_requests"])
    connections = int(config["connections"])
    latencies: list[float] = []
    counts = {"sent": 0, "non_2xx": 0, "errors": 0}
    deadline = time.monotonic() + float(config["duration"])
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:

        async def user() -> None:
            while counts["sent"] < max_requests and time.monotonic() < deadline:
                counts["sent"] += 1
                begin = time.perf_counter()
                try:
                    response = await client.get(url)
                except httpx.HTTPError:
                    counts["errors"] += 1
                    continue
                latencies.append(time.perf_counter() - begin)
                if not 200 <= response.status_code < 300:
                    counts["non_2xx"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(connections)))
        seconds = time.perf_counter() - started
    latencies.sort()
    done = len(latencies)
    return {
        "tool": "httpx",
        "requests": done,
        "seconds": seconds,
        "rps": done / seconds,
        "capped": counts["sent"] >= max_requests,
        "p50_ms": _pct(latencies, 0.5),
        "p90_ms": _pct(latencies, 0.9),
        "p99_ms": _pct(latencies, 0.99),
        "mean_ms": sum(latencies) / max(1, done) * 1000,
        "non_2xx": counts["non_2xx"],
        "socket_errors": counts["errors"],
    }


class _RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for the open-loop driver.

    GET only, responses with a Content-Length (what uvicorn sends for the benchmark app), one
    request per connection at a time; idle connections are reused. It spends a fraction of
    httpx's CPU per request, so the driver can keep a timetable on two shared cores without
    stealing much of the server's CPU.
    """

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        self._request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
        self._timeout = timeout
        # Oldest first, so every idle connection keeps being used (uvicorn closes connections
        # idle for 5 s).
        self._idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()

    async def get(self) -> int:
        """One GET; its status code. Raises OSError/ValueError/TimeoutError on failure."""
        if self._idle:
            reader, writer = self._idle.popleft()
            try:
                return await self._exchange(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise
                # The server had closed this idle connection: once more, on a new one.
        reader, writer = await asyncio.open_connection(self._host, self._port)
        return await self._exchange(reader, writer)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        try:
            async with asyncio.timeout(self._timeout):
                writer.write(self._request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                marker = head.lower().find(b"\r\ncontent-length:")
                if marker < 0:
                    raise ValueError("response without Content-Length")
                end = head.index(b"\r\n", marker + 2)
                await reader.readexactly(int(head[marker + 17 : end]))
        except BaseException:
            writer.close()
            raise
        if b"connection: close" in head.lower():
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class _HttpxClient:
    """The same interface over httpx (``"client": "httpx"``: about 5x the driver's CPU)."""

    def __init__(self, url: str, timeout: float, max_in_flight: int) -> None:
        import httpx

        limits = httpx.Limits(
            max_connections=max_in_flight, max_keepalive_connections=max_in_flight
        )
        self._url = url
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def get(self) -> int:
        return (await self._client.get(self._url)).status_code

    async def close(self) -> None:
        await self._client.aclose()


async def _open_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Start request i at ``start + i / rate``; never wait for an answer before the next send."""
    import httpx

    rate = min(float(config["rate"]), MAX_RATE)
    duration = min(float(config["duration"]), _MAX_DURATION)
    max_in_flight = int(config["max_in_flight"])
    late_s = float(config["late_ms"]) / 1000
    kind = config.get("client", "raw")
    total = int(rate * duration)
    interval = 1.0 / rate
    latencies: list[float] = []  # actual send -> response
    from_schedule: list[float] = []  # scheduled slot -> response
    lags: list[float] = []  # scheduled slot -> actual send
    counts = {"sent": 0, "missed": 0, "late": 0, "non_2xx": 0, "errors": 0}
    in_flight = 0
    peak_in_flight = 0
    failures = (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError, httpx.HTTPError)
    client: _RawClient | _HttpxClient = (
        _HttpxClient(config["url"], 10.0, max_in_flight)
        if kind == "httpx"
        else _RawClient(config["url"], 10.0)
    )

    async def one(due: float) -> None:
        nonlocal in_flight
        begin = time.perf_counter()
        lag = begin - due
        lags.append(lag)
        if lag > late_s:
            counts["late"] += 1
        try:
            status = await client.get()
        except failures:
            counts["errors"] += 1
            return
        finally:
            in_flight -= 1
        end = time.perf_counter()
        latencies.append(end - begin)
        from_schedule.append(end - due)
        if not 200 <= status < 300:
            counts["non_2xx"] += 1

    try:
        # Open a few connections (and warm the client's code paths) before the clock starts.
        primed = await asyncio.gather(
            *(client.get() for _ in range(min(_PRIME, max_in_flight))), return_exceptions=True
        )
        prime_failures = sum(1 for r in primed if isinstance(r, BaseException))
        pending: set[asyncio.Task[None]] = set()
        gc.collect()
        gc.freeze()  # what exists now is never collected again: shorter collections
        cpu_begin = time.process_time()
        start = time.perf_counter() + 0.01
        # A driver that falls far behind stops sending (the rest count as missed): bounded time.
        hard_stop = start + duration + max(1.0, duration / 2)
        for i in range(total):
            due = start + i * interval
            now = time.perf_counter()
            if now > hard_stop:
                counts["missed"] += total - i
                break
            # Always yield, even when behind: the running requests must progress.
            await asyncio.sleep(max(0.0, due - now))
            if in_flight >= max_in_flight:
                counts["missed"] += 1
                continue
            in_flight += 1
            peak_in_flight = max(peak_in_flight, in_flight)
            counts["sent"] += 1
            task = asyncio.create_task(one(due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=15.0)
        unfinished = len(pending)
        seconds = time.perf_counter() - start
        driver_cpu = time.process_time() - cpu_begin
    finally:
        await client.close()
    latencies.sort()
    from_schedule.sort()
    lags.sort()
    done = len(latencies)
    sent = max(1, counts["sent"])
    return {
        "tool": f"open-loop ({kind})",
        "offered_rps": rate,
        "scheduled": total,
        "sent": counts["sent"],
        "missed": counts["missed"],
        "late": counts["late"],
        "late_ms": late_s * 1000,
        "late_fraction": counts["late"] / sent,
        "requests": done,
        "seconds": seconds,
        # Achieved: responses over the time from the first slot to the last response (equal
        # to the offered rate, give or take one latency, when the driver keeps its timetable).
        "rps": done / seconds if seconds > 0 else float("nan"),
        "capped": False,
        "p50_ms": _pct(latencies, 0.5),
        "p90_ms": _pct(latencies, 0.9),
        "p99_ms": _pct(latencies, 0.99),
        "mean_ms": sum(latencies) / max(1, done) * 1000,
        "sched_p50_ms": _pct(from_schedule, 0.5),
        "sched_p99_ms": _pct(from_schedule, 0.99),
        "lag_p50_ms": _pct(lags, 0.5),
        "lag_p99_ms": _pct(lags, 0.99),
        "lag_max_ms": lags[-1] * 1000 if lags else float("nan"),
        "max_in_flight": max_in_flight,
        "peak_in_flight": peak_in_flight,
        # The driver's own CPU over the run (1.0 = a whole core): near 1, it is the bottleneck.
        "driver_cpu_share": driver_cpu / seconds if seconds > 0 else float("nan"),
        "non_2xx": counts["non_2xx"],
        "socket_errors": counts["errors"] + unfinished + prime_failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="JSON config (url, duration, ...)")
    config = json.loads(parser.parse_args().worker)
    _check_loopback(config["url"])
    if config.get("cpu") is not None:
        os.sched_setaffinity(0, {int(config["cpu"])})
    if config.get("mode") == "rate":
        emit(asyncio.run(_open_loop(config)))
    else:
        emit(asyncio.run(_httpx_load(config)))


if __name__ == "__main__":
    sys.exit(main())
