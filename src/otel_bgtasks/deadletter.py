"""Dead letters: tasks that failed for good, kept in a persistent store to inspect and replay.

A task ends up here when it exhausts its retries, fails with a permanent error, is refused by
an open circuit, times out, or was running in a process that died (durable tasks, through the
journal). Each `DeadLetter` carries what is needed to run the task again: an importable
function reference (`func_ref`) and its serialized arguments (`payload`), plus the last error
and the trace/span ids of the original task span, so a replay is linked to it.

Stores (`open_store(url)`)::

    store = open_store("sqlite:////var/lib/app/dlq.db")   # one host, several worker processes
    store = open_store("redis://localhost:6379/0")        # shared by every host

`open_store` wraps the store in a `BufferedStore` (see `otel_bgtasks.stores`): a write that
fails because the backing store is down never raises into the task; the entry waits in memory
and is written by the next successful operation.

Operators use `DeadLetters(store)` (list, show, delete, purge, replay) or the CLI:
``otel-bgtasks dlq list|show|delete|replay|purge`` (store URL from ``--store`` or the
``OTEL_BGTASKS_DLQ_URL`` environment variable).
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import secrets
import socket
import threading
import time
import traceback as _traceback
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar, runtime_checkable
from urllib.parse import urlsplit

import structlog

from otel_bgtasks.attributes import ErrorCategory
from otel_bgtasks.errors import error_type

__all__ = [
    "DLQ_URL_ENV",
    "CorruptEntryError",
    "DeadLetter",
    "DeadLetterReason",
    "DeadLetterStore",
    "DeadLetters",
    "JSONSerializer",
    "JournalEntry",
    "ReplayOutcome",
    "ReplayReport",
    "ReplayResult",
    "ReplayRunner",
    "ReplayStatus",
    "SerializationError",
    "Serializer",
    "StoreUnavailableError",
    "TaskImportError",
    "decode_entry",
    "decode_journal",
    "dump_call",
    "func_ref",
    "get_serializer",
    "open_store",
    "owner_is_dead",
    "process_identity",
    "recover_interrupted",
    "register_serializer",
    "resolve",
]

_T = TypeVar("_T")
_Record = TypeVar("_Record", "DeadLetter", "JournalEntry")

DLQ_URL_ENV = "OTEL_BGTASKS_DLQ_URL"
"""Environment variable holding the default store URL (the CLI reads it)."""

_log = structlog.get_logger("otel_bgtasks")

_HEX = frozenset("0123456789abcdef")


class DeadLetterReason(StrEnum):
    """Why a task was dead-lettered (`bgtasks.dlq.reason`)."""

    EXHAUSTED = "exhausted"
    PERMANENT = "permanent"
    CIRCUIT_OPEN = "circuit_open"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"


# -- errors ---------------------------------------------------------------------------------


class TaskImportError(LookupError):
    """A dead letter's function reference can no longer be imported; the entry is kept."""


class SerializationError(TypeError):
    """A task argument cannot be serialized for a durable or replayable task.

    Attributes:
        position: index of the offending positional argument, or None.
        keyword: name of the offending keyword argument, or None.
        path: where inside the argument the bad value sits (e.g. ``["user"].address``), or "".
        value_type: the type name of the value that cannot be serialized.
    """

    def __init__(
        self,
        message: str,
        *,
        position: int | None = None,
        keyword: str | None = None,
        path: str = "",
        value_type: str = "",
    ) -> None:
        super().__init__(message)
        self.position = position
        self.keyword = keyword
        self.path = path
        self.value_type = value_type


class CorruptEntryError(ValueError):
    """A stored row cannot be decoded (bad JSON, missing or invalid fields).

    Attributes:
        entry_id: the row's id in the store.
    """

    def __init__(self, entry_id: str, reason: str) -> None:
        super().__init__(f"dead-letter entry {entry_id!r} is corrupt: {reason}")
        self.entry_id = entry_id
        self.reason = reason


class StoreUnavailableError(RuntimeError):
    """The backing store cannot be reached (raised by reads; writes are buffered)."""


