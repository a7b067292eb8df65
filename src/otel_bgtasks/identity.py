"""Process identity and liveness: who owns a journaled task, and whether it is still alive.

An identity is ``"hostname:pid:token"``. On Linux the token is
``"{boot}.{pidns}.{start}.{random}"``: the kernel's boot id, the PID namespace and the
process's start time (clock ticks since boot, from ``/proc/self/stat``). Two containers with
the same hostname that both run as PID 1 therefore have different identities, and neither
takes the other for dead: a pid is only checked when the owner ran under the same kernel boot
and in the same PID namespace as us, and then its start time must match too (a reused pid is
another process). Everything else is judged by heartbeat age (`DeadLetterStore.dead_owners`).
On a system without ``/proc`` the token is the random part alone, and two such processes on
one host judge each other by pid.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from dataclasses import dataclass

__all__ = ["owner_is_alive", "owner_is_dead", "process_identity"]

_identity_lock = threading.Lock()
_identity: tuple[int, str] | None = None


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return ""


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id").replace("-", "")[:16]


def _pid_namespace() -> str:
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return "".join(ch for ch in link if ch.isdigit())


def _start_time(pid: int | str) -> str:
    """The process's start time in clock ticks since boot ("" when unknown or gone)."""
    stat = _read(f"/proc/{pid}/stat")
    _, sep, rest = stat.rpartition(")")  # the command name may hold spaces and parentheses
    fields = rest.split()
    return fields[19] if sep and len(fields) > 19 else ""


@dataclass(frozen=True, slots=True)
class _Token:
    boot: str
    pidns: str
    start: str

    @classmethod
    def parse(cls, token: str) -> _Token | None:
        parts = token.split(".")
        if len(parts) != 4 or not all(parts[:3]):
            return None  # from a system without /proc: the random part alone
        return cls(parts[0], parts[1], parts[2])


def process_identity() -> str:
    """``"hostname:pid:token"``, stable within a process; a forked child gets its own."""
    global _identity
    pid = os.getpid()
    with _identity_lock:
        if _identity is None or _identity[0] != pid:
            boot, pidns, start = _boot_id(), _pid_namespace(), _start_time("self")
            rand = secrets.token_hex(6)
            token = f"{boot}.{pidns}.{start}.{rand}" if boot and pidns and start else rand
            _identity = (pid, f"{socket.gethostname()}:{pid}:{token}")
        return _identity[1]


def _parse_identity(owner: str) -> tuple[str, int, str] | None:
    host, sep, rest = owner.rpartition(":")
    # rpartition twice: a hostname never contains ':' but keep parsing robust anyway
    host, sep2, pid_text = host.rpartition(":")
    if not sep or not sep2 or not pid_text.isdigit():
        return None
    return host, int(pid_text), rest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _same_host(owner: str) -> tuple[int, _Token | None, _Token | None] | None:
    """(pid, its token, our token) of an owner with our hostname; None for another host or
    an identity that does not parse. A token is None from a system without /proc."""
    parsed = _parse_identity(owner)
    if parsed is None or parsed[0] != socket.gethostname():
        return None
    _, pid, token = parsed
    return pid, _Token.parse(token), _Token.parse(process_identity().rsplit(":", 1)[1])


def owner_is_dead(owner: str) -> bool:
    """True when `owner` surely is gone: it ran on this machine (same hostname, and for
    current identities the same kernel boot and PID namespace) and its pid no longer exists,
    is ours, or belongs to a process started at another time (pid reuse, or an earlier
    incarnation such as pid 1 of a restarted container).

    Any other owner (another host, another container, another boot with the same hostname)
    cannot be checked here: `DeadLetterStore.dead_owners` uses its heartbeat age.
    """
    if owner == process_identity():
        return False
    local = _same_host(owner)
    if local is None:
        return False
    pid, theirs, mine = local
    if theirs is None or mine is None:
        if theirs is not None or mine is not None:
            return False  # one side has /proc and the other not: not the same system
        return pid == os.getpid() or not _pid_alive(pid)  # no /proc here: hostname and pid
    if (theirs.boot, theirs.pidns) != (mine.boot, mine.pidns):
        return False  # another boot or another container: its pids are not ours to check
    if pid == os.getpid():
        return True
    if not _pid_alive(pid):
        return True
    started = _start_time(pid)
    return bool(started) and started != theirs.start


def owner_is_alive(owner: str) -> bool:
    """True when `owner` surely is running: this process, or one on this machine (same
    hostname, kernel boot and PID namespace) whose pid exists with the start time its identity
    records. Such an owner is never recovered, however old its heartbeat."""
    if owner == process_identity():
        return True
    local = _same_host(owner)
    if local is None:
        return False
    pid, theirs, mine = local
    if theirs is None or mine is None or (theirs.boot, theirs.pidns) != (mine.boot, mine.pidns):
        return False
    return pid != os.getpid() and _pid_alive(pid) and _start_time(pid) == theirs.start
