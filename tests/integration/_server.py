"""Real servers for the integration tests: uvicorn in a thread, an app in a subprocess, waits.

    with UvicornThread(app) as server, server.client() as client:
        client.get("/ok")
        wait_for_tasks()                          # every scheduled background task finished
        spans = wait_until(lambda: ..., what="the request span")

`UvicornThread` serves an ASGI app with a real `uvicorn.Server` on a free loopback port in a
background thread (stopped through `should_exit`). Its client opens a new connection per
request: uvicorn does not read the next request of a keep-alive connection before the
background tasks of the previous response are done, which would serialise what a test means
to run side by side.

`AppProcess` runs a command (``python -m uvicorn ...`` or ``opentelemetry-instrument ...``) in
its own session with stdout and stderr in separate files, waits until a URL answers, and stops
it with a signal of the test's choice (SIGINT/SIGTERM to flush, SIGKILL to crash).

All waits are bounded and fail the test with what they were waiting for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
import uvicorn
from tests.support.ports import LOOPBACK, free_port
from tests.support.waiting import wait_until

from otel_bgtasks._execution import active_executor as current_executor

__all__ = [
    "REPO_ROOT",
    "VENV_BIN",
    "AppProcess",
    "UvicornThread",
    "durable_app",
    "wait_for_tasks",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
# The interpreter's own bin directory holds uvicorn and opentelemetry-instrument.
VENV_BIN = Path(sys.executable).parent


def wait_for_tasks(timeout: float = 15.0) -> None:
    """Wait until the active instrumentation has no scheduled or running background task.

    A task leaves `inflight` after its span ended and its metrics were recorded, so spans and
    data points are complete when this returns (the request span may still be ending: wait
    for it with `wait_until`).
    """

    def idle() -> bool:
        executor = current_executor()
        return executor is None or not executor.inflight

    wait_until(idle, what="background tasks to finish", timeout=timeout)


class UvicornThread:
    """A real uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app: Any, *, port: int | None = None, **config: Any) -> None:
        self.port = port or free_port()
        self.config = uvicorn.Config(
            app,
            host=LOOPBACK,
            port=self.port,
            # No logging config: uvicorn's records propagate to the root logger (caplog).
            log_config=None,
            access_log=False,
            loop="asyncio",
            ws="none",
            lifespan="on",
            **config,
        )
        self.server = uvicorn.Server(self.config)
        self._thread = threading.Thread(target=self._serve, name=f"uvicorn-{self.port}")
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _serve(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # reported by start()/stop() in the test's thread
            self._error = exc

    def start(self, timeout: float = 15.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"uvicorn on port {self.port} exited") from self._error
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"uvicorn did not start on port {self.port} within {timeout}s")
            time.sleep(0.01)

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(timeout)
        if self._error is not None:
            raise RuntimeError(f"uvicorn on port {self.port} failed") from self._error

    def client(self, **kwargs: Any) -> httpx.Client:
        """An HTTP client for this server, one connection per request."""
        kwargs.setdefault("timeout", 10.0)
        kwargs.setdefault("limits", httpx.Limits(max_keepalive_connections=0))
        return httpx.Client(base_url=self.url, **kwargs)

    def __enter__(self) -> UvicornThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class AppProcess:
    """A server command in a subprocess (own session), stdout and stderr kept apart.

    The environment is this process's plus `env` (only `env` with ``inherit_env=False``);
    ``PYTHONPATH`` starts with the repository root either way.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        workdir: Path,
        port: int,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/",
        name: str = "app",
        inherit_env: bool = True,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.ready_path = ready_path
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self.env = {**(os.environ if inherit_env else {}), **(env or {})}
        # The app modules are imported as tests.integration.apps.*: run from the repo root.
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH", "")) if p
        )
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._popen is not None
        return self._popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def start(self, timeout: float = 30.0) -> None:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._popen.poll() is not None:
                pytest.fail(
                    f"{self.argv[0]} exited with {self._popen.returncode} before it answered:\n"
                    f"{self.stderr()[-4000:]}"
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                pytest.fail(f"{self.argv} did not answer within {timeout}s:\n{self.stderr()}")
            time.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send `sig`, wait for the exit (SIGKILL after `timeout`); returns the exit code.

        The process is reaped, so its pid is gone afterwards (a zombie would look alive).
        """
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            popen.send_signal(sig)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        return popen.returncode

    def __enter__(self) -> AppProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(signal.SIGKILL)


def durable_app(
    tmp_path: Path,
    *,
    task_seconds: float = 0.0,
    name: str,
    uvicorn_args: Sequence[str] = (),
    gate: Path | None = None,
    gate_from: int = 0,
) -> tuple[AppProcess, str, Path]:
    """The durable-task app (tests/integration/apps/durable_app.py) as a real uvicorn process.

    Its tasks work `task_seconds`, then (with `gate`, those numbered `gate_from` or more) until
    the test creates that file.
    Returns the process (not started), its SQLite dead-letter store URL and the results file
    its tasks append to.
    """
    from tests.integration.apps.durable_tasks import GATE_ENV, GATE_FROM_ENV, SECONDS_ENV

    from otel_bgtasks.stores import DLQ_URL_ENV

    store_url = f"sqlite:///{tmp_path / 'dlq.db'}"
    results = tmp_path / "results.txt"
    port = free_port()
    process = AppProcess(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.integration.apps.durable_app:app",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--no-access-log",
            *uvicorn_args,
        ],
        workdir=tmp_path,
        port=port,
        env={
            DLQ_URL_ENV: store_url,
            "BGTASKS_TEST_RESULTS": str(results),
            SECONDS_ENV: str(task_seconds),
            **({GATE_ENV: str(gate), GATE_FROM_ENV: str(gate_from)} if gate is not None else {}),
        },
        ready_path="/ready",
        name=name,
    )
    return process, store_url, results
