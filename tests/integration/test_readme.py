"""Every code block of the README runs as pasted (issue 19), or says here why it cannot.

Each block is found by a line it contains (`tests.readme.blocks`); a block that is neither run
here nor given a reason fails `test_every_block_is_run_or_has_a_reason`, so a new example is
under test from the day it is written. Blocks run in a fresh project directory holding the
`shop` package the examples assume (tests/readme/project), in a child interpreter with none
of the test run's OTEL_* variables. The only substitution: `/var/lib/shop` (an absolute path a
test must not write) becomes a directory of the test's own, and that path must occur.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.readme.blocks import README, Block, blocks, substitute

from otel_bgtasks.records import DeadLetter, DeadLetterReason
from otel_bgtasks.stores import SQLiteDeadLetterStore

PROJECT = Path(__file__).resolve().parents[1] / "readme" / "project"
VENV_BIN = Path(sys.executable).parent

# python blocks run as scripts: the line that finds the block -> extra environment
PYTHON = {
    "# app.py": {},
    'configure_telemetry(service_name="shop")  # OTLP providers': {},
    'payments = CircuitBreaker("payments-api"': {},
    'instrument(dispatch="local", max_concurrency=32, drain_timeout=20)': {},
    "task = schedule(send_report, 42)": {},
    "class MyDispatcher:                     # otel_bgtasks.dispatch.Dispatcher": {},
    "app.include_router(bgtasks_router(": {"OTEL_BGTASKS_ADMIN_TOKEN": "a-token-of-the-operator"},
    'async with start_recovery(mode="rerun", concurrency=4)': {},
    "configure_structlog_json()                          # JSON lines": {},
    "alerting = install_alerting(": {"SLACK_WEBHOOK_URL": "https://hooks.example.invalid/T0/B0"},
}
PYTEST = "async def test_signup_mails_the_user(bgtasks):"
CLI = "otel-bgtasks dlq replay --all --task charge-card"
ALERT_RULES = 'export OTEL_BGTASKS_ALERT_RULES="consecutive_failures:3'
# Blocks run elsewhere, or that cannot run here: the line that finds them -> why.
ELSEWHERE = {
    "make demo    # the main job": "`make demo` is tests/integration/test_demo.py; `make test`"
    " is this suite",
    "pip install otel-bgtasks opentelemetry-distro": "needs the package registry; every extra"
    " it names is checked against pyproject.toml (test_the_install_extras_exist)",
    "mkdir -p /var/lib/shop": "runs in tests/e2e/test_zero_code.py against"
    " the real collector, Jaeger and Prometheus (with app.py, under uvicorn and gunicorn)",
    "docker compose up --build": "no Docker engine here: docker-compose.yml is loaded and"
    " checked by compose-go in tests/e2e/test_compose.py",
    "scripts/local-stack                  # in one terminal": "tests/e2e/test_local_stack.py"
    " runs the script",
    "curl -s 'http://localhost:16686/api/services'": "TRACE_ID is a placeholder; the same"
    " requests are made in tests/e2e/test_zero_code.py",
    '--data-urlencode \'tags={"bgtasks.task.id":"TASK_ID"}\'': "TASK_ID is a placeholder;"
    " tests/e2e/test_zero_code.py runs this search for every task",
    "make bench ": "the benchmarks take minutes (benchmarks/README.md)",
    "otel-bgtasks dlq list [--task NAME]": "a synopsis (```text), not an example",
    "# shop/tasks.py: imported by the web app and by the worker": "needs a broker and a"
    " Celery worker: tests/integration/test_celery.py runs the same shape (its app, tasks and"
    " worker modules in tests/integration/apps/celery_*.py) against real ones",
}


def _find(key: str) -> Block:
    found = [b for b in blocks() if key in b.text]
    assert len(found) == 1, f"README.md: {len(found)} blocks contain {key!r}"
    return found[0]


def test_every_block_is_run_or_has_a_reason() -> None:
    keys = [*PYTHON, PYTEST, CLI, ALERT_RULES, *ELSEWHERE]
    handled = {_find(key).line for key in keys}
    unhandled = [str(b) for b in blocks() if b.line not in handled]
    assert unhandled == [], (
        "README blocks neither run nor explained in tests/integration/test_readme.py"
    )


def test_the_install_extras_exist() -> None:
    import tomllib

    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    text = _find("pip install otel-bgtasks opentelemetry-distro").text
    named = {part.split("]")[0] for part in text.split("otel-bgtasks[")[1:]}
    assert named == {"redis", "webhooks", "testing"}
    assert named <= set(extras)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory with the `shop` package, as a user has it."""
    where = tmp_path / "project"
    shutil.copytree(PROJECT, where)
    return where


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = ""  # only the project directory (the script's) and the installed package
    env["XDG_STATE_HOME"] = os.environ["XDG_STATE_HOME"]  # the conftest's, never the real one
    env.update(extra or {})
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{argv}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _shop_dir(tmp_path: Path) -> str:
    store_dir = tmp_path / "var-lib-shop"
    store_dir.mkdir(exist_ok=True)
    return str(store_dir)


