"""The circuit breakers one executor's tasks use, and their telemetry (state gauge,
transition counter, span event, log line)."""

from __future__ import annotations

import threading

from opentelemetry import trace

from otel_bgtasks import attributes as attr
from otel_bgtasks._logger import log
from otel_bgtasks.circuit import CircuitBreaker, CircuitState
from otel_bgtasks.metrics import Instruments

__all__ = ["BreakerRegistry"]


class BreakerRegistry:
    """Breakers by name: a named template is shared by every task using that name; an
    unnamed one is copied per task (named after it)."""

    def __init__(self, instruments: Instruments) -> None:
        self.instruments = instruments
        self.by_name: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def get(self, template: CircuitBreaker, task: str) -> CircuitBreaker:
        """The breaker a task uses (created and observed at first use)."""
        key = template.name or task
        breaker = self.by_name.get(key)
        if breaker is None:
            with self._lock:
                breaker = self.by_name.get(key)
                if breaker is None:
                    breaker = template if template.name else template.named(task)
                    if self.on_transition not in breaker.listeners:
                        breaker.listeners.append(self.on_transition)
                    self.by_name[key] = breaker
                    state = breaker.last_state if breaker.blocking else breaker.state
                    self.instruments.circuit_state.set(int(state), {attr.CIRCUIT_NAME: key})
        return breaker

    def observed(self, breaker: CircuitBreaker) -> None:
        """Report a shared breaker's state as last read (another replica may change it)."""
        self.instruments.circuit_state.set(
            int(breaker.last_state), {attr.CIRCUIT_NAME: breaker.key}
        )

    def on_transition(self, name: str, before: CircuitState, after: CircuitState) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(
                attr.EVENT_CIRCUIT_STATE_CHANGE,
                {
                    attr.CIRCUIT_NAME: name,
                    attr.CIRCUIT_FROM: before.label,
                    attr.CIRCUIT_TO: after.label,
                },
            )
        self.instruments.circuit_state.set(int(after), {attr.CIRCUIT_NAME: name})
        self.instruments.circuit_transitions.add(
            1,
            {
                attr.CIRCUIT_NAME: name,
                attr.CIRCUIT_FROM: before.label,
                attr.CIRCUIT_TO: after.label,
            },
        )
        log.warning(
            "circuit breaker state change",
            circuit=name,
            from_state=before.label,
            to_state=after.label,
        )

    def detach(self) -> None:
        """Stop listening to the breakers (they may outlive this executor)."""
        for breaker in self.by_name.values():
            if self.on_transition in breaker.listeners:
                breaker.listeners.remove(self.on_transition)
