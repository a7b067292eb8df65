"""How many times the broker delivered a message: a poison message is stopped after
``max_deliveries``.

Celery does not count deliveries: on Redis a message whose worker is killed is requeued
(``reject_on_worker_lost``) or restored after the visibility timeout, forever (celery issue
9082). A first delivery costs nothing here; a redelivered one (kombu's ``redelivered`` flag, a
Celery worker-lost retry, or a copy re-sent by recovery) increments a counter kept in the
broker's own Redis (``bgtasks:deliveries:<task id>``, expiring after a week), removed when the
task ends. With a broker that is not Redis the count only tells first from later deliveries
(2), which still dead-letters a task that is not durable at its first redelivery.
"""

from __future__ import annotations

import contextlib
from typing import Any

import structlog
from celery import Celery

from otel_bgtasks._tracebacks import exception_fields
from otel_bgtasks.celery._transport import messaging_system

__all__ = ["KEY_PREFIX", "DeliveryCounter"]

KEY_PREFIX = "bgtasks:deliveries:"
_TTL = 7 * 24 * 3600

_log = structlog.get_logger("otel_bgtasks")


class DeliveryCounter:
    """Counts redeliveries per task id in the broker's Redis (one per process: after a
    fork, the connection is made again)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.exact = messaging_system(app) == "redis"
        self._connection: Any = None

    def _client(self) -> Any:
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        return self._connection.default_channel.client

    def count(self, task_id: str, redelivered: bool) -> int:
        """This delivery's number (1: the first)."""
        if not redelivered:
            return 1
        if not self.exact:
            return 2
        try:
            pipe = self._client().pipeline()
            pipe.incr(KEY_PREFIX + task_id)
            pipe.expire(KEY_PREFIX + task_id, _TTL)
            seen, _ = pipe.execute()
            return 1 + int(seen)
        except Exception:  # the broker went away: the message cannot be acked either
            _log.warning("delivery count unavailable", task_id=task_id, **exception_fields())
            self.close()
            return 2

    def forget(self, task_id: str) -> None:
        """The task ended: drop its count (only called after a redelivery)."""
        if not self.exact:
            return
        try:
            self._client().delete(KEY_PREFIX + task_id)
        except Exception:  # it expires by itself
            self.close()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # a dead connection has nothing to release
                connection.release()
