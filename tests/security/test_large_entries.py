"""`dlq show`, `dlq list` and the admin router on a large entry (issue 18, case 5).

A task called with a multi-megabyte argument leaves a dead letter that large. The views show
a preview (the payload's first 1,000 characters) and its size; the whole payload comes only on
request (``--full``, ``show --json``, ``list --json --full``, ``?full=true``), streamed from
the store. The stores serve previews without reading a payload whole (checked with a store
whose whole-entry reads fail), on SQLite and on a real Redis. Time and memory are measured
by ``benchmarks/large_entry.py`` (tests never time anything).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI

from otel_bgtasks.cli import main
from otel_bgtasks.health import bearer_token_auth, bgtasks_router
from otel_bgtasks.records import DeadLetter
from otel_bgtasks.signing import SigningKeys
from otel_bgtasks.stores.base import DeadLetterStore
from tests.integration._server import UvicornThread
from tests.security.conftest import Backend
from tests.security.test_planted_entries import TASKS, planted_letter

SIZE = 3_000_000  # characters of the argument: a 3 MB payload
KEY = "k1-0123456789abcdef0123456789abcdef"
TOKEN = "admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def large_entry(backend: Backend) -> DeadLetter:
    argument = ("abcdefghij" * (SIZE // 10 + 1))[:SIZE]
    entry = planted_letter(f"{TASKS}:record", argument, task_name="record").signed(
        SigningKeys.of(KEY)
    )
    backend.store.put(entry)
    return entry


class NoWholeReads:
    """A store whose whole-entry reads fail: the views must not use them."""

    def __init__(self, store: DeadLetterStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        if name in ("get", "list"):
            raise AssertionError(f"{name}() reads payloads whole")
        return getattr(self._store, name)


def test_the_store_previews_and_streams_without_whole_reads(backend: Backend) -> None:
    entry = large_entry(backend)
    store: Any = NoWholeReads(backend.store)
    (listed,) = store.previews()
    assert listed.entry.payload == entry.payload[:1_000]
    assert (listed.payload_size, listed.truncated) == (len(entry.payload), True)
    assert store.preview(entry.id) == listed
    chunks: Iterator[bytes] = store.payload_chunks(entry.id)
    assert b"".join(chunks).decode() == entry.payload


def test_cli_show_and_list_print_a_preview_and_the_size(
    backend: Backend, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    entry = large_entry(backend)
    env = {"OTEL_BGTASKS_SIGNING_KEY": KEY}
    base = ["--store", backend.url, "--tasks", TASKS, "dlq"]

    assert main([*base, "show", entry.id], environ=env) == 0
    out = capsys.readouterr().out
    assert len(out) < 10_000
    assert (
        f"payload size 3.0 MB ({len(entry.payload):,} bytes), the first 1,000 characters shown"
        " (--full: all of it)"
    ) in " ".join(out.split())
    assert "check ok" in " ".join(out.split())  # the signature verified on the streamed digest

    assert main([*base, "show", entry.id, "--full"], environ=env) == 0
    out = capsys.readouterr().out
    assert entry.payload in out

    assert main([*base, "show", entry.id, "--json"], environ=env) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {**entry.to_dict(), "check": "ok", "check_reason": ""}

    assert main([*base, "list", "--json"], environ=env) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["payload"] == entry.payload[:1_000]
    assert (listed["payload_size"], listed["payload_truncated"]) == (len(entry.payload), True)
    assert listed["check"] == "ok"

    assert main([*base, "list", "--json", "--full"], environ=env) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["payload"] == entry.payload

    assert main([*base, "list"], environ=env) == 0
    assert len(capsys.readouterr().out) < 2_000


def test_the_router_serves_a_preview_and_streams_on_request(
    backend: Backend, instrument: Any
) -> None:
    entry = large_entry(backend)
    app = FastAPI()
    store: Any = NoWholeReads(backend.store)
    app.include_router(bgtasks_router(auth=bearer_token_auth(TOKEN), store=store))
    with UvicornThread(app) as server, server.client() as client:
        listed = client.get("/bgtasks/dead-letters", headers=AUTH)
        shown = client.get(f"/bgtasks/dead-letters/{entry.id}", headers=AUTH)
        full = client.get(f"/bgtasks/dead-letters/{entry.id}?full=true", headers=AUTH)
    preview = {
        **entry.to_dict(),
        "payload": entry.payload[:1_000],
        "payload_size": len(entry.payload),
        "payload_truncated": True,
    }
    assert listed.json() == [preview]
    assert len(listed.content) < 5_000
    assert shown.json() == preview
    assert full.headers["content-type"] == "application/json"
    assert full.json() == {**entry.to_dict(), "payload_size": len(entry.payload)}
