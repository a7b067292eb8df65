"""Throughput and latency of a real uvicorn server, exporting OTLP to a real collector.

Three uvicorn processes serve ``benchmarks/_http_app.py`` (one endpoint scheduling one
background task), one per variant: ``none`` (uninstrumented), ``upstream``
(opentelemetry-instrumentation-fastapi) and ``ours`` (upstream plus this package). All export
OTLP/gRPC to the collector built by scripts/infra.sh (started with collector-config/otelcol.yaml
by the e2e harness, feeding a Jaeger), on free loopback ports. After a warm-up each round loads
every server in turn (order rotated per round) from a second process (wrk, or an httpx client)
with fixed concurrency, bounded in time and count.

Reported per variant: req/s, latency p50/p99, background-task latency (scheduling to task end,
measured by the app), and the throughput ratios ours/upstream (target >= 0.95) and x/none.
Every response must be a 200 and every request's task must have run (the app's own counter).

Then a fixed-rate phase compares latency at equal load: at saturation each variant's latency is
mostly queueing behind its own throughput, so a faster variant is not comparable with a slower
one. Every variant is driven open loop (``_load.drive_rate``) at the same offered rate, half the
saturation throughput of the slowest variant measured just before (a fixed rate with --quick),
and request and task latency p50/p99 are reported with their ratios to ``none``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, RESULTS_DIR, interleaved, median, per_round, ratio
from benchmarks._load import drive, drive_rate, load_tool

__all__ = ["VARIANTS", "run"]

VARIANTS = ("none", "upstream", "ours")
# rate_fraction: the fixed-rate phase offers this fraction of the reference saturation
# throughput; with "rate" set (--quick) that rate instead, so a one-round smoke run does not
# hang its latency figures on one noisy saturation sample.
FULL = {
    "rounds": 3,
    "duration": 8,
    "warmup": 3,
    "connections": 8,
    "rate_fraction": 0.5,
    "rate_duration": 4,
    "max_in_flight": 64,
}
QUICK = {
    "rounds": 2,
    "duration": 3,
    "warmup": 2,
    "connections": 8,
    "rate": 400,
    "rate_duration": 2.5,
    "max_in_flight": 64,
}
MAX_RPS = 20_000  # safety cap on responses per run: duration * MAX_RPS
# A safety cap on the fixed rate. The open-loop driver's raw client takes about 0.16 of a core
# at 800 req/s here (httpx: 0.6); far above, it would take a real share of the two cores.
MAX_FIXED_RATE = 2_000.0
ON_SCHEDULE_LATE_FRACTION = 0.01  # a fixed-rate run counts as on schedule below this
THROUGHPUT_TARGET = 0.95


class SkipBenchmark(RuntimeError):
    """A component the benchmark needs is missing (the message says how to get it)."""


def infra() -> Any:
    """The e2e harness module (tests/e2e/_infra.py), which starts the real components."""
    import sys

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.e2e import _infra

    for name in ("otelcol", "jaeger"):
        if _infra.find_binary(name) is None:
            raise SkipBenchmark(f"{name} not found: run scripts/infra.sh (or set OTELCOL_BIN)")
    return _infra


def workdir(name: str) -> Path:
    path = RESULTS_DIR / "work" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@contextlib.contextmanager
def collector(work: Path) -> Iterator[Any]:
    """Jaeger and the collector (on collector-config/otelcol.yaml), on loopback."""
    _infra = infra()
    with contextlib.ExitStack() as stack:
        jaeger = _infra.Jaeger(work)
        jaeger.process.env = {**jaeger.process.env, "JAEGER_MAX_TRACES": "20000"}
        stack.callback(jaeger.stop)
        jaeger.start()
        otelcol = _infra.Collector(work, jaeger_otlp_grpc=jaeger.otlp_grpc_address)
        stack.callback(otelcol.stop)
        otelcol.start()
        yield otelcol


def start_app(
    work: Path, name: str, variant: str, otlp_endpoint: str, env: Mapping[str, str] | None = None
) -> Any:
    """A uvicorn process serving the benchmark app as `variant`, exporting to `otlp_endpoint`
    (`env` adds variables)."""
    _infra = infra()
    server = _infra.UvicornApp(
        work,
        app="benchmarks._http_app:app",
        otlp_endpoint=otlp_endpoint,
        service_name=name,
        ready_path="/stats",
        env={
            # This checkout's src first: a copy of the tree serves its own code.
            "PYTHONPATH": os.pathsep.join((str(REPO_ROOT / "src"), str(REPO_ROOT))),
            "BENCH_VARIANT": variant,
            "OTEL_BGTASKS_DLQ_URL": f"sqlite:///{work / (name + '-dlq.db')}",
            **(env or {}),
        },
    )
    server.start()
    return server


def stats(server: Any) -> dict[str, Any]:
    status, body = server.get("/stats")
    if status != 200:
        raise RuntimeError(f"/stats answered {status}: {body[:300]!r}")
    return dict(json.loads(body))


def wait_drained(server: Any, timeout: float = 15.0) -> dict[str, Any]:
    """/stats once every request's task has run (or after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        current = stats(server)
        if current["tasks"] >= current["requests"] or time.monotonic() >= deadline:
            return current
        time.sleep(0.1)