# -- records --------------------------------------------------------------------------------


def _check_hex(name: str, value: str, length: int) -> None:
    if value and (len(value) != length or not set(value) <= _HEX):
        raise ValueError(f"{name} must be {length} lowercase hex digits or '', got {value!r}")


def _format_traceback(exc: BaseException) -> str:
    return "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))


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

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("DeadLetter.id must not be empty")
        if not isinstance(self.reason, DeadLetterReason):
            raise TypeError(f"DeadLetter.reason must be a DeadLetterReason, got {self.reason!r}")
        if self.attempts < 0:
            raise ValueError(f"DeadLetter.attempts must be >= 0, got {self.attempts}")
        _check_hex("trace_id", self.trace_id, 32)
        _check_hex("span_id", self.span_id, 16)

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
            error_message=str(exc),
            traceback=_format_traceback(exc),
            category=str(category),
            attempts=attempts,
            first_failure=now if first_failure is None else first_failure,
            last_failure=now,
            reason=reason,
            trace_id=trace_id,
            span_id=span_id,
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
        )

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
                error_message=str(exc),
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
        owner: the `process_identity()` of the process running it.
        enqueued_at: epoch seconds at scheduling.
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

    def __post_init__(self) -> None:
        if not self.task_id:
            raise ValueError("JournalEntry.task_id must not be empty")
        _check_hex("trace_id", self.trace_id, 32)
        _check_hex("span_id", self.span_id, 16)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JournalEntry:
        return cls(**_decode_fields(cls, data, {}))

    @classmethod
    def from_json(cls, text: str | bytes) -> JournalEntry:
        return cls.from_dict(_loads_object(text))


def _decode_reason(value: Any) -> DeadLetterReason:
    return DeadLetterReason(value)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
}


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
                value = float(value)
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


# -- serializers ----------------------------------------------------------------------------


