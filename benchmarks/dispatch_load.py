"""Dispatch modes under HTTP load: ``local`` against ``inline``, and what upstream's metric says.

Two uvicorn processes serve ``benchmarks/_http_app.py`` as ``ours`` (upstream's FastAPI
instrumentation plus this package), one with ``OTEL_BGTASKS_DISPATCH=inline``, one with
``local`` (read by the instrumentor, as under ``opentelemetry-instrument``), both exporting to
the real collector. Phases, interleaved over rounds (median reported):

1. saturation on ``/work`` (a trivial task): throughput, request p50/p99, task latency
   p50/p99, and local/inline ratios (target: throughput >= 1.0);
2. the same at a fixed rate (half the slower mode's saturation throughput), open loop;
3. ``/work50`` (the endpoint awaits 5 ms, its task 50 ms) at a fixed rate: request latency p50
   as the client measured it against the p50 of upstream's ``http.server.duration`` histogram
   (recorded with 0.5 ms buckets for this benchmark), per mode. Target for ``local``: within
   10% of the client's (the client also sees the connection and the loopback, ~1 ms here,
   which no server metric can); ``inline`` reports the task's 50 ms on top of the request.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

from benchmarks._common import interleaved, median, per_round, ratio
from benchmarks._load import drive_rate
from benchmarks.http_load import (
    collector,
    fixed_rate,
    fixed_rate_rounds,
    load,
    start_app,
    summarize,
    summarize_fixed_rate,
    wait_drained,
    workdir,
)

__all__ = ["MODES", "run", "table"]

MODES = ("inline", "local")
FULL = {
    "rounds": 3,
    "duration": 6,
    "warmup": 2,
    "connections": 8,
    "rate_fraction": 0.5,
    "rate_duration": 4,
    "max_in_flight": 64,
    "metric_rate": 100,
    "metric_duration": 4,
}
QUICK = {**FULL, "rounds": 1, "duration": 3, "rate": 400, "rate_duration": 2.5}
THROUGHPUT_TARGET = 1.0
METRIC_TARGET = 0.10  # |metric p50 / client p50 - 1| for local


def _histogram_p50(bounds: list[float], counts: list[int]) -> float:
    """p50 (ms) of an explicit-bucket histogram, linear within the bucket."""
    total = sum(counts)
    if total == 0:
        return float("nan")
    half, seen = total / 2, 0
    for i, count in enumerate(counts):
        if seen + count >= half and count:
            low = bounds[i - 1] if i > 0 else 0.0
            high = bounds[i] if i < len(bounds) else low
            return low + (high - low) * (half - seen) / count
        seen += count
    return bounds[-1]


def _request_metric(server: Any) -> tuple[list[float], list[int]]:
    status, body = server.get("/request-metric")
    if status != 200:
        raise RuntimeError(f"/request-metric answered {status}")
    data = json.loads(body)
    return data["bounds"], data["counts"]


def metric_vs_client(server: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    """Drive /work50 at a fixed rate; the client's p50 and upstream's metric p50 (ms)."""
    if server.post("/reset") != 200:
        raise RuntimeError("/reset failed")
    bounds, before = _request_metric(server)
    result = drive_rate(
        f"{server.url}/work50",
        rate=float(config["metric_rate"]),
        duration=float(config["metric_duration"]),
        max_in_flight=int(config["max_in_flight"]),
    )
    app = wait_drained(server)
    _, after = _request_metric(server)
    delta = [a - b for a, b in zip(after, before, strict=True)]
    metric_p50 = _histogram_p50(bounds, delta)
    return {
        "client_p50_ms": result["p50_ms"],
        "client_p99_ms": result["p99_ms"],
        "metric_p50_ms": metric_p50,
        "metric_over_client": ratio(metric_p50, result["p50_ms"]),
        "recorded": sum(delta),
        "requests": result["requests"],
        "all_ok": result["non_2xx"] == 0 and app["tasks"] == app["requests"],
    }


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    if rounds is not None:
        config["rounds"] = rounds
    work = workdir("dispatch")
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    metric: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with collector(work) as otelcol, contextlib.ExitStack() as stack:
        servers = {}
        for mode in MODES:
            server = start_app(
                work,
                f"bench-dispatch-{mode}",
                "ours",
                otelcol.otlp_grpc_endpoint,
                env={"OTEL_BGTASKS_DISPATCH": mode, "BENCH_REQUEST_METRIC": "1"},
            )
            stack.callback(server.stop)
            servers[mode] = server
        for mode in MODES:
            load(servers[mode], config, float(config["warmup"]))
        for r, mode in interleaved(MODES, int(config["rounds"])):
            result = load(servers[mode], config, float(config["duration"]))
            samples[mode].append(result)
            log(
                f"  dispatch round {r + 1}: {mode:<7} {result['rps']:8.0f} req/s  "
                f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
                f"task p50 {result['task_p50_ms']:.2f} p99 {result['task_p99_ms']:.2f} ms  "
                f"ok={result['all_ok']}"
            )
        slowest = min(MODES, key=lambda m: median(r["rps"] for r in samples[m]))
        rate = fixed_rate(config, median(r["rps"] for r in samples[slowest]))
        basis = (
            "fixed (--quick)" if config.get("rate") else f"{config['rate_fraction']} x {slowest}"
        )
        fixed = fixed_rate_rounds(servers, config, rate, "dispatch", log)
        for r, mode in interleaved(MODES, int(config["rounds"])):
            figures = metric_vs_client(servers[mode], config)
            metric[mode].append(figures)
            log(
                f"  dispatch 50 ms task round {r + 1}: {mode:<7} client p50 "
                f"{figures['client_p50_ms']:.2f} ms, upstream metric p50 "
                f"{figures['metric_p50_ms']:.2f} ms ({figures['metric_over_client']:.2f}x)  "
                f"ok={figures['all_ok']}"
            )
    result = summarize(samples, "inline", config)
    result["fixed_rate"] = summarize_fixed_rate(fixed, "inline", rate, basis)
    result["local_over_inline_throughput"] = result["throughput_ratio"]["local_over_inline"]
    result["throughput_target"] = THROUGHPUT_TARGET
    result["request_metric_50ms_task"] = {
        mode: {
            "client_p50_ms": median(f["client_p50_ms"] for f in runs),
            "metric_p50_ms": median(f["metric_p50_ms"] for f in runs),
            "metric_over_client": median(f["metric_over_client"] for f in runs),
            "all_ok": all(f["all_ok"] for f in runs),
        }
        for mode, runs in metric.items()
    }
    result["metric_target"] = METRIC_TARGET
    result["local_task_latency_over_inline_fixed"] = median(
        per_round(fixed, "task_p50_ms", lambda v: ratio(v["local"], v["inline"]))
    )
    return result


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for mode, v in figures["variants"].items():
        rows.append(
            (
                f"dispatch {mode} saturation",
                f"{v['rps']:.0f} req/s, p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms, "
                f"task p50 {v['task_p50_ms']:.2f} p99 {v['task_p99_ms']:.2f} ms, ok={v['all_ok']}",
                "",
            )
        )
    rows.append(
        (
            "dispatch local/inline throughput",
            f"{figures['local_over_inline_throughput']:.3f}",
            f">= {THROUGHPUT_TARGET}",
        )
    )
    rows.append(
        (
            "dispatch local/inline request p99 (saturation)",
            f"{figures['p99_latency_ratio']['local_over_inline']:.3f}",
            "(report)",
        )
    )
    fixed = figures["fixed_rate"]
    for mode, v in fixed["variants"].items():
        rows.append(
            (
                f"dispatch {mode} @ {fixed['offered_rps']:.0f} req/s",
                f"request p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms, task p50 "
                f"{v['task_p50_ms']:.3f} p99 {v['task_p99_ms']:.3f} ms, ok={v['all_ok']}",
                "",
            )
        )
    for figure in ("request_p50_ratio", "request_p99_ratio", "task_p50_ratio", "task_p99_ratio"):
        rows.append(
            (
                f"dispatch local/inline {figure.removesuffix('_ratio')} @ fixed rate",
                f"{fixed[figure]['local_over_inline']:.3f}",
                "(report)",
            )
        )
    for mode, v in figures["request_metric_50ms_task"].items():
        rows.append(
            (
                f"dispatch {mode}, 50 ms task: upstream metric p50 / client p50",
                f"{v['metric_p50_ms']:.2f} / {v['client_p50_ms']:.2f} ms = "
                f"{v['metric_over_client']:.3f}",
                f"within {METRIC_TARGET:.0%}" if mode == "local" else "(report)",
            )
        )
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
