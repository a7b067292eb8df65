"""`RedisDeadLetterStore`: dead letters shared by every host, in Redis.

Keys (``{prefix}`` defaults to ``bgtasks``):

- ``{prefix}:dlq:entries``: hash, entry id -> entry JSON without its payload;
- ``{prefix}:dlq:payload:{id}``: string, the entry's payload (read by ranges: a preview reads
  its first bytes only, ``--full`` streams it);
- ``{prefix}:dlq:by_time``: sorted set, entry id scored by ``last_failure`` (order, ``since``);
- ``{prefix}:journal:entries`` / ``{prefix}:journal:by_time``: the same for journaled tasks,
  scored by ``enqueued_at``;
- ``{prefix}:dlq:claims`` / ``{prefix}:journal:claims``: hash, id -> ``"{until}|{owner}"``,
  the lease of the replayer/recoverer working on the row;
- ``{prefix}:heartbeats``: hash, owner -> last heartbeat (epoch seconds);
- ``{prefix}:consumed``: sorted set, nonce scored by when it was consumed (a replay or
  recovery that ran it), trimmed after `CONSUMED_RETENTION`.

An entry whose payload is inside its JSON (written by hand, or planted) is read as it is.

Each write is one MULTI/EXEC transaction; claims are Lua scripts (atomic on the server) that
judge leases on the server's clock (``TIME``), as heartbeats and the dead-owner judgement do:
a host whose clock runs ahead takes no live lease and judges no live owner dead.
Connect and command timeouts are short (1 s by default) with a single immediate reconnect
attempt, so an outage costs a task about a second at most; `open_store` adds the
`BufferedStore` that keeps those writes until Redis is back.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - installed with the dev extra
    raise ImportError(
        "RedisDeadLetterStore needs the redis package: pip install 'otel-bgtasks[redis]'"
    ) from exc

from otel_bgtasks.errors import (
    ConfigurationError,
    ConsumedEntryError,
    CorruptEntryError,
    StoreUnavailableError,
)
from otel_bgtasks.records import (
    MAX_ROW_BYTES,
    PREVIEW_CHARS,
    DeadLetter,
    DeadLetterPreview,
    DeadLetterReason,
    JournalEntry,
    decode_entry,
    decode_journal,
    preview_text,
)
from otel_bgtasks.stores.base import CONSUMED_RETENTION, DeadLetterStore

__all__ = ["RedisDeadLetterStore"]

_log = structlog.get_logger("otel_bgtasks")

_BATCH = 500
_SKEW_WARNING = 1.0  # seconds between this host's clock and Redis's worth a warning

# KEYS: a hash. ARGV: max bytes, then ids. For each id: its value, false when missing, or its
# length (an integer) when longer than max bytes: an oversized row is never sent.
_FETCH = """
local out = {}
local limit = tonumber(ARGV[1])
for i = 2, #ARGV do
  local size = redis.call('HSTRLEN', KEYS[1], ARGV[i])
  if size > limit then
    out[i - 1] = size
  else
    out[i - 1] = redis.call('HGET', KEYS[1], ARGV[i])
  end
end
return out
"""

# The server's clock in epoch seconds: leases and liveness are judged on it, whatever the
# clocks of the hosts calling (Redis replicates a script's effects, so TIME is allowed).
_NOW = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: string keys. ARGV: max bytes. For each key: its value, false when missing, its length
# (an integer) when longer than max bytes, or -1 when it is not a string.
_FETCH_KEYS = """
local out = {}
local limit = tonumber(ARGV[1])
for i = 1, #KEYS do
  local size = redis.pcall('STRLEN', KEYS[i])
  if type(size) ~= 'number' then
    out[i] = -1
  elseif size > limit then
    out[i] = size
  else
    out[i] = redis.call('GET', KEYS[i])
  end
end
return out
"""

# KEYS: payload keys. ARGV: bytes of head. For each key: {length, first bytes}; length -1 when
# missing (an entry written with the payload inside it), -2 when not a string.
_PREVIEW = """
local out = {}
local head = tonumber(ARGV[1])
for i = 1, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind == 'none' then
    out[i] = {-1, ''}
  elseif kind ~= 'string' then
    out[i] = {-2, ''}
  else
    local size = redis.call('STRLEN', KEYS[i])
    out[i] = {size, head > 0 and redis.call('GETRANGE', KEYS[i], 0, head - 1) or ''}
  end
