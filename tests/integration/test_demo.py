"""`python -m otel_bgtasks.demo`, as `make demo` runs it: the report a newcomer reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def _run_demo(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(COLUMNS="220", NO_COLOR="1")
    done = subprocess.run(
        [sys.executable, "-m", "otel_bgtasks.demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _table_instruments(report: str) -> list[str]:
    """The instrument column of the metric table, in order (continuation lines skipped)."""
    table = report.split("Metrics (as exported)", 1)[1].split("└", 1)[0]
    return re.findall(r"^│ ([a-z][\w.]+) ", table, flags=re.MULTILINE)


def test_demo_report_shows_task_metrics_first_in_their_units() -> None:
    report = _run_demo()
    instruments = _table_instruments(report)
    assert instruments[0] == "bgtasks.task.duration"
    assert all(name.startswith("bgtasks.") for name in instruments), instruments
    expected_order = [
        "bgtasks.task.duration",
        "bgtasks.task.wait",
        "bgtasks.task.retries",
        "bgtasks.task.active",
        "bgtasks.task.pending",
        "bgtasks.dlq.moves",
        "bgtasks.dlq.replays",
        "bgtasks.dlq.depth",
        "bgtasks.circuit.state",
        "bgtasks.circuit.transitions",
        "bgtasks.alerts.sent",
    ]
    assert list(dict.fromkeys(instruments)) == expected_order
    # Upstream's HTTP metrics are one line after the table, in their own unit (ms).
    (summary,) = [line for line in report.splitlines() if line.startswith("HTTP (upstream")]
    match = re.search(r"(\d+) requests \(status 200: (\d+)\), mean ([\d.]+) (ms|s)", summary)
    assert match is not None, summary
    assert match.group(1) == match.group(2) == "11"
    assert match.group(4) == "ms", summary
    assert float(match.group(3)) < 1000, summary
    # The error category in brackets survives rich's markup.
    assert "dead_lettered ValueError [validation] attempts=1" in report


def test_demo_http_flag_lists_upstream_series_after_ours() -> None:
    instruments = _table_instruments(_run_demo("--http"))
    first_http = next(i for i, name in enumerate(instruments) if name.startswith("http."))
    assert all(name.startswith("bgtasks.") for name in instruments[:first_http])
    assert all(not name.startswith("bgtasks.") for name in instruments[first_http:])
    assert "http.server.duration" in instruments