def load(server: Any, config: Mapping[str, Any], duration: float) -> dict[str, Any]:
    """Reset the app's counters, load it at saturation, wait for its tasks; the figures."""
    if server.post("/reset") != 200:
        raise RuntimeError("/reset failed")
    result = drive(
        f"{server.url}/work",
        duration=duration,
        connections=int(config["connections"]),
        max_requests=int(duration * MAX_RPS),
    )
    return _with_app_figures(server, result)


def pinning() -> tuple[int, int] | None:
    """(driver CPU, server event-loop CPU) for the fixed-rate phase; None on a single CPU.

    Below saturation, a driver sharing the server's CPU is woken by each response and, having
    slept, preempts the server between its response and its background task: task latency
    then depends on where the scheduler happened to put two processes (+-15% between rounds
    here). Pinning the driver and the server's event-loop thread to different CPUs removes
    that; the server's other threads (span export, gRPC) stay free to run anywhere.
    """
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[-1]) if len(allowed) >= 2 else None


def load_at_rate(server: Any, config: Mapping[str, Any], rate: float) -> dict[str, Any]:
    """Reset the app's counters, send a fixed rate (open loop), wait for its tasks; figures."""
    if server.post("/reset") != 200:
        raise RuntimeError("/reset failed")
    cpus = pinning() if config.get("pin", True) else None
    pid = server.process.pid
    before = os.sched_getaffinity(pid)
    try:
        if cpus is not None:
            os.sched_setaffinity(pid, {cpus[1]})  # the main thread only: tid == pid
        result = drive_rate(
            f"{server.url}/work",
            rate=rate,
            duration=float(config["rate_duration"]),
            max_in_flight=int(config["max_in_flight"]),
            cpu=None if cpus is None else cpus[0],
        )
    finally:
        os.sched_setaffinity(pid, before)
    result["pinned"] = cpus is not None
    result = _with_app_figures(server, result)
    result["on_schedule"] = (
        result["missed"] == 0 and result["late_fraction"] <= ON_SCHEDULE_LATE_FRACTION
    )
    return result


def fixed_rate(config: Mapping[str, Any], saturation_rps: float) -> float:
    """The fixed-rate phase's offered rate: config["rate"], or a fraction of `saturation_rps`."""
    if config.get("rate"):
        return float(config["rate"])
    wanted = float(config["rate_fraction"]) * saturation_rps
    return max(50.0, min(MAX_FIXED_RATE, round(wanted)))


