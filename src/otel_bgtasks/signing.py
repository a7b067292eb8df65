"""HMAC signatures on stored calls: with a key set, only entries this app wrote are run, once.

Set ``OTEL_BGTASKS_SIGNING_KEY`` (several keys separated by commas, for rotation: the first
signs, every one verifies) or call `configure_signing`. Each dead letter and journal row is
then signed when written; replay and recovery verify the signature before decoding the payload
or looking the function up, and refuse (keeping the entry) an unsigned or tampered one.

A signature authorizes one use of one thing. It is an HMAC-SHA256 over canonical JSON of the
row's **kind** (`DEAD_LETTER`, `JOURNAL`, `MESSAGE`: a signed journal row copied into the dead
letters does not verify there) and of the fields that decide what runs and for whom: the id,
task name, function reference, serializer, the payload's SHA-256, a per-entry **nonce**, and
for a journal row its **owner** and **enqueue time** (a live process's row pointed at a dead
owner does not verify). The nonce is what a store remembers once the entry ran (a successful
replay or recovery records it with the delete), so a copy planted again is refused. The error
fields, counts and failure times are display only (escaped when shown).

`SigningKeys.sign` / `verify` take the kind explicitly, so another record type (a broker
message) signs with its own kind and fields. Signatures are ``v2:`` + hex; the ``v1:`` scheme of
development versions (no kind, owner or nonce) is refused with a pointer to
``otel-bgtasks dlq adopt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from otel_bgtasks.errors import UnsafeConfigurationError, UntrustedEntryError

__all__ = [
    "ADOPT_HINT",
    "DEAD_LETTER",
    "JOURNAL",
    "MESSAGE",
    "SIGNING_KEY_ENV",
    "SignedValue",
    "SigningKeys",
    "configure_signing",
    "new_nonce",
    "payload_digest",
    "signing_keys",
    "signing_override",
]

SIGNING_KEY_ENV = "OTEL_BGTASKS_SIGNING_KEY"
"""Environment variable: the signing key(s), comma-separated, the first one signs."""

DEAD_LETTER = "dead_letter"
"""Kind of a dead letter's signature."""
JOURNAL = "journal"
"""Kind of a durable task's journal row's signature."""
MESSAGE = "message"
"""Kind of a broker message's signature (a distributed dispatcher's)."""

ADOPT_HINT = "review it, then sign it with `otel-bgtasks dlq adopt ID`"
"""What to do with an entry refused for its signature's scheme or absence."""

SignedValue = str | int | float
"""A signed field's value (floats must be finite: they are signed as their JSON form)."""

_PREFIX = "v2:"  # the signature scheme, so a later one can be told apart
_OLD_PREFIXES = ("v1:",)  # earlier: id, task, function, serializer and payload only
_MIN_KEY_BYTES = 16


def new_nonce() -> str:
    """A fresh per-entry nonce: 128 random bits, hex."""
    return secrets.token_hex(16)


def payload_digest(payload: str | bytes) -> str:
    """The SHA-256 (hex) of a payload's UTF-8 bytes: what a signature covers of it, so that a
    large payload can be verified while it is streamed."""
    data = payload.encode() if isinstance(payload, str) else payload
    return hashlib.sha256(data).hexdigest()


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

    def sign(self, kind: str, fields: Mapping[str, SignedValue]) -> str:
        """The signature of one `kind` of record (`DEAD_LETTER`, `JOURNAL`, `MESSAGE`, or a
        kind of your own) with these `fields`, by the first key.

        Raises:
            ValueError: an empty kind, or a field that is not a str, int or finite float.
        """
        return _PREFIX + _mac(self.keys[0], kind, fields)

    def verify(self, kind: str, fields: Mapping[str, SignedValue], signature: str) -> None:
        """Accept `signature` if any key made it for this `kind` and these `fields`.

        Raises:
            UntrustedEntryError: the entry is unsigned, signed with an older scheme, or no key
                verifies its signature for this kind (tampered, copied from another kind of
                row, or signed with a key this process does not have).
        """
        if not signature:
            raise UntrustedEntryError(
                "refused: the entry is not signed and a signing key is set (it was not written"
                f" by this app, or before signing was enabled); {ADOPT_HINT}"
            )
        if signature.startswith(_OLD_PREFIXES):
            raise UntrustedEntryError(
                "refused: the entry's signature is of an older scheme (v1: it does not bind the"
                f" row's kind, owner or nonce); {ADOPT_HINT}"
            )
        if not signature.startswith(_PREFIX):
            raise UntrustedEntryError("refused: the entry's signature has an unknown format")
        given = signature[len(_PREFIX) :]
        if not any(hmac.compare_digest(given, _mac(key, kind, fields)) for key in self.keys):
            raise UntrustedEntryError(
                "refused: the entry's signature does not match (tampered, copied from another"
                " kind of row, or signed with a key this process does not have)"
            )


def _mac(key: bytes, kind: str, fields: Mapping[str, SignedValue]) -> str:
    if not kind:
        raise ValueError("a signature needs a kind (e.g. signing.DEAD_LETTER)")
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"signed field {name!r} must be a str, int or float")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"signed field {name!r} must be finite")
    message = json.dumps(
        {"kind": kind, "fields": dict(fields)},
        separators=(",", ":"),
        sort_keys=True,
        ensure_ascii=True,
    )
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
