"""What each part of the signal contract costs per task (opt-in: ``--only contract_parts``).

The per_task floor (`contract`) is built up one part at a time, each step in its own process
with the per_task setup and loop, interleaved over rounds:

    none -> upstream (a bare span, opentelemetry-instrumentation-fastapi)
         -> span (a CONSUMER span attached around the task, no attribute, no link)
         -> +event (`bgtasks.enqueued` on the request span)
         -> +link -> +attributes (4 at start, attempts and outcome at the end)
         -> +wait_histogram -> +duration_histogram (= the full contract floor)

Reported: overhead over `none` of each step and what each part adds (the difference with the
previous step, per round, median), which shows what the contract itself costs in the SDK and
so what a per-task target relative to upstream's bare span can reach.
"""

from __future__ import annotations

from typing import Any

from benchmarks._common import interleaved, median, per_round, ratio, run_worker
from benchmarks.per_task import CONTRACT_PARTS

__all__ = ["STEPS", "run"]

# Each step adds one part to the previous one.
STEPS: dict[str, str] = {"none": "none", "upstream": "upstream", "span": "contract:"}
for _i, _part in enumerate(CONTRACT_PARTS):
    STEPS[f"+{_part}"] = "contract:" + "+".join(CONTRACT_PARTS[: _i + 1])

FULL = {"tasks": 15_000, "batches": 5, "warmup": 2_000, "rounds": 5}
QUICK = {"tasks": 3_000, "batches": 3, "warmup": 500, "rounds": 2}


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    if rounds is not None:
        config["rounds"] = rounds
    names = list(STEPS)
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r, name in interleaved(names, int(config["rounds"])):
        result = run_worker("benchmarks.per_task", {**config, "variant": STEPS[name]}, timeout=300)
        samples[name].append(result)
        log(f"  contract_parts round {r + 1}: {name:<20} {result['cpu_ns'] / 1000:8.1f} us cpu")
    overhead_us = {
        n: median(per_round(samples, "cpu_ns", lambda v, n=n: v[n] - v["none"])) / 1000
        for n in names
        if n != "none"
    }
    steps = [n for n in names if n not in ("none", "upstream")]
    adds_us = {}
    previous = "none"
    for n in steps:
        adds_us[n] = (
            median(per_round(samples, "cpu_ns", lambda v, n=n, p=previous: v[n] - v[p])) / 1000
        )
        previous = n
    last = steps[-1]
    return {
        "config": config,
        "clock": "cpu",
        "overhead_us": overhead_us,
        "part_adds_us": adds_us,
        "contract_over_upstream": median(
            per_round(
                samples,
                "cpu_ns",
                lambda v: ratio(v[last] - v["none"], v["upstream"] - v["none"]),
            )
        ),
        "samples": {n: [s["cpu_ns"] for s in samples[n]] for n in names},
    }


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [
        (
            f"contract_parts {name}",
            f"overhead {figures['overhead_us'][name]:.1f} us"
            + (
                f" (adds {figures['part_adds_us'][name]:+.1f})"
                if name in figures["part_adds_us"]
                else ""
            ),
            "",
        )
        for name in figures["overhead_us"]
    ]
    rows.append(
        (
            "contract_parts floor/upstream (overhead)",
            f"{figures['contract_over_upstream']:.2f}",
            "(bounds ours/upstream from below)",
        )
    )
    return rows