@pytest.mark.parametrize("key", list(PYTHON))
def test_a_python_example_runs_as_pasted(key: str, project: Path, tmp_path: Path) -> None:
    text = _find(key).text
    if "/var/lib/shop" in text:
        text = substitute(text, {"/var/lib/shop": _shop_dir(tmp_path)})
    script = project / "example.py"
    script.write_text(text)
    done = _run([sys.executable, str(script)], project, _env(PYTHON[key]))
    if key.startswith("task = schedule"):
        assert done.stdout.splitlines() == ["report sent to user 42", "report sent to user 43"]


def test_the_testing_example_passes_under_pytest(project: Path) -> None:
    (project / "test_signup.py").write_text(_find(PYTEST).text)
    done = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            "-W",
            "error",
            "test_signup.py",
        ],
        project,
        _env(),
    )
    assert "3 passed" in done.stdout, done.stdout


def test_the_cli_example_runs_from_the_project_directory(project: Path, tmp_path: Path) -> None:
    """Also issue 19, item 6: `shop.tasks` is imported from the working directory, with no
    PYTHONPATH, as Celery's -A does."""
    shop_dir = _shop_dir(tmp_path)
    now = time.time()
    with SQLiteDeadLetterStore(Path(shop_dir) / "dead-letters.db") as store:
        store.put(
            DeadLetter(
                id="9f0c1e2d3b4a59687766554433221100",
                task_name="charge-card",
                func_ref="shop.tasks:charge_card",
                payload=json.dumps({"args": ["o-17", 1200], "kwargs": {}}),
                error_type="CircuitOpenError",
                error_message="circuit 'payments-api' is open; the task was not run",
                traceback="",
                category="connection",
                attempts=0,
                first_failure=now - 60,
                last_failure=now - 60,
                reason=DeadLetterReason.CIRCUIT_OPEN,
                trace_id="",
                span_id="",
            )
        )
    script = substitute(_find(CLI).text, {"/var/lib/shop": shop_dir})
    done = _run(["bash", "-ec", script], project, _env())
    assert "charge-card" in done.stdout
    assert "replay: 1 replayed" in done.stdout
    assert "recover: no interrupted durable tasks" in done.stdout
    with SQLiteDeadLetterStore(Path(shop_dir) / "dead-letters.db") as store:
        assert store.count() == 0


def test_the_alert_rules_variable_parses(project: Path) -> None:
    check = (
        "python -c 'from otel_bgtasks.alerting.config import rules_from_env;"
        " print(len(rules_from_env()))'"
    )
    done = _run(["bash", "-ec", _find(ALERT_RULES).text + check], project, _env())
    assert done.stdout.strip() == "5"
