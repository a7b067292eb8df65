"""HTTP load from a second process, bounded in time and in count, on loopback only.

`drive()` runs ``wrk`` (``apt-get install wrk``) with a fixed number of connections for a
fixed duration, capped at a maximum number of responses (``wrk_report.lua``); without wrk it
runs this module as a subprocess: an async httpx client with the same fixed concurrency.
Either way the result is requests, req/s, latency p50/p90/p99 and error counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks._common import REPO_ROOT, emit, run_worker

__all__ = ["drive", "load_tool"]

_LUA = Path(__file__).with_name("wrk_report.lua")


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


# -- the httpx fallback (runs as its own process) -------------------------------------------


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

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    done = len(latencies)
    return {
        "tool": "httpx",
        "requests": done,
        "seconds": seconds,
        "rps": done / seconds,
        "capped": counts["sent"] >= max_requests,
        "p50_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "p99_ms": pct(0.99),
        "mean_ms": sum(latencies) / done * 1000,
        "non_2xx": counts["non_2xx"],
        "socket_errors": counts["errors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="JSON config (url, duration, ...)")
    config = json.loads(parser.parse_args().worker)
    _check_loopback(config["url"])
    emit(asyncio.run(_httpx_load(config)))


if __name__ == "__main__":
    sys.exit(main())
