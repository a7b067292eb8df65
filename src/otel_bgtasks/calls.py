"""Task calls as stored: a function reference plus serialized arguments, and back.

One encoding for both stores of calls: `encode_call` for durable tasks (refuses what it cannot
store, at scheduling, naming the argument) and `describe_call` for dead letters (never fails:
what cannot be replayed is kept as a bounded description saying why). `decode_call` turns a
stored call back into a function and arguments, or says why it cannot.

Serializers are looked up by the name stored with the call (`register_serializer`); nothing
here unpickles. A stored call is untrusted: `decode_call` verifies its signature first (when a
signing key is set, `otel_bgtasks.signing`), then looks its function up among the app's tasks
(`otel_bgtasks.registry`, which never imports what an entry names), then decodes the payload.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from otel_bgtasks.errors import NotReplayableError, SerializationError, TaskImportError
from otel_bgtasks.registry import lookup_task
from otel_bgtasks.signing import SigningKeys, signing_keys

__all__ = [
    "UNREPLAYABLE",
    "DecodedCall",
    "EncodedCall",
    "JSONSerializer",
    "Serializer",
    "StoredCall",
    "check_replayable",
    "decode_call",
    "describe_call",
    "encode_call",
    "func_ref",
    "get_serializer",
    "register_serializer",
    "resolve",
]

UNREPLAYABLE = "unreplayable"
"""Serializer name of a call kept for inspection only; its payload says why."""

_MAX_DEPTH = 64  # JSON nesting accepted in arguments; deeper is refused, not recursed into
_MAX_INT_BITS = 14_000  # ~4,200 digits: Python refuses to print longer ints
_DESCRIPTION_LIMIT = 2_000  # characters of an unreplayable call's description


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

    Accepted values: None, bool, int, float, str, and lists, tuples and str-keyed dicts of them,
    nested at most 64 deep. Round trip caveat: tuples come back as lists (JSON has no tuple).
    Anything else (objects, sets, bytes, non-str dict keys, which JSON would silently turn
    into strings, NaN, ints too long to print) raises `SerializationError` naming the argument,
    so the task fails at scheduling, not at replay.
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
        problem = _json_problem(value, "", 0)
        if problem is None:
            return
        path, _, why = problem
        where = f"argument at position {position}" if keyword is None else f"argument {keyword!r}"
        inside = f" (at {path})" if path else ""
        raise SerializationError(
            f"{where}{inside} is not JSON-serializable ({why})",
            position=position,
            keyword=keyword,
            path=path,
            value_type=why,
        )


def _json_problem(value: Any, path: str, depth: int) -> tuple[str, Any, str] | None:
    """(path, value, why) of the first value JSON cannot represent faithfully, or None."""
    if value is None or isinstance(value, bool | str):
        return None
    if isinstance(value, int):
        return None if value.bit_length() <= _MAX_INT_BITS else (path, value, "int too large")
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value, "float")
    if depth >= _MAX_DEPTH and isinstance(value, list | tuple | dict):
        return (path, value, f"nested deeper than {_MAX_DEPTH}")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _json_problem(item, f"{path}[{i}]", depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (f"{path}[{_short(key)}] key", key, type(key).__name__)
            found = _json_problem(item, f"{path}[{_short(key)}]", depth + 1)
            if found is not None:
                return found
        return None
    return (path, value, type(value).__name__)


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
            f"no serializer named {_short(name)} is registered; known:"
            f" {', '.join(sorted(_SERIALIZERS))} (call otel_bgtasks.register_serializer in the"
            " replaying process)"
        ) from None


def register_serializer(serializer: Serializer) -> None:
    """Make `serializer` available by its `name` for replays (`get_serializer`).

    Raises:
        ValueError: the name is reserved for calls that cannot be replayed.
    """
    if serializer.name == UNREPLAYABLE:
        raise ValueError(f"serializer name {serializer.name!r} is reserved")
    _SERIALIZERS[serializer.name] = serializer


# -- function references ----------------------------------------------------------------------

_HINT = "durable/replayable tasks must be module-level functions importable by another process"


def func_ref(func: Callable[..., Any]) -> str:
    """The importable reference ``"package.module:Qual.name"`` of a module-level function.

    Raises:
        TypeError: `func` is a partial, lambda, local function, bound method, callable object,
            or lives in ``__main__``: durable and replayable tasks must be module-level
            functions (or static/class-level functions) importable by another process.
    """
    if isinstance(func, functools.partial):
        raise TypeError(f"cannot reference a functools.partial ({func!r}); {_HINT}")
    if inspect.ismethod(func):
        raise TypeError(f"cannot reference a bound method ({func.__qualname__}); {_HINT}")
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or inspect.isclass(func):
        raise TypeError(f"cannot reference {func!r}; {_HINT}")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise TypeError(f"cannot reference {module}.{qualname} (lambda or local function); {_HINT}")
    if module == "__main__":
        raise TypeError(f"cannot reference {qualname} defined in __main__; {_HINT}")
    ref = f"{module}:{qualname}"
    try:
        found = _import_live(ref)
    except TaskImportError as exc:
        raise TypeError(f"{exc}; {_HINT}") from None
    if found is not func:
        raise TypeError(f"{ref} resolves to a different object than the task function; {_HINT}")
    return ref


def resolve(ref: str) -> Callable[..., Any]:
    """The app's task a stored `func_ref` names (see `otel_bgtasks.registry`); never imports.

    Raises:
        UnregisteredTaskError: `ref` is not one of the app's tasks (a `TaskImportError`).
    """
    return lookup_task(ref)


def _import_live(ref: str) -> Callable[..., Any]:
    """Import what `ref` names: only for a live function's own reference (`func_ref`), whose
    module is already imported, never for a reference read from a store."""
    module_name, sep, qualname = ref.partition(":")
    if not ref:
        raise TaskImportError("the entry has no function reference (the task was not importable)")
    shown = _short(ref)
    if not sep or not module_name or not qualname:
        raise TaskImportError(
            f"task {shown} can no longer be imported: malformed reference, expected"
            " 'package.module:Qualified.name'; the entry is kept"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time error of user code means "not importable"
        raise TaskImportError(
            f"task {shown} can no longer be imported: {type(exc).__name__}: {exc};"
            " the entry is kept"
        ) from exc
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise TaskImportError(
                f"task {shown} can no longer be imported: module {module_name!r} has no"
                f" attribute {qualname!r}; the entry is kept"
            ) from None
    if not callable(target):
        raise TaskImportError(
            f"task {shown} can no longer be imported: {qualname!r} is not callable;"
            " the entry is kept"
        )
    return target  # type: ignore[no-any-return]


# -- calls --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedCall:
    """A call as stored: `func_ref` ("" if not importable), `payload`, and the `serializer`
    name that reads the payload (`UNREPLAYABLE`: a description kept for inspection only)."""

    func_ref: str
    payload: str
    serializer: str

    @property
    def replayable(self) -> bool:
        return bool(self.func_ref) and self.serializer != UNREPLAYABLE


def encode_call(
    serializer: Serializer,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    task_name: str,
) -> EncodedCall:
    """Encode a durable task's call, or refuse it naming what is wrong.

    Raises:
        TypeError: the function is not importable by another process.
        SerializationError: e.g. "argument 'user' (position 0) of task send_mail is not
            serializable by 'json' (User); pass JSON-serializable values or a serializer=...".
    """
    ref = func_ref(func)
    return EncodedCall(ref, _dumps(serializer, func, args, kwargs, task_name), serializer.name)


def describe_call(
    serializer: Serializer,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    task_name: str,
) -> EncodedCall:
    """Encode a failed task's call for its dead letter; never raises.

    A function that is not importable gets ``func_ref=""``; arguments that cannot be
    serialized (whatever they are: deep, recursive, huge, with a `repr` that raises) are kept
    as a description of at most 2,000 characters saying why the call cannot be replayed.
    """
    try:
        ref = func_ref(func)
    except TypeError:  # a lambda or local function: kept for inspection, not replayable
        ref = ""
    try:
        return EncodedCall(ref, _dumps(serializer, func, args, kwargs, task_name), serializer.name)
    except Exception as exc:  # whatever the serializer raised, the failure must be kept
        why = _bounded(str(exc) if isinstance(exc, SerializationError) else _error_text(exc))
        description = json.dumps({"unreplayable": why, "call": _bounded_repr((args, kwargs))})
        return EncodedCall(ref, description, UNREPLAYABLE)


class StoredCall(Protocol):
    """A call read from a store or a broker (a `DeadLetter`, a `JournalEntry`, a
    `TaskMessage`): untrusted input."""

    @property
    def task_name(self) -> str: ...

    @property
    def func_ref(self) -> str: ...

    @property
    def serializer(self) -> str: ...

    @property
    def payload(self) -> str: ...

    @property
    def signature(self) -> str: ...

    def call_fields(self) -> tuple[str, ...]: ...


def check_replayable(entry: StoredCall, *, keys: SigningKeys | None = None) -> None:
    """Raises what `decode_call` would, short of decoding the payload.

    Raises:
        UntrustedEntryError, NotReplayableError, TaskImportError, LookupError: as `decode_call`.
    """
    _check(entry, keys)


class DecodedCall(NamedTuple):
    """A stored call, verified and decoded: unpacks as ``func, args, kwargs``."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def decode_call(entry: StoredCall, *, keys: SigningKeys | None = None) -> DecodedCall:
    """The function and arguments of a stored call, in this order of checks: the signature
    (when `keys`, default the configured ones, are set), then the function among the app's
    registered tasks, then the serializer by name; only then is the payload decoded.

    Raises:
        UntrustedEntryError: unsigned or tampered while a key is set, or the function is not
            one of the app's tasks (`UnregisteredTaskError`); nothing was decoded or imported.
        NotReplayableError: the call was stored for inspection only (says why).
        TaskImportError: the entry has no function reference.
        LookupError: its serializer is not registered in this process.
        ValueError: the payload cannot be decoded by its serializer.
    """
    func, serializer = _check(entry, keys)
    try:
        args, kwargs = serializer.loads(entry.payload)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(
            f"payload cannot be decoded by {_short(entry.serializer)}: {_error_text(exc)}"
        ) from exc
    return DecodedCall(func, tuple(args), dict(kwargs))


