"""Log correlation: trace and task ids on every log line written in a task or a request.

structlog::

    import structlog
    from otel_bgtasks import configure_structlog_json

    configure_structlog_json()          # JSON lines with trace_id, span_id, task_name, task_id

or add `TraceContextProcessor()` to your own processor chain (before the renderer).

Standard-library logging: `logging.getLogger().addFilter(TraceContextFilter())` (or on a
handler) puts the same fields on each `LogRecord`, ready for a formatter such as
``%(asctime)s %(levelname)s [trace_id=%(trace_id)s task=%(task_name)s] %(message)s``.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

from otel_bgtasks.state import current_task

__all__ = ["TraceContextFilter", "TraceContextProcessor", "configure_structlog_json"]


def _correlation() -> dict[str, str]:
    fields: dict[str, str] = {}
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        # Hex, as Jaeger shows them, so a log line can be pasted into Jaeger's search.
        fields["trace_id"] = format(ctx.trace_id, "032x")
        fields["span_id"] = format(ctx.span_id, "016x")
    task = current_task()
    if task is not None:
        fields["task_name"] = task.name
        fields["task_id"] = task.task_id
    return fields


class TraceContextProcessor:
    """structlog processor adding `trace_id`, `span_id`, `task_name` and `task_id`.

    Keys the event already has are left alone. A failure to read the context never drops the
    log event.
    """

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        try:
            fields = _correlation()
        except Exception:  # correlation is best effort; the log line itself must survive
            return event_dict
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict


class TraceContextFilter(logging.Filter):
    """stdlib logging filter setting `trace_id`, `span_id`, `task_name`, `task_id` on records.

    Fields are empty strings outside a span or task, so format strings never fail.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            fields = _correlation()
        except Exception:  # never lose a record over correlation
            fields = {}
        for key in ("trace_id", "span_id", "task_name", "task_id"):
            if not hasattr(record, key):
                setattr(record, key, fields.get(key, ""))
        return True


def configure_structlog_json(level: int = logging.INFO) -> None:
    """Configure structlog to render JSON lines carrying the trace and task correlation.

    Exceptions logged with ``exc_info`` (by your code) render as a structured traceback of at
    most 20 frames and without local variables: locals hold arguments and secrets, and a deep
    structure in one would make the line megabytes long.
    """
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            TraceContextProcessor(),
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False, max_frames=20)
            ),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
