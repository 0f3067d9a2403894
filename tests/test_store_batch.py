"""gateway/store/batch.py: `take` (a whole admission, atomic, all or nothing) and `give` (everything handed
back in one round trip), the contract suite of tests/test_store.py run on memory, sqlite and a real
redis-server with the fake clock; plus the in-order fallback Redis Cluster uses.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.store import Hit, Store, StoreConfig, open_store
from gateway.store.batch import (
    AcquireAsk,
    Count,
    HitAsk,
    Release,
    ReleaseSlot,
    ReserveAsk,
    Settle,
    take_in_order,
)
from gateway.store.sqlite import SCHEMA
from tests import test_store as contract
from tests.test_store import DAY, T0, FakeClock

store, redis_url = contract.store, contract.redis_url
"""The contract suite's fixtures: every backend, the fake clock."""

def atomic(s: Store) -> bool:
    """Every backend but Redis Cluster, where `take` is single operations in order (see batch.take_in_order):
    it stops at the first refusal, and what the steps before it took is held until given back."""
    return not getattr(s, "_one_slot", False)


ADMISSION = [HitAsk("key-a", 1, 3, 60), AcquireAsk("tenant", 2, 30), ReserveAsk("tenant", 4, 10, DAY)]


async def test_a_batch_that_fits_takes_every_step_as_the_single_operations_would(
        store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = T0 + 15
    taken = await s.take(ADMISSION)
    assert taken.admitted and taken.refused == ()
    hit, lease, token = taken.results
    assert hit == Hit(True, 2, 45)
    assert isinstance(lease, str) and isinstance(token, str)
    assert await s.spent("tenant", DAY) == 4
    assert await s.renew(lease), "the lease is a real one"
    assert await s.acquire("tenant", 2, 30) is not None and await s.acquire("tenant", 2, 30) is None
    await s.settle(token, 1.5)
    assert await s.spent("tenant", DAY) == 1.5, "the token is a real one"
    assert (await s.hit("key-a", 2, 3, 60)).allowed and not (await s.hit("key-a", 1, 3, 60)).allowed


async def test_a_refused_budget_step_takes_nothing_at_all(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = T0 + 15
    assert await s.reserve("tenant", 8, 10, DAY) is not None
    taken = await s.take(ADMISSION)  # 4 more does not fit under 10
    assert not taken.admitted and taken.refused == (2,)
    assert taken.results == (Hit(True, 3, 45), None, None), "the hit says what is left now: nothing was counted"
    assert (await s.hit("key-a", 3, 3, 60)).allowed, "the hit was not counted"
    assert await s.acquire("tenant", 2, 30) is not None and await s.acquire("tenant", 2, 30) is not None, \
        "no slot is held"
    assert await s.spent("tenant", DAY) == 8


async def test_a_refused_window_reports_its_figures_and_every_refused_step(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = T0 + 15
    assert (await s.hit("key-a", 3, 3, 60)).allowed
    assert await s.acquire("tenant", 1, 30) is not None
    taken = await s.take([HitAsk("key-a", 1, 3, 60), HitAsk("key-b", 2, 5, 60), AcquireAsk("tenant", 1, 30)])
    if atomic(s):
        assert not taken.admitted and taken.refused == (0, 2)
        assert taken.results == (Hit(False, 0, 45), Hit(True, 5, 45), None)
    else:
        assert not taken.admitted and taken.refused == (0,) and taken.results == (Hit(False, 0, 45), None, None)
    assert (await s.hit("key-b", 5, 5, 60)).allowed, "the step that fit was not applied either"


async def test_a_refused_optional_step_is_reported_and_takes_nothing(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = T0 + 15
    assert (await s.hit("shadow", 1, 1, 60)).allowed
    taken = await s.take([HitAsk("shadow", 1, 1, 60, required=False), HitAsk("key-a", 1, 3, 60),
                          AcquireAsk("tenant", 0, 30, required=False), ReserveAsk("tenant", 4, 10, DAY)])
    assert taken.admitted and taken.refused == (0, 2)
    shadow, hit, lease, token = taken.results
    assert shadow == Hit(False, 0, 45) and hit == Hit(True, 2, 45) and lease is None and isinstance(token, str)
    assert (await s.hit("shadow", 0, 2, 60)).remaining == 1, "the refused optional hit counted nothing"


async def test_steps_on_one_key_add_up_within_a_batch(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = T0
    taken = await s.take([HitAsk("k", 2, 3, 60), HitAsk("k", 2, 3, 60), ReserveAsk("t", 3, 5, DAY),
                          ReserveAsk("t", 3, 5, DAY, required=False), AcquireAsk("c", 1, 30),
                          AcquireAsk("c", 1, 30, required=False)])
    assert not taken.admitted and taken.refused == ((1, 3, 5) if atomic(s) else (1,))
    again = await s.take([HitAsk("k", 2, 3, 60), HitAsk("k", 1, 3, 60), ReserveAsk("t", 3, 5, DAY),
                          ReserveAsk("t", 2, 5, DAY)])
    assert again.admitted and again.results[1] == Hit(True, 0, 60)
    assert await s.spent("t", DAY) == 5 and not (await s.hit("k", 0.001, 3, 60)).allowed


async def test_give_hands_back_everything_once(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = T0
    taken = await s.take([HitAsk("k", 3, 3, 60), AcquireAsk("c", 1, 30), ReserveAsk("t", 4, 10, DAY),
                          ReserveAsk("u", 4, 10, DAY)])
    _, lease, settled, released = taken.results
    assert isinstance(lease, str) and isinstance(settled, str) and isinstance(released, str)
    items = [ReleaseSlot(lease), Settle(settled, 1.5), Release(released), Count("k", -2, 60),
             Count("after", 12.345, 60)]
    for _ in range(2):  # idempotent: a second give changes nothing more (the refund stays one refund)
        await s.give(items)
        assert await s.spent("t", DAY) == 1.5 and await s.spent("u", DAY) == 0
    assert await s.acquire("c", 1, 30) is not None
    assert (await s.hit("k", 0, 3, 60)).remaining == 3, "two refunds of 2 bring 3 down to 0, not below"
    assert (await s.hit("after", 0, 100, 60)).remaining == pytest.approx(100 - 2 * 12.345)
    await s.give([])


async def test_concurrent_takes_admit_exactly_what_fits_and_never_refuse_while_room_remains(
        store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    batch = [HitAsk("A", 1, 30, DAY), ReserveAsk("B", 1, 20, DAY)]
    taken = await asyncio.gather(*(s.take(batch) for _ in range(100)))
    assert sum(t.admitted for t in taken) == 20
    if atomic(s):  # (on a Cluster a refused request holds its hit on A until it gives it back)
        assert all(t.refused == (1,) for t in taken if not t.admitted), "only the budget refuses: A has room"
    assert (await s.hit("A", 0, 30, DAY)).remaining == 10, "A counts exactly the 20 admitted"
    assert await s.spent("B", DAY) == 20


async def test_the_cluster_fallback_takes_in_order_and_gives_back_on_refusal(
        store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = T0 + 15
    assert await s.reserve("tenant", 8, 10, DAY) is not None
    taken = await take_in_order(s, [*ADMISSION, HitAsk("never", 1, 1, 60)])
    assert not taken.admitted and taken.refused == (2,)
    assert taken.results == (Hit(True, 3, 45), None, None, None), "stopped at the refusal, nothing counted"
    assert (await s.hit("key-a", 3, 3, 60)).allowed, "its hit was refunded"
    assert await s.acquire("tenant", 1, 30) is not None, "its lease released"
    fits = await take_in_order(s, [HitAsk("key-b", 1, 3, 60), ReserveAsk("tenant", 2, 10, DAY)])
    assert fits.admitted and isinstance(fits.results[1], str) and await s.spent("tenant", DAY) == 10


async def test_a_refund_cannot_be_a_step_of_take(store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    with pytest.raises(ValueError, match="refund"):
        await s.take([HitAsk("k", -1, 3, 60)])


async def test_a_sqlite_file_with_the_earlier_rowid_tables_still_serves(tmp_path: Path) -> None:
    """The tables are WITHOUT ROWID now (half the pages per commit); a file made before keeps its rowid
    tables, and every statement works on both. (Such a file has no `kv` table either: it is added.)"""
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    earlier = "\n".join(line for line in SCHEMA.splitlines() if " kv" not in line)
    db.executescript(earlier.replace("\n    WITHOUT ROWID", "").replace(" WITHOUT ROWID", ""))
    tables = [sql for (sql,) in db.execute("SELECT sql FROM sqlite_master WHERE type = 'table'")]
    db.close()
    assert len(tables) == 4 and not any("WITHOUT" in sql for sql in tables), tables
    s = open_store(StoreConfig(backend="sqlite", path=str(path)))
    try:
        taken = await s.take(ADMISSION)
        _, lease, token = taken.results
        assert taken.admitted and isinstance(lease, str) and isinstance(token, str)
        assert not (await s.take([HitAsk("key-a", 3, 3, 60), *ADMISSION[1:]])).admitted
        await s.give([ReleaseSlot(lease), Settle(token, 1), Count("key-a", -1, 60)])
        await s.put("ek:added", "value", 60)
        assert await s.get("ek:added") == "value"
        assert await s.spent("tenant", DAY) == 1 and (await s.hit("key-a", 3, 3, 60)).allowed
    finally:
        await s.close()
