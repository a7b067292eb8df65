"""Process identity and liveness: who owns a journaled task, and whether it is still alive."""

from __future__ import annotations

import os
import secrets
import socket
import threading

__all__ = ["owner_is_dead", "process_identity"]

_identity_lock = threading.Lock()
_identity: tuple[int, str] | None = None


def process_identity() -> str:
    """``"hostname:pid:token"``, stable within a process; a forked child gets its own."""
    global _identity
    pid = os.getpid()
    with _identity_lock:
        if _identity is None or _identity[0] != pid:
            _identity = (pid, f"{socket.gethostname()}:{pid}:{secrets.token_hex(6)}")
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


def owner_is_dead(owner: str) -> bool:
    """True when `owner` surely is gone: same host and its pid no longer exists, or it had
    our pid with another token (an earlier incarnation, e.g. pid 1 of a restarted container).

    Owners on other hosts cannot be checked here: `DeadLetterStore.dead_owners` uses their
    heartbeat age. PID reuse by an unrelated process makes a dead owner look alive until its
    heartbeat goes stale.
    """
    if owner == process_identity():
        return False
    parsed = _parse_identity(owner)
    if parsed is None or parsed[0] != socket.gethostname():
        return False
    _, pid, _ = parsed
    if pid == os.getpid():
        return True
    return not _pid_alive(pid)