def _check(entry: StoredCall, keys: SigningKeys | None) -> tuple[Callable[..., Any], Serializer]:
    keys = keys if keys is not None else signing_keys()
    if keys is not None:
        keys.verify(entry.call_fields(), entry.signature)
    if entry.serializer == UNREPLAYABLE:
        raise NotReplayableError(
            f"the call cannot be replayed: {_unreplayable_reason(entry.payload)}"
        )
    if not entry.func_ref:
        raise TaskImportError("the entry has no function reference (the task was not importable)")
    func = lookup_task(entry.func_ref)
    return func, get_serializer(entry.serializer)


def _unreplayable_reason(payload: str) -> str:
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return "its arguments could not be serialized"
    reason = data.get("unreplayable") if isinstance(data, dict) else None
    return _bounded(reason) if isinstance(reason, str) else "its arguments could not be serialized"


def _dumps(
    serializer: Serializer,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    task_name: str,
) -> str:
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
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(
            f"arguments of task {task_name} are not serializable by {serializer.name!r}:"
            f" {_error_text(exc)}; pass serializable values or a serializer=..."
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


_repr = reprlib.Repr()
_repr.maxlevel = 4
_repr.maxstring = 120
_repr.maxother = 120
_repr.maxlong = 60


def _bounded(text: str) -> str:
    return text if len(text) <= _DESCRIPTION_LIMIT else text[: _DESCRIPTION_LIMIT - 1] + "…"


def _bounded_repr(value: Any) -> str:
    """A repr of at most 2,000 characters, whatever `value` is (its own repr may raise)."""
    try:
        return _bounded(_repr.repr(value))
    except Exception:  # a repr that raises, an int too long to print...
        return f"<{type(value).__name__} that cannot be shown>"


def _short(value: object) -> str:
    return _bounded_repr(value)[:200]


def _error_text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # an exception whose __str__ raises
        text = ""
    return _bounded(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
