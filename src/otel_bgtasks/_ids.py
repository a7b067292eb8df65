"""Trace and span ids as the stores keep them: lowercase hex, "" for none."""

from __future__ import annotations

import random

from opentelemetry.trace import SpanContext, TraceFlags

__all__ = [
    "check_hex",
    "from_hex",
    "from_traceparent",
    "new_task_id",
    "span_id_hex",
    "to_traceparent",
    "trace_id_hex",
]

_HEX = frozenset("0123456789abcdef")


def new_task_id() -> str:
    """A fresh `bgtasks.task.id` (32 hex digits)."""
    return f"{random.getrandbits(128):032x}"


def trace_id_hex(context: SpanContext | None) -> str:
    """The 32-digit hex trace id, or "" without a valid context."""
    return format(context.trace_id, "032x") if context is not None and context.is_valid else ""


def span_id_hex(context: SpanContext | None) -> str:
    """The 16-digit hex span id, or "" without a valid context."""
    return format(context.span_id, "016x") if context is not None and context.is_valid else ""


def from_hex(trace_id: str, span_id: str) -> SpanContext | None:
    """The (remote, sampled) span context stored as hex ids, to link to; None for ""."""
    if not trace_id or not span_id:
        return None
    return SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )


def check_hex(name: str, value: str, length: int) -> None:
    """Raises `ValueError` unless `value` is "" or `length` lowercase hex digits."""
    if value and (len(value) != length or not set(value) <= _HEX):
        raise ValueError(f"{name} must be {length} lowercase hex digits or '', got {value!r}")


def to_traceparent(context: SpanContext | None) -> str:
    """The W3C ``traceparent`` of `context` ("" without a valid context)."""
    if context is None or not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def from_traceparent(value: str) -> SpanContext | None:
    """The remote span context a W3C ``traceparent`` (version 00) names, or None when
    `value` is not one (untrusted input: checked, never partially parsed)."""
    if not isinstance(value, str) or len(value) != 55:
        return None
    version, trace_id, span_id, flags = (value[0:2], value[3:35], value[36:52], value[53:55])
    if value[2] != "-" or value[35] != "-" or value[52] != "-" or version != "00":
        return None
    if not set(value[3:35] + value[36:52] + flags) <= _HEX:
        return None
    context = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16) & 0x01),
    )
    return context if context.is_valid else None
