"""Where the request-latency tail at a fixed rate comes from (opt-in: ``--only tail_parts``).

The HTTP benchmark's fixed-rate phase shows `ours` with a longer request p99 than `upstream`.
This drives `upstream` and `ours` apps at the same fixed rate (open loop, pinned as in the
HTTP benchmark), each in three set-ups that remove one suspect at a time:

- ``*_otlp``: as in the HTTP benchmark (OTLP/gRPC to the real collector);
- ``*_noexport``: the batch processor exports to a no-op exporter: no span is encoded, so the
  export thread never holds the GIL for the encoding of a batch (`BENCH_NOOP_SPAN_EXPORT=1`);
- ``*_gcfreeze``: OTLP again, with everything alive after start-up frozen out of the garbage
  collector (`gc.freeze()`), so a collection of the old generation walks only what was made
  since (`BENCH_GC_FREEZE=1`).

Figures: request and task latency p50/p99 of each, ratios to ``upstream_otlp`` per round,
and `ours`/`upstream` within each set-up: what is left of the gap once the suspect is gone.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from benchmarks._common import median, per_round, ratio
from benchmarks.http_load import (
    collector,
    fixed_rate_rounds,
    load,
    start_app,
    summarize_fixed_rate,
    workdir,
)

__all__ = ["run", "table"]

SETUPS = {
    "otlp": {},
    "noexport": {"BENCH_NOOP_SPAN_EXPORT": "1"},
    "gcfreeze": {"BENCH_GC_FREEZE": "1"},
}
NAMES = tuple(f"{variant}_{setup}" for setup in SETUPS for variant in ("upstream", "ours"))
FULL = {
    "rounds": 3,
    "warmup": 3,
    "connections": 8,
    "rate": 400,
    "rate_duration": 4,
    "max_in_flight": 64,
}
QUICK = {**FULL, "rounds": 2, "warmup": 2, "rate_duration": 2.5}


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    if rounds is not None:
        config["rounds"] = rounds
    work = workdir("tail_parts")
    with contextlib.ExitStack() as stack, collector(work) as otelcol:
        servers = {}
        for name in NAMES:
            variant, setup = name.split("_")
            servers[name] = start_app(
                work, f"bench-{name}", variant, otelcol.otlp_grpc_endpoint, SETUPS[setup]
            )
            stack.callback(servers[name].stop)
        for server in servers.values():
            load(server, config, float(config["warmup"]))
        rate = float(config["rate"])
        fixed = fixed_rate_rounds(servers, config, rate, "tail_parts", log)
    figures = summarize_fixed_rate(fixed, "upstream_otlp", rate, "fixed")
    figures["config"] = config
    figures["ours_over_upstream"] = {
        setup: {
            key: median(
                per_round(fixed, key, lambda v, s=setup: ratio(v[f"ours_{s}"], v[f"upstream_{s}"]))
            )
            for key in ("p50_ms", "p99_ms", "task_p50_ms", "task_p99_ms")
        }
        for setup in SETUPS
    }
    return figures


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, v in figures["variants"].items():
        rows.append(
            (
                f"tail_parts {name} @ {figures['offered_rps']:.0f} req/s",
                f"request p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms, task p50 "
                f"{v['task_p50_ms']:.3f} p99 {v['task_p99_ms']:.3f} ms, on schedule "
                f"{v['on_schedule']}",
                "",
            )
        )
    for setup, r in figures["ours_over_upstream"].items():
        rows.append(
            (
                f"tail_parts ours/upstream ({setup})",
                f"request p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f}, task p50 "
                f"{r['task_p50_ms']:.2f} p99 {r['task_p99_ms']:.2f}",
                "request p99 <= 1.25" if setup == "otlp" else "(report)",
            )
        )
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2, default=str))
