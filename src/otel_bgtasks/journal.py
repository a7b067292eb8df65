"""The durable-task journal: a row per durable task from scheduling to its end, and the
heartbeat that tells recovery elsewhere this process is alive."""

from __future__ import annotations

import threading

import structlog

from otel_bgtasks._ids import span_id_hex, trace_id_hex
from otel_bgtasks._tracebacks import exception_fields
from otel_bgtasks.calls import Serializer, encode_call
from otel_bgtasks.identity import process_identity
from otel_bgtasks.records import JournalEntry
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = ["HEARTBEAT_EVERY", "Journal"]

HEARTBEAT_EVERY = 10.0
"""Seconds between heartbeats while durable tasks are in flight."""

_log = structlog.get_logger("otel_bgtasks")


class Journal:
    """Journals durable tasks in `store` and heartbeats while any is in flight.

    One daemon heartbeat thread per journal, from its first durable task until `close()`.
    """

    def __init__(self, store: DeadLetterStore, serializer: Serializer) -> None:
        self.store = store
        self.serializer = serializer
        self.in_flight = 0  # journaled tasks not finished
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def add(self, state: TaskCallState) -> None:
        """Journal a task at scheduling.

        Raises:
            TypeError: the function is not importable or an argument cannot be serialized
                (`SerializationError`, naming it).
        """
        call = encode_call(
            self.serializer, state.func, state.args, state.kwargs, task_name=state.name
        )
        self.store.journal_add(
            JournalEntry(
                task_id=state.task_id,
                task_name=state.name,
                func_ref=call.func_ref,
                payload=call.payload,
                serializer=call.serializer,
                owner=process_identity(),
                enqueued_at=state.enqueued_wall,
                trace_id=trace_id_hex(state.link),
                span_id=span_id_hex(state.link),
            ).signed()  # with a signing key set; recovery verifies it before decoding
        )
        state.journaled = True
        self.in_flight += 1
        if self._thread is None or not self._thread.is_alive():
            self.store.heartbeat(process_identity())
            self._thread = threading.Thread(
                target=self._beat, name="otel-bgtasks-heartbeat", daemon=True
            )
            self._thread.start()

    def finished(self, state: TaskCallState, *, keep: bool = False) -> None:
        """A journaled task ended; `keep` leaves its row for recovery (it was cancelled)."""
        self.in_flight -= 1
        if keep:
            return
        try:
            self.store.journal_remove(state.task_id)
        except Exception:  # recovery will find it again; a duplicate beats a lost task
            _log.error(
                "durable task could not be removed from the journal",
                task_id=state.task_id,
                task_name=state.name,
                **exception_fields(),
            )

    def close(self) -> None:
        """Stop heartbeating."""
        self._closed.set()

    def _beat(self) -> None:
        while not self._closed.wait(HEARTBEAT_EVERY):
            if self.in_flight <= 0:
                continue
            try:
                self.store.heartbeat(process_identity())
            except Exception:  # a store outage: recovery elsewhere may see us as stale
                _log.error("journal heartbeat failed", **exception_fields())
