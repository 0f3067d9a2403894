"""`put` and `get`, values with a TTL (the realtime client secrets): the contract suite of tests/test_store.py
run on memory, sqlite, a real redis-server and a real Redis Cluster with the fake clock; then what each backend
does on its own (Redis's own expiry and hash-tagged key, SQLite's sweep, memory's bound).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path

from gateway.store import Store, StoreConfig, open_store
from gateway.store.memory import MAX_VALUES, MemoryStore
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SWEEP
from tests import test_store as contract
from tests.redis_server import needs_redis
from tests.test_store import T0, TIMEOUT_S, FakeClock

store, redis_url = contract.store, contract.redis_url
"""The contract suite's fixtures: every backend, the fake clock."""

SESSION = json.dumps({"type": "transcription", "audio": {"input": {"transcription": {
    "model": "gpt-4o-transcribe", "language": "fr", "prompt": "Réunion du comité — « ordre du jour » 会议 🎙️ | "
    * 100}}}}, ensure_ascii=False)
"""A few KB of non-ASCII text (accents, CJK, an emoji outside the BMP) with the `|` Redis puts after the expiry."""


async def test_a_value_is_kept_for_its_ttl_then_gone(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    assert await s.get("ek:absent") is None
    await s.put("ek:a", "first", 10)
    assert await s.get("ek:a") == "first"
    clock.now = T0 + 9.9
    assert await s.get("ek:a") == "first"
    clock.now = T0 + 10
    assert await s.get("ek:a") is None, "gone once its TTL has passed"
    assert await s.get("ek:absent") is None


async def test_a_put_replaces_the_value_and_its_ttl(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    await s.put("ek:a", "first", 5)
    await s.put("ek:a", "second", 60)
    assert await s.get("ek:a") == "second"
    clock.now = T0 + 30
    assert await s.get("ek:a") == "second", "the new TTL, not the first one"
    await s.put("ek:a", "third", 1)
    clock.now = T0 + 31
    assert await s.get("ek:a") is None, "a shorter TTL replaces a longer one too"
    await s.put("ek:b", "other", 60)
    assert await s.get("ek:b") == "other" and await s.get("ek:a") is None, "keys apart"


async def test_a_value_of_a_few_kb_of_any_text_comes_back_whole(store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    assert len(SESSION.encode()) > 4096
    await s.put("ek:session", SESSION, 600)
    assert await s.get("ek:session") == SESSION
    await s.put("ek:é|会", "", 600)
    assert await s.get("ek:é|会") == "", "an empty value is a value; a key may be any text"


async def test_concurrent_puts_of_one_key_leave_one_of_them(store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    values = [f"v{i}" for i in range(20)]
    await asyncio.gather(*(s.put("ek:race", v, 60) for v in values))
    assert await s.get("ek:race") in values


@needs_redis
async def test_redis_expires_a_value_by_its_own_clock_under_the_hash_tag(redis_url: str) -> None:
    prefix = uuid.uuid4().hex
    s = open_store(StoreConfig(backend="redis", url=redis_url, key_prefix=prefix, timeout_s=TIMEOUT_S))
    assert isinstance(s, RedisStore)
    try:
        await s.put("ek:short", "x", 0.3)
        await s.put("ek:long", "y", 600)
        assert 0 < await s._redis.pttl(f"{{{prefix}:ek:short}}:v") <= 300
        assert 0 < await s._redis.pttl(f"{{{prefix}:ek:long}}:v") <= 600_000, "SET PX: the server drops it"
        await asyncio.sleep(0.5)
        assert await s.get("ek:short") is None and await s.get("ek:long") == "y"
        assert await s._redis.keys(f"*{prefix}*") == [f"{{{prefix}:ek:long}}:v"]
    finally:
        await s.close()


async def test_sqlite_ignores_expired_rows_and_sweeps_them_as_it_writes(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "state.sqlite3"
    s = open_store(StoreConfig(backend="sqlite", path=str(path)), clock)
    try:
        for i in range(SWEEP + 20):
            await s.put(f"ek:{i}", "x", 10)
        await s.put("ek:live", "y", 3600)
        clock.now = T0 + 10
        assert await s.get("ek:0") is None, "expired, though its row is still there"
        assert _rows(path) == SWEEP + 21
        await s.put("ek:new", "z", 10)
        assert _rows(path) == 20 + 2, f"one write sweeps {SWEEP} expired rows, no more"
        await s.put("ek:new", "z", 10)
        assert _rows(path) == 2 and await s.get("ek:live") == "y"
    finally:
        await s.close()


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM kv").fetchone()[0])


async def test_memory_drops_expired_values_then_the_oldest_written() -> None:
    assert MAX_VALUES == 10_000
    clock = FakeClock()
    s = MemoryStore(clock, max_values=3)
    await s.put("a", "1", 1)
    await s.put("b", "2", 100)
    await s.put("c", "3", 100)
    clock.now = T0 + 2
    await s.put("d", "4", 100)
    assert [await s.get(k) for k in "abcd"] == [None, "2", "3", "4"], "the expired one made room, not b"
    await s.put("b", "2'", 100)  # written again: now the newest
    await s.put("e", "5", 100)
    assert [await s.get(k) for k in "bcde"] == ["2'", None, "4", "5"], "full: the oldest written went"
    assert len(s._values) == 3
