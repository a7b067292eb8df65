"""The durable-task journal: a row per durable task from scheduling to its end, and the
heartbeat that tells recovery elsewhere this process is alive.

Store calls never run on the event loop: inside a gated request (every Starlette request, by
the dispatch seam; `JournalGate` for other ASGI apps) the row is written by the journal's
writer thread and the gate sends the response only once it is committed (`response_gate`);
removals from the event loop go to the same writer, after the add (one thread, in order).
Elsewhere (sync endpoints in the thread pool, plain threads) the journal writes synchronously,
as it is off the loop already; from the event loop without a gate (`schedule()` outside a
request) the add stays synchronous too, so the row is committed before it returns.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections.abc import Callable

import structlog

from otel_bgtasks._ids import span_id_hex, trace_id_hex
from otel_bgtasks._loops import running_loop
from otel_bgtasks._tracebacks import exception_fields
from otel_bgtasks.calls import Serializer, encode_call
from otel_bgtasks.identity import process_identity
from otel_bgtasks.records import JournalEntry, route_owner
from otel_bgtasks.response_gate import gate_active, track_write
from otel_bgtasks.state import TaskCallState
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = ["HEARTBEAT_EVERY", "Journal"]

HEARTBEAT_EVERY = 10.0
"""Seconds between heartbeats, from the first durable task for the life of the process."""

_log = structlog.get_logger("otel_bgtasks")


def _on_event_loop() -> bool:
    return running_loop() is not None  # asyncio or trio


class Journal:
    """Journals durable tasks in `store` and heartbeats from the first one until `close()`.

    One daemon heartbeat thread per journal; one writer thread for writes from the loop.
    """

    def __init__(self, store: DeadLetterStore, serializer: Serializer) -> None:
        self.store = store
        self.serializer = serializer
        self.in_flight = 0  # journaled tasks not finished
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer_lock = threading.Lock()
        self._adds: dict[str, concurrent.futures.Future[None]] = {}  # deferred, not yet done

    def add(self, state: TaskCallState) -> None:
        """Journal a task at scheduling.

        Raises:
            TypeError: the function is not importable or an argument cannot be serialized
                (`SerializationError`, naming it).
        """
        if state.call is None:
            state.call = encode_call(
                self.serializer, state.func, state.args, state.kwargs, task_name=state.name
            )
        entry = self._entry(state, process_identity())
        if gate_active() and _on_event_loop():
            future = self._writer_pool().submit(self._write_add, entry)
            self._adds[state.task_id] = future
            future.add_done_callback(lambda _f: self._adds.pop(state.task_id, None))
            track_write(future)
        else:
            self.store.journal_add(entry)
        state.journaled = True
        self.in_flight += 1
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._beat, name="otel-bgtasks-heartbeat", daemon=True
            )
            self._thread.start()

    def _entry(
        self, state: TaskCallState, owner: str, deadline: float | None = None
    ) -> JournalEntry:
        """The row of `state` (encoded: `state.call`), signed with a signing key set
        (recovery verifies it before decoding)."""
        call = state.call
        assert call is not None
        return JournalEntry(
            task_id=state.task_id,
            task_name=state.name,
            func_ref=call.func_ref,
            payload=call.payload,
            serializer=call.serializer,
            owner=owner,
            enqueued_at=state.enqueued_wall,
            trace_id=trace_id_hex(state.link),
            span_id=span_id_hex(state.link),
            deadline=deadline,
        ).signed()

    def hand_off(self, state: TaskCallState, route: str, deadline: float) -> None:
        """A journaled task was published to `route`: its row moves to ``route:<route>``
        until `deadline` (`DeadLetterStore.journal_hand_off`), after its add, off the loop."""
        self.in_flight -= 1
        owner = route_owner(route)
        signature = self._entry(state, owner, deadline).signature if state.call else None
        write = functools.partial(
            self._hand_off, state.task_id, state.name, owner, deadline, signature or None
        )
        self._after_add(state.task_id, write)

    def _hand_off(
        self, task_id: str, task_name: str, owner: str, deadline: float, signature: str | None
    ) -> None:
        try:
            self.store.journal_hand_off(
                task_id, owner=owner, deadline=deadline, signature=signature
            )
        except Exception:  # the row stays ours: recovery of this process would re-run it
            _log.error(
                "durable task could not be handed off in the journal",
                task_id=task_id,
                task_name=task_name,
                owner=owner,
                **exception_fields(),
            )

    def _after_add(self, task_id: str, write: Callable[[], None]) -> None:
        """Run `write` after the row's add: on the writer thread from the loop (in order, off
        the loop), else here once the deferred add is done."""
        pending = self._adds.get(task_id)
        if _on_event_loop() and (pending is not None or self._writer is not None):
            self._writer_pool().submit(write)
            return
        if pending is not None:
            try:
                pending.result()
            except Exception:  # logged by the writer
                return
        write()

    def _writer_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._writer_lock:
            if self._writer is None:
                self._writer = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="otel-bgtasks-journal"
                )
            return self._writer

    def _write_add(self, entry: JournalEntry) -> None:
        try:
            self.store.journal_add(entry)
        except Exception:
            _log.error(
                "durable task could not be journaled",
                task_id=entry.task_id,
                task_name=entry.task_name,
                entry=entry.to_json(),
                **exception_fields(),
            )
            raise

    def finished(self, state: TaskCallState, *, keep: bool = False) -> None:
        """A journaled task ended; `keep` leaves its row for recovery (it was cancelled)."""
        self.in_flight -= 1
        if keep:
            return
        self._after_add(state.task_id, functools.partial(self._remove, state.task_id, state.name))

    def _remove(self, task_id: str, task_name: str) -> None:
        try:
            self.store.journal_remove(task_id)
        except Exception:  # recovery will find it again; a duplicate beats a lost task
            _log.error(
                "durable task could not be removed from the journal",
                task_id=task_id,
                task_name=task_name,
                **exception_fields(),
            )

    def close(self) -> None:
        """Stop heartbeating; wait for the writer's queued writes."""
        self._closed.set()
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def _beat(self) -> None:
        while True:
            try:
                self.store.heartbeat(process_identity())
            except Exception:  # a store outage: recovery elsewhere may see us as stale
                _log.error("journal heartbeat failed", **exception_fields())
            if self._closed.wait(HEARTBEAT_EVERY):
                return
