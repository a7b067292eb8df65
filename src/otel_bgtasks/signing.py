"""HMAC signatures on stored calls: with a key set, only entries this app wrote are replayed.

Set ``OTEL_BGTASKS_SIGNING_KEY`` (several keys separated by commas, for rotation: the first
signs, every one verifies) or call `configure_signing`. Each dead letter and journal row is
then signed when written; replay and recovery verify the signature before decoding the payload
or looking the function up, and refuse (keeping the entry) an unsigned or tampered one.

What is signed is the call: the entry id, task name, function reference, serializer and
payload, as canonical JSON, with HMAC-SHA256. Those decide what runs and with which arguments;
the error fields, counts and timestamps are display only (and are escaped when shown). A dead
letter made from a journal row (recovery) keeps the row's id and call, so its signature too.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from otel_bgtasks.errors import UnsafeConfigurationError, UntrustedEntryError

__all__ = [
    "SIGNING_KEY_ENV",
    "SigningKeys",
    "configure_signing",
    "signing_keys",
    "signing_override",
]

SIGNING_KEY_ENV = "OTEL_BGTASKS_SIGNING_KEY"
"""Environment variable: the signing key(s), comma-separated, the first one signs."""

_PREFIX = "v1:"  # the signature scheme, so a later one can be told apart
_MIN_KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """Keys for signing (the first) and verifying (any) stored calls.

    Raises:
        UnsafeConfigurationError: no key, or a key shorter than 16 bytes.
    """

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise UnsafeConfigurationError(f"{SIGNING_KEY_ENV}: give at least one key")
        for key in self.keys:
            if len(key) < _MIN_KEY_BYTES:
                raise UnsafeConfigurationError(
                    f"{SIGNING_KEY_ENV}: a signing key must be at least {_MIN_KEY_BYTES} bytes"
                    " (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
                )

    @classmethod
    def of(cls, keys: str | bytes | Sequence[str | bytes]) -> SigningKeys:
        """From one key, a comma-separated string of keys, or a sequence of keys."""
        if isinstance(keys, str):
            items: Sequence[str | bytes] = [k for k in keys.split(",") if k.strip()]
        elif isinstance(keys, bytes):
            items = [keys]
        else:
            items = list(keys)
        return cls(tuple(k.strip().encode() if isinstance(k, str) else k for k in items))

    def sign(self, fields: Sequence[str]) -> str:
        """The signature of a call's fields (id, task name, func_ref, serializer, payload)."""
        return _PREFIX + _mac(self.keys[0], fields)

    def verify(self, fields: Sequence[str], signature: str) -> None:
        """Accept `signature` if any key made it.

        Raises:
            UntrustedEntryError: the entry is unsigned, or no key verifies its signature
                (tampered, or signed with a key this process does not have).
        """
        if not signature:
            raise UntrustedEntryError(
                "refused: the entry is not signed and a signing key is set (it was not written"
                " by this app, or before signing was enabled)"
            )
        if not signature.startswith(_PREFIX):
            raise UntrustedEntryError("refused: the entry's signature has an unknown format")
        given = signature[len(_PREFIX) :]
        if not any(hmac.compare_digest(given, _mac(key, fields)) for key in self.keys):
            raise UntrustedEntryError(
                "refused: the entry's signature does not match (tampered, or signed with a key"
                " this process does not have)"
            )


def _mac(key: bytes, fields: Sequence[str]) -> str:
    message = json.dumps(list(fields), separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


_lock = threading.Lock()
_configured: SigningKeys | None = None
_from_env = True


def configure_signing(keys: str | bytes | Sequence[str | bytes] | None) -> None:
    """Set this process's signing keys (first signs, all verify); None turns signing off
    (and stops reading ``OTEL_BGTASKS_SIGNING_KEY``).

    Raises:
        UnsafeConfigurationError: a key is shorter than 16 bytes, or the sequence is empty.
    """
    global _configured, _from_env
    parsed = None if keys is None else SigningKeys.of(keys)
    with _lock:
        _configured, _from_env = parsed, False


def signing_keys() -> SigningKeys | None:
    """The keys in force: `configure_signing`'s, else ``OTEL_BGTASKS_SIGNING_KEY``'s, else None.

    Raises:
        UnsafeConfigurationError: the environment variable holds a key that is too short.
    """
    if not _from_env:
        return _configured
    value = os.environ.get(SIGNING_KEY_ENV, "")
    return SigningKeys.of(value) if value.strip() else None


@contextlib.contextmanager
def signing_override(keys: SigningKeys | None) -> Iterator[None]:
    """Use `keys` (None: no signing) within the block, then restore (the CLI, whose
    environment is given to it, and tests)."""
    global _configured, _from_env
    with _lock:
        saved = (_configured, _from_env)
        _configured, _from_env = keys, False
    try:
        yield
    finally:
        with _lock:
            _configured, _from_env = saved
