"""Identities of processes on this machine, in the format `process_identity` writes."""

from __future__ import annotations

import socket
import subprocess

from otel_bgtasks.identity import process_identity

__all__ = ["dead_owner", "dead_pid", "identity_of"]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): `true`, not an interpreter,
    so that unit tests start no Python process."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[19]


def identity_of(pid: int, *, pidns: str | None = None, start: str | None = None) -> str:
    """The identity process `pid` of this host would have, with some token parts replaced
    (`start` is read from /proc unless given)."""
    mine = process_identity().rsplit(":", 1)[1].split(".")
    parts = [mine[0], pidns or mine[1], start or _start_time(pid), "0123456789ab"]
    return f"{socket.gethostname()}:{pid}:{'.'.join(parts)}"


def dead_owner() -> str:
    """The identity of a process of this host and container that has exited."""
    return identity_of(dead_pid(), start="1")
