"""Task call records: a `DeadLetter` (failed for good), a `JournalEntry` (durable, in flight)
and a `TaskMessage` (a task published to another process by a remote dispatcher).

All are frozen dataclasses with a JSON stored form. Rows read back from a store, and messages
read from a broker, are untrusted: `decode_entry` / `decode_journal` / `decode_message` check
every field's type and raise `CorruptEntryError` naming the row, so one bad row never hides
the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from opentelemetry.trace import SpanContext

from otel_bgtasks._ids import check_hex, from_traceparent
from otel_bgtasks._tracebacks import bounded_message, bounded_traceback
from otel_bgtasks.attributes import ErrorCategory
from otel_bgtasks.errors import CorruptEntryError, error_type
from otel_bgtasks.signing import SigningKeys, signing_keys

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ROUTE_OWNER_PREFIX",
    "DeadLetter",
    "DeadLetterReason",
    "JournalEntry",
    "TaskMessage",
    "decode_entry",
    "decode_journal",
    "decode_message",
    "route_owner",
]

_Record = TypeVar("_Record", "DeadLetter", "JournalEntry", "TaskMessage")

ROUTE_OWNER_PREFIX = "route:"
"""A journal row owned by ``route:<route>`` was handed to that route's dispatcher (published
to another process): recovery re-sends it after its deadline, never runs it locally."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest encoded `TaskMessage` `decode_message` parses; a larger one is corrupt."""


def route_owner(route: str) -> str:
    """The journal owner of a row handed to `route` (``route:<route>``)."""
    return ROUTE_OWNER_PREFIX + route


class DeadLetterReason(StrEnum):
    """Why a task was dead-lettered (`bgtasks.dlq.reason`)."""

    EXHAUSTED = "exhausted"
    PERMANENT = "permanent"
    CIRCUIT_OPEN = "circuit_open"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    # Tasks that never ran (`Executor.dead_letter_unrun`):
    UNDELIVERABLE = "undeliverable"
    """Its dispatcher could not publish it before its deadline (or its submit raised)."""
    REFUSED = "refused"
    """The consumer refused the message: unregistered task, unsigned or tampered, undecodable."""
    WORKER_LOST = "worker_lost"
    """It lost its worker, or was delivered more than the dispatcher's maximum times."""


