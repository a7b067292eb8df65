"""A sampler that keeps a task whenever the request that scheduled it was sampled.

In `link` trace mode a task span starts a new trace, so a parent-based sampler would decide it
afresh (with a ratio sampler, a sampled request could lose its task). `LinkAwareSampler` samples
a task span whose scheduling link is sampled and defers everything else to its delegate.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from otel_bgtasks.attributes import TASK_ID

__all__ = ["LinkAwareSampler"]


def _default_sampler() -> sampling.Sampler:
    try:
        # The SDK's own reading of OTEL_TRACES_SAMPLER / _ARG, so the standard variables apply.
        return sampling._get_from_env_or_default()
    except Exception:  # pragma: no cover - an SDK without the helper
        return sampling.ParentBased(sampling.ALWAYS_ON)


class LinkAwareSampler(sampling.Sampler):
    """Sample task spans linked to a sampled scheduling span; otherwise ask `delegate`."""

    def __init__(self, delegate: sampling.Sampler | None = None) -> None:
        self._delegate = delegate if delegate is not None else _default_sampler()

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> sampling.SamplingResult:
        if (
            links
            and attributes
            and TASK_ID in attributes
            and not get_current_span(parent_context).get_span_context().is_valid
            and any(link.context.trace_flags.sampled for link in links)
        ):
            return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE, attributes)
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"LinkAwareSampler{{{self._delegate.get_description()}}}"
