"""The libraries this instrumentation patches, as `opentelemetry-instrument` expects them."""

from __future__ import annotations

__all__ = ["_instruments"]

_instruments = ("starlette >= 0.27",)