def _format_traceback(exc: BaseException) -> str:
    return bounded_traceback(exc)  # without locals, at most 8 kB whatever the task raised


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered task: what to run again, why it failed, where its trace is.

    Attributes:
        id: unique entry id (32 hex digits).
        task_name: the task's name (as on its span).
        func_ref: ``"package.module:Qual.name"`` (see `func_ref`); "" if it was not importable,
            in which case the entry can be inspected but not replayed.
        payload: the arguments serialized by the serializer named `serializer`.
        error_type, error_message, traceback, category: the last error.
        attempts: attempts made so far (replays included).
        first_failure, last_failure: epoch seconds.
        reason: why the task was dead-lettered.
        trace_id, span_id: the original task span (hex), or "" when there was none.
        signature: HMAC of the call (see `otel_bgtasks.signing`), "" when written unsigned.
        route: the route of the dispatcher the task was sent through (a remote engine), or
            None for a task of this process; a replay sends it back there when a dispatcher
            for that route is registered (`otel_bgtasks.dispatch.register_dispatcher`).
    """

    id: str
    task_name: str
    func_ref: str
    payload: str
    error_type: str
    error_message: str
    traceback: str
    category: str
    attempts: int
    first_failure: float
    last_failure: float
    reason: DeadLetterReason
    serializer: str = "json"
    trace_id: str = ""
    span_id: str = ""
    signature: str = ""
    route: str | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("DeadLetter.id must not be empty")
        if not isinstance(self.reason, DeadLetterReason):
            raise TypeError(f"DeadLetter.reason must be a DeadLetterReason, got {self.reason!r}")
        if self.attempts < 0:
            raise ValueError(f"DeadLetter.attempts must be >= 0, got {self.attempts}")
        check_hex("trace_id", self.trace_id, 32)
        check_hex("span_id", self.span_id, 16)

    @classmethod
    def from_exception(
        cls,
        exc: BaseException,
        *,
        task_name: str,
        func_ref: str,
        payload: str,
        reason: DeadLetterReason,
        attempts: int,
        first_failure: float | None = None,
        last_failure: float | None = None,
        category: str = ErrorCategory.UNKNOWN,
        serializer: str = "json",
        trace_id: str = "",
        span_id: str = "",
        route: str | None = None,
        entry_id: str | None = None,
    ) -> DeadLetter:
        """A new entry (fresh id, or `entry_id`) whose error fields come from `exc`."""
        now = time.time() if last_failure is None else last_failure
        return cls(
            id=uuid.uuid4().hex if entry_id is None else entry_id,
            task_name=task_name,
            func_ref=func_ref,
            payload=payload,
            serializer=serializer,
            error_type=error_type(exc),
            error_message=bounded_message(exc),
            traceback=_format_traceback(exc),
            category=str(category),
            attempts=attempts,
            first_failure=now if first_failure is None else first_failure,
            last_failure=now,
            reason=reason,
            trace_id=trace_id,
            span_id=span_id,
            route=route,
        )

    @classmethod
    def from_journal(
        cls,
        entry: JournalEntry,
        *,
        at: float | None = None,
        reason: DeadLetterReason = DeadLetterReason.INTERRUPTED,
    ) -> DeadLetter:
        """The dead letter for a journaled task whose process died while it ran.

        Its id is the task id, so recovering the same journal entry twice (two processes
        racing, or a crash between put and journal_remove) yields one entry, not two. A row
        handed to a route keeps that route (a replay sends it back there).
        """
        now = time.time() if at is None else at
        route = entry.route
        return cls(
            id=entry.task_id,
            task_name=entry.task_name,
            func_ref=entry.func_ref,
            payload=entry.payload,
            serializer=entry.serializer,
            error_type="",
            error_message=(
                f"process {entry.owner} stopped while the task was running"
                if route is None
                else f"no worker of route {route!r} finished the task by its deadline"
            ),
            traceback="",
            category=ErrorCategory.SYSTEM.value,
            attempts=1,
            first_failure=now,
            last_failure=now,
            reason=reason,
            trace_id=entry.trace_id,
            span_id=entry.span_id,
            signature=entry.signature,  # same id and call: the row's signature still holds
            route=route,
        )

    def call_fields(self) -> tuple[str, str, str, str, str]:
        """What the signature covers: id, task name, function reference, serializer, payload."""
        return (self.id, self.task_name, self.func_ref, self.serializer, self.payload)

    def signed(self, keys: SigningKeys | None = None) -> DeadLetter:
        """A copy signed with `keys` (default: the configured ones); itself without keys."""
        keys = keys if keys is not None else signing_keys()
        if keys is None:
            return self
        return dataclasses.replace(self, signature=keys.sign(self.call_fields()))

    def replace(self, **changes: Any) -> DeadLetter:
        """A copy with `changes` applied (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def with_failure(
        self,
        exc: BaseException | None = None,
        *,
        at: float | None = None,
        reason: DeadLetterReason | None = None,
        category: str | None = None,
        attempts: int = 1,
    ) -> DeadLetter:
        """A copy recording `attempts` more failed attempts at `at` (default: now).

        With `exc`, the error fields are replaced by that error's.
        """
        changes: dict[str, Any] = {
            "attempts": self.attempts + attempts,
            "last_failure": time.time() if at is None else at,
        }
        if exc is not None:
            changes.update(
                error_type=error_type(exc),
                error_message=bounded_message(exc),
                traceback=_format_traceback(exc),
            )
        if reason is not None:
            changes["reason"] = reason
        if category is not None:
            changes["category"] = str(category)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the stored form; `route` only when set)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["reason"] = self.reason.value
        if self.route is None:
            del data["route"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeadLetter:
        """Decode a stored dict.

        Raises:
            ValueError: a field is missing or invalid (`CorruptEntryError` is raised by stores).
        """
        return cls(
            **_decode_fields(cls, data, {"reason": _decode_reason, "route": _optional_text})
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        return cls.from_dict(_loads_object(text))


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A durable task that is scheduled or running; removed when it finishes either way.

    Attributes:
        task_id: the task's `bgtasks.task.id`.
        owner: the `process_identity()` of the process running it, or ``route:<route>`` once
            handed to a remote dispatcher (`DeadLetterStore.journal_hand_off`).
        enqueued_at: epoch seconds at scheduling.
        deadline: for a handed-off row, the epoch second (store clock) after which recovery
            re-sends it through its route's dispatcher; None otherwise.
        The other fields are as in `DeadLetter`.
    """

    task_id: str
    task_name: str
    func_ref: str
    payload: str
    owner: str
    enqueued_at: float
    serializer: str = "json"
    trace_id: str = ""
    span_id: str = ""
    signature: str = ""
    deadline: float | None = None

    def __post_init__(self) -> None:
        if not self.task_id:
            raise ValueError("JournalEntry.task_id must not be empty")
        check_hex("trace_id", self.trace_id, 32)
        check_hex("span_id", self.span_id, 16)

    def call_fields(self) -> tuple[str, str, str, str, str]:
        """What the signature covers (as `DeadLetter.call_fields`; the task id is the id)."""
        return (self.task_id, self.task_name, self.func_ref, self.serializer, self.payload)

    @property
    def route(self) -> str | None:
        """The route this row was handed to, or None while a process of ours owns it."""
        if self.owner.startswith(ROUTE_OWNER_PREFIX):
            return self.owner[len(ROUTE_OWNER_PREFIX) :]
        return None

    def handed(
        self, owner: str, deadline: float, signature: str | None = None
    ) -> JournalEntry:
        """This row moved to `owner` until `deadline` (`DeadLetterStore.journal_hand_off`);
        `signature` replaces the row's, None keeps it."""
        return dataclasses.replace(
            self,
            owner=owner,
            deadline=float(deadline),
            signature=self.signature if signature is None else signature,
        )

    def signed(self, keys: SigningKeys | None = None) -> JournalEntry:
        """A copy signed with `keys` (default: the configured ones); itself without keys."""
        keys = keys if keys is not None else signing_keys()
        if keys is None:
            return self
        return dataclasses.replace(self, signature=keys.sign(self.call_fields()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the stored form; `deadline` only when set)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.deadline is None:
            del data["deadline"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JournalEntry:
        return cls(**_decode_fields(cls, data, {"deadline": _optional_timestamp("deadline")}))

    @classmethod
    def from_json(cls, text: str | bytes) -> JournalEntry:
        return cls.from_dict(_loads_object(text))


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One task a remote dispatcher publishes to another process (any engine's body).

    The worker side turns it back into a task with `Executor.receive`, which verifies its
    signature, looks its function up among the app's registered tasks and decodes the call
    once. A message read from a broker is untrusted input, exactly like a store row.

    Attributes:
        task_id: the task's `bgtasks.task.id`, kept across the broker (and its retries).
        task_name, func_ref, serializer, payload: the encoded call (as in `DeadLetter`).
        route: the route of the dispatcher that published it (`Dispatcher.route`).
        enqueued_at: WALL-clock epoch seconds at scheduling: the worker's
            `bgtasks.task.wait` is the time from then to its first attempt (the broker wait).
        traceparent: the W3C ``traceparent`` of the producer's span ("" for none): the worker
            span links to it (trace mode ``link``) or is its child (``child``).
        durable: the task has a journal row, handed to `route`; the consumer removes it when
            the task ends.
        signature: HMAC of `call_fields` (see `otel_bgtasks.signing`), "" when unsigned.
    """

    task_id: str
    task_name: str
    func_ref: str
    payload: str
    route: str
    enqueued_at: float
    serializer: str = "json"
    traceparent: str = ""
    durable: bool = False
    signature: str = ""

    def __post_init__(self) -> None:
        if not self.task_id:
            raise ValueError("TaskMessage.task_id must not be empty")
        if self.traceparent and from_traceparent(self.traceparent) is None:
            raise ValueError(f"TaskMessage.traceparent is not valid: {self.traceparent[:80]!r}")

    def call_fields(self) -> tuple[str, ...]:
        """What the signature covers: the kind ``message``, the ids, the call, the route, the
        enqueue time and the durable flag (a row's signature never verifies as a message)."""
        return (
            "message",
            self.task_id,
            self.task_name,
            self.func_ref,
            self.serializer,
            self.payload,
            self.route,
            repr(float(self.enqueued_at)),
            "durable" if self.durable else "",
        )

    def link(self) -> SpanContext | None:
        """The producer's span context (to link to), or None."""
        return from_traceparent(self.traceparent) if self.traceparent else None

    def signed(self, keys: SigningKeys | None = None) -> TaskMessage:
        """A copy signed with `keys` (default: the configured ones); itself without keys."""
        keys = keys if keys is not None else signing_keys()
        if keys is None:
            return self
        return dataclasses.replace(self, signature=keys.sign(self.call_fields()))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskMessage:
        return cls(**_decode_fields(cls, data, {"durable": _flag("durable")}))

    @classmethod
    def from_json(cls, text: str | bytes) -> TaskMessage:
        return cls.from_dict(_loads_object(text))


def _decode_reason(value: Any) -> DeadLetterReason:
    return DeadLetterReason(value)


def _optional_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"expected a string or null, got {type(value).__name__}")


def _optional_timestamp(name: str) -> Callable[[Any], float | None]:
    def convert(value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"field {name!r} must be a number or null, got {type(value).__name__}")
        return _timestamp(name, value)

    return convert


def _flag(name: str) -> Callable[[Any], bool]:
    def convert(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"field {name!r} must be true or false, got {type(value).__name__}")
        return value

    return convert


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
}


_MIN_TIMESTAMP = -62_135_596_800.0  # 0001-01-01T00:00:00Z
_MAX_TIMESTAMP = 253_402_300_799.0  # 9999-12-31T23:59:59Z: the last one datetime can show


def _timestamp(name: str, value: float) -> float:
    """Every float field is an epoch timestamp: NaN, infinities and values no date can show
    (1e300) make the row corrupt rather than crash whoever displays it."""
    number = float(value)
    if not math.isfinite(number) or not _MIN_TIMESTAMP <= number <= _MAX_TIMESTAMP:
        raise ValueError(f"field {name!r} is not a valid timestamp: {value!r}")
    return number


def _decode_fields(
    cls: type[Any], data: Mapping[str, Any], converters: dict[str, Callable[[Any], Any]]
) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is not dataclasses.MISSING:
                continue
            raise ValueError(f"missing field {f.name!r}")
        value = data[f.name]
        convert = converters.get(f.name)
        if convert is not None:
            value = convert(value)
        else:
            allowed = _FIELD_TYPES.get(str(f.type), ())
            if allowed and (not isinstance(value, allowed) or isinstance(value, bool)):
                raise ValueError(f"field {f.name!r} must be {f.type}, got {type(value).__name__}")
            if str(f.type) == "float":
                value = _timestamp(f.name, value)
        out[f.name] = value
    return out


def _loads_object(text: str | bytes) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def _decode(row_id: str, raw: str | bytes | None, kind: type[_Record], id_field: str) -> _Record:
    if raw is None:
        raise CorruptEntryError(row_id, "no data")
    try:
        record = kind.from_json(raw)
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, MemoryError) as exc:
        raise CorruptEntryError(row_id, f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    stored = getattr(record, id_field)
    if stored != row_id:
        raise CorruptEntryError(row_id, f"stored data has {id_field} {stored!r}")
    return record


def decode_entry(entry_id: str, raw: str | bytes | None) -> DeadLetter:
    """Decode a stored dead letter, raising `CorruptEntryError` naming the row on failure."""
    return _decode(entry_id, raw, DeadLetter, "id")


def decode_journal(task_id: str, raw: str | bytes | None) -> JournalEntry:
    """Decode a stored journal entry, raising `CorruptEntryError` naming the row on failure."""
    return _decode(task_id, raw, JournalEntry, "task_id")


def decode_message(raw: str | bytes | None) -> TaskMessage:
    """Decode a message read from a broker (at most `MAX_MESSAGE_BYTES`).

    Raises:
        CorruptEntryError: it is not a valid encoded `TaskMessage` (named ``message``, or by
            its task id once known).
    """
    if raw is None:
        raise CorruptEntryError("message", "no data")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise CorruptEntryError("message", f"{len(raw)} bytes, more than {MAX_MESSAGE_BYTES}")
    try:
        return TaskMessage.from_json(raw)
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, MemoryError) as exc:
        raise CorruptEntryError("message", f"{type(exc).__name__}: {str(exc)[:200]}") from exc
