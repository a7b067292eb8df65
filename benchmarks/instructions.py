"""Instructions per task under valgrind (callgrind): a figure that other load cannot move.

    python -m benchmarks.instructions ours floor         # variants of benchmarks/per_task.py
    python -m benchmarks.instructions --tasks 2000 ours

Each variant runs twice under ``valgrind --tool=callgrind`` (all threads, so the span
processor's export thread counts), with ``tasks`` and ``2 * tasks`` iterations of the per_task
loop; instructions per task = (Ir(2n) - Ir(n)) / n, which cancels start-up, imports and the
warm-up. The periodic metric reader is set to a very long interval (its collections are
time-dependent). Used to decide optimisations on a shared machine, where CPU time varies by
tens of percent between runs; valgrind's own overhead makes it about 50x slower than native.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from benchmarks._common import REPO_ROOT

__all__ = ["instructions", "per_task_instructions"]

_COLLECTED = re.compile(r"Collected : (\d+)")


def instructions(variant: str, tasks: int) -> int:
    """Instructions (Ir) of a whole worker process running `tasks` iterations of `variant`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    config = {"variant": variant, "tasks": tasks, "count_only": True}
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.per_task",
            "--worker",
            json.dumps(config),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    found = _COLLECTED.search(proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"{variant}: valgrind failed\n{proc.stderr[-3000:]}")
    return int(found.group(1))


def per_task_instructions(variant: str, tasks: int) -> float:
    """(Ir(2 tasks) - Ir(tasks)) / tasks."""
    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(lambda n: instructions(variant, n), (tasks, 2 * tasks))
    return (large - small) / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    results = {}
    for variant in args.variants:
        results[variant] = per_task_instructions(variant, args.tasks)
        print(f"{variant:<14} {results[variant]:12,.0f} instructions/task", flush=True)
    base = results.get("none")
    if base is not None:
        for variant, value in results.items():
            if variant != "none":
                print(f"{variant:<14} overhead {value - base:12,.0f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
