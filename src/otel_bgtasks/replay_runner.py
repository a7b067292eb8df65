"""Deprecated home of `run_dead_letter` and `standalone_executor`: see `otel_bgtasks.replay`."""

from __future__ import annotations

from otel_bgtasks.replay import run_dead_letter, standalone_executor

__all__ = ["run_dead_letter", "standalone_executor"]
