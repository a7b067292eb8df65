"""Run Starlette's and FastAPI's own test suites, unchanged, with otel-bgtasks instrumented.

    python scripts/upstream/run.py                   # both suites, asyncio and trio
    python scripts/upstream/run.py --suite starlette --backend trio

The suites come from the source distributions of the Starlette and FastAPI versions this
checkout's virtual environment has (``pip download --no-binary``), unpacked in a temporary
directory outside the repository. They run in a virtual environment of their own
(``$CACHE/upstream-venv``, reused while the versions match) holding this checkout and the
suites' test dependencies, with ``-p bgtasks_instrument_first`` (this directory): the package
is instrumented before a test module is imported, ``propagate_exceptions=True``, recording
spans and metrics.

Backends: Starlette's suite is parametrised over asyncio and trio by anyio's pytest plugin
(each run deselects the other backend's tests with ``-k``); FastAPI's builds its clients
without choosing one, so the trio run makes ``TestClient`` default to trio.

Every test that fails instrumented is run again without the package: failing there too, it
is the environment's (reported, not counted against us); passing there, the package broke it
and the run fails. `BY_DESIGN` lists the tests that assert what the package deliberately
changes, with the reason.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("OTEL_BGTASKS_CACHE", Path.home() / ".cache" / "otel-bgtasks"))

TEST_DEPENDENCIES = {
    # Starlette's dev group (what its tests import)
    "starlette": (
        "pytest>=9,<9.2",
        "anyio[trio]>=4.11",
        "trio>=0.34",
        "itsdangerous",
        "jinja2",
        "python-multipart>=0.0.18",
        "pyyaml",
        "httpx>=0.27,<0.29",
        "httpx2[zstd]>=2.0",
        "blockbuster>=1.5.23",
        "opentelemetry-sdk",
    ),
    # FastAPI's tests group
    "fastapi": (
        "pytest>=9,<9.2",
        "anyio[trio]>=4.11",
        "coverage>=7.8",
        "opentelemetry-sdk",
        "opentelemetry-instrumentation-fastapi",
        "opentelemetry-exporter-otlp-proto-http",
        "logfire",
        "sentry-sdk",
        "dirty-equals",
        "inline-snapshot",
        "flask>=3,<4",
        "pwdlib[argon2]",
        "pyjwt",
        "sqlmodel",
        "strawberry-graphql<1",
        "typer",
        "a2wsgi",
        "python-slugify",
        "pytest-timeout",
        "pytest-xdist[psutil]",
        "email-validator",
        "pydantic-settings",
        "fastapi-cli",
        "uvicorn",
        "httpx>=0.27,<0.29",
        "httpx2>=2.0",
        "python-multipart>=0.0.18",
        "pyyaml",
    ),
}

BY_DESIGN = {
    "fastapi": {
        "tests/test_telemetry/test_background.py::test_background_task_spans": (
            "asserts that FastAPI's own `fastapi.background_task` span (a child of the ended"
            " request span) is the task's current span: the package replaces it with its one"
            " task span, CONSUMER `process {task}` in a new trace linked to the request"
        ),
        "tests/test_telemetry/test_background.py::test_background_task_objects": (
            "the same: FastAPI's own per-task span"
        ),
        "tests/test_telemetry/test_background.py::test_background_task_failure": (
            "the same: FastAPI's own per-task span and its failure status"
        ),
    },
}


@dataclass
class Result:
    suite: str
    backend: str
    passed: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    environment: list[str] = field(default_factory=list)  # fail without the package too
    by_design: list[str] = field(default_factory=list)
    ours: list[str] = field(default_factory=list)  # pass without the package: our fault


def installed_version(name: str) -> str:
    return importlib.metadata.version(name)


def upstream_venv(versions: dict[str, str], suites: tuple[str, ...]) -> Path:
    """The suites' virtual environment, created (or refreshed) for these versions and
    suites."""
    venv = CACHE / "upstream-venv"
    stamp = venv / "bgtasks-versions.txt"
    wanted = ",".join([*(f"{k}=={v}" for k, v in sorted(versions.items())), *sorted(suites)])
    python = venv / "bin" / "python"
    if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        pins = [f"{name}=={version}" for name, version in versions.items()]
        needed = sorted({dep for suite in suites for dep in TEST_DEPENDENCIES[suite]})
        subprocess.run([*pip, *pins, *needed], check=True)
        stamp.write_text(wanted)
    # this checkout, every time (its dependencies are mostly there already)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", str(REPO)], check=True)
    return python


def sources(name: str, version: str, into: Path) -> Path:
    """The unpacked source distribution of `name` `version` (its tests included)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"{name}=={version}",
            "-d",
            str(into),
        ],
        check=True,
    )
    (archive,) = into.glob(f"{name}-{version}.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / f"{name}-{version}"


def run_pytest(
    python: Path,
    root: Path,
    backend: str,
    suite: str,
    *,
    instrumented: bool,
    only: list[str] | None = None,
) -> tuple[Path, float]:
    report = Path(tempfile.mkstemp(prefix=f"bgtasks-{suite}-", suffix=".xml")[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env["BGTASKS_UPSTREAM_INSTRUMENT"] = "1" if instrumented else "0"
    args = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    args += ["-p", "bgtasks_instrument_first", f"--junitxml={report}"]
    if suite == "starlette":
        if only is None:  # the tests of the other backend out; the backend-free ones run
            other = "trio" if backend == "asyncio" else "asyncio"
            args += ["-k", f"not {other}", "tests"]
    else:
        if backend == "trio":
            env["BGTASKS_UPSTREAM_TESTCLIENT_BACKEND"] = "trio"
        if only is None:
            args += ["tests"]
    if only is not None:
        args += only
    begin = time.monotonic()
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, check=False)
    if not report.stat().st_size:  # pytest did not even start (a plugin or import error)
        raise RuntimeError(
            f"pytest wrote no report for {suite} ({backend}): {' '.join(args)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return report, time.monotonic() - begin


def outcomes(report: Path) -> tuple[int, list[str], int]:
    """(passed, failed test ids, skipped) of a junit report."""
    passed, failed, skipped = 0, [], 0
    for case in ET.parse(report).getroot().iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        test_id = f"{path}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(test_id)
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, sorted(set(failed)), skipped


def by_design(suite: str, test_id: str) -> bool:
    base = test_id.split("[", 1)[0]
    return base in BY_DESIGN.get(suite, {})


def check(python: Path, root: Path, suite: str, backend: str) -> Result:
    report, seconds = run_pytest(python, root, backend, suite, instrumented=True)
    passed, failed, skipped = outcomes(report)
    result = Result(suite, backend, passed, failed, skipped, seconds)
    suspects = [t for t in failed if not by_design(suite, t)]
    result.by_design = [t for t in failed if by_design(suite, t)]
    if suspects:
        again, _ = run_pytest(python, root, backend, suite, instrumented=False, only=suspects)
        _, still, _ = outcomes(again)
        result.environment = [t for t in suspects if t in still]
        result.ours = [t for t in suspects if t not in still]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("starlette", "fastapi", "all"), default="all")
    parser.add_argument("--backend", choices=("asyncio", "trio", "both"), default="both")
    args = parser.parse_args()
    versions = {name: installed_version(name) for name in ("starlette", "fastapi")}
    suites = ("starlette", "fastapi") if args.suite == "all" else (args.suite,)
    python = upstream_venv(versions, suites)
    backends = ("asyncio", "trio") if args.backend == "both" else (args.backend,)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bgtasks-upstream-") as tmp:
        for suite in suites:
            root = sources(suite, versions[suite], Path(tmp) / suite)
            for backend in backends:
                result = check(python, root, suite, backend)
                results.append(result)
                print(
                    f"{suite} {versions[suite]} [{backend}]: {result.passed} passed,"
                    f" {len(result.failed)} failed ({len(result.by_design)} by design,"
                    f" {len(result.environment)} fail without the package too,"
                    f" {len(result.ours)} caused by it), {result.skipped} skipped"
                    f" in {result.seconds:.0f} s",
                    flush=True,
                )
                for test_id in result.by_design:
                    print(f"  by design: {test_id}")
                for test_id in result.environment:
                    print(f"  environment: {test_id}")
                for test_id in result.ours:
                    print(f"  CAUSED BY THE PACKAGE: {test_id}")
    ours = sum(len(r.ours) for r in results)
    print(f"{sum(r.passed for r in results)} passed, {ours} failed")
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
