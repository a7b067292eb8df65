"""`dlq show`, `dlq list` and the admin router on one large dead letter (issue 18, case 5).

    python -m benchmarks.large_entry [--sizes 5,100] [--cap 180]

One SQLite store per size holds a single dead letter whose payload is one string argument of
that many MB (what a task called with a big argument leaves). Each command runs in its own
process; reported: its wall time and peak RSS (`wait4`), and the bytes it wrote to stdout. A
command still running after `--cap` seconds is stopped and reported as such. ``empty`` is the
same command on a store with a one-byte argument: the fixed cost (interpreter, imports).

Run it with ``PYTHONPATH=<another checkout>/src`` to measure another version of the package
(the store is written by the version measured). Variants that version does not have
(``show-full``, ``list-json`` previews, ``router-full``) are left out with ``--commands``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

_FILL = """
import json, sys, uuid
from otel_bgtasks.records import DeadLetter, DeadLetterReason
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore
path, size = sys.argv[1], int(sys.argv[2])
argument = ("abcdefghij" * (size // 10 + 1))[:size]
entry = DeadLetter(
    id=uuid.uuid4().hex, task_name="big", func_ref="benchmarks._tasks:replay_target",
    payload=json.dumps({"args": [argument], "kwargs": {}}), error_type="ValueError",
    error_message="too big", traceback="", category="validation", attempts=1,
    first_failure=1.0, last_failure=2.0, reason=DeadLetterReason.PERMANENT,
)
with SQLiteDeadLetterStore(path) as store:
    store.put(entry)
print(entry.id)
"""

_ROUTER = """
import sys
from fastapi import FastAPI
from fastapi.testclient import TestClient
from otel_bgtasks.health import bearer_token_auth, bgtasks_router
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore
path, entry_id, what = sys.argv[1], sys.argv[2], sys.argv[3]
query = "?full=true" if what == "full" else ""
app = FastAPI()
store = SQLiteDeadLetterStore(path)
app.include_router(bgtasks_router(auth=bearer_token_auth("t" * 16), store=store))
with TestClient(app) as client:
    url = "/bgtasks/dead-letters" + ("" if what == "list" else "/" + entry_id + query)
    with client.stream("GET", url, headers={"Authorization": "Bearer " + "t" * 16}) as response:
        assert response.status_code == 200, response.status_code
        for piece in response.iter_raw():
            sys.stdout.buffer.write(piece)
"""


def _run(argv: list[str], cap: float) -> dict[str, Any]:
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL)
        deadline = start + cap
        status, usage = 0, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.kill(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - start
        out.seek(0, os.SEEK_END)
        written = out.tell()
    return {
        "seconds": round(elapsed, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "stdout_bytes": written,
        "exit": proc.returncode,
        "stopped_at_cap": proc.returncode == -signal.SIGKILL,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5,100", help="payload sizes in MB")
    parser.add_argument("--cap", type=float, default=180.0, help="seconds before stopping one")
    parser.add_argument(
        "--commands",
        default="show,show-full,show-json,list,list-json,router-show,router-full,router-list",
    )
    args = parser.parse_args(argv)
    py = sys.executable
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in [("empty", 1)] + [
            (f"{mb} MB", int(float(mb) * 1_000_000)) for mb in args.sizes.split(",")
        ]:
            path = Path(tmp) / f"dlq-{size}.db"
            fill = subprocess.run(
                [py, "-c", _FILL, str(path), str(size)], capture_output=True, text=True, check=True
            )
            entry_id = fill.stdout.strip()
            url = f"sqlite:///{path}"
            cli = [py, "-m", "otel_bgtasks.cli", "--store", url, "dlq"]
            commands = {
                "show": [*cli, "show", entry_id],
                "show-full": [*cli, "show", entry_id, "--full"],
                "show-json": [*cli, "show", entry_id, "--json"],
                "list": [*cli, "list"],
                "list-json": [*cli, "list", "--json"],
                "router-show": [py, "-c", _ROUTER, str(path), entry_id, "show"],
                "router-full": [py, "-c", _ROUTER, str(path), entry_id, "full"],
                "router-list": [py, "-c", _ROUTER, str(path), entry_id, "list"],
            }
            for name in args.commands.split(","):
                measured = _run(commands[name], args.cap)
                results[f"{label} {name}"] = measured
                print(f"{label:>7} {name:<12} {json.dumps(measured)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
