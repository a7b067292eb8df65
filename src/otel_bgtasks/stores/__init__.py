"""Dead-letter stores, opened by URL with `open_store`.

- `SQLiteDeadLetterStore`: one file, several worker processes on one host.
- `RedisDeadLetterStore`: shared by every host (needs the ``redis`` extra).
- `BufferedStore`: wraps either so a store outage never raises into a task (the default of
  `open_store`).

Another backend subclasses `otel_bgtasks.stores.base.DeadLetterStore`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import platformdirs

from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.stores._buffer import BufferedStore
from otel_bgtasks.stores.base import DeadLetterStore
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore

if TYPE_CHECKING:
    from otel_bgtasks.stores.redis import RedisDeadLetterStore

__all__ = [
    "DLQ_URL_ENV",
    "BufferedStore",
    "DeadLetterStore",
    "RedisDeadLetterStore",
    "SQLiteDeadLetterStore",
    "default_store_path",
    "default_store_url",
    "open_store",
    "redact_url",
]

DLQ_URL_ENV = "OTEL_BGTASKS_DLQ_URL"
"""Environment variable holding the default store URL (the instrumentor and the CLI read it)."""

_VALID_URLS = (
    "sqlite:///path.db, sqlite:////abs/path.db, redis://host:port/db, rediss://host:port/db"
)


def __getattr__(name: str) -> Any:
    # redis is an optional dependency: imported when a Redis store is first used.
    if name == "RedisDeadLetterStore":
        from otel_bgtasks.stores.redis import RedisDeadLetterStore

        return RedisDeadLetterStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_store_path() -> Path:
    """Where dead letters go when nothing is configured: ``dead-letters.db`` in the user's state
    directory (``$XDG_STATE_HOME/otel-bgtasks``, by default ``~/.local/state/otel-bgtasks`` on
    Linux; platformdirs' ``user_state_path`` elsewhere). Created at the first dead letter."""
    return platformdirs.user_state_path("otel-bgtasks") / "dead-letters.db"


def default_store_url() -> str:
    """``sqlite:///`` + `default_store_path()` (the URL the CLI and the instrumentor default to)."""
    return f"sqlite:///{default_store_path()}"


def redact_url(url: str) -> str:
    """`url` with any password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        user = parts.username or ""
        return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()
    except ValueError:
        return "<unparsable URL>"


def open_store(
    url: str, *, buffered: bool = True, max_pending: int = 10_000, lazy: bool = False
) -> DeadLetterStore:
    """Open the store a URL names.

    ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (SQLAlchemy style: the
    path is what follows ``sqlite:///``), ``redis://[:password@]host:port/db`` and
    ``rediss://`` (TLS); ``?prefix=name`` sets the Redis key prefix (default ``bgtasks``).

    With `buffered` (the default) the store is wrapped in a `BufferedStore` keeping up to
    `max_pending` writes in memory while the backing store is down. With `lazy`, an SQLite file
    (and its directory) is created at the first write, not now.

    Raises:
        ConfigurationError: unknown scheme or malformed URL (the message lists the valid
            forms); a `ValueError`.
        ImportError: a Redis URL without the ``redis`` extra installed.
    """
    store = _open_raw(url, lazy)
    return BufferedStore(store, max_pending=max_pending) if buffered else store


def _open_raw(url: str, lazy: bool = False) -> DeadLetterStore:
    shown = redact_url(url)
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "sqlite":
        prefix = "sqlite:///"
        if not url.lower().startswith(prefix) or len(url) == len(prefix):
            raise ConfigurationError(f"invalid SQLite URL {shown!r}: expected sqlite:///path.db")
        path = url[len(prefix) :]
        if path == ":memory:" or "?" in path:
            raise ConfigurationError(
                f"invalid SQLite URL {shown!r}: give a file path (several processes share it),"
                " without query parameters"
            )
        try:
            return SQLiteDeadLetterStore(path, lazy=lazy)
        except ConfigurationError as exc:
            if os.path.isabs(path):
                raise
            # sqlite:///var/lib/app/dlq.db is var/lib/app/dlq.db under the working directory
            raise ConfigurationError(
                f"{exc} ({shown!r} is relative to the working directory {os.getcwd()!r};"
                f" for the absolute path /{path} write four slashes: sqlite:////{path})"
            ) from None
    if scheme in ("redis", "rediss"):
        from otel_bgtasks.stores.redis import RedisDeadLetterStore

        return RedisDeadLetterStore(url)
    raise ConfigurationError(
        f"unsupported dead-letter store URL {shown!r}; valid forms: {_VALID_URLS}"
    )
