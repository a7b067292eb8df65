"""What the dispatcher and the worker need to know about a Celery app's broker.

- `messaging_system`: ``messaging.system`` is the broker (``redis``, ``rabbitmq``, ...): the
  conventions' maintainers declined ``celery`` as a system.
- `publisher_connection`: a broker connection of our own for publishing, with every socket
  timeout bounded by ``publish_timeout`` (a broker that accepts connections and never answers
  hung ``apply_async`` for over 100 s with Celery's defaults, 1.4 s with 1 s timeouts).
- `visibility_timeout`: how long the broker keeps a delivered, unacknowledged message before
  delivering it again (Redis and SQS transports); a durable task must finish within it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from kombu import Connection

__all__ = [
    "DEFAULT_VISIBILITY_TIMEOUT",
    "broker_url",
    "messaging_system",
    "publisher_connection",
    "visibility_timeout",
]

DEFAULT_VISIBILITY_TIMEOUT = 3600.0
"""Kombu's default for the Redis and SQS transports."""

_SYSTEMS = {
    "redis": "redis",
    "rediss": "redis",
    "sentinel": "redis",
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "pyamqp": "rabbitmq",
    "librabbitmq": "rabbitmq",
    "sqs": "aws_sqs",
    "kafka": "kafka",
    "memory": "memory",
    "filesystem": "filesystem",
}
_WITH_VISIBILITY = frozenset({"redis", "aws_sqs"})


def broker_url(app: Celery) -> str:
    """The app's broker URL for writing (first of a failover list)."""
    url = app.conf.broker_write_url or app.conf.broker_url or "amqp://"
    if isinstance(url, list | tuple):
        url = url[0]
    return str(url).split(";")[0]


def messaging_system(app: Celery) -> str:
    """``messaging.system`` for the app's broker."""
    scheme = urlsplit(broker_url(app)).scheme.split("+")[-1].lower()
    return _SYSTEMS.get(scheme, scheme or "unknown")


def visibility_timeout(app: Celery) -> float | None:
    """Seconds before an unacknowledged message is delivered again, or None when the broker
    redelivers only when the consumer's connection closes (AMQP)."""
    if messaging_system(app) not in _WITH_VISIBILITY:
        return None
    options: dict[str, Any] = dict(app.conf.broker_transport_options or {})
    value = options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)
    try:
        return float(value)
    except (TypeError, ValueError):
        return DEFAULT_VISIBILITY_TIMEOUT


def publisher_connection(app: Celery, publish_timeout: float) -> Connection:
    """A new broker connection whose connect, read and write waits are each bounded by
    `publish_timeout` seconds (Redis: socket timeouts; AMQP: connect/read/write timeouts)."""
    options: dict[str, Any] = {
        "socket_timeout": publish_timeout,
        "socket_connect_timeout": publish_timeout,
        "read_timeout": publish_timeout,
        "write_timeout": publish_timeout,
        "max_retries": 0,
    }
    return app.connection_for_write(
        transport_options=options, connect_timeout=publish_timeout
    )
