"""A real prefork ``celery worker`` for tests, started by the test, on loopback Redis.

    with running_worker(env) as worker:      # waits until the worker announced itself ready
        worker.kill_child()                  # SIGKILL one prefork child
        worker.kill()                        # SIGKILL the whole worker (main + children)
        worker.start()                       # start it again (waits until ready)

Readiness is an event, not a sleep: the worker module's ``worker_ready`` handler pushes the
main pid onto the results Redis list ``ready:<run>`` and `start` waits on it with BLPOP (the
bound only turns a worker that never starts into a failure with its log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import redis

__all__ = ["REPO_ROOT", "CeleryWorker", "running_worker"]

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_APP = "tests.integration.apps.celery_worker"
READY_WITHIN = 120.0  # seconds: a failure bound, never an outcome


class CeleryWorker:
    """One ``celery worker -c <concurrency>`` process group, restartable."""

    def __init__(
        self,
        env: Mapping[str, str],
        results: redis.Redis,
        log_dir: Path,
        *,
        concurrency: int = 2,
        queue: str = "bgtasks",
        app: str = WORKER_APP,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.run = uuid.uuid4().hex[:12]
        self.env = {
            **os.environ,
            **env,
            "BGTASKS_TEST_RUN": self.run,
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        self.results = results
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.queue = queue
        self.app = app
        self.extra = extra
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = log_dir / "celery-worker.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start the worker and wait until it is ready to consume."""
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"\n--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", self.app, "worker",
                    "-P", "prefork", "-c", str(self.concurrency), "-Q", self.queue,
                    "-n", f"bgtasks-{self.run}-{self.starts}@%h",
                    "--without-gossip", "--without-mingle", "--without-heartbeat",
                    "-l", "INFO", *self.extra,
                ],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        ready = self.results.blpop([f"ready:{self.run}"], timeout=READY_WITHIN)
        if ready is None or self.proc.poll() is not None:
            self.kill()
            pytest.fail(f"celery worker did not become ready:\n{self.log.read_text()[-4000:]}")

    def children(self) -> list[int]:
        """The prefork children's pids."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def kill_child(self, pid: int | None = None) -> int:
        """SIGKILL one child (`pid`, or the first); returns its pid."""
        target = pid if pid is not None else self.children()[0]
        os.kill(target, signal.SIGKILL)
        return target

    def kill(self) -> None:
        """SIGKILL the whole worker (its process group) and reap it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM: children flush their telemetry), SIGKILL if it hangs."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
        with suppress(ProcessLookupError):  # children left behind by a main process that died
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def running_worker(
    env: Mapping[str, str], results: redis.Redis, log_dir: Path, **options: object
) -> Iterator[CeleryWorker]:
    """A started worker; stopped (warm shutdown) on exit."""
    worker = CeleryWorker(env, results, log_dir, **options)  # type: ignore[arg-type]
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