def _with_app_figures(server: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Wait for the app's tasks; add its counters, CPU and task latency to the load's result."""
    app = wait_drained(server)
    result["app"] = app
    result["all_ok"] = (
        result["non_2xx"] == 0
        and result["socket_errors"] == 0
        and app["tasks"] == app["requests"]
        and app["task_failures"] in (0, -1)
        and app["requests"] >= result["requests"]
    )
    served = max(1, app["requests"])
    result["cpu_us_per_request"] = app["cpu_s"] / served * 1e6
    result["main_cpu_us_per_request"] = app["main_thread_cpu_s"] / served * 1e6
    result["export_cpu_us_per_request"] = (app["cpu_s"] - app["main_thread_cpu_s"]) / served * 1e6
    result["task_p50_ms"] = app["task_latency_p50_ms"]
    result["task_p99_ms"] = app["task_latency_p99_ms"]
    return result


def summarize(
    samples: dict[str, list[dict[str, Any]]], baseline: str, config: Mapping[str, Any]
) -> dict[str, Any]:
    """Medians per variant and per-round throughput ratios against `baseline` and each other."""
    names = list(samples)
    figures: dict[str, Any] = {"config": dict(config), "tool": load_tool(), "variants": {}}
    for name in names:
        runs = samples[name]
        figures["variants"][name] = {
            "rps": median(r["rps"] for r in runs),
            "p50_ms": median(r["p50_ms"] for r in runs),
            "p99_ms": median(r["p99_ms"] for r in runs),
            "task_p50_ms": median(r["task_p50_ms"] for r in runs),
            "task_p99_ms": median(r["task_p99_ms"] for r in runs),
            "cpu_us_per_request": median(r["cpu_us_per_request"] for r in runs),
            "main_cpu_us_per_request": median(r["main_cpu_us_per_request"] for r in runs),
            "export_cpu_us_per_request": median(r["export_cpu_us_per_request"] for r in runs),
            "requests": sum(r["requests"] for r in runs),
            "all_ok": all(r["all_ok"] for r in runs),
            "capped": any(r["capped"] for r in runs),
            "rps_per_round": [r["rps"] for r in runs],
        }
    figures["throughput_ratio"] = {
        f"{name}_over_{baseline}": median(
            per_round(samples, "rps", lambda v, n=name: ratio(v[n], v[baseline]))
        )
        for name in names
        if name != baseline
    }
    figures["task_latency_ratio"] = {
        f"{name}_over_{baseline}": median(
            per_round(samples, "task_p50_ms", lambda v, n=name: ratio(v[n], v[baseline]))
        )
        for name in names
        if name != baseline
    }
    figures["cpu_per_request_ratio"] = {
        f"{name}_over_{baseline}": median(
            per_round(samples, "cpu_us_per_request", lambda v, n=name: ratio(v[n], v[baseline]))
        )
        for name in names
        if name != baseline
    }
    figures["p99_latency_ratio"] = {
        f"{name}_over_{baseline}": median(
            per_round(samples, "p99_ms", lambda v, n=name: ratio(v[n], v[baseline]))
        )
        for name in names
        if name != baseline
    }
    return figures


def summarize_fixed_rate(
    samples: dict[str, list[dict[str, Any]]], baseline: str, rate: float, basis: str
) -> dict[str, Any]:
    """Medians per variant of the fixed-rate runs, and per-round latency ratios to `baseline`."""
    figures: dict[str, Any] = {
        "offered_rps": rate,
        "rate_basis": basis,
        "pinning": dict(
            zip(("driver_cpu", "server_event_loop_cpu"), pinning() or (), strict=False)
        ),
        "variants": {},
    }
    for name, runs in samples.items():
        figures["variants"][name] = {
            "rps": median(r["rps"] for r in runs),
            "p50_ms": median(r["p50_ms"] for r in runs),
            "p99_ms": median(r["p99_ms"] for r in runs),
            "sched_p99_ms": median(r["sched_p99_ms"] for r in runs),
            "task_p50_ms": median(r["task_p50_ms"] for r in runs),
            "task_p99_ms": median(r["task_p99_ms"] for r in runs),
            "cpu_us_per_request": median(r["cpu_us_per_request"] for r in runs),
            "requests": sum(r["requests"] for r in runs),
            # The worst round: a driver that fell behind anywhere shows here.
            "late_fraction": max(r["late_fraction"] for r in runs),
            "missed": sum(r["missed"] for r in runs),
            "lag_p99_ms": max(r["lag_p99_ms"] for r in runs),
            "driver_cpu_share": max(r["driver_cpu_share"] for r in runs),
            "peak_in_flight": max(r["peak_in_flight"] for r in runs),
            "on_schedule": all(r["on_schedule"] for r in runs),
            "pinned": all(r["pinned"] for r in runs),
            "all_ok": all(r["all_ok"] for r in runs),
            "task_p50_ms_per_round": [r["task_p50_ms"] for r in runs],
            "task_p99_ms_per_round": [r["task_p99_ms"] for r in runs],
        }
    for figure, key in (
        ("task_p50_ratio", "task_p50_ms"),
        ("task_p99_ratio", "task_p99_ms"),
        ("request_p50_ratio", "p50_ms"),
        ("request_p99_ratio", "p99_ms"),
        ("cpu_per_request_ratio", "cpu_us_per_request"),
    ):
        figures[figure] = {
            f"{name}_over_{baseline}": median(
                per_round(samples, key, lambda v, n=name, b=baseline: ratio(v[n], v[b]))
            )
            for name in samples
            if name != baseline
        }
    figures["on_schedule"] = all(v["on_schedule"] for v in figures["variants"].values())
    figures["all_ok"] = all(v["all_ok"] for v in figures["variants"].values())
    return figures


def fixed_rate_rounds(
    servers: Mapping[str, Any],
    config: Mapping[str, Any],
    rate: float,
    prefix: str,
    log: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Interleaved rounds driving every server at `rate`; the per-round results per name."""
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for r, name in interleaved(list(servers), int(config["rounds"])):
        result = load_at_rate(servers[name], config, rate)
        samples[name].append(result)
        log(
            f"  {prefix} fixed {rate:.0f} req/s round {r + 1}: {name:<9} "
            f"task p50 {result['task_p50_ms']:.3f} p99 {result['task_p99_ms']:.3f} ms  "
            f"request p50 {result['p50_ms']:.2f} p99 {result['p99_ms']:.2f} ms  "
            f"late {result['late_fraction'] * 100:.1f}% missed {result['missed']}  "
            f"driver cpu {result['driver_cpu_share']:.2f}  ok={result['all_ok']}"
        )
    return samples


def fixed_rate_rows(
    prefix: str, fixed: Mapping[str, Any], target: str
) -> list[tuple[str, str, str]]:
    """Table rows of a fixed-rate phase (`target` printed next to the task-latency ratios)."""
    rate = fixed["offered_rps"]
    rows = []
    for name, v in fixed["variants"].items():
        rows.append(
            (
                f"{prefix} {name} @ {rate:.0f} req/s",
                f"task p50 {v['task_p50_ms']:.3f} p99 {v['task_p99_ms']:.3f} ms, request p50 "
                f"{v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms, {v['rps']:.0f} req/s achieved, "
                f"late {v['late_fraction'] * 100:.1f}%, missed {v['missed']}, ok={v['all_ok']}",
                "",
            )
        )
    for figure, label in (
        ("task_p50_ratio", "task latency p50"),
        ("task_p99_ratio", "task latency p99"),
        ("request_p50_ratio", "request latency p50"),
        ("request_p99_ratio", "request latency p99"),
    ):
        for key, value in fixed[figure].items():
            rows.append(
                (
                    f"{prefix} {key} {label} @ fixed rate",
                    f"{value:.3f}",
                    target if figure.startswith("task") else "(report)",
                )
            )
    rows.append((f"{prefix} fixed-rate driver on schedule", str(fixed["on_schedule"]), "True"))
    return rows


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    if rounds is not None:
        config["rounds"] = rounds
    work = workdir("http")
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with collector(work) as otelcol, contextlib.ExitStack() as stack:
        servers = {}
        for variant in VARIANTS:
            server = start_app(work, f"bench-{variant}", variant, otelcol.otlp_grpc_endpoint)
            stack.callback(server.stop)
            servers[variant] = server
        for variant in VARIANTS:
            load(servers[variant], config, float(config["warmup"]))
        for r, variant in interleaved(VARIANTS, int(config["rounds"])):
            result = load(servers[variant], config, float(config["duration"]))
            samples[variant].append(result)
            log(
                f"  http round {r + 1}: {variant:<9} {result['rps']:8.0f} req/s  "
                f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
                f"cpu/req {result['cpu_us_per_request']:.0f} us "
                f"(export {result['export_cpu_us_per_request']:.0f})  ok={result['all_ok']}"
            )
        # Equal load for everyone: half of what the slowest variant sustains.
        slowest = min(VARIANTS, key=lambda v: median(r["rps"] for r in samples[v]))
        rate = fixed_rate(config, median(r["rps"] for r in samples[slowest]))
        basis = (
            "fixed (--quick)" if config.get("rate") else f"{config['rate_fraction']} x {slowest}"
        )
        fixed = fixed_rate_rounds(servers, config, rate, "http", log)
    figures = summarize(samples, "none", config)
    figures["fixed_rate"] = summarize_fixed_rate(fixed, "none", rate, basis)
    figures["fixed_rate"]["ours_over_upstream"] = {
        key: median(per_round(fixed, key, lambda v: ratio(v["ours"], v["upstream"])))
        for key in ("task_p50_ms", "task_p99_ms", "p50_ms", "p99_ms")
    }
    figures["ours_over_upstream"] = median(
        per_round(samples, "rps", lambda v: ratio(v["ours"], v["upstream"]))
    )
    figures["ours_over_upstream_target"] = THROUGHPUT_TARGET
    figures["ours_over_upstream_cpu_per_request"] = median(
        per_round(samples, "cpu_us_per_request", lambda v: ratio(v["ours"], v["upstream"]))
    )
    return figures


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, v in figures["variants"].items():
        rows.append(
            (
                f"http {name}",
                f"{v['rps']:.0f} req/s, p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms, "
                f"task p50 {v['task_p50_ms']:.2f} ms, server CPU/request "
                f"{v['cpu_us_per_request']:.0f} us ({v['export_cpu_us_per_request']:.0f} in "
                f"export threads), ok={v['all_ok']}",
                "",
            )
        )
    rows.append(
        (
            "http ours/upstream throughput",
            f"{figures['ours_over_upstream']:.3f}",
            f">= {THROUGHPUT_TARGET}",
        )
    )
    rows.append(
        (
            "http ours/upstream server CPU per request",
            f"{figures['ours_over_upstream_cpu_per_request']:.3f}",
            "(report)",
        )
    )
    for key, value in figures["throughput_ratio"].items():
        rows.append((f"http {key} throughput", f"{value:.3f}", "(report)"))
    if "fixed_rate" in figures:
        rows.extend(fixed_rate_rows("http", figures["fixed_rate"], "(report)"))
        ours = figures["fixed_rate"]["ours_over_upstream"]
        rows.append(
            (
                "http ours/upstream latency @ fixed rate",
                f"task p50 {ours['task_p50_ms']:.3f}, p99 {ours['task_p99_ms']:.3f}; "
                f"request p50 {ours['p50_ms']:.3f}, p99 {ours['p99_ms']:.3f}",
                "(report)",
            )
        )
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