end
return out
"""

# KEYS: entries, claims[, payload]. ARGV: id, owner, now ('' for the server's TIME), lease
# seconds, max bytes. {entry, payload or false}; false when missing or held by another owner;
# an integer (nothing claimed) when the entry or its payload is longer than max bytes (its
# length), or -1 when the payload is not a string.
_CLAIM = (
    _NOW
    + """
local size = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if size > tonumber(ARGV[5]) then return size end
local data = redis.call('HGET', KEYS[1], ARGV[1])
if not data then return false end
local payload = false
if KEYS[3] then
  local psize = redis.pcall('STRLEN', KEYS[3])
  if type(psize) ~= 'number' then return -1 end
  if psize > tonumber(ARGV[5]) then return psize end
  payload = redis.call('GET', KEYS[3])
end
local moment = ARGV[3] == '' and now() or tonumber(ARGV[3])
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  local sep = string.find(held, '|', 1, true)
  local untl = tonumber(string.sub(held, 1, sep - 1))
  local holder = string.sub(held, sep + 1)
  if holder ~= ARGV[2] and untl > moment then return false end
end
local untl = string.format('%.6f', moment + tonumber(ARGV[4]))
redis.call('HSET', KEYS[2], ARGV[1], untl .. '|' .. ARGV[2])
return {data, payload}
"""
)

# KEYS: heartbeats. ARGV: owner. Records the server's TIME as the owner's last heartbeat.
_HEARTBEAT = (
    _NOW
    + """
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.6f', now()))
"""
)

# KEYS: entries, by_time, claims[, payload]. ARGV: id, owner, data ('' keeps the row), score,
# payload.
_RELEASE = """
local held = redis.call('HGET', KEYS[3], ARGV[1])
if not held then return 0 end
if string.sub(held, string.find(held, '|', 1, true) + 1) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  if KEYS[4] then redis.call('SET', KEYS[4], ARGV[5]) end
end
return 1
"""

# KEYS: heartbeats. ARGV: owner, seen_before.
_FORGET = """
local at = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if at and at < tonumber(ARGV[2]) then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

# KEYS: entries, by_time, claims, consumed[, payload]. ARGV: id, owner, nonce ('' consumes
# nothing), retention seconds. The nonce is recorded in the same script as the delete.
_DELETE_CLAIMED = (
    _NOW
    + """
local held = redis.call('HGET', KEYS[3], ARGV[1])
if not held then return 0 end
if string.sub(held, string.find(held, '|', 1, true) + 1) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if KEYS[5] then redis.call('DEL', KEYS[5]) end
if removed == 1 and ARGV[3] ~= '' then
  local moment = now()
  redis.call('ZADD', KEYS[4], moment, ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (moment - tonumber(ARGV[4])))
end
return removed
"""
)


# KEYS: entries, claims. ARGV: id, expected data, new data. Compare-and-set of one row's data
# (computed by the client, which keeps every number exact), releasing its claim: 1 if set,
# 0 if the row changed meanwhile, -1 if it is gone.
_REPLACE = """
local data = redis.call('HGET', KEYS[1], ARGV[1])
if not data then return -1 end
if data ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

_REPLACE_TRIES = 16  # concurrent rewrites of one row are rare (a renewal, a removal)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _split_prefix(url: str, default: str) -> tuple[str, str]:
    """Remove our ``prefix`` query parameter (redis-py would reject it)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = default
    kept = []
    for key, value in query:
        if key == "prefix":
            prefix = value
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


