"""Instructions per task under valgrind (callgrind): a figure that other load cannot move.

    python -m benchmarks.instructions ours floor         # variants of benchmarks/per_task.py
    python -m benchmarks.instructions --tasks 2000 ours

Each variant runs twice under ``valgrind --tool=callgrind`` (all threads), with ``tasks`` and
``2 * tasks`` iterations of the per_task loop; instructions per task = (Ir(2n) - Ir(n)) / n,
which cancels start-up, imports and the warm-up. Nothing time-dependent runs: the periodic
metric reader has a very long interval and spans go through a SimpleSpanProcessor (exported to
the no-op exporter on the loop's thread) instead of the batch processor's thread, whose
interleaving with the loop varies. Used to decide optimisations on a shared machine, where CPU
time varies by tens of percent between runs; valgrind makes it about 50x slower than native.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks._common import REPO_ROOT

__all__ = ["instructions", "per_task_instructions"]

_COLLECTED = re.compile(r"Collected : (\d+)")


def instructions(variant: str, tasks: int) -> tuple[int, int]:
    """Instructions (Ir) of a worker process running `tasks` iterations of `variant`:
    (all threads, the main thread)."""
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"  # the same hashing, hence the same dict and set probing
    # This checkout's src first: a copy of the tree measures its own code, not the installed one.
    paths = (str(REPO_ROOT / "src"), str(REPO_ROOT), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    config = {"variant": variant, "tasks": tasks, "count_only": True}
    out = tempfile.mkdtemp(prefix="bgtasks-callgrind-")
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            f"--callgrind-out-file={out}/cg.out",
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
    try:
        if proc.returncode != 0 or found is None:
            raise RuntimeError(f"{variant}: valgrind failed\n{proc.stderr[-3000:]}")
        main = 0
        for path in Path(out).iterdir():
            if path.name.endswith("-01"):  # thread 1: the event loop's
                for line in path.read_text().splitlines():
                    if line.startswith(("summary:", "totals:")):
                        main = int(line.split()[1])
                        break
        return int(found.group(1)), main
    finally:
        shutil.rmtree(out, ignore_errors=True)


def per_task_instructions(variant: str, tasks: int) -> tuple[float, float]:
    """(Ir(2 tasks) - Ir(tasks)) / tasks: all threads, main thread."""
    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(lambda n: instructions(variant, n), (tasks, 2 * tasks))
    return (large[0] - small[0]) / tasks, (large[1] - small[1]) / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    results = {}
    for variant in args.variants:
        results[variant] = per_task_instructions(variant, args.tasks)
        total, main = results[variant]
        print(
            f"{variant:<14} {total:12,.0f} instructions/task ({main:,.0f} main thread)", flush=True
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
