"""Deprecated home of the dead-letter names, kept so 0.1 imports keep working.

The names now live in one module per concept: `otel_bgtasks.records` (`DeadLetter`,
`JournalEntry`, reasons), `otel_bgtasks.calls` (serializers, function references),
`otel_bgtasks.identity` (process identity), `otel_bgtasks.stores` (the store interface and
`open_store`), `otel_bgtasks.replay` (`DeadLetters`, replay results), `otel_bgtasks.recovery`
and `otel_bgtasks.errors`. Import from there (or from `otel_bgtasks`).
"""

from __future__ import annotations

from otel_bgtasks.calls import (
    JSONSerializer,
    Serializer,
    func_ref,
    get_serializer,
    register_serializer,
    resolve,
)
from otel_bgtasks.errors import (
    CorruptEntryError,
    SerializationError,
    StoreUnavailableError,
    TaskImportError,
)
from otel_bgtasks.identity import owner_is_dead, process_identity
from otel_bgtasks.records import (
    DeadLetter,
    DeadLetterReason,
    JournalEntry,
    decode_entry,
    decode_journal,
)
from otel_bgtasks.recovery import recover_interrupted
from otel_bgtasks.replay import (
    DeadLetters,
    ReplayOutcome,
    ReplayReport,
    ReplayResult,
    ReplayRunner,
    ReplayStatus,
)
from otel_bgtasks.stores import DLQ_URL_ENV, open_store
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = [
    "DLQ_URL_ENV",
    "CorruptEntryError",
    "DeadLetter",
    "DeadLetterReason",
    "DeadLetterStore",
    "DeadLetters",
    "JSONSerializer",
    "JournalEntry",
    "ReplayOutcome",
    "ReplayReport",
    "ReplayResult",
    "ReplayRunner",
    "ReplayStatus",
    "SerializationError",
    "Serializer",
    "StoreUnavailableError",
    "TaskImportError",
    "decode_entry",
    "decode_journal",
    "func_ref",
    "get_serializer",
    "open_store",
    "owner_is_dead",
    "process_identity",
    "recover_interrupted",
    "register_serializer",
    "resolve",
]
