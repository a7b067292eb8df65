"""`RedisDeadLetterStore`: dead letters shared by every host, in Redis.

Keys (``{prefix}`` defaults to ``bgtasks``):

- ``{prefix}:dlq:entries``: hash, entry id -> entry JSON;
- ``{prefix}:dlq:by_time``: sorted set, entry id scored by ``last_failure`` (order, ``since``);
- ``{prefix}:journal:entries`` / ``{prefix}:journal:by_time``: the same for journaled tasks,
  scored by ``enqueued_at``;
- ``{prefix}:dlq:claims`` / ``{prefix}:journal:claims``: hash, id -> ``"{until}|{owner}"``,
  the lease of the replayer/recoverer working on the row;
- ``{prefix}:heartbeats``: hash, owner -> last heartbeat (epoch seconds).

Each write is one MULTI/EXEC transaction; claims are Lua scripts (atomic on the server).
Connect and command timeouts are short (1 s by default) with a single immediate reconnect
attempt, so an outage costs a task about a second at most; `open_store` adds the
`BufferedStore` that keeps those writes until Redis is back.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Iterator
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

from otel_bgtasks.errors import ConfigurationError, CorruptEntryError, StoreUnavailableError
from otel_bgtasks.records import (
    DeadLetter,
    DeadLetterReason,
    JournalEntry,
    decode_entry,
    decode_journal,
)
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = ["RedisDeadLetterStore"]

_log = structlog.get_logger("otel_bgtasks")

_BATCH = 500

# KEYS: entries, claims. ARGV: id, owner, now, until. The row's data, or false.
_CLAIM = """
local data = redis.call('HGET', KEYS[1], ARGV[1])
if not data then return false end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  local sep = string.find(held, '|', 1, true)
  local untl = tonumber(string.sub(held, 1, sep - 1))
  local holder = string.sub(held, sep + 1)
  if holder ~= ARGV[2] and untl > tonumber(ARGV[3]) then return false end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4] .. '|' .. ARGV[2])
return data
"""

# KEYS: entries, by_time, claims. ARGV: id, owner, data ('' keeps the row), score.
_RELEASE = """
local held = redis.call('HGET', KEYS[3], ARGV[1])
if not held then return 0 end
if string.sub(held, string.find(held, '|', 1, true) + 1) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
end
return 1
"""

# KEYS: heartbeats. ARGV: owner, seen_before.
_FORGET = """
local at = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if at and at < tonumber(ARGV[2]) then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

