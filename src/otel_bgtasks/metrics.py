"""The OTel instruments of the signal contract (DESIGN.md section 3)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from threading import Lock

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otel_bgtasks.attributes import TASK_NAME

__all__ = [
    "DURATION_BUCKETS",
    "PUBLISH_BUCKETS",
    "ActiveSource",
    "DepthSource",
    "Instruments",
]

# Background tasks run from milliseconds to minutes; the SDK default buckets assume ms.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

# A publish to a broker takes from well under a millisecond to the publish timeout.
PUBLISH_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

DepthSource = Callable[[], Iterable[Observation]]
"""Returns the current dead-letter depth observations (one per store)."""

ActiveSource = Callable[[], Mapping[str, int]]
"""Returns the tasks running now by task name (0 for a name that ran and runs no more)."""


class Instruments:
    """Creates every contract instrument once, from one meter."""

    def __init__(self, meter: Meter) -> None:
        self._lock = Lock()
        self.duration = meter.create_histogram(
            "bgtasks.task.duration",
            unit="s",
            description="Duration of a background task execution, all attempts included",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self.wait = meter.create_histogram(
            "bgtasks.task.wait",
            unit="s",
            description="Time from scheduling a background task to its first attempt",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        # Observed at collection from the executor's in-flight tasks (`set_active_source`):
        # nothing is counted per task on the hot path, same `bgtasks_task_active` series.
        self._active_source: ActiveSource | None = None
        meter.create_observable_up_down_counter(
            "bgtasks.task.active",
            callbacks=[self._observe_active],
            unit="{task}",
            description="Background tasks running now",
        )
        # Scheduled and not started yet, observed the same way (`set_pending_source`).
        self._pending_source: ActiveSource | None = None
        meter.create_observable_up_down_counter(
            "bgtasks.task.pending",
            callbacks=[self._observe_pending],
            unit="{task}",
            description="Background tasks scheduled and not started yet",
        )
        self.retries = meter.create_counter(
            "bgtasks.task.retries", unit="{retry}", description="Retries of background tasks"
        )
        self.circuit_state = meter.create_gauge(
            "bgtasks.circuit.state",
            unit="{state}",
            description="Circuit breaker state: 0 closed, 1 half-open, 2 open",
        )
        self.circuit_transitions = meter.create_counter(
            "bgtasks.circuit.transitions",
            unit="{transition}",
            description="Circuit breaker state transitions",
        )
        self.skipped = meter.create_counter(
            "bgtasks.task.skipped",
            unit="{task}",
            description="Scheduled background tasks that never ran, by reason",
        )
        self.inlined = meter.create_counter(
            "bgtasks.task.inlined",
            unit="{task}",
            description=(
                "Tasks for the local pool run inline by their response instead, the pool's"
                " queue being full (back-pressure)"
            ),
        )
        self.dlq_moves = meter.create_counter(
            "bgtasks.dlq.moves", unit="{entry}", description="Tasks moved to the dead-letter store"
        )
        self.dlq_replays = meter.create_counter(
            "bgtasks.dlq.replays", unit="{entry}", description="Dead letters replayed, by outcome"
        )
        self._depth_sources: list[DepthSource] = []
        self._write_error_sources: list[DepthSource] = []
        meter.create_observable_counter(
            "bgtasks.dlq.write_errors",
            callbacks=[self._observe_write_errors],
            unit="{write}",
            description="Dead-letter or journal writes that failed when submitted (kept in memory)",
        )
        self._dropped_sources: list[DepthSource] = []
        meter.create_observable_counter(
            "bgtasks.dlq.dropped",
            callbacks=[self._observe_dropped],
            unit="{entry}",
            description="Buffered dead-letter or journal writes never stored (logged whole)",
        )
        meter.create_observable_gauge(
            "bgtasks.dlq.depth",
            callbacks=[self._observe_depth],
            unit="{entry}",
            description="Entries in the dead-letter store",
        )
        # Remote dispatch (a broker): the messaging conventions' client metrics, per attempt.
        self.publish_duration = meter.create_histogram(
            "messaging.client.operation.duration",
            unit="s",
            description="Duration of one attempt to send a background task to its broker",
            explicit_bucket_boundaries_advisory=list(PUBLISH_BUCKETS),
        )
        self.sent_messages = meter.create_counter(
            "messaging.client.sent.messages",
            unit="{message}",
            description="Attempts to send a background task to its broker (error.type: failed)",
        )
        self._backlog_sources: list[DepthSource] = []
        meter.create_observable_gauge(
            "bgtasks.dispatch.backlog",
            callbacks=[self._observe_backlog],
            unit="{task}",
            description="Background tasks handed to a remote dispatcher and not yet published",
        )

    def set_active_source(self, source: ActiveSource) -> None:
        """Report `bgtasks.task.active` from `source` at each collection."""
        self._active_source = source

    def active_counts(self) -> Mapping[str, int]:
        """Tasks running now, by task name (every name that ran: 0 when none runs)."""
        source = self._active_source
        return source() if source is not None else {}

    def set_pending_source(self, source: ActiveSource) -> None:
        """Report `bgtasks.task.pending` from `source` at each collection."""
        self._pending_source = source

    def pending(self) -> dict[str, int]:
        """Tasks scheduled and not started, by task name (names seen so far, zeros included)."""
        source = self._pending_source
        return dict(source()) if source is not None else {}

    def _observe_pending(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, count in self.pending().items():
            yield Observation(count, {TASK_NAME: name})

    def active(self, name: str) -> int:
        """Tasks named `name` running now."""
        return self.active_counts().get(name, 0)

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, count in self.active_counts().items():
            yield Observation(count, {TASK_NAME: name})

    def add_depth_source(self, source: DepthSource) -> None:
        """Report a store's size through `bgtasks.dlq.depth` at each collection."""
        with self._lock:
            self._depth_sources.append(source)

    def add_write_error_source(self, source: DepthSource) -> None:
        """Report a store's failed writes through `bgtasks.dlq.write_errors`."""
        with self._lock:
            self._write_error_sources.append(source)

    def add_dropped_source(self, source: DepthSource) -> None:
        """Report a store's dropped buffered writes through `bgtasks.dlq.dropped`."""
        with self._lock:
            self._dropped_sources.append(source)

    def _observe_dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._dropped_sources)
        for source in sources:
            yield from source()

    def _observe_write_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._write_error_sources)
        for source in sources:
            yield from source()

    def add_backlog_source(self, source: DepthSource) -> None:
        """Report a remote dispatcher's unpublished tasks through `bgtasks.dispatch.backlog`."""
        with self._lock:
            if source not in self._backlog_sources:
                self._backlog_sources.append(source)

    def _observe_backlog(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._backlog_sources)
        for source in sources:
            yield from source()

    def _observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._depth_sources)
        for source in sources:
            yield from source()