class RedisDeadLetterStore(DeadLetterStore):
    """Dead letters in Redis.

    Args:
        url_or_client: ``redis://host:port/db`` / ``rediss://...`` (``?prefix=`` accepted), or
            a ready `redis.Redis` client (used as is: its own timeouts apply).
        prefix: key prefix, so several applications can share one Redis.
        timeout: connect and command timeout in seconds when built from a URL.
        max_row_bytes: a row longer than this is corrupt; Redis never sends it (its length
            is checked on the server first; default 256 MiB).
        clock: this host's wall clock, compared with Redis's (a skew over a second is logged
            once); never used to judge a lease or an owner's liveness: those use Redis's
            ``TIME`` (inside the claim script), so hosts whose clocks disagree still agree.

    Raises:
        ConfigurationError: an empty prefix (a `ValueError`); ValueError: a malformed URL.
        StoreUnavailableError: from every method when Redis cannot be reached.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        *,
        prefix: str = "bgtasks",
        timeout: float = 1.0,
        max_row_bytes: int = MAX_ROW_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_row_bytes = max_row_bytes
        self.clock = clock
        if isinstance(url_or_client, str):
            url, prefix = _split_prefix(url_or_client, prefix)
            self.client: redis.Redis = redis.Redis.from_url(
                url,
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                # one immediate reconnect (a restarted server leaves stale pooled sockets),
                # not redis-py's default of 10 retries with backoff
                retry=Retry(NoBackoff(), 1),
            )
            self._owns_client = True
        else:
            self.client = url_or_client
            self._owns_client = False
        if not prefix:
            raise ConfigurationError("RedisDeadLetterStore prefix must not be empty")
        self.prefix = prefix
        self._entries = f"{prefix}:dlq:entries"
        self._by_time = f"{prefix}:dlq:by_time"
        self._journal = f"{prefix}:journal:entries"
        self._journal_by_time = f"{prefix}:journal:by_time"
        self._heartbeats = f"{prefix}:heartbeats"
        self._consumed = f"{prefix}:consumed"
        self._payloads = f"{prefix}:dlq:payload:"
        self._claims = f"{prefix}:dlq:claims"
        self._journal_claims = f"{prefix}:journal:claims"
        self._claim_script = self.client.register_script(_CLAIM)
        self._fetch_script = self.client.register_script(_FETCH)
        self._fetch_keys_script = self.client.register_script(_FETCH_KEYS)
        self._preview_script = self.client.register_script(_PREVIEW)
        self._heartbeat_script = self.client.register_script(_HEARTBEAT)
        self._skew_logged = False
        self._release_script = self.client.register_script(_RELEASE)
        self._delete_claimed_script = self.client.register_script(_DELETE_CLAIMED)
        self._forget_script = self.client.register_script(_FORGET)
        self._replace_script = self.client.register_script(_REPLACE)

    @property
    def identity(self) -> str:
        """``redis://host:port/db/prefix`` (never the password)."""
        kwargs = self.client.connection_pool.connection_kwargs
        where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
        return f"redis://{where}/{self.prefix}"

    def __repr__(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
        return f"RedisDeadLetterStore({where!r}, prefix={self.prefix!r})"

    @contextmanager
    def _redis(self) -> Iterator[redis.Redis]:
        try:
            yield self.client
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"Redis dead-letter store {self!r}: {exc}") from exc

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    # -- helpers ------------------------------------------------------------------------------

    def _fetch(self, r: redis.Redis, key: str, ids: builtins.list[str]) -> Iterable[Any]:
        """Each id's raw value: bytes, None when missing, or its length (int) when oversized."""
        for start in range(0, len(ids), _BATCH):
            batch = ids[start : start + _BATCH]
            yield from cast(
                builtins.list[Any],
                self._fetch_script(keys=[key], args=[self.max_row_bytes, *batch], client=r),
            )

    def _oversized(self, row_id: str, size: int, what: str) -> CorruptEntryError:
        if size < 0:
            return CorruptEntryError(row_id, "its payload key is not a string", what=what)
        return CorruptEntryError(
            row_id, f"{size} bytes, over the limit of {self.max_row_bytes}", what=what
        )

    def _payload_key(self, entry_id: str) -> str:
        return self._payloads + entry_id

    def _decode_entry(self, entry_id: str, raw: Any, payload: Any = None) -> DeadLetter:
        """`raw` and `payload` as `_fetch`/`_FETCH_KEYS` give them (an int: oversized)."""
        for value in (raw, payload):
            if isinstance(value, int):
                raise self._oversized(entry_id, value, "dead-letter entry")
        return decode_entry(entry_id, raw, max_bytes=self.max_row_bytes, payload=payload)

    def _decode_journal(self, task_id: str, raw: Any) -> JournalEntry:
        if isinstance(raw, int):
            raise self._oversized(task_id, raw, "journal entry")
        return decode_journal(task_id, raw, max_bytes=self.max_row_bytes)

    def _payloads_of(self, r: redis.Redis, ids: builtins.list[str]) -> builtins.list[Any]:
        keys = [self._payload_key(i) for i in ids]
        out: builtins.list[Any] = []
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            out.extend(
                cast(
                    builtins.list[Any],
                    self._fetch_keys_script(keys=batch, args=[self.max_row_bytes], client=r),
                )
            )
        return out

    def _previews_of(
        self, r: redis.Redis, ids: builtins.list[str], chars: int
    ) -> builtins.list[tuple[int, bytes]]:
        keys = [self._payload_key(i) for i in ids]
        out: builtins.list[tuple[int, bytes]] = []
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            found = self._preview_script(keys=batch, args=[max(chars, 0) * 4], client=r)
            out.extend((int(size), bytes(head)) for size, head in cast(builtins.list[Any], found))
        return out

    def _read(
        self, r: redis.Redis, ids: builtins.list[str], mode: str, chars: int
    ) -> Iterator[tuple[str, Any]]:
        """(id, decoded or `CorruptEntryError`, or None when gone) for each id, with the
        whole payload (`mode` "full") or its first `chars` characters ("preview")."""
        metas = builtins.list(self._fetch(r, self._entries, ids))
        if mode == "full":
            for entry_id, raw, payload in zip(ids, metas, self._payloads_of(r, ids), strict=True):
                if raw is None:
                    yield entry_id, None
                    continue
                try:
                    yield entry_id, self._decode_entry(entry_id, raw, payload)
                except CorruptEntryError as exc:
                    yield entry_id, exc
            return
        for entry_id, raw, (size, head) in zip(
            ids, metas, self._previews_of(r, ids, chars), strict=True
        ):
            if raw is None:
                yield entry_id, None
                continue
            try:
                if size == -2:
                    raise self._oversized(entry_id, -1, "dead-letter entry")
                if size == -1:  # the payload inside the entry: whole, within max_row_bytes
                    yield entry_id, DeadLetterPreview.of(self._decode_entry(entry_id, raw), chars)
                    continue
                entry = self._decode_entry(entry_id, raw, preview_text(head, chars))
                yield entry_id, DeadLetterPreview(entry, size)
            except CorruptEntryError as exc:
                yield entry_id, exc

    def _ids_since(self, r: redis.Redis, key: str, since: float | None) -> builtins.list[str]:
        low: float | str = "-inf" if since is None else since
        return [_text(i) for i in cast(builtins.list[Any], r.zrangebyscore(key, low, "+inf"))]

    def _scan(
        self, r: redis.Redis, since: float | None, mode: str = "preview", chars: int = 0
    ) -> Iterator[tuple[str, Any]]:
        """(id, entry or preview or decoding error) in `last_failure` order; drops stale
        index ids."""
        ids = self._ids_since(r, self._by_time, since)
        stale: builtins.list[str] = []
        for start in range(0, len(ids), _BATCH):
            for entry_id, found in self._read(r, ids[start : start + _BATCH], mode, chars):
                if found is None:  # deleted between ZRANGE and HMGET, or index out of sync
                    stale.append(entry_id)
                    continue
                yield entry_id, found
        if stale:
            # only ids still without data: an entry put meanwhile keeps its index
            for entry_id in stale:
                if not r.hexists(self._entries, entry_id):
                    r.zrem(self._by_time, entry_id)

    # -- dead letters ---------------------------------------------------------------------------

    def put(self, entry: DeadLetter) -> None:
        with self._redis() as r:
            pipe = r.pipeline(transaction=True)
            pipe.hset(self._entries, entry.id, entry.meta_json())
            pipe.set(self._payload_key(entry.id), entry.payload)
            pipe.zadd(self._by_time, {entry.id: entry.last_failure})
            pipe.hdel(self._claims, entry.id)
            pipe.execute()

    update = put

    def get(self, entry_id: str) -> DeadLetter | None:
        with self._redis() as r:
            ((_, found),) = self._read(r, [entry_id], "full", 0)
        if isinstance(found, CorruptEntryError):
            raise found
        return cast(DeadLetter | None, found)

    def preview(self, entry_id: str, *, chars: int = PREVIEW_CHARS) -> DeadLetterPreview | None:
        with self._redis() as r:
            ((_, found),) = self._read(r, [entry_id], "preview", chars)
        if isinstance(found, CorruptEntryError):
            raise found
        return cast(DeadLetterPreview | None, found)

    def payload_chunks(self, entry_id: str, *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        key = self._payload_key(entry_id)
        with self._redis() as r:
            ((size, _),) = self._previews_of(r, [entry_id], 0)
        if size == -1:  # the payload inside the entry (or gone)
            yield from super().payload_chunks(entry_id, chunk_size=chunk_size)
            return
        if size == -2:
            raise self._oversized(entry_id, -1, "dead-letter entry")
        for start in range(0, size, chunk_size):
            with self._redis() as r:
                yield cast(bytes, r.getrange(key, start, min(start + chunk_size, size) - 1))

    def _matching(
        self,
        mode: str,
        task: str | None,
        reason: DeadLetterReason | str | None,
        since: float | None,
        limit: int | None,
        chars: int,
    ) -> builtins.list[Any]:
        wanted = None if reason is None else DeadLetterReason(reason)
        out: builtins.list[Any] = []
        if limit is not None and limit <= 0:
            return out
        with self._redis() as r:
            for entry_id, found in self._scan(r, since, mode, chars):
                if isinstance(found, CorruptEntryError):
                    _log.error(
                        "corrupt dead-letter entry skipped", entry_id=entry_id, error=str(found)
                    )
                    continue
                entry = found.entry if isinstance(found, DeadLetterPreview) else found
                if (task is None or entry.task_name == task) and (
                    wanted is None or entry.reason is wanted
                ):
                    out.append(found)
                    if limit is not None and len(out) >= limit:
                        break
        return out

    def list(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> builtins.list[DeadLetter]:
        return self._matching("full", task, reason, since, limit, 0)

    def previews(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
        chars: int = PREVIEW_CHARS,
    ) -> builtins.list[DeadLetterPreview]:
        return self._matching("preview", task, reason, since, limit, chars)

    def delete(self, entry_id: str) -> bool:
        with self._redis() as r:
            pipe = r.pipeline(transaction=True)
            pipe.hdel(self._entries, entry_id)
            pipe.zrem(self._by_time, entry_id)
            pipe.hdel(self._claims, entry_id)
            pipe.delete(self._payload_key(entry_id))
            removed, _, _, _ = pipe.execute()
        return bool(removed)

    def purge(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
    ) -> int:
        wanted = None if reason is None else DeadLetterReason(reason)
        with self._redis() as r:
            if task is None and wanted is None and since is None:
                ids = [_text(key) for key in cast(builtins.list[Any], r.hkeys(self._entries))]
                for start in range(0, len(ids), _BATCH):
                    r.delete(*(self._payload_key(i) for i in ids[start : start + _BATCH]))
                pipe = r.pipeline(transaction=True)
                pipe.hlen(self._entries)
                pipe.delete(self._entries, self._by_time, self._claims)
                total, _ = pipe.execute()
                return int(total)
            doomed = [
                entry_id
                for entry_id, found in self._scan(r, since, "preview", 0)
                # a corrupt row matches only filters we can check without decoding it
                if (
                    task is None and wanted is None
                    if isinstance(found, CorruptEntryError)
                    else (task is None or found.entry.task_name == task)
                    and (wanted is None or found.entry.reason is wanted)
                )
            ]
            removed = 0
            for start in range(0, len(doomed), _BATCH):
                batch = doomed[start : start + _BATCH]
                pipe = r.pipeline(transaction=True)
                pipe.hdel(self._entries, *batch)
                pipe.zrem(self._by_time, *batch)
                pipe.hdel(self._claims, *batch)
                pipe.delete(*(self._payload_key(i) for i in batch))
                count, _, _, _ = pipe.execute()
                removed += int(count)
        return removed

    def count(self) -> int:
        with self._redis() as r:
            return int(r.hlen(self._entries))

    def corrupt_ids(self) -> builtins.list[str]:
        bad: builtins.list[str] = []
        with self._redis() as r:
            ids = [_text(key) for key in cast(builtins.list[Any], r.hkeys(self._entries))]
            for start in range(0, len(ids), _BATCH):
                for entry_id, found in self._read(r, ids[start : start + _BATCH], "preview", 0):
                    if isinstance(found, CorruptEntryError):
                        bad.append(entry_id)
        return sorted(bad)

    def consumed(self, nonces: Iterable[str]) -> dict[str, float]:
        wanted = [n for n in dict.fromkeys(nonces) if n]
        found: dict[str, float] = {}
        with self._redis() as r:
            for start in range(0, len(wanted), _BATCH):
                batch = wanted[start : start + _BATCH]
                scores = cast(builtins.list[Any], r.zmscore(self._consumed, batch))
                for nonce, score in zip(batch, scores, strict=True):
                    if score is not None:
                        found[nonce] = float(score)
        return found

    # -- claims -------------------------------------------------------------------------------

    def _claim(
        self, keys: builtins.list[str], row_id: str, owner: str, lease: float, now: float | None
    ) -> Any:
        moment = "" if now is None else repr(now)  # "": the server's clock
        with self._redis():
            return self._claim_script(
                keys=keys, args=[row_id, owner, moment, repr(lease), self.max_row_bytes]
            )

    def _release(
        self,
        keys: builtins.list[str],
        row_id: str,
        owner: str,
        data: str = "",
        score: float = 0,
        payload: str = "",
    ) -> bool:
        with self._redis():
            return bool(self._release_script(keys=keys, args=[row_id, owner, data, score, payload]))

    def _delete_claimed(
        self, keys: builtins.list[str], row_id: str, owner: str, consume: str
    ) -> bool:
        args = [row_id, owner, consume, repr(CONSUMED_RETENTION)]
        with self._redis():
            return bool(self._delete_claimed_script(keys=keys, args=args))

    def _dlq_keys(self, entry_id: str) -> builtins.list[str]:
        return [self._entries, self._by_time, self._claims, self._payload_key(entry_id)]

    def _journal_keys(self) -> builtins.list[str]:
        return [self._journal, self._journal_by_time, self._journal_claims]

    def _refuse_consumed(self, row_id: str, nonce: str, release: Callable[[], object]) -> None:
        if not nonce:
            return
        consumed = self.consumed([nonce])
        if consumed:
            release()
            raise ConsumedEntryError(row_id, consumed[nonce])

    def claim(
        self, entry_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> DeadLetter | None:
        claimed = self._claim(
            [self._entries, self._claims, self._payload_key(entry_id)], entry_id, owner, lease, now
        )
        if claimed is None:
            return None
        if isinstance(claimed, int):  # oversized: not claimed
            raise self._oversized(entry_id, claimed, "dead-letter entry")
        raw, payload = claimed

        def release() -> object:
            keys = [self._entries, self._by_time, self._claims]
            return self._release(keys, entry_id, owner)

        try:
            entry = self._decode_entry(entry_id, raw, payload)
        except CorruptEntryError:
            release()
            raise
        self._refuse_consumed(entry_id, entry.nonce, release)
        return entry

    def release(self, entry_id: str, owner: str, *, entry: DeadLetter | None = None) -> bool:
        if entry is None:
            return self._release([self._entries, self._by_time, self._claims], entry_id, owner)
        return self._release(
            self._dlq_keys(entry_id),
            entry_id,
            owner,
            entry.meta_json(),
            entry.last_failure,
            entry.payload,
        )

    def delete_claimed(self, entry_id: str, owner: str, *, consume: str = "") -> bool:
        keys = [self._entries, self._by_time, self._claims, self._consumed]
        return self._delete_claimed([*keys, self._payload_key(entry_id)], entry_id, owner, consume)

    def journal_claim(
        self, task_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> JournalEntry | None:
        claimed = self._claim([self._journal, self._journal_claims], task_id, owner, lease, now)
        if claimed is None:
            return None
        if isinstance(claimed, int):  # oversized: not claimed
            raise self._oversized(task_id, claimed, "journal entry")
        raw, _ = claimed
        try:
            entry = self._decode_journal(task_id, raw)
        except CorruptEntryError:
            self._release(self._journal_keys(), task_id, owner)
            raise
        self._refuse_consumed(
            task_id, entry.nonce, lambda: self._release(self._journal_keys(), task_id, owner)
        )
        return entry

    def journal_release(self, task_id: str, owner: str) -> bool:
        return self._release(self._journal_keys(), task_id, owner)

    def journal_remove_claimed(self, task_id: str, owner: str, *, consume: str = "") -> bool:
        keys = [self._journal, self._journal_by_time, self._journal_claims, self._consumed]
        return self._delete_claimed(keys, task_id, owner, consume)

    # -- journal and owners -------------------------------------------------------------------

    def journal_add(self, entry: JournalEntry) -> None:
        with self._redis() as r:
            pipe = r.pipeline(transaction=True)
            pipe.hset(self._journal, entry.task_id, entry.to_json())
            pipe.zadd(self._journal_by_time, {entry.task_id: entry.enqueued_at})
            pipe.hdel(self._journal_claims, entry.task_id)
            pipe.execute()

    def journal_remove(self, task_id: str) -> bool:
        with self._redis() as r:
            pipe = r.pipeline(transaction=True)
            pipe.hdel(self._journal, task_id)
            pipe.zrem(self._journal_by_time, task_id)
            pipe.hdel(self._journal_claims, task_id)
            removed, _, _ = pipe.execute()
        return bool(removed)

    def _journal_entries(self, r: redis.Redis) -> Iterator[JournalEntry]:
        ids = self._ids_since(r, self._journal_by_time, None)
        for task_id, raw in zip(ids, self._fetch(r, self._journal, ids), strict=True):
            if raw is None:
                continue
            try:
                yield self._decode_journal(task_id, raw)
            except CorruptEntryError as exc:
                _log.error("corrupt journal entry skipped", task_id=task_id, error=str(exc))

    def journal_list(self, *, owner: str | None = None) -> builtins.list[JournalEntry]:
        with self._redis() as r:
            return [e for e in self._journal_entries(r) if owner is None or e.owner == owner]

    def journal_hand_off(
        self, task_id: str, *, owner: str, deadline: float, signature: str | None = None
    ) -> bool:
        with self._redis() as r:
            for _ in range(_REPLACE_TRIES):
                raw = r.hget(self._journal, task_id)
                if raw is None:
                    return False
                moved = self._decode_journal(task_id, raw).handed(
                    owner, deadline, signature
                )
                done = int(
                    self._replace_script(
                        keys=[self._journal, self._journal_claims],
                        args=[task_id, raw, moved.to_json()],
                    )
                )
                if done != 0:
                    return done > 0
        raise StoreUnavailableError(
            f"Redis dead-letter store {self!r}: journal row {task_id!r} kept changing while"
            " it was handed off"
        )

    def now(self) -> float:
        """Redis's clock (``TIME``), which every lease and liveness judgement uses; a host
        clock more than a second away from it is logged once (it no longer matters here, but
        it does for whatever else the host times)."""
        with self._redis() as r:
            seconds, micros = r.time()
        moment = seconds + micros / 1_000_000
        skew = self.clock() - moment
        if abs(skew) > _SKEW_WARNING and not self._skew_logged:
            self._skew_logged = True
            _log.warning(
                "clock skew between this host and Redis; leases and liveness use Redis's clock",
                skew_seconds=round(skew, 3),
                store=repr(self),
            )
        return moment

    def heartbeat(self, owner: str, *, at: float | None = None) -> None:
        with self._redis() as r:
            if at is None:  # the server's clock, as liveness is judged on it
                self._heartbeat_script(keys=[self._heartbeats], args=[owner], client=r)
            else:
                r.hset(self._heartbeats, owner, repr(at))

    def last_seen(self) -> dict[str, float]:
        with self._redis() as r:
            raw = cast(dict[Any, Any], r.hgetall(self._heartbeats))
            seen: dict[str, float] = {}
            for owner, at in raw.items():
                try:
                    seen[_text(owner)] = float(_text(at))
                except ValueError:
                    _log.error("corrupt heartbeat skipped", owner=_text(owner))
            newest: dict[str, float] = {}
            for entry in self._journal_entries(r):
                newest[entry.owner] = max(
                    newest.get(entry.owner, entry.enqueued_at), entry.enqueued_at
                )
        for owner, at in newest.items():
            seen[owner] = max(seen.get(owner, at), at)
        return seen

    def forget_owner(self, owner: str, *, seen_before: float | None = None) -> None:
        with self._redis() as r:
            if seen_before is None:
                r.hdel(self._heartbeats, owner)
                return
            # atomic: a heartbeat written meanwhile keeps the owner
            self._forget_script(keys=[self._heartbeats], args=[owner, repr(seen_before)])
