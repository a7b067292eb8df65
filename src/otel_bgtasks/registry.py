"""The app's tasks: the only functions a stored entry may name for replay or recovery.

A dead letter or a journal row is untrusted input (anyone who can write the store can write
one), so its function reference is looked up here and never imported. A reference
``"package.module:name"`` runs only when one of these holds:

1. the function is decorated with `@background_task` (registered when its module is imported);
2. this process scheduled it as a background task (an instrumented app replaying its own
   dead letters from the admin router, or re-running its journal at startup);
3. it is a plain module-level function defined in a declared task module (``--tasks MODULE``,
   ``OTEL_BGTASKS_TASK_MODULES``, or `declare_task_modules`): `module.__dict__[name]` is a
   Python function (not a class, builtin or bound method) whose ``__module__`` is that module,
   so a name the module merely imported (``from os import system``) does not count.

Declared modules are imported on purpose, like Celery's ``-A``; a module an entry names is
never imported.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import FunctionType
from typing import Any

from otel_bgtasks.errors import ConfigurationError, UnregisteredTaskError

__all__ = [
    "TASK_MODULES_ENV",
    "declare_task_modules",
    "declared_task_modules",
    "isolated",
    "lookup_task",
    "note_scheduled",
    "register_task",
    "task_key",
]

TASK_MODULES_ENV = "OTEL_BGTASKS_TASK_MODULES"
"""Comma-separated modules holding the app's tasks (imported by the CLI and recovery)."""

_SHOWN = 200  # characters of an untrusted reference quoted in an error message
_SCHEDULED_MAX = 4096  # functions remembered as scheduled by this process

_lock = threading.Lock()
_registered: dict[str, Callable[..., Any]] = {}
_scheduled: dict[str, Callable[..., Any]] = {}
_declared: dict[str, Any] = {}  # module name -> module object
_env_loaded = False


def task_key(func: Callable[..., Any]) -> str | None:
    """``"module:qualname"`` of a plain function (what entries store as `func_ref`), or None
    for anything that cannot be named so (lambdas, local functions, partials, objects)."""
    if not isinstance(func, FunctionType):
        return None
    module, qualname = func.__module__, func.__qualname__
    if not isinstance(module, str) or module == "__main__" or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def register_task(func: Callable[..., Any]) -> None:
    """Make `func` replayable by its reference (`@background_task` calls this)."""
    key = task_key(func)
    if key is not None:
        with _lock:
            _registered[key] = func


def note_scheduled(func: Callable[..., Any]) -> None:
    """Remember a function this process scheduled: its own dead letters stay replayable."""
    key = task_key(func)
    if key is None or _scheduled.get(key) is func:
        return
    with _lock:
        if len(_scheduled) >= _SCHEDULED_MAX:
            _scheduled.clear()
        _scheduled[key] = func


def declare_task_modules(modules: str | Iterable[str]) -> list[str]:
    """Import the app's task modules (names, or one comma-separated string); returns them.

    Raises:
        ConfigurationError: a module cannot be imported (the message names it and the error).
    """
    names = _split(modules) if isinstance(modules, str) else [m.strip() for m in modules if m]
    for name in names:
        if name in _declared:
            continue
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # an operator's typo or a broken module: say which
            raise ConfigurationError(
                f"task module {name!r} cannot be imported: {type(exc).__name__}: {exc}"
            ) from exc
        with _lock:
            _declared[name] = module
    return names


def declared_task_modules() -> list[str]:
    """The task modules declared so far (including those of ``OTEL_BGTASKS_TASK_MODULES``)."""
    _load_env()
    return sorted(_declared)


def lookup_task(ref: str) -> Callable[..., Any]:
    """The app's task named by `ref` (a stored, untrusted `func_ref`); never imports it.

    Raises:
        UnregisteredTaskError: `ref` names no task of this app (the message says how to make
            it one); the entry is kept.
    """
    if not isinstance(ref, str) or not ref:
        raise UnregisteredTaskError("refused: the entry has no function reference")
    try:
        _load_env()
    except ConfigurationError as exc:
        raise UnregisteredTaskError(f"refused: {exc}; the entry is kept") from None
    found = _registered.get(ref) or _scheduled.get(ref) or _module_function(ref)
    if found is not None:
        return found
    shown = ref if len(ref) <= _SHOWN else ref[: _SHOWN - 1] + "…"
    declared = ", ".join(sorted(_declared)) or "none"
    raise UnregisteredTaskError(
        f"refused: task {shown!r} is not a registered task of this app (declared task modules:"
        f" {declared}); decorate it with @background_task in a module given by --tasks or"
        f" {TASK_MODULES_ENV}; the entry is kept"
    )


def _module_function(ref: str) -> Callable[..., Any] | None:
    module_name, sep, name = ref.partition(":")
    module = _declared.get(module_name) if sep else None
    if module is None or not name.isidentifier():
        return None
    namespace: Mapping[str, Any] = vars(module)
    func = namespace.get(name)
    if not isinstance(func, FunctionType) or inspect.isclass(func):
        return None
    if func.__module__ != module_name or func.__qualname__ != name:
        return None  # imported from elsewhere, or an alias: not this module's own task
    return func


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _load_env() -> None:
    global _env_loaded
    if _env_loaded:
        return
    _env_loaded = True
    value = os.environ.get(TASK_MODULES_ENV, "")
    if value.strip():
        declare_task_modules(value)


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Undo, at the end of the block, every registration and declaration made in it (tests)."""
    global _env_loaded
    with _lock:
        saved = (dict(_registered), dict(_scheduled), dict(_declared), _env_loaded)
    try:
        yield
    finally:
        with _lock:
            for live, kept in zip((_registered, _scheduled, _declared), saved[:3], strict=True):
                live.clear()
                live.update(kept)
            _env_loaded = saved[3]
