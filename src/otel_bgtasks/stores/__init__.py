"""Dead-letter store implementations; open one by URL with `otel_bgtasks.deadletter.open_store`.

- `SQLiteDeadLetterStore`: one file, several worker processes on one host.
- `RedisDeadLetterStore`: shared by every host.
- `BufferedStore`: wraps either so a store outage never raises into a task (the default of
  `open_store`).

Another backend subclasses `otel_bgtasks.deadletter.DeadLetterStore` and decodes rows with
`decode_entry` / `decode_journal` (which raise `CorruptEntryError` naming the row).
"""

from __future__ import annotations

from otel_bgtasks.stores._buffer import BufferedStore
from otel_bgtasks.stores.redis import RedisDeadLetterStore
from otel_bgtasks.stores.sqlite import SQLiteDeadLetterStore

__all__ = ["BufferedStore", "RedisDeadLetterStore", "SQLiteDeadLetterStore"]
