"""The package's own logger: a broken user log processor never breaks a task, and an
exception is never rendered with its frames' locals."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import structlog

from otel_bgtasks._tracebacks import exception_fields

__all__ = ["SafeLogger", "log"]

_structlog = structlog.get_logger("otel_bgtasks")


class SafeLogger:
    """Logging that never raises into the caller.

    An exception is logged as ``error_type``, ``error_message`` (bounded) and ``traceback``
    (a bounded string without locals), never as ``exc_info``: structlog's default console
    renderer and ``dict_tracebacks`` would render every frame's local variables (task
    arguments, secrets) at a cost without bound.
    """

    def _emit(self, method: str, event: str, **fields: Any) -> None:
        try:
            getattr(_structlog, method)(event, **fields)
        except Exception:  # the fallback must not raise either
            with contextlib.suppress(Exception):
                logging.getLogger("otel_bgtasks").log(
                    logging.ERROR if method in ("error", "exception") else logging.WARNING,
                    "%s %s",
                    event,
                    fields,
                )

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log at error level with the exception being handled, rendered bounded."""
        self._emit("error", event, **fields, **exception_fields())


log = SafeLogger()
