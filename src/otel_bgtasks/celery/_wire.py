"""The Celery message of a background task: one Celery task, our own header, a signed body.

Every background task travels as the Celery task `RUN_TASK` (shadowed with the task's name in
Celery's logs and events), with the Celery id = ``bgtasks.task.id``:

- body (Celery args): one JSON object, the signed encoded call: ``task_name``, ``func_ref``,
  ``serializer``, ``payload``, ``signature``, ``durable``, ``route``;
- header `HEADER` (a key of our own: upstream's instrumentation writes ``traceparent`` into
  the same header dict): ``traceparent`` of the PRODUCER span, ``enqueued_at``
  (wall clock, epoch s: the broker wait is measured from it), ``task_id``, ``max_deliveries``.

A message in the broker is untrusted input: `decode_body` and `decode_header` check every
field's type and size and raise `MessageError` saying what is wrong; nothing here imports or
runs anything (the executor verifies the signature and looks the function up among the app's
registered tasks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otel_bgtasks.errors import CorruptEntryError

__all__ = [
    "HEADER",
    "MAX_DELIVERIES_LIMIT",
    "MAX_PAYLOAD",
    "RUN_TASK",
    "Body",
    "Header",
    "MessageError",
    "decode_body",
    "decode_header",
]

RUN_TASK = "otel_bgtasks.run"
"""The Celery task name every background task is sent as."""

HEADER = "bgtasks"
"""Our key in the Celery message headers."""

MAX_PAYLOAD = 4 * 1024 * 1024  # characters of an encoded call accepted from the broker
MAX_DELIVERIES_LIMIT = 100
_MAX_NAME = 1_000  # task names, function references, serializer names, routes
_MAX_SIGNATURE = 200
_MAX_TRACE = 64  # a W3C traceparent is 55 characters
_MIN_TIME = 0.0
_MAX_TIME = 253_402_300_799.0  # 9999-12-31


class MessageError(CorruptEntryError):
    """A broker message that is not a well-formed background-task message (it is refused).

    Attributes:
        entry_id: the message id (bounded), reason: what is wrong with it.
    """

    def __init__(self, message_id: str, reason: str) -> None:
        shown = message_id if len(message_id) <= 64 else message_id[:63] + "…"
        super().__init__(shown, reason)
        self.args = (
            f"broker message {shown!r} refused: {reason}; it is dead-lettered as refused and"
            " nothing was run (was it sent by CeleryDispatcher of this app?)",
        )


@dataclass(frozen=True, slots=True)
class Body:
    """The signed encoded call carried as the Celery task's only argument."""

    task_name: str
    func_ref: str
    serializer: str
    payload: str
    signature: str
    durable: bool
    route: str

    def to_json(self) -> dict[str, Any]:
        return {
            "task_name": self.task_name,
            "func_ref": self.func_ref,
            "serializer": self.serializer,
            "payload": self.payload,
            "signature": self.signature,
            "durable": self.durable,
            "route": self.route,
        }


@dataclass(frozen=True, slots=True)
class Header:
    """Our header: trace context of the producer span, enqueue time, task id."""

    task_id: str
    enqueued_at: float
    traceparent: str = ""
    max_deliveries: int = 0  # 0: the worker's default
    resent: bool = False  # a copy re-sent by recovery or replay: counted as a redelivery

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"task_id": self.task_id, "enqueued_at": self.enqueued_at}
        if self.resent:
            data["resent"] = True
        if self.traceparent:
            data["traceparent"] = self.traceparent
        if self.max_deliveries:
            data["max_deliveries"] = self.max_deliveries
        return data


def _text(data: Mapping[str, Any], key: str, limit: int, *, required: bool = True) -> str:
    value = data.get(key, None if required else "")
    if not isinstance(value, str):
        raise MessageError("message", f"field {key!r} must be a string")
    if len(value) > limit:
        raise MessageError("message", f"field {key!r} is longer than {limit} characters")
    return value


def decode_body(task_id: str, args: Any) -> Body:
    """The call carried by a message's Celery args (``[body]``).

    Raises:
        MessageError: not exactly one JSON object with the expected fields, types and sizes.
    """
    if not isinstance(args, list | tuple) or len(args) != 1 or not isinstance(args[0], dict):
        raise MessageError(task_id, "expected one JSON object as the task's only argument")
    data = args[0]
    durable = data.get("durable", False)
    if not isinstance(durable, bool):
        raise MessageError(task_id, "field 'durable' must be true or false")
    try:
        return Body(
            task_name=_text(data, "task_name", _MAX_NAME),
            func_ref=_text(data, "func_ref", _MAX_NAME),
            serializer=_text(data, "serializer", _MAX_NAME),
            payload=_text(data, "payload", MAX_PAYLOAD),
            signature=_text(data, "signature", _MAX_SIGNATURE, required=False),
            durable=durable,
            route=_text(data, "route", _MAX_NAME, required=False),
        )
    except MessageError as exc:
        raise MessageError(task_id, exc.reason) from None


def decode_header(task_id: str, headers: Any) -> Header:
    """Our header from a message's custom headers (`Request.headers`).

    Raises:
        MessageError: absent, or a field of the wrong type, size or range.
    """
    data = headers.get(HEADER) if isinstance(headers, Mapping) else None
    if not isinstance(data, Mapping):
        raise MessageError(task_id, f"the message has no {HEADER!r} header")
    enqueued = data.get("enqueued_at")
    if (
        isinstance(enqueued, bool)
        or not isinstance(enqueued, int | float)
        or not math.isfinite(enqueued)
        or not _MIN_TIME <= enqueued <= _MAX_TIME
    ):
        raise MessageError(task_id, "header field 'enqueued_at' must be epoch seconds")
    resent = data.get("resent", False)
    if not isinstance(resent, bool):
        raise MessageError(task_id, "header field 'resent' must be true or false")
    max_deliveries = data.get("max_deliveries", 0)
    if isinstance(max_deliveries, bool) or not isinstance(max_deliveries, int):
        raise MessageError(task_id, "header field 'max_deliveries' must be an integer")
    try:
        header = Header(
            task_id=_text(data, "task_id", 64),
            enqueued_at=float(enqueued),
            traceparent=_text(data, "traceparent", _MAX_TRACE, required=False),
            max_deliveries=min(max(max_deliveries, 0), MAX_DELIVERIES_LIMIT),
            resent=resent,
        )
    except MessageError as exc:
        raise MessageError(task_id, exc.reason) from None
    if header.task_id != task_id:
        raise MessageError(task_id, "header task id differs from the message id")
    return header
