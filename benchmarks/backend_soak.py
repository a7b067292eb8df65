"""Memory of the ``ours`` app over a longer run with the telemetry backend stopped (opt-in).

``--only backend_soak``: one fresh uvicorn process serving the benchmark app (``ours``),
exporting OTLP to a loopback port nothing listens on, driven open loop at a fixed rate
(``_load.drive_rate``) for 60 s (20 s with --quick). Its RSS, request count and span-queue
length are sampled every 2 s during the run (``GET /mem``, cheap) and for a few seconds after.

The question is whether memory levels off: with the backend down, the BatchSpanProcessor's
queue fills to its limit (``OTEL_BSP_MAX_QUEUE_SIZE``, 2048 spans) and then drops the oldest,
so RSS should reach a plateau once the queue is full, whatever the number of requests. Figures:
the samples, RSS at the quarter marks of the load, growth over the first and the second half
of the load (a plateau: the second half's growth near zero, against a request count that keeps
rising), the largest span-queue length seen, and that nothing surfaced (all 200s, all tasks run).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import time
from typing import Any

from benchmarks._load import drive_rate
from benchmarks.backend_failing import _export_errors
from benchmarks.http_load import ON_SCHEDULE_LATE_FRACTION, infra, start_app, wait_drained, workdir

__all__ = ["run"]

FULL = {"rate": 600, "duration": 60, "sample_every": 2.0, "after": 6.0, "max_in_flight": 64}
QUICK = {"rate": 400, "duration": 20, "sample_every": 2.0, "after": 4.0, "max_in_flight": 64}


def _mem(server: Any) -> dict[str, Any]:
    status, body = server.get("/mem")
    if status != 200:
        raise RuntimeError(f"/mem answered {status}: {body[:300]!r}")
    return dict(json.loads(body))


def _at(samples: list[dict[str, Any]], t: float) -> dict[str, Any]:
    """The first sample at or after `t` seconds (the last one if none)."""
    return next((s for s in samples if s["t_s"] >= t), samples[-1])


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    del rounds  # one long round by design
    config = dict(QUICK if quick else FULL)
    duration = float(config["duration"])
    work = workdir("backend_soak")
    endpoint = f"http://127.0.0.1:{infra().free_port()}"  # nothing listens: connection refused
    samples: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        server = start_app(work, "bench-soak-stopped", "ours", endpoint)
        stack.callback(server.stop)
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        begin = time.monotonic()

        def sample(phase: str) -> None:
            current = _mem(server)
            current["t_s"] = round(time.monotonic() - begin, 2)
            current["phase"] = phase
            samples.append(current)

        sample("idle")
        load_begin = time.monotonic()
        future = pool.submit(
            drive_rate,
            f"{server.url}/work",
            rate=float(config["rate"]),
            duration=duration,
            max_in_flight=int(config["max_in_flight"]),
        )
        next_sample = load_begin
        while not future.done():
            next_sample += float(config["sample_every"])
            with contextlib.suppress(concurrent.futures.TimeoutError):
                future.result(timeout=max(0.0, next_sample - time.monotonic()))
            if not future.done():
                sample("load")
                last = samples[-1]
                log(
                    f"  backend_soak t={last['t_s']:5.1f}s  RSS {last['rss_mb']:6.1f} MiB  "
                    f"requests {last['requests']:6d}  span queue {last['span_queue']}"
                )
        result = future.result()
        load_seconds = time.monotonic() - load_begin
        sample("load end")
        after_end = time.monotonic() + float(config["after"])
        while time.monotonic() < after_end:
            time.sleep(float(config["sample_every"]))
            sample("after")
        app = wait_drained(server)
        export_errors = _export_errors(server)

    load_samples = [s for s in samples if s["phase"] in ("load", "load end")]
    t0 = samples[0]["t_s"]
    start_rss = samples[0]["rss_mb"]

    def rss_at(fraction: float) -> float:
        return float(_at(load_samples, t0 + fraction * load_seconds)["rss_mb"])

    quarter = {f"{int(f * 100)}%": rss_at(f) for f in (0.25, 0.5, 0.75)}
    quarter["100%"] = float(load_samples[-1]["rss_mb"])
    figures: dict[str, Any] = {
        "config": config,
        "backend": "stopped",
        "span_queue_limit": int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "2048")),
        "rss_idle_mb": start_rss,
        "rss_during_load_mb": quarter,
        "growth_first_half_mb": quarter["50%"] - start_rss,
        "growth_second_half_mb": quarter["100%"] - quarter["50%"],
        "requests_first_half": _at(load_samples, t0 + 0.5 * load_seconds)["requests"],
        "requests_total": app["requests"],
        "span_queue_max": max((s["span_queue"] or 0) for s in samples),
        "rss_max_mb": max(s["rss_mb"] for s in samples),
        "rss_after_mb": samples[-1]["rss_mb"],
        "export_errors_logged": export_errors,
        "load": {
            k: result[k]
            for k in (
                "offered_rps",
                "rps",
                "requests",
                "missed",
                "late_fraction",
                "p50_ms",
                "p99_ms",
                "driver_cpu_share",
            )
        },
        "on_schedule": result["missed"] == 0
        and result["late_fraction"] <= ON_SCHEDULE_LATE_FRACTION,
        "no_error_surfaced": (
            result["non_2xx"] == 0
            and result["socket_errors"] == 0
            and app["tasks"] == app["requests"]
            and app["task_failures"] in (0, -1)
        ),
        "samples": samples,
    }
    return figures


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    q = figures["rss_during_load_mb"]
    rate = figures["config"]["rate"]
    return [
        (
            f"soak stopped backend, {figures['config']['duration']} s @ {rate} req/s",
            f"RSS idle {figures['rss_idle_mb']:.0f} -> 25% {q['25%']:.0f} -> 50% {q['50%']:.0f}"
            f" -> 75% {q['75%']:.0f} -> end {q['100%']:.0f} MiB "
            f"({figures['requests_total']} requests)",
            "",
        ),
        (
            "soak RSS growth, 2nd half of the load",
            f"{figures['growth_second_half_mb']:+.1f} MiB "
            f"(1st half {figures['growth_first_half_mb']:+.1f})",
            "~0 (plateau)",
        ),
        (
            "soak largest span queue",
            str(figures["span_queue_max"]),
            f"<= {figures['span_queue_limit']}",
        ),
        ("soak no error surfaced", str(figures["no_error_surfaced"]), "True"),
        ("soak driver on schedule", str(figures["on_schedule"]), "True"),
    ]


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2, default=str))
