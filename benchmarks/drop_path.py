"""Where the failing-backend task latency goes: the SDK's full-queue drop path (opt-in).

``--only drop_path``. With the backend down the BatchSpanProcessor's queue stays full, and every
span that ends on the request path goes through the SDK's drop path: it builds a
``logger.warning("Queue full, dropping Span.")`` record (discarded afterwards by the SDK's own
duplicate filter) and the full deque drops its oldest span, which is freed there, on the event
loop's thread, instead of on the export thread after an export. This benchmark isolates those
two costs with four ``ours`` apps, all driven at the same fixed rate (open loop, pinned as in
``backend_failing``'s fixed-rate phase):

- ``healthy``: the collector;
- ``stopped``: a loopback port nothing listens on;
- ``stopped_quiet``: the same, with the SDK processor's logger raised to ERROR (the warning is
  not built; ``BENCH_QUIET_SDK_DROP_LOG=1``);
- ``stopped_unbounded``: the same as ``stopped`` with a span queue too large to fill during the
  run (``OTEL_BSP_MAX_QUEUE_SIZE``): no drop path at all, but memory grows with every request,
  so its p99 (garbage collection over a growing heap) and RSS are not an option, only a bound.

Figures: task and request latency p50/p99 of each, as ratios of ``healthy`` per round.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from benchmarks._common import median
from benchmarks.http_load import (
    collector,
    fixed_rate,
    fixed_rate_rounds,
    infra,
    load,
    start_app,
    stats,
    summarize_fixed_rate,
    workdir,
)

__all__ = ["run"]

VARIANTS = ("healthy", "stopped", "stopped_quiet", "stopped_unbounded")
FULL = {
    "rounds": 5,
    "warmup": 3,
    "connections": 8,
    "rate_fraction": 0.5,
    "rate_duration": 4,
    "max_in_flight": 64,
}
QUICK = {**FULL, "rounds": 2, "warmup": 2, "rate": 400, "rate_duration": 2.5}
_UNBOUNDED_QUEUE = "2000000"  # > spans per run: 4 per request


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    if rounds is not None:
        config["rounds"] = rounds
    _infra = infra()
    work = workdir("drop_path")
    with contextlib.ExitStack() as stack, collector(work) as otelcol:
        stopped = f"http://127.0.0.1:{_infra.free_port()}"
        setups = {
            "healthy": (otelcol.otlp_grpc_endpoint, {}),
            "stopped": (stopped, {}),
            "stopped_quiet": (stopped, {"BENCH_QUIET_SDK_DROP_LOG": "1"}),
            "stopped_unbounded": (stopped, {"OTEL_BSP_MAX_QUEUE_SIZE": _UNBOUNDED_QUEUE}),
        }
        servers = {}
        for name, (endpoint, env) in setups.items():
            servers[name] = start_app(work, f"bench-{name}", "ours", endpoint, env)
            stack.callback(servers[name].stop)
        # The warm-up at saturation also fills the stopped apps' queues; its healthy
        # throughput sets the rate, as in backend_failing.
        warm = {
            name: load(server, config, float(config["warmup"])) for name, server in servers.items()
        }
        rate = fixed_rate(config, warm["healthy"]["rps"])
        basis = "fixed (--quick)" if config.get("rate") else f"{config['rate_fraction']} x healthy"
        fixed = fixed_rate_rounds(servers, config, rate, "drop_path", log)
        end = {name: stats(server) for name, server in servers.items()}
    figures = summarize_fixed_rate(fixed, "healthy", rate, basis)
    figures["config"] = config
    figures["span_queue_at_end"] = {name: e.get("span_queue") for name, e in end.items()}
    figures["rss_end_mb"] = {name: e["rss_mb"] for name, e in end.items()}
    figures["task_p50_ms_median"] = {n: median(r["task_p50_ms"] for r in fixed[n]) for n in fixed}
    return figures


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, v in figures["variants"].items():
        rows.append(
            (
                f"drop_path {name} @ {figures['offered_rps']:.0f} req/s",
                f"task p50 {v['task_p50_ms']:.3f} p99 {v['task_p99_ms']:.3f} ms, request p50 "
                f"{v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms, span queue "
                f"{figures['span_queue_at_end'][name]}, RSS {figures['rss_end_mb'][name]:.0f} MiB",
                "",
            )
        )
    for key, value in figures["task_p50_ratio"].items():
        p99 = figures["task_p99_ratio"][key]
        rows.append((f"drop_path {key} task latency", f"p50 {value:.3f}, p99 {p99:.3f}", ""))
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2, default=str))
