"""The durability trials in full: 5 trials of 500 durable tasks (20 ms each) per scenario,
through a prefork Celery worker of 2 children on loopback Redis (broker, store):

- ``child``: SIGKILL one worker child after a fifth of the tasks ran;
- ``worker``: SIGKILL the whole worker (main process and children), restart it once;
- ``broker``: SIGKILL the broker (no persistence: every queued message is gone), restart it.

Prints ran / ran twice / dead-lettered / lost per trial and the totals; lost must be 0. The
web side is this process (instrumented; `start_recovery(every=1)` re-sends hand-offs past
their deadline, the broker's visibility timeout: 10 s here). The same trial, once with 100 tasks per
scenario, is in the test suite (tests/integration/test_celery_durability.py).

    python -m benchmarks.celery_durability [--tasks 500] [--trials 5] [--scenarios child,worker]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "benchmarks"]
sys.path.insert(0, str(REPO_ROOT))

from tests.celery_trials import SCENARIOS, TrialResult, run_trial, running_recovery  # noqa: E402
from tests.celery_worker import CeleryWorker  # noqa: E402
from tests.support.redis import running_redis  # noqa: E402


def run(*, tasks: int = 500, trials: int = 5, scenarios: tuple[str, ...] = SCENARIOS) -> Any:
    from benchmarks._common import noop_providers
    from otel_bgtasks import BackgroundTasksInstrumentor
    from otel_bgtasks.stores import open_store

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "b").mkdir()
        (base / "s").mkdir()
        (base / "w").mkdir()
        with running_redis(base / "b") as broker, running_redis(base / "s") as store_server:
            env = {
                "BGTASKS_TEST_BROKER": broker.url,
                "BGTASKS_TEST_STORE": f"redis://127.0.0.1:{store_server.port}/1",
            }
            os.environ.update(env)
            from tests.integration.apps import celery_app, celery_tasks

            celery_app.configure(env["BGTASKS_TEST_BROKER"], env["BGTASKS_TEST_STORE"])
            tracer_provider, meter_provider, _ = noop_providers()
            instrumentor = BackgroundTasksInstrumentor()
            instrumentor.instrument(
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
                dead_letter_store=env["BGTASKS_TEST_STORE"],
            )
            recovery = running_recovery(every=1.0)
            recovery.__enter__()
            worker = CeleryWorker(env, celery_app.results(), base / "w")
            worker.start()

            def restart_worker() -> None:
                worker.kill()
                worker.start()

            def restart_broker() -> None:
                broker.kill()
                broker.start()

            damage = {
                "child": worker.kill_child,
                "worker": restart_worker,
                "broker": restart_broker,
            }
            results: list[TrialResult] = []
            try:
                with open_store(env["BGTASKS_TEST_STORE"]) as store:
                    for scenario in scenarios:
                        for trial in range(trials):
                            result = run_trial(
                                scenario,  # type: ignore[arg-type]
                                tasks=tasks,
                                results=celery_app.results(),
                                store=store,
                                damage=damage,  # type: ignore[arg-type]
                                record=celery_tasks.record,
                            )
                            results.append(result)
                            print(f"trial {trial + 1}: {result.row()}", flush=True)
            finally:
                recovery.__exit__(None, None, None)
                worker.stop()
                instrumentor.uninstrument()
    totals: dict[str, dict[str, int]] = {}
    for result in results:
        row = totals.setdefault(
            result.scenario,
            {"trials": 0, "tasks": 0, "ran": 0, "ran_twice": 0, "dead_lettered": 0, "lost": 0},
        )
        row["trials"] += 1
        for key in ("tasks", "ran", "ran_twice", "dead_lettered", "lost"):
            row[key] += getattr(result, key)
    worst = {
        s: max(r.seconds for r in results if r.scenario == s) for s in {r.scenario for r in results}
    }
    return {"totals": totals, "worst_recovery_s": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    summary = run(
        tasks=args.tasks, trials=args.trials, scenarios=tuple(args.scenarios.split(","))
    )
    print(json.dumps(summary, indent=2))
    return 0 if all(row["lost"] == 0 for row in summary["totals"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
