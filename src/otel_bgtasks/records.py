"""Task call records: a `DeadLetter` (failed for good) and a `JournalEntry` (durable, in flight).

Both are frozen dataclasses with a JSON stored form. Rows read back from a store are untrusted:
`decode_entry` / `decode_journal` check every field's type and raise `CorruptEntryError` naming
the row, so one bad row never hides the others.
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

from otel_bgtasks._ids import check_hex
from otel_bgtasks._tracebacks import bounded_message, bounded_traceback
from otel_bgtasks.attributes import ErrorCategory
from otel_bgtasks.errors import CorruptEntryError, error_type
from otel_bgtasks.signing import SigningKeys, signing_keys

__all__ = [
    "ROUTE_OWNER",
    "DeadLetter",
    "DeadLetterReason",
    "JournalEntry",
    "TaskMessage",
    "decode_entry",
    "decode_journal",
]

_Record = TypeVar("_Record", "DeadLetter", "JournalEntry")


class DeadLetterReason(StrEnum):
    """Why a task was dead-lettered (`bgtasks.dlq.reason`)."""

    EXHAUSTED = "exhausted"
    PERMANENT = "permanent"
    CIRCUIT_OPEN = "circuit_open"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    # Tasks that never ran (`Executor.dead_letter_unrun`): remote dispatch.
    UNDELIVERABLE = "undeliverable"
    """Could not be published to its remote engine within the publish deadline."""
    REFUSED = "refused"
    """The consumer refused the message: unregistered, unsigned/tampered or undecodable."""
    WORKER_LOST = "worker_lost"
    """Its worker was lost more than max_deliveries times (or once, for a task that is not
    durable: at most once)."""


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
        route: the remote dispatcher the task was bound for (e.g. ``celery:bgtasks``); a
            replay sends it there when that dispatcher is registered. "" = this process.
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
    route: str = ""

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
        route: str = "",
    ) -> DeadLetter:
        """A new entry (fresh id) whose error fields come from `exc`."""
        now = time.time() if last_failure is None else last_failure
        return cls(
            id=uuid.uuid4().hex,
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
        racing, or a crash between put and journal_remove) yields one entry, not two.
        """
        now = time.time() if at is None else at
        return cls(
            id=entry.task_id,
            task_name=entry.task_name,
            func_ref=entry.func_ref,
            payload=entry.payload,
            serializer=entry.serializer,
            error_type="",
            error_message=f"process {entry.owner} stopped while the task was running",
            traceback="",
            category=ErrorCategory.SYSTEM.value,
            attempts=1,
            first_failure=now,
            last_failure=now,
            reason=reason,
            trace_id=entry.trace_id,
            span_id=entry.span_id,
            signature=entry.signature,  # same id and call: the row's signature still holds
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
        """A JSON-ready dict (the stored form)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["reason"] = self.reason.value
        if not self.route:  # the stored form of a local task is unchanged
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
        return cls(**_decode_fields(cls, data, {"reason": _decode_reason}))

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        return cls.from_dict(_loads_object(text))


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A durable task that is scheduled or running; removed when it finishes either way.

    Attributes:
        task_id: the task's `bgtasks.task.id`.
        owner: the `process_identity()` of the process running it, or ``route:<route>``
            once handed to a remote dispatcher (`Executor.hand_off`).
        enqueued_at: epoch seconds at scheduling.
        deadline: epoch seconds after which a handed-off row is re-sent by recovery (0:
            not handed off).
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
    deadline: float = 0.0

    def __post_init__(self) -> None:
        if not self.task_id:
            raise ValueError("JournalEntry.task_id must not be empty")
        check_hex("trace_id", self.trace_id, 32)
        check_hex("span_id", self.span_id, 16)

    def call_fields(self) -> tuple[str, str, str, str, str]:
        """What the signature covers (as `DeadLetter.call_fields`; the task id is the id)."""
        return (self.task_id, self.task_name, self.func_ref, self.serializer, self.payload)

    def signed(self, keys: SigningKeys | None = None) -> JournalEntry:
        """A copy signed with `keys` (default: the configured ones); itself without keys."""
        keys = keys if keys is not None else signing_keys()
        if keys is None:
            return self
        return dataclasses.replace(self, signature=keys.sign(self.call_fields()))

    def replace(self, **changes: Any) -> JournalEntry:
        """A copy with `changes` applied (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not self.deadline:  # the stored form of a row not handed off is unchanged
            del data["deadline"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JournalEntry:
        return cls(**_decode_fields(cls, data, {}))

    @classmethod
    def from_json(cls, text: str | bytes) -> JournalEntry:
        return cls.from_dict(_loads_object(text))


ROUTE_OWNER = "route:"
"""Owner prefix of a journal row handed to a remote dispatcher (never recovered locally)."""


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """A task sent to another process by a remote dispatcher: untrusted when received.

    Attributes:
        task_id: the original `bgtasks.task.id` (the message id).
        task_name, func_ref, serializer, payload: the encoded call (as in `JournalEntry`).
        traceparent, tracestate: W3C trace context of the producer span ("" if none).
        enqueued_at: wall clock (epoch s) at scheduling: the consumer's wait is measured
            from it (`bgtasks.task.wait` is the broker wait).
        route: the dispatcher's route; durable: the task has a journal row.
        signature: HMAC of `call_fields` (kind ``message``), "" unsigned.
    """

    task_id: str
    task_name: str
    func_ref: str
    serializer: str
    payload: str
    enqueued_at: float
    traceparent: str = ""
    tracestate: str = ""
    route: str = ""
    durable: bool = False
    signature: str = ""

    def call_fields(self) -> tuple[str, str, str, str, str]:
        """What the signature covers; the id is bound to the kind (a journal row's or dead
        letter's signature does not verify as a message)."""
        return (
            "message:" + self.task_id,
            self.task_name,
            self.func_ref,
            self.serializer,
            self.payload,
        )

    def signed(self, keys: SigningKeys | None = None) -> TaskMessage:
        """A copy signed with `keys` (default: the configured ones); itself without keys."""
        keys = keys if keys is not None else signing_keys()
        if keys is None:
            return self
        return dataclasses.replace(self, signature=keys.sign(self.call_fields()))


def _decode_reason(value: Any) -> DeadLetterReason:
    return DeadLetterReason(value)


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
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptEntryError(row_id, f"{type(exc).__name__}: {exc}") from exc
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