# KEYS: entries, by_time, claims. ARGV: id, owner.
_DELETE_CLAIMED = """
local held = redis.call('HGET', KEYS[3], ARGV[1])
if not held then return 0 end
if string.sub(held, string.find(held, '|', 1, true) + 1) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""


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
    ) -> None:
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
        self._claims = f"{prefix}:dlq:claims"
        self._journal_claims = f"{prefix}:journal:claims"
        self._claim_script = self.client.register_script(_CLAIM)
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
        for start in range(0, len(ids), _BATCH):
            yield from cast(builtins.list[Any], r.hmget(key, ids[start : start + _BATCH]))

    def _ids_since(self, r: redis.Redis, key: str, since: float | None) -> builtins.list[str]:
        low: float | str = "-inf" if since is None else since
        return [_text(i) for i in cast(builtins.list[Any], r.zrangebyscore(key, low, "+inf"))]

    def _scan(
        self, r: redis.Redis, since: float | None
    ) -> Iterator[tuple[str, DeadLetter | CorruptEntryError]]:
        """(id, entry or decoding error) in `last_failure` order; drops stale index ids."""
        ids = self._ids_since(r, self._by_time, since)
        stale: builtins.list[str] = []
        for entry_id, raw in zip(ids, self._fetch(r, self._entries, ids), strict=True):
            if raw is None:  # deleted between ZRANGE and HMGET, or index out of sync
                stale.append(entry_id)
                continue
            try:
                yield entry_id, decode_entry(entry_id, raw)
            except CorruptEntryError as exc:
                yield entry_id, exc
        if stale:
            # only ids still without data: an entry put meanwhile keeps its index
            for entry_id in stale:
                if not r.hexists(self._entries, entry_id):
                    r.zrem(self._by_time, entry_id)

    # -- dead letters ---------------------------------------------------------------------------

    def put(self, entry: DeadLetter) -> None:
        with self._redis() as r:
            pipe = r.pipeline(transaction=True)
            pipe.hset(self._entries, entry.id, entry.to_json())
            pipe.zadd(self._by_time, {entry.id: entry.last_failure})
            pipe.hdel(self._claims, entry.id)
            pipe.execute()

    update = put

    def get(self, entry_id: str) -> DeadLetter | None:
        with self._redis() as r:
            raw = r.hget(self._entries, entry_id)
        return None if raw is None else decode_entry(entry_id, cast(bytes, raw))

    def list(
        self,
        *,
        task: str | None = None,
        reason: DeadLetterReason | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> builtins.list[DeadLetter]:
        wanted = None if reason is None else DeadLetterReason(reason)
        out: builtins.list[DeadLetter] = []
        if limit is not None and limit <= 0:
            return out
        with self._redis() as r:
            for entry_id, found in self._scan(r, since):
                if isinstance(found, CorruptEntryError):
                    _log.error(
                        "corrupt dead-letter entry skipped", entry_id=entry_id, error=str(found)
                    )
                    continue
                if (task is None or found.task_name == task) and (
                    wanted is None or found.reason is wanted
                ):
                    out.append(found)
                    if limit is not None and len(out) >= limit:
                        break
        return out

    def delete(self, entry_id: str) -> bool:
        with self._redis() as r:
            pipe = r.pipeline(transaction=True)
            pipe.hdel(self._entries, entry_id)
            pipe.zrem(self._by_time, entry_id)
            pipe.hdel(self._claims, entry_id)
            removed, _, _ = pipe.execute()
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
                pipe = r.pipeline(transaction=True)
                pipe.hlen(self._entries)
                pipe.delete(self._entries, self._by_time, self._claims)
                total, _ = pipe.execute()
                return int(total)
            doomed = [
                entry_id
                for entry_id, found in self._scan(r, since)
                # a corrupt row matches only filters we can check without decoding it
                if (
                    task is None and wanted is None
                    if isinstance(found, CorruptEntryError)
                    else (task is None or found.task_name == task)
                    and (wanted is None or found.reason is wanted)
                )
            ]
            removed = 0
            for start in range(0, len(doomed), _BATCH):
                batch = doomed[start : start + _BATCH]
                pipe = r.pipeline(transaction=True)
                pipe.hdel(self._entries, *batch)
                pipe.zrem(self._by_time, *batch)
                pipe.hdel(self._claims, *batch)
                count, _, _ = pipe.execute()
                removed += int(count)
        return removed

    def count(self) -> int:
        with self._redis() as r:
            return int(r.hlen(self._entries))

    def corrupt_ids(self) -> builtins.list[str]:
        bad: builtins.list[str] = []
        with self._redis() as r:
            for key, raw in r.hscan_iter(self._entries):
                entry_id = _text(key)
                try:
                    decode_entry(entry_id, raw)
                except CorruptEntryError:
                    bad.append(entry_id)
        return sorted(bad)

    # -- claims -------------------------------------------------------------------------------

    def _claim(
        self, keys: tuple[str, str], row_id: str, owner: str, lease: float, now: float | None
    ) -> Any:
        moment = time.time() if now is None else now
        with self._redis():
            return self._claim_script(
                keys=list(keys), args=[row_id, owner, repr(moment), repr(moment + lease)]
            )

    def _release(
        self, keys: tuple[str, str, str], row_id: str, owner: str, data: str = "", score: float = 0
    ) -> bool:
        with self._redis():
            return bool(self._release_script(keys=list(keys), args=[row_id, owner, data, score]))

    def _delete_claimed(self, keys: tuple[str, str, str], row_id: str, owner: str) -> bool:
        with self._redis():
            return bool(self._delete_claimed_script(keys=list(keys), args=[row_id, owner]))

    def _dlq_keys(self) -> tuple[str, str, str]:
        return self._entries, self._by_time, self._claims

    def _journal_keys(self) -> tuple[str, str, str]:
        return self._journal, self._journal_by_time, self._journal_claims

    def claim(
        self, entry_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> DeadLetter | None:
        raw = self._claim((self._entries, self._claims), entry_id, owner, lease, now)
        if raw is None:
            return None
        try:
            return decode_entry(entry_id, raw)
        except CorruptEntryError:
            self._release(self._dlq_keys(), entry_id, owner)
            raise

    def release(self, entry_id: str, owner: str, *, entry: DeadLetter | None = None) -> bool:
        if entry is None:
            return self._release(self._dlq_keys(), entry_id, owner)
        return self._release(self._dlq_keys(), entry_id, owner, entry.to_json(), entry.last_failure)

    def delete_claimed(self, entry_id: str, owner: str) -> bool:
        return self._delete_claimed(self._dlq_keys(), entry_id, owner)

    def journal_claim(
        self, task_id: str, owner: str, *, lease: float, now: float | None = None
    ) -> JournalEntry | None:
        raw = self._claim((self._journal, self._journal_claims), task_id, owner, lease, now)
        if raw is None:
            return None
        try:
            return decode_journal(task_id, raw)
        except CorruptEntryError:
            self._release(self._journal_keys(), task_id, owner)
            raise

    def journal_release(self, task_id: str, owner: str) -> bool:
        return self._release(self._journal_keys(), task_id, owner)

    def journal_remove_claimed(self, task_id: str, owner: str) -> bool:
        return self._delete_claimed(self._journal_keys(), task_id, owner)

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
                yield decode_journal(task_id, raw)
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
                moved = decode_journal(task_id, cast(bytes, raw)).handed(
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
        """The Redis server's clock (``TIME``): one clock for every host sharing the store."""
        with self._redis() as r:
            seconds, micros = r.time()
        return seconds + micros / 1_000_000

    def heartbeat(self, owner: str, *, at: float | None = None) -> None:
        with self._redis() as r:
            r.hset(self._heartbeats, owner, repr(time.time() if at is None else at))

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
