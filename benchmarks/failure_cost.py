"""What failing tasks cost an app: an unrelated endpoint's latency with 20 failing tasks/s.

One uvicorn process serves ``benchmarks/_failing_app.py`` (this package, a SQLite dead-letter
store, spans to an SDK provider without exporter) once per logging set-up: ``default``
(structlog unconfigured: its console renderer, rich installed, the issue's worst case) and
``json`` (`configure_structlog_json`); stdout goes to a file. Each round runs two phases in
turn (order rotated), each driving ``GET /ping`` open loop at a fixed rate while a second
driver sends 20 req/s that each schedule two tasks: in ``failing`` (``GET /fail``) the first
fails with a 900-deep list argument and secrets (dead-lettered), in ``quiet`` (``GET /ok``,
the baseline: the same load and drivers) it succeeds; the second task always succeeds.

Reported per set-up: /ping p50/p99 in both phases and their ratio failing/quiet (median over
rounds; target p99 within 1.2x), the event loop's extra CPU per failure (failing minus quiet
loop-thread CPU time, over the failures: the cost requests queue behind, which a busy machine's
scheduling noise does not blur as it does a p99), log bytes and dead letters per failure, and
that every failure was dead-lettered and every following task ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, interleaved, median
from benchmarks._load import drive_rate

__all__ = ["run", "table"]

LOGGING = ("default", "json")
PHASES = ("quiet", "failing")
FAILURES_PER_S = 20.0
TARGET = 1.2
FULL = {"rounds": 3, "duration": 6.0, "rate": 200.0}
QUICK = {"rounds": 1, "duration": 3.0, "rate": 200.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return dict(json.loads(response.read()))


@contextlib.contextmanager
def _serve(work: Path, logging: str) -> Iterator[tuple[str, Path]]:
    port = _free_port()
    log = work / f"app-{logging}.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "BENCH_LOGS": logging,
        "OTEL_BGTASKS_DLQ_URL": f"sqlite:///{work / f'dlq-{logging}.db'}",
        "COLUMNS": "120",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks._failing_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    _get(f"{url}/stats")
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        tail = log.read_text()[-2000:]
                        raise RuntimeError(f"app did not start: {tail}") from None
                    time.sleep(0.1)
            yield url, log
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _phase(url: str, log: Path, phase: str, config: dict[str, Any]) -> dict[str, Any]:
    before, log_before = _get(f"{url}/stats"), log.stat().st_size
    side_result: dict[str, Any] = {}
    path = "/fail" if phase == "failing" else "/ok"

    def drive_side() -> None:
        side_result.update(
            drive_rate(f"{url}{path}", rate=FAILURES_PER_S, duration=config["duration"])
        )

    side = threading.Thread(target=drive_side)
    side.start()
    ping = drive_rate(f"{url}/ping", rate=config["rate"], duration=config["duration"])
    side.join()
    time.sleep(0.5)  # the last failures' dead letters and log lines
    after, log_after = _get(f"{url}/stats"), log.stat().st_size
    failures = after["failed"] - before["failed"]
    return {
        "p50_ms": ping["p50_ms"],
        "p99_ms": ping["p99_ms"],
        "ping_non_2xx": ping["non_2xx"] + ping["socket_errors"],
        "failures": failures,
        "failures_per_s": failures / config["duration"],
        "dead_letters": (after["dead_letters"] or 0) - (before["dead_letters"] or 0),
        "tasks_after": after["after"] - before["after"],
        "log_bytes": log_after - log_before,
        "loop_cpu_ms_per_request": (after["loop_cpu_s"] - before["loop_cpu_s"])
        * 1000
        / max(1, ping["requests"] + side_result.get("requests", 0)),
        "loop_cpu_ms": (after["loop_cpu_s"] - before["loop_cpu_s"]) * 1000,
        "side_requests": side_result.get("requests", 0),
        "side_p99_ms": side_result.get("p99_ms"),
    }


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    if rounds is not None:
        config["rounds"] = rounds
    figures: dict[str, Any] = {"config": config, "logging": {}}
    with tempfile.TemporaryDirectory(prefix="bgtasks-failure-cost-") as tmp:
        for logging in LOGGING:
            samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PHASES}
            with _serve(Path(tmp), logging) as (url, app_log):
                _phase(url, app_log, "failing", {**config, "duration": 1.0})  # warm-up
                for r, phase in interleaved(PHASES, int(config["rounds"])):
                    sample = _phase(url, app_log, phase, config)
                    samples[phase].append(sample)
                    log(f"  {logging} round {r} {phase}: {json.dumps(sample)}")
            failing = samples["failing"]
            total_failures = sum(s["failures"] for s in failing)
            p99_ratios = [
                f["p99_ms"] / q["p99_ms"]
                for q, f in zip(samples["quiet"], failing, strict=True)
                if q["p99_ms"] > 0
            ]
            figures["logging"][logging] = {
                "quiet_p50_ms": median(s["p50_ms"] for s in samples["quiet"]),
                "quiet_p99_ms": median(s["p99_ms"] for s in samples["quiet"]),
                "failing_p50_ms": median(s["p50_ms"] for s in failing),
                "failing_p99_ms": median(s["p99_ms"] for s in failing),
                "p99_ratio": median(p99_ratios),
                "failures_per_s": median(s["failures_per_s"] for s in failing),
                "log_bytes_per_failure": sum(s["log_bytes"] for s in failing)
                / max(total_failures, 1),
                # the event loop's extra CPU per failure: failing minus quiet loop time at the
                # same load, over the failures (robust where latency is noise on a busy machine)
                "loop_cpu_ms_per_failure": median(
                    (f["loop_cpu_ms"] - q["loop_cpu_ms"]) / max(f["failures"], 1)
                    for q, f in zip(samples["quiet"], failing, strict=True)
                ),
                "all_dead_lettered": all(s["dead_letters"] == s["failures"] for s in failing),
                "tasks_after_failures_ran": all(s["tasks_after"] == s["failures"] for s in failing),
                "ping_all_ok": all(s["ping_non_2xx"] == 0 for p in PHASES for s in samples[p]),
                "samples": samples,
            }
    return figures


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for logging, v in figures["logging"].items():
        rows.append(
            (
                f"failure cost ({logging} logs) /ping p99",
                f"{v['quiet_p99_ms']:.2f} -> {v['failing_p99_ms']:.2f} ms"
                f" (p50 {v['quiet_p50_ms']:.2f} -> {v['failing_p50_ms']:.2f}) at"
                f" {v['failures_per_s']:.0f} failures/s, ratio {v['p99_ratio']:.2f}",
                f"<= {TARGET}",
            )
        )
        rows.append(
            (
                f"failure cost ({logging} logs) per failure",
                f"{v['loop_cpu_ms_per_failure']:.2f} ms of event-loop CPU,"
                f" {v['log_bytes_per_failure']:.0f} log bytes, dead-lettered"
                f" {v['all_dead_lettered']}, next task ran {v['tasks_after_failures_ran']}",
                "bounded",
            )
        )
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2, default=str))