@runtime_checkable
class Serializer(Protocol):
    """Turns a task's arguments into a string and back.

    `dumps` raises `TypeError` (preferably `SerializationError`, which says which argument)
    when an argument cannot be serialized.
    """

    name: str

    def dumps(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str: ...

    def loads(self, payload: str) -> tuple[tuple[Any, ...], dict[str, Any]]: ...


class JSONSerializer:
    """The default serializer: arguments as a JSON object ``{"args": [...], "kwargs": {...}}``.

    Accepted values: None, bool, int, float, str, and lists, tuples and str-keyed dicts of them.
    Round trip caveat: tuples come back as lists (JSON has no tuple). Anything else (objects,
    sets, bytes, non-str dict keys, which JSON would silently turn into strings) raises
    `SerializationError` naming the argument, so the task fails at scheduling, not at replay.
    """

    name = "json"

    def dumps(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        for position, value in enumerate(args):
            self._check(value, position=position, keyword=None)
        for keyword, value in kwargs.items():
            self._check(value, position=None, keyword=keyword)
        return json.dumps({"args": list(args), "kwargs": kwargs}, separators=(",", ":"))

    def loads(self, payload: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        data = json.loads(payload)
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("args"), list)
            or not isinstance(data.get("kwargs"), dict)
        ):
            raise ValueError("JSON payload must be an object with 'args' (list), 'kwargs' (object)")
        return tuple(data["args"]), data["kwargs"]

    def _check(self, value: Any, *, position: int | None, keyword: str | None) -> None:
        problem = _json_problem(value, "")
        if problem is None:
            return
        path, bad = problem
        where = f"argument at position {position}" if keyword is None else f"argument {keyword!r}"
        inside = f" (at {path})" if path else ""
        raise SerializationError(
            f"{where}{inside} is not JSON-serializable ({type(bad).__name__})",
            position=position,
            keyword=keyword,
            path=path,
            value_type=type(bad).__name__,
        )


def _json_problem(value: Any, path: str) -> tuple[str, Any] | None:
    """(path, value) of the first value JSON cannot represent faithfully, or None."""
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _json_problem(item, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (f"{path}[{key!r}] key", key)
            found = _json_problem(item, f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    return (path, value)


_SERIALIZERS: dict[str, Serializer] = {"json": JSONSerializer()}


def get_serializer(name: str) -> Serializer:
    """The registered serializer called `name`.

    Raises:
        LookupError: no serializer of that name is registered (see `register_serializer`).
    """
    try:
        return _SERIALIZERS[name]
    except KeyError:
        raise LookupError(
            f"no serializer named {name!r} is registered; known: {', '.join(sorted(_SERIALIZERS))}"
            " (call otel_bgtasks.deadletter.register_serializer in the replaying process)"
        ) from None


def register_serializer(serializer: Serializer) -> None:
    """Make `serializer` available by its `name` for replays (`get_serializer`)."""
    _SERIALIZERS[serializer.name] = serializer


def dump_call(
    serializer: Serializer,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    task_name: str,
) -> str:
    """Serialize a task's arguments, naming the parameter and task in any error.

    Raises:
        SerializationError: e.g. "argument 'user' (position 0) of task send_mail is not
            JSON-serializable (User); pass JSON-serializable values or a serializer=...".
    """
    try:
        return serializer.dumps(args, kwargs)
    except SerializationError as exc:
        parameter = exc.keyword
        if parameter is None and exc.position is not None:
            parameter = _parameter_name(func, exc.position)
        if parameter is not None and exc.position is not None:
            where = f"argument {parameter!r} (position {exc.position})"
        elif parameter is not None:
            where = f"argument {parameter!r}"
        else:
            where = f"argument at position {exc.position}"
        inside = f" at {exc.path}" if exc.path else ""
        raise SerializationError(
            f"{where} of task {task_name} is not serializable by {serializer.name!r}"
            f" ({exc.value_type}{inside}); pass {serializer.name.upper()}-serializable values"
            " or a serializer=...",
            position=exc.position,
            keyword=exc.keyword,
            path=exc.path,
            value_type=exc.value_type,
        ) from exc
    except TypeError as exc:
        raise SerializationError(
            f"arguments of task {task_name} are not serializable by {serializer.name!r}: {exc};"
            " pass serializable values or a serializer=..."
        ) from exc


def _parameter_name(func: Callable[..., Any], position: int) -> str | None:
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, param in enumerate(params):
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            return f"*{param.name}"
        if i == position and param.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            return param.name
    return None


# -- function references --------------------------------------------------------------------


def func_ref(func: Callable[..., Any]) -> str:
    """The importable reference ``"package.module:Qual.name"`` of a module-level function.

    Raises:
        TypeError: `func` is a partial, lambda, local function, bound method, callable object,
            or lives in ``__main__``: durable and replayable tasks must be module-level
            functions (or static/class-level functions) importable by another process.
    """
    hint = "durable/replayable tasks must be module-level functions importable by another process"
    if isinstance(func, functools.partial):
        raise TypeError(f"cannot reference a functools.partial ({func!r}); {hint}")
    if inspect.ismethod(func):
        raise TypeError(f"cannot reference a bound method ({func.__qualname__}); {hint}")
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or inspect.isclass(func):
        raise TypeError(f"cannot reference {func!r}; {hint}")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise TypeError(f"cannot reference {module}.{qualname} (lambda or local function); {hint}")
    if module == "__main__":
        raise TypeError(f"cannot reference {qualname} defined in __main__; {hint}")
    ref = f"{module}:{qualname}"
    try:
        found = resolve(ref)
    except TaskImportError as exc:
        raise TypeError(f"{exc}; {hint}") from None
    if found is not func:
        raise TypeError(f"{ref} resolves to a different object than the task function; {hint}")
    return ref


def resolve(ref: str) -> Callable[..., Any]:
    """Import the function named by a `func_ref` string.

    Raises:
        TaskImportError: the module or attribute is gone, or the reference is malformed.
    """
    module_name, sep, qualname = ref.partition(":")
    if not ref:
        raise TaskImportError("the entry has no function reference (the task was not importable)")
    if not sep or not module_name or not qualname:
        raise TaskImportError(
            f"task {ref!r} can no longer be imported: malformed reference, expected"
            " 'package.module:Qualified.name'; the entry is kept"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time error of user code means "not importable"
        raise TaskImportError(
            f"task {ref!r} can no longer be imported: {type(exc).__name__}: {exc};"
            " the entry is kept"
        ) from exc
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise TaskImportError(
                f"task {ref!r} can no longer be imported: module {module_name!r} has no"
                f" attribute {qualname!r}; the entry is kept"
            ) from None
    if not callable(target):
        raise TaskImportError(
            f"task {ref!r} can no longer be imported: {qualname!r} is not callable;"
            " the entry is kept"
        )
    return target  # type: ignore[no-any-return]


# -- process identity -----------------------------------------------------------------------

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


# -- the store interface --------------------------------------------------------------------


class DeadLetterStore(ABC):
    """Persistent dead letters plus the durable-task journal and owner heartbeats.

    Methods are synchronous and thread-safe: the executor calls them from worker threads.
    `list` skips rows that cannot be decoded (logging an error naming each) and `corrupt_ids`
    returns them, so one bad row never hides the others.
    """

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # dead letters
    @abstractmethod
    def put(self, entry: DeadLetter) -> None:
        """Store `entry` (replacing one with the same id)."""

    @abstractmethod
    def get(self, entry_id: str) -> DeadLetter | None:
        """The entry with this id, or None.

        Raises:
            CorruptEntryError: the row exists but cannot be decoded.
        """

    @abstractmethod
    def list(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Entries, oldest `last_failure` first, filtered by task name, reason and
        `last_failure >= since`; corrupt rows are skipped (see `corrupt_ids`)."""

    @abstractmethod
    def update(self, entry: DeadLetter) -> None:
        """Replace the stored entry with the same id (stores it if it was deleted)."""

    @abstractmethod
    def delete(self, entry_id: str) -> bool:
        """Remove an entry (corrupt rows too); True if it existed."""

    @abstractmethod
    def purge(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
    ) -> int:
        """Remove matching entries; without filters every row, corrupt ones included.
        Returns the number removed."""

    @abstractmethod
    def count(self) -> int:
        """Number of stored rows (the `bgtasks.dlq.depth` gauge)."""

    @abstractmethod
    def corrupt_ids(self) -> builtins.list[str]:
        """Ids of rows that cannot be decoded (scans the whole store)."""

    # journal
    @abstractmethod
    def journal_add(self, entry: JournalEntry) -> None:
        """Record a durable task as scheduled/running (replacing one with the same id)."""

    @abstractmethod
    def journal_remove(self, task_id: str) -> bool:
        """Forget a durable task (it finished); True if it was recorded."""

    @abstractmethod
    def journal_list(self, *, owner: str | None = None) -> builtins.list[JournalEntry]:
        """Journaled tasks, oldest first, optionally of one owner; corrupt rows skipped."""

    # owners
    @abstractmethod
    def heartbeat(self, owner: str, *, at: float | None = None) -> None:
        """Record that `owner` is alive at `at` (default: now)."""

    @abstractmethod
    def last_seen(self) -> dict[str, float]:
        """Each known owner's last sign of life: its heartbeat, or for an owner with journal
        entries but no heartbeat, its newest `enqueued_at`."""

    @abstractmethod
    def forget_owner(self, owner: str) -> None:
        """Drop `owner`'s heartbeat (after its journal entries were recovered)."""

    def dead_owners(self, stale_after: float, *, now: float | None = None) -> builtins.list[str]:
        """Owners whose last sign of life is older than `stale_after` seconds, or on this host
        whose process is gone (`owner_is_dead`). This process is never listed."""
        moment = time.time() if now is None else now
        me = process_identity()
        dead = [
            owner
            for owner, seen in self.last_seen().items()
            if owner != me and (moment - seen > stale_after or owner_is_dead(owner))
        ]
        return sorted(dead)

    def close(self) -> None:  # noqa: B027 - optional for stores without resources
        """Release connections; pending buffered writes are flushed or logged."""


def recover_interrupted(
    store: DeadLetterStore, *, stale_after: float, now: float | None = None
) -> list[DeadLetter]:
    """Move the journal entries of dead owners to the dead letters (reason `interrupted`).

    Safe to run from several processes at once: the dead letter's id is the task id, so a
    race stores the same entry twice, not two entries. Returns the entries moved here.
    """
    moment = time.time() if now is None else now
    moved: list[DeadLetter] = []
    for owner in store.dead_owners(stale_after, now=moment):
        for journaled in store.journal_list(owner=owner):
            entry = DeadLetter.from_journal(journaled, at=moment)
            store.put(entry)  # before removing: a crash in between leaves a duplicate, not a loss
            store.journal_remove(journaled.task_id)
            moved.append(entry)
            _log.warning(
                "durable task interrupted, moved to dead letters",
                task_name=entry.task_name,
                task_id=entry.id,
                owner=owner,
            )
        store.forget_owner(owner)
    return moved


def open_store(url: str, *, buffered: bool = True, max_pending: int = 10_000) -> DeadLetterStore:
    """Open the store a URL names.

    ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (SQLAlchemy style: the
    path is what follows ``sqlite:///``), ``redis://[:password@]host:port/db`` and
    ``rediss://`` (TLS); ``?prefix=name`` sets the Redis key prefix (default ``bgtasks``).

    With `buffered` (the default) the store is wrapped in a `BufferedStore` keeping up to
    `max_pending` writes in memory while the backing store is down.

    Raises:
        ValueError: unknown scheme or malformed URL (the message lists the valid forms).
    """
    from otel_bgtasks.stores import BufferedStore  # stores import this module

    store = _open_raw(url)
    return BufferedStore(store, max_pending=max_pending) if buffered else store


_VALID_URLS = (
    "sqlite:///path.db, sqlite:////abs/path.db, redis://host:port/db, rediss://host:port/db"
)


def _open_raw(url: str) -> DeadLetterStore:
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "sqlite":
        prefix = "sqlite:///"
        if not url.lower().startswith(prefix) or len(url) == len(prefix):
            raise ValueError(f"invalid SQLite URL {url!r}: expected sqlite:///path.db")
        path = url[len(prefix) :]
        if path == ":memory:" or "?" in path:
            raise ValueError(
                f"invalid SQLite URL {url!r}: give a file path (several processes share it),"
                " without query parameters"
            )
        from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore

        return SQLiteDeadLetterStore(path)
    if scheme in ("redis", "rediss"):
        from otel_bgtasks.stores.redis import RedisDeadLetterStore

        return RedisDeadLetterStore(url)
    raise ValueError(f"unsupported dead-letter store URL {url!r}; valid forms: {_VALID_URLS}")


# -- operator API: list, show, delete, purge, replay ----------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay runner reports for one entry.

    Attributes:
        ok: the task succeeded; the entry is deleted.
        entry: on failure, the updated entry to store (attempts, last error); None keeps the
            stored entry with one more attempt and `last_failure` now.
    """

    ok: bool
    entry: DeadLetter | None = None


ReplayRunner = Callable[[DeadLetter], Awaitable[ReplayResult]]
"""Re-runs a dead letter's task (as a new span linked to the original) and reports the result."""

ReplayStatus = Literal["replayed", "failed", "import_error", "missing", "corrupt", "error"]


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """The result of replaying one entry.

    `status`: ``replayed`` (succeeded, deleted), ``failed`` (task failed again, entry updated),
    ``import_error`` (function or its serializer unavailable here, entry kept), ``missing``
    (no such id), ``corrupt`` (row cannot be decoded, kept), ``error`` (the runner itself
    raised; entry kept unchanged).
    """

    entry_id: str
    status: ReplayStatus
    task_name: str = ""
    message: str = ""


@dataclass(slots=True)
class ReplayReport:
    """All outcomes of one `DeadLetters.replay` call, in replay order."""

    outcomes: list[ReplayOutcome] = field(default_factory=list)

    def by_status(self, status: ReplayStatus) -> list[ReplayOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def replayed(self) -> int:
        return len(self.by_status("replayed"))

    @property
    def ok(self) -> bool:
        """True when every entry replayed successfully."""
        return all(o.status == "replayed" for o in self.outcomes)


class DeadLetters:
    """Operator API over a store: inspect, delete, purge and replay dead letters."""

    def __init__(self, store: DeadLetterStore) -> None:
        self.store = store
        self._offload = True

    def list(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Entries oldest first (see `DeadLetterStore.list`)."""
        return self.store.list(task=task, reason=reason, since=since, limit=limit)

    def show(self, entry_id: str) -> DeadLetter:
        """The entry with this id.

        Raises:
            KeyError: no entry has this id.
            CorruptEntryError: the row cannot be decoded.
        """
        entry = self.store.get(entry_id)
        if entry is None:
            raise KeyError(entry_id)
        return entry

    def delete(self, entry_id: str) -> bool:
        return self.store.delete(entry_id)

    def purge(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
    ) -> int:
        return self.store.purge(task=task, reason=reason, since=since)

    async def replay(
        self,
        ids: Iterable[str] | None,
        runner: ReplayRunner,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        on_outcome: Callable[[ReplayOutcome], None] | None = None,
        on_start: Callable[[int], None] | None = None,
        offload: bool = True,
    ) -> ReplayReport:
        """Replay entries one after the other (a recovering downstream gets no burst).

        Args:
            ids: entry ids, or None for every entry matching the filters (oldest first).
            runner: runs one entry, see `ReplayRunner`.
            on_start: called with the number of entries about to be replayed.
            on_outcome: called after each entry (progress display).
            offload: run store calls in a worker thread, so a server's event loop keeps
                serving; a process that owns its loop (the CLI) passes False: the thread hop
                costs more than the store call.

        A `TaskImportError` or a runner exception affects only its entry, which is kept; the
        others continue.
        """
        report = ReplayReport()
        store = self.store
        self._offload = offload
        targets: list[DeadLetter | str]
        if ids is None:
            targets = list(await self._call(store.list, task=task, reason=reason, since=since))
        else:
            targets = list(dict.fromkeys(ids))
        if on_start is not None:
            on_start(len(targets))
        for target in targets:
            outcome = await self._replay_one(target, runner)
            report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
        return report

    async def _call(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        if self._offload:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    async def _replay_one(self, target: DeadLetter | str, runner: ReplayRunner) -> ReplayOutcome:
        store = self.store
        if isinstance(target, str):
            try:
                found = await self._call(store.get, target)
            except CorruptEntryError as exc:
                return ReplayOutcome(target, "corrupt", message=str(exc))
            if found is None:
                return ReplayOutcome(target, "missing", message=f"no dead letter {target!r}")
            entry = found
        else:
            entry = target
        try:
            resolve(entry.func_ref)
            get_serializer(entry.serializer)
        except LookupError as exc:  # TaskImportError, or a serializer this process lacks
            _log.error("dead letter replay: task not importable", entry_id=entry.id, error=str(exc))
            return ReplayOutcome(entry.id, "import_error", entry.task_name, str(exc))
        try:
            result = await runner(entry)
        except TaskImportError as exc:
            _log.error("dead letter replay: task not importable", entry_id=entry.id, error=str(exc))
            return ReplayOutcome(entry.id, "import_error", entry.task_name, str(exc))
        except Exception as exc:  # the runner broke: keep the entry untouched, go on
            _log.exception("dead letter replay: runner failed", entry_id=entry.id)
            return ReplayOutcome(entry.id, "error", entry.task_name, f"{type(exc).__name__}: {exc}")
        if result.ok:
            await self._call(store.delete, entry.id)
            return ReplayOutcome(entry.id, "replayed", entry.task_name)
        updated = result.entry if result.entry is not None else entry.with_failure()
        await self._call(store.update, updated)
        message = (
            f"{updated.error_type}: {updated.error_message}" if updated.error_type else "failed"
        )
        return ReplayOutcome(entry.id, "failed", entry.task_name, message)
