"""Run the otel-bgtasks benchmarks; write benchmarks/results/latest.json and print a table.

    python benchmarks/run.py                 # every benchmark (about 9 minutes on 2 cores)
    python benchmarks/run.py --quick         # a smoke run (< 2 minutes)
    python benchmarks/run.py --only per_task # one benchmark (comma-separated for several)
    python benchmarks/run.py --profile       # pyinstrument on the per_task `ours` variant
    python benchmarks/run.py --only contract_parts   # opt-in: what each contract part costs
    python benchmarks/run.py --only backend_soak     # opt-in: RSS over 60 s, backend down
    python benchmarks/run.py --only drop_path        # opt-in: the SDK's full-queue cost
    python benchmarks/run.py --only store_stall      # opt-in: /ping p99 while the store stalls
    python benchmarks/run.py --only export_parts     # opt-in: export cost of each span kind
    python benchmarks/run.py --only tail_parts       # opt-in: where the fixed-rate p99 goes
    python benchmarks/run.py --only celery           # opt-in: Celery on the seam vs plain Celery
    python -m benchmarks.celery_durability           # the durability trials (5 x 500 per scenario)
    python benchmarks/run.py --only backpressure     # opt-in: local pool RSS, slots busy

Every figure is a ratio against a baseline measured in the same run (see benchmarks/README.md).
The results of the benchmarks that ran replace their entries in latest.json; the others stay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, the benchmarks directory itself would be first on sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "benchmarks"]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import (  # noqa: E402 - after the sys.path fix above
    backend_failing,
    backend_soak,
    backpressure,
    celery_dispatch,
    contract_parts,
    dispatch_load,
    drop_path,
    export_parts,
    failure_cost,
    http_load,
    memory,
    per_task,
    replay,
    store_stall,
    tail_parts,
)
from benchmarks._common import RESULTS_DIR, run_worker  # noqa: E402

BENCHMARKS: dict[str, Any] = {
    "per_task": per_task,
    "replay": replay,
    "memory": memory,
    "http": http_load,
    "backend_failing": backend_failing,
    "dispatch": dispatch_load,
    "failure_cost": failure_cost,
}
# Opt-in (--only NAME): diagnostics that the default run leaves out to stay under 10 minutes.
EXTRA: dict[str, Any] = {
    "contract_parts": contract_parts,
    "backend_soak": backend_soak,
    "drop_path": drop_path,
    "store_stall": store_stall,
    "export_parts": export_parts,
    "tail_parts": tail_parts,
    "backpressure": backpressure,
    "celery": celery_dispatch,
}


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() + ("+dirty-src" if dirty.stdout.strip() else "")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "otel-bgtasks",
        "opentelemetry-sdk",
        "opentelemetry-instrumentation-fastapi",
        "starlette",
        "fastapi",
        "uvicorn",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def environment() -> dict[str, Any]:
    return {
        "commit": _git_commit(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": _versions(),
    }


def run_profile(quick: bool) -> dict[str, Any]:
    tasks = per_task.PROFILE_TASKS["quick" if quick else "full"]
    config = {"variant": "ours", "tasks": tasks, "warmup": 2_000, "batches": 1, "profile": True}
    return run_worker("benchmarks.per_task", config, timeout=600)


def profile_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [
        (
            f"profile self time: {name}",
            f"{row['share'] * 100:.1f}%",
            "",
        )
        for name, row in summary["categories"].items()
    ]
    for row in summary["top"][:10]:
        rows.append(
            (
                f"profile top: {row['function']} [{row['category']}]",
                f"{row['share'] * 100:.1f}%",
                row["file"],
            )
        )
    rows.append(("profile report", summary["report"], ""))
    return rows


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max((len(r[0]) for r in rows), default=10)
    vwidth = min(90, max((len(r[1]) for r in rows), default=10))
    print(f"\n{'figure':<{width}}  {'value':<{vwidth}}  target")
    print(f"{'-' * width}  {'-' * vwidth}  ------")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and rounds (smoke)")
    parser.add_argument(
        "--only",
        metavar="NAME",
        help=f"run only these benchmarks (comma-separated): {', '.join([*BENCHMARKS, *EXTRA])}",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the per_task `ours` variant with pyinstrument (results/profile.txt)",
    )
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    args = parser.parse_args(argv)

    if args.profile:
        names: list[str] = []
    elif args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS and n not in EXTRA]
        if unknown:
            known = ", ".join([*BENCHMARKS, *EXTRA])
            parser.error(f"unknown benchmark(s) {unknown}; known: {known}")
    else:
        names = list(BENCHMARKS)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    latest = RESULTS_DIR / "latest.json"
    results: dict[str, Any] = {}
    if latest.exists():
        try:
            results = json.loads(latest.read_text())
        except ValueError:
            results = {}
    results.setdefault("benchmarks", {})
    results["environment"] = environment()

    rows: list[tuple[str, str, str]] = []
    failed = False
    started = time.monotonic()
    for name in names:
        module = BENCHMARKS.get(name) or EXTRA[name]
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        begin = time.monotonic()
        try:
            figures = module.run(quick=args.quick, rounds=args.rounds, log=_log)
        except http_load.SkipBenchmark as exc:
            print(f"  skipped: {exc}")
            results["benchmarks"][name] = {"skipped": str(exc)}
            rows.append((name, "skipped", str(exc)))
            continue
        except Exception as exc:  # one broken benchmark must not lose the others' figures
            traceback.print_exc()
            failed = True
            results["benchmarks"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            rows.append((name, "ERROR", f"{type(exc).__name__}"))
            continue
        figures["quick"] = args.quick
        figures["seconds"] = round(time.monotonic() - begin, 1)
        figures["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results["benchmarks"][name] = figures
        rows.extend(module.table(figures))
        _write(latest, results)

    if args.profile:
        print(f"== profile{' (quick)' if args.quick else ''}", flush=True)
        summary = run_profile(args.quick)
        summary["quick"] = args.quick
        summary["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results["profile"] = summary
        rows.extend(profile_rows(summary))

    results["environment"]["load_average_end"] = os.getloadavg()
    results["environment"]["seconds"] = round(time.monotonic() - started, 1)
    _write(latest, results)
    print_table(rows)
    print(f"\nresults: {latest.relative_to(REPO_ROOT)} ({results['environment']['seconds']}s)")
    return 1 if failed else 0


def _log(message: str) -> None:
    print(message, flush=True)


def _write(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
