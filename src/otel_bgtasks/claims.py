"""One claim of a stored row at a time: take a lease, renew it while the work runs, settle.

Replay (dead letters) and recovery (journal rows) both go through `hold`:

    async with hold(DEAD_LETTERS, store, entry_id, owner, lease=60) as claim:
        if claim is None: ...            # missing, or another owner holds a live lease
        ...                              # claim.row is ours; renewed every lease / 3
        await claim.settle()             # done: remove the row if the claim is still ours
        # or: await claim.release(update) # give it back (updated), e.g. after a failure

A block that leaves without settling or releasing (an exception, a cancellation at shutdown)
gives the row back at once, shielded from the cancellation; a process that dies leaves a lease
that expires, and the row is claimable again (at least once across crashes, once between live
claimants).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from otel_bgtasks.records import DeadLetter, JournalEntry
from otel_bgtasks.stores.base import DeadLetterStore

__all__ = ["DEAD_LETTERS", "JOURNAL", "Claim", "Table", "hold", "renewing"]

_Row = TypeVar("_Row", DeadLetter, JournalEntry)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Table(Generic[_Row]):
    """The claim operations of one kind of row in a store (unbound methods)."""

    claim: Callable[..., _Row | None]
    release: Callable[..., bool]
    settle: Callable[..., bool]


def _dlq_claim(store: DeadLetterStore, key: str, owner: str, *, lease: float) -> DeadLetter | None:
    return store.claim(key, owner, lease=lease)


def _dlq_release(store: DeadLetterStore, key: str, owner: str, **update: Any) -> bool:
    return store.release(key, owner, **update)


def _dlq_settle(store: DeadLetterStore, key: str, owner: str) -> bool:
    return store.delete_claimed(key, owner)


def _journal_claim(
    store: DeadLetterStore, key: str, owner: str, *, lease: float
) -> JournalEntry | None:
    return store.journal_claim(key, owner, lease=lease)


def _journal_release(store: DeadLetterStore, key: str, owner: str) -> bool:
    return store.journal_release(key, owner)


def _journal_settle(store: DeadLetterStore, key: str, owner: str) -> bool:
    return store.journal_remove_claimed(key, owner)


DEAD_LETTERS: Table[DeadLetter] = Table(_dlq_claim, _dlq_release, _dlq_settle)
"""Dead letters (replay): a failed replay releases the entry updated (``entry=``)."""
JOURNAL: Table[JournalEntry] = Table(_journal_claim, _journal_release, _journal_settle)
"""Journal rows (recovery): settled once re-run or dead-lettered."""


class Claim(Generic[_Row]):
    """A lease held on `row` by `owner`, until settled or released."""

    def __init__(
        self,
        table: Table[_Row],
        store: DeadLetterStore,
        row: _Row,
        key: str,
        owner: str,
        offload: bool,
    ) -> None:
        self.row: _Row = row
        self._table: Table[_Row] = table
        self._store = store
        self._key = key
        self._owner = owner
        self._offload = offload
        self.done = False

    async def _call(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        if self._offload:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    async def settle(self) -> bool:
        """Remove the row if the claim is still ours (False: its lease expired and another
        took it, or it was deleted)."""
        self.done = True
        return await self._call(self._table.settle, self._store, self._key, self._owner)

    async def release(self, **update: Any) -> bool:
        """Give the row back (replacing it with `update`'s ``entry=``, dead letters only)
        if the claim is still ours."""
        self.done = True
        return await self._call(
            self._table.release, self._store, self._key, self._owner, **update
        )

    def renew(self, lease: float) -> object:
        return self._table.claim(self._store, self._key, self._owner, lease=lease)


@contextlib.asynccontextmanager
async def hold(
    table: Table[_Row],
    store: DeadLetterStore,
    key: str,
    owner: str,
    *,
    lease: float,
    offload: bool = True,
) -> AsyncIterator[Claim[_Row] | None]:
    """Claim `key` for `owner` for `lease` seconds, renewed every third of it while the block
    runs; yields None when the row is missing or held by another.

    Raises:
        CorruptEntryError: the row exists but cannot be decoded (the store released it).
    """
    take = functools.partial(table.claim, store, key, owner, lease=lease)
    row = await asyncio.to_thread(take) if offload else take()
    if row is None:
        yield None
        return
    claim = Claim(table, store, row, key, owner, offload)
    try:
        async with renewing(functools.partial(claim.renew, lease), lease / 3):
            yield claim
    except BaseException:
        if not claim.done:  # cancelled or broken: give it back now (the lease would expire)
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    asyncio.to_thread(table.release, store, key, owner)
                )
        raise
    if not claim.done:
        await claim.release()


@contextlib.asynccontextmanager
async def renewing(renew: Callable[[], object], every: float) -> AsyncIterator[None]:
    """Call `renew` (a claim renewal, in a worker thread) every `every` seconds while the
    body runs; a failed renewal is retried at the next tick."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(renew)

    renewer = asyncio.create_task(loop())
    try:
        yield
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
