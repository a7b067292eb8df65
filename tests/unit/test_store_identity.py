"""`DeadLetterStore.identity`: the `bgtasks.dlq.store` attribute of `bgtasks.dlq.depth`.

The same for every process opening one store (so dashboards take the max per store over the
replicas, then sum a job's stores), bounded (one value per store) and without secrets.
"""

from __future__ import annotations

from pathlib import Path

from otel_bgtasks.stores import open_store
from otel_bgtasks.stores.redis import RedisDeadLetterStore
from otel_bgtasks.testing import InMemoryDeadLetterStore


def test_sqlite_is_its_absolute_path_whatever_the_url(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///dlq.db")
    absolute = open_store(f"sqlite:///{tmp_path}/dlq.db")
    try:
        assert relative.identity == absolute.identity == f"sqlite:{tmp_path}/dlq.db"
    finally:
        relative.close()
        absolute.close()


def test_redis_is_host_port_db_and_prefix_never_the_password() -> None:
    store = RedisDeadLetterStore("redis://:s3cret@10.0.0.7:6390/2?prefix=shop")  # no connection
    try:
        assert store.identity == "redis://10.0.0.7:6390/2/shop"
        buffered = open_store("redis://:s3cret@10.0.0.7:6390/2")
        assert buffered.identity == "redis://10.0.0.7:6390/2/bgtasks"
        assert "s3cret" not in buffered.identity
        buffered.close()
    finally:
        store.close()


def test_in_memory_stores_are_told_apart() -> None:
    one, two = InMemoryDeadLetterStore(), InMemoryDeadLetterStore()
    assert one.identity.startswith("memory:")
    assert one.identity != two.identity
