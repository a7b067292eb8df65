"""An opt-in FastAPI router: task health, and dead-letter admin behind an auth dependency.

    from otel_bgtasks.health import bearer_token_auth, bgtasks_router

    app.include_router(bgtasks_router(auth=bearer_token_auth(os.environ["OTEL_BGTASKS_ADMIN_TOKEN"])))
    app.include_router(bgtasks_router(admin=False))        # only GET /bgtasks/health

GET /bgtasks/health: running and pending tasks (pending by task, as `bgtasks.task.pending`),
oldest running age, recent failures, circuit states, dead-letter depth and the write buffer
(`degraded` while writes wait in memory or a circuit is open). It never waits on the store more
than `HEALTH_STORE_TIMEOUT` seconds, and never on the event loop. Admin (auth required):
GET /bgtasks/dead-letters,
GET /bgtasks/dead-letters/{id}, POST /bgtasks/dead-letters/{id}/replay,
POST /bgtasks/dead-letters/replay (all, or filtered by task/reason),
DELETE /bgtasks/dead-letters/{id}.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from otel_bgtasks._execution import Executor, active_executor
from otel_bgtasks.errors import ConfigurationError
from otel_bgtasks.replay import DeadLetters, run_dead_letter
from otel_bgtasks.stores.base import DeadLetterStore, StoreStatus

__all__ = ["HEALTH_STORE_TIMEOUT", "bearer_token_auth", "bgtasks_router"]

HEALTH_STORE_TIMEOUT = 1.0
"""Seconds the health endpoint waits for the store's depth before reporting it unknown."""


def bearer_token_auth(token: str) -> Callable[..., None]:
    """A dependency accepting `Authorization: Bearer <token>`, compared in constant time.

    Raises:
        ConfigurationError: an empty token (which would let anyone in).
    """
    if not token:
        raise ConfigurationError("bearer_token_auth needs a non-empty token")
    expected = token.encode()
    scheme = HTTPBearer(auto_error=False)

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:  # noqa: B008
        given = credentials.credentials.encode() if credentials else b""
        if not secrets.compare_digest(given, expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "a valid bearer token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def _executor() -> Executor | None:
    return active_executor()


def _store(explicit: DeadLetterStore | None) -> DeadLetterStore:
    if explicit is not None:
        return explicit
    executor = _executor()
    if executor is None or executor.store is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no dead-letter store configured")
    store: DeadLetterStore = executor.store
    return store


def bgtasks_router(
    *,
    auth: Callable[..., Any] | None = None,
    admin: bool = True,
    store: DeadLetterStore | None = None,
    prefix: str = "/bgtasks",
) -> APIRouter:
    """The health router, plus the dead-letter admin endpoints when `admin` is set.

    Args:
        auth: a FastAPI dependency guarding the admin endpoints (e.g. `bearer_token_auth`).
        admin: mount the admin endpoints (requires `auth`).
        store: the dead-letter store; default: the instrumentor's.

    Raises:
        ConfigurationError: `admin` without `auth`: the admin endpoints never mount unprotected.
    """
    if admin and auth is None:
        raise ConfigurationError(
            "the dead-letter admin endpoints need an auth dependency: "
            "bgtasks_router(auth=bearer_token_auth(token)), or admin=False for health only"
        )
    router = APIRouter(prefix=prefix, tags=["bgtasks"])

    @router.get("/health")
    async def health() -> dict[str, Any]:
        executor = _executor()
        if executor is None:
            return {"status": "not_instrumented"}
        now = executor.clock()
        states = list(executor.inflight.values())
        running = [s for s in states if not executor.is_pending(s)]
        pending = {name: n for name, n in sorted(executor.instruments.pending().items()) if n}
        depth: int | None = None
        buffer: StoreStatus | None = None
        if executor.store is not None:
            buffer = executor.store.status()
            try:
                depth = await asyncio.wait_for(
                    asyncio.to_thread(executor.store.count), HEALTH_STORE_TIMEOUT
                )
            except Exception:  # an unreachable or slow store is reported, not raised
                depth = None
        # a Redis-backed breaker's state as this process last saw it: no Redis call here
        circuits = {
            name: (b.last_state if b.blocking else b.state).label
            for name, b in executor.breakers.by_name.items()
        }
        failing = buffer is not None and bool(buffer["pending"] or buffer["store_down"])
        return {
            "status": "degraded" if failing or "open" in circuits.values() else "ok",
            "running": len(running),
            "pending": len(states) - len(running),
            "pending_by_task": pending,  # bgtasks.task.pending
            "oldest_running_seconds": max((now - s.enqueued_at for s in running), default=0.0),
            "recent_failures": [asdict(f) for f in list(executor.failures.recent)[-10:]],
            "circuits": circuits,
            "dead_letter_depth": depth,
            "dead_letter_buffer": buffer,
        }

    if not admin:
        return router
    guarded = [Depends(auth)]

    @router.get("/dead-letters", dependencies=guarded)
    async def list_dead_letters(
        task: str | None = None, reason: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        letters = DeadLetters(_store(store))
        found = await asyncio.to_thread(letters.list, task=task, reason=reason, limit=limit)
        return [e.to_dict() for e in found]

    @router.get("/dead-letters/{entry_id}", dependencies=guarded)
    async def show_dead_letter(entry_id: str) -> dict[str, Any]:
        entry = await asyncio.to_thread(_store(store).get, entry_id)
        if entry is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead letter {entry_id!r}")
        return entry.to_dict()

    @router.post("/dead-letters/{entry_id}/replay", dependencies=guarded)
    async def replay_one(entry_id: str) -> dict[str, Any]:
        report = await DeadLetters(_store(store)).replay([entry_id], run_dead_letter)
        (outcome,) = report.outcomes
        if outcome.status == "missing":
            raise HTTPException(status.HTTP_404_NOT_FOUND, outcome.message)
        return {"id": outcome.entry_id, "status": outcome.status, "message": outcome.message}

    @router.post("/dead-letters/replay", dependencies=guarded)
    async def replay_all(task: str | None = None, reason: str | None = None) -> dict[str, Any]:
        letters = DeadLetters(_store(store))
        report = await letters.replay(None, run_dead_letter, task=task, reason=reason)
        return {
            "replayed": report.replayed,
            "sent": report.sent,
            "outcomes": [
                {"id": o.entry_id, "status": o.status, "message": o.message}
                for o in report.outcomes
            ],
        }

    @router.delete("/dead-letters/{entry_id}", dependencies=guarded)
    async def delete_dead_letter(entry_id: str) -> dict[str, bool]:
        if not await asyncio.to_thread(_store(store).delete, entry_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead letter {entry_id!r}")
        return {"deleted": True}

    return router
