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
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, RESULTS_DIR, interleaved, median, per_round, ratio
from benchmarks._load import drive, load_tool

__all__ = ["VARIANTS", "run"]

VARIANTS = ("none", "upstream", "ours")
FULL = {"rounds": 3, "duration": 8, "warmup": 3, "connections": 8}
QUICK = {"rounds": 2, "duration": 3, "warmup": 2, "connections": 8}
MAX_RPS = 20_000  # safety cap on responses per run: duration * MAX_RPS
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


def start_app(work: Path, name: str, variant: str, otlp_endpoint: str) -> Any:
    """A uvicorn process serving the benchmark app as `variant`, exporting to `otlp_endpoint`."""
    _infra = infra()
    server = _infra.UvicornApp(
        work,
        app="benchmarks._http_app:app",
        otlp_endpoint=otlp_endpoint,
        service_name=name,
        ready_path="/stats",
        env={
            "PYTHONPATH": str(REPO_ROOT),
            "BENCH_VARIANT": variant,
            "OTEL_BGTASKS_DLQ_URL": f"sqlite:///{work / (name + '-dlq.db')}",
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
    """Reset the app's counters, load it, wait for its tasks; the load and app figures."""
    if server.post("/reset") != 200:
        raise RuntimeError("/reset failed")
    result = drive(
        f"{server.url}/work",
        duration=duration,
        connections=int(config["connections"]),
        max_requests=int(duration * MAX_RPS),
    )
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
    figures = summarize(samples, "none", config)
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
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
