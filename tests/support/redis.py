"""A real `redis-server` on loopback for tests: started in a temp dir, stopped afterwards.

The `redis_server` fixture (tests/conftest.py) gives each test its own::

    def test_x(redis_server):     # redis_server.url, .stop(), .start() (same port)
        ...

`running_redis(directory)` starts one for another scope (a module-wide server).

Without the binary the test is skipped ("redis-server not found: apt-get install
redis-server"), unless OTEL_BGTASKS_REQUIRE_INFRA=1, where it fails: CI must not go green by
skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.ports import free_port

__all__ = ["RedisServer", "redis_server_binary", "running_redis"]

MISSING = "redis-server not found: apt-get install redis-server"


def redis_server_binary() -> str:
    """The redis-server path; skips the test (or fails it under OTEL_BGTASKS_REQUIRE_INFRA=1)."""
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        if os.environ.get("OTEL_BGTASKS_REQUIRE_INFRA") == "1":
            pytest.fail(f"{MISSING} (OTEL_BGTASKS_REQUIRE_INFRA=1)")
        pytest.skip(MISSING)
    return found


class RedisServer:
    """One redis-server process without persistence, restartable on the same port."""

    def __init__(self, binary: str, directory: Path, port: int | None = None) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.log = directory / f"redis-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, same port) and wait until it answers PING; fails the test if not."""
        if not self.try_start(timeout):
            pytest.fail(f"redis-server did not start on port {self.port}:\n{self.log.read_text()}")

    def try_start(self, timeout: float = 10.0) -> bool:
        if self.running:
            return True
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.directory),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self._ping():
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL (no persistence here: every queued message is gone)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A started server in `directory`; stopped on exit."""
    binary = redis_server_binary()
    for _ in range(3):  # the free port may be taken between free_port() and redis binding it
        server = RedisServer(binary, directory)
        if server.try_start():
            break
    else:
        pytest.fail(f"redis-server did not start:\n{server.log.read_text()}")
    try:
        yield server
    finally:
        server.stop()
