"""The pytest plugin is registered by the package and inert until a test requests `bgtasks`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SUITE = """
import sys

from starlette.background import BackgroundTask

ORIGINAL_INIT = BackgroundTask.__init__


def test_1_unused_plugin_imports_and_patches_nothing():
    assert "otel_bgtasks" not in sys.modules
    assert BackgroundTask.__init__ is ORIGINAL_INIT


def test_2_fixture_instruments(bgtasks):
    assert bgtasks.instrumentor.is_instrumented_by_opentelemetry
    assert BackgroundTask.__init__ is not ORIGINAL_INIT


def test_3_and_undoes_it_afterwards():
    from otel_bgtasks import BackgroundTasksInstrumentor

    assert not BackgroundTasksInstrumentor().is_instrumented_by_opentelemetry
    assert BackgroundTask.__init__ is ORIGINAL_INIT
"""


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_plugin_is_inert_until_its_fixture_is_used(tmp_path: Path) -> None:
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE))
    done = _pytest(tmp_path, "test_suite.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_plugin_lists_its_fixtures(tmp_path: Path) -> None:
    done = _pytest(tmp_path, "--fixtures")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bgtasks -- " in done.stdout
    assert "bgtasks_options -- " in done.stdout
