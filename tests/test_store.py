"""gateway/store/: one contract suite run against memory, sqlite, a real redis-server (tests/redis_server.py,
on a free loopback port) and the redis backend with `cluster: true` on a real three-node Redis Cluster
(conftest's `redis_cluster`; more of it in test_store_cluster.py). Redis tests skip only when the binary
is missing. Time is a fake clock the test advances, except where the server's own clock is the point.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.store import Store, StoreConfig, StoreUnavailable, open_store
from gateway.store.redis import RedisStore
from tests.redis_cluster import MISSING
from tests.redis_server import needs_redis, redis_server
from tests.support import free_port

needs_cluster = pytest.mark.skipif(bool(MISSING), reason=MISSING)
T0 = 1_800_057_600.0
"""A fake now at a midnight UTC (a multiple of every window used here)."""
DECADE = 10 * 365 * 86400.0
"""Period of the real-clock tests: no boundary falls inside one run."""
DAY = 86400.0
NOV, DEC = 1_793_491_200.0, 1_796_083_200.0
"""2026-11-01 and 2026-12-01 00:00 UTC: anchors of 30- and 31-day months (an epoch-aligned 30-day
window would end on Nov 3)."""
MONDAY = 345_600.0
"""1970-01-05 00:00 UTC, the anchor of weeks from Monday (epoch-aligned weeks start on Thursday)."""


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


TIMEOUT_S = 5.0
"""The contract tests' store timeout: what they check is semantics, and a loaded CI machine can take longer
than the default 0.5 s to connect 200 concurrent operations (the timeouts have tests of their own)."""


def config_for(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> StoreConfig:
    if backend == "redis":
        return StoreConfig(backend="redis", url=request.getfixturevalue("redis_url"), key_prefix=uuid.uuid4().hex,
                           timeout_s=TIMEOUT_S)
    if backend == "redis-cluster":
        return StoreConfig(backend="redis", cluster=True, url=request.getfixturevalue("redis_cluster").url,
                           key_prefix=uuid.uuid4().hex, timeout_s=TIMEOUT_S)
    return StoreConfig(backend=backend, path=str(tmp_path / "state" / "gateway.sqlite3"),  # type: ignore[arg-type]
                       timeout_s=TIMEOUT_S)


BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=needs_redis),
            pytest.param("redis-cluster", marks=needs_cluster)]
"""`redis-cluster`: the redis backend with `cluster: true` on a real three-node cluster, where the
scopes of one test live on different nodes."""


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, FakeClock]]:
    clock = FakeClock()
    s = open_store(config_for(request.param, request, tmp_path), clock)
    yield s, clock
    await s.close()


async def test_hit_is_a_fixed_window_where_a_refused_hit_counts_nothing(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = T0 + 15
    first = await s.hit("key-a", 2, 3, 60)
    assert (first.allowed, first.remaining, first.reset_s) == (True, 1, 45)
    refused = await s.hit("key-a", 2, 3, 60)
    assert (refused.allowed, refused.remaining) == (False, 1)
    last = await s.hit("key-a", 1, 3, 60)
    assert (last.allowed, last.remaining) == (True, 0)
    assert not (await s.hit("key-a", 1, 3, 60)).allowed
    assert (await s.hit("key-b", 1, 3, 60)).allowed, "keys count apart"
    assert (await s.hit("key-a", 1, 3, 3600)).allowed, "windows of one key count apart"


async def test_hit_window_rolls_over_at_an_epoch_multiple(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = T0 + 59.9
    assert (await s.hit("k", 1, 1, 60)).allowed
    assert not (await s.hit("k", 1, 1, 60)).allowed
    clock.now = T0 + 60
    again = await s.hit("k", 1, 1, 60)
    assert (again.allowed, again.remaining, again.reset_s) == (True, 0, 60)


async def test_reserve_settle_release_and_spent(store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    first = await s.reserve("tenant", 4, 10, 86400)
    assert first is not None and await s.spent("tenant", 86400) == 4
    assert await s.reserve("tenant", 7, 10, 86400) is None, "4 + 7 > 10"
    assert await s.spent("tenant", 86400) == 4, "a refused reservation reserves nothing"
    await s.settle(first, 2)
    assert await s.spent("tenant", 86400) == 2
    second = await s.reserve("tenant", 7, 10, 86400)
    assert second is not None and await s.spent("tenant", 86400) == 9
    await s.release(second)
    assert await s.spent("tenant", 86400) == 2
    await s.release(second)
    await s.settle(first, 9)
    assert await s.spent("tenant", 86400) == 2, "a token settles or releases once"
    assert await s.spent("other", 86400) == 0


async def test_a_new_period_starts_at_zero_and_old_tokens_leave_it_alone(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = T0 + 86399
    old = await s.reserve("tenant", 10, 10, 86400)
    assert old is not None and await s.reserve("tenant", 1, 10, 86400) is None
    clock.now = T0 + 86400
    assert await s.spent("tenant", 86400) == 0
    new = await s.reserve("tenant", 6, 10, 86400)
    assert new is not None
    await s.settle(old, 1)
    await s.release(old)
    assert await s.spent("tenant", 86400) == 6


async def test_money_amounts_fit_their_cap_exactly(store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    tokens = [await s.reserve("usd", 0.1, 5.0, 86400) for _ in range(51)]
    assert sum(t is not None for t in tokens) == 50 and tokens[-1] is None
    assert await s.spent("usd", 86400) == pytest.approx(5.0)


async def test_an_anchor_makes_a_calendar_month(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = NOV + 0.5
    assert (await s.hit("month", 4, 10, 30 * DAY, NOV)).allowed
    clock.now = DEC - 1
    last = await s.hit("month", 1, 10, 30 * DAY, NOV)
    assert (last.remaining, last.reset_s) == (5, 1.0), "November's count carries until Dec 1"
    clock.now = DEC + 0.5
    december = await s.hit("month", 1, 10, 31 * DAY, DEC)
    assert (december.remaining, december.reset_s) == (9, 31 * DAY - 0.5)


async def test_a_caller_across_the_month_boundary_gets_the_store_clocks_month(
    store: tuple[Store, FakeClock]
) -> None:
    s, clock = store
    clock.now = NOV + DAY
    assert (await s.hit("month", 4, 10, 30 * DAY, NOV)).allowed
    clock.now = DEC - 0.5  # the caller's clock already says December
    ahead = await s.hit("month", 1, 10, 31 * DAY, DEC)
    assert ahead.reset_s == 0.5, "floored modulo: an anchor after now gives the window ending at it"
    clock.now = DEC + 0.5  # the caller's clock still says November
    behind = await s.hit("month", 1, 10, 30 * DAY, NOV)
    assert (behind.remaining, behind.reset_s) == (9, 30 * DAY - 0.5), "November's 4 stay in November"


async def test_weeks_anchored_on_monday_reset_at_monday_midnight(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    clock.now = DEC - DAY - 3600  # Sunday 2026-11-29 23:00 UTC (Dec 1 is a Tuesday)
    week = await s.hit("week", 1, 10, 7 * DAY, MONDAY)
    assert (week.allowed, week.reset_s) == (True, 3600)


async def test_an_anchored_period_resets_where_the_anchor_says(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    six = T0 + 6 * 3600  # days from 06:00 UTC
    clock.now = six - 1
    old = await s.reserve("tenant", 10, 10, DAY, six)
    assert old is not None and await s.spent("tenant", DAY, six) == 10
    assert await s.reserve("tenant", 1, 10, DAY, six) is None
    clock.now = six
    assert await s.spent("tenant", DAY, six) == 0, "the period starts at 06:00, not at midnight"
    new = await s.reserve("tenant", 7, 10, DAY, six)
    assert new is not None
    await s.settle(old, 1)
    clock.now = six + DAY - 1
    assert await s.spent("tenant", DAY, six) == 7, "the old token leaves the new period alone"
    await s.settle(new, 3)
    assert await s.spent("tenant", DAY, six) == 3


async def test_a_negative_cost_refunds_down_to_zero(store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    assert (await s.hit("k", 3, 5, 60)).allowed
    refund = await s.hit("k", -2, 5, 60)
    assert (refund.allowed, refund.remaining) == (True, 4)
    assert (await s.hit("k", 0, 5, 60)).remaining == 4
    assert (await s.hit("k", 4, 5, 60)).allowed
    over = await s.hit("k", -1, 2, 60)
    assert (over.allowed, over.remaining) == (True, 0), "a refund is allowed even above a (lower) limit"
    clamped = await s.hit("k", -50, 5, 60)
    assert (clamped.allowed, clamped.remaining) == (True, 5)
    assert (await s.hit("k", 5, 5, 60)).allowed, "the count is 0, not below"
    assert not (await s.hit("k", 1, 5, 60)).allowed


async def test_a_refund_outside_the_current_window_changes_and_creates_nothing(
    store: tuple[Store, FakeClock]
) -> None:
    s, clock = store
    ghost = await s.hit("never", -2, 5, 60)
    assert (ghost.allowed, ghost.remaining) == (True, 5)
    assert (await s.hit("never", 1, 5, 60)).remaining == 4, "a fresh window, not -2"
    clock.now = T0 + 50
    assert (await s.hit("old", 3, 5, 60)).allowed
    clock.now = T0 + 60
    late = await s.hit("old", -3, 5, 60)
    assert (late.allowed, late.remaining, late.reset_s) == (True, 5, 60)
    assert (await s.hit("old", 5, 5, 60)).allowed, "the new window starts at 0, not -3"
    assert not (await s.hit("old", 1, 5, 60)).allowed


async def test_a_huge_limit_counts_and_fractional_costs_add_exactly(store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    counted = 0.0
    for _ in range(3):
        assert (await s.hit("usage", 12.345, 1e18, 60)).allowed
        counted += 12.345
    assert (await s.hit("usage", 0, 100, 60)).remaining == 100 - counted
    assert (await s.hit("usage", 5e17, 1e18, 60)).remaining == 1e18 - (counted + 5e17)


async def test_leases_hold_slots_until_released_or_expired(store: tuple[Store, FakeClock]) -> None:
    s, clock = store
    a = await s.acquire("streams", 2, 10)
    b = await s.acquire("streams", 2, 10)
    assert a and b and a != b
    assert await s.acquire("streams", 2, 10) is None
    assert await s.acquire("elsewhere", 2, 10) is not None
    await s.release_slot(a)
    c = await s.acquire("streams", 2, 10)
    assert c is not None
    clock.now = T0 + 5
    assert await s.renew(b), "b now expires at T0 + 15, c at T0 + 10"
    clock.now = T0 + 11
    assert not await s.renew(c), "an expired lease is gone"
    assert await s.acquire("streams", 2, 10) is not None, "c's slot came back without a release"
    assert await s.acquire("streams", 2, 10) is None, "b still holds its slot"
    clock.now = T0 + 16
    assert not await s.renew(b)


async def test_concurrent_reservations_grant_exactly_the_cap(store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    tokens = await asyncio.gather(*(s.reserve("budget", 1, 50, 86400) for _ in range(200)))
    assert sum(t is not None for t in tokens) == 50
    assert await s.spent("budget", 86400) == 50


async def test_concurrent_hits_allow_exactly_the_limit(store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    hits = await asyncio.gather(*(s.hit("rpm", 1, 10, 60) for _ in range(100)))
    assert sum(h.allowed for h in hits) == 10


async def test_concurrent_acquires_grant_exactly_the_limit(store: tuple[Store, FakeClock]) -> None:
    s, _ = store
    leases = await asyncio.gather(*(s.acquire("slots", 5, 30) for _ in range(50)))
    assert sum(lease is not None for lease in leases) == 5


def reserve_in_process(config: StoreConfig, scope: str, barrier: multiprocessing.synchronize.Barrier,
                       results: multiprocessing.Queue) -> None:
    """One OS process: 100 concurrent reservations of 1 against a cap of 50 (real clock)."""

    async def run() -> int:
        s = open_store(config)
        try:
            await s.spent(scope, DECADE)  # connect before the race starts
            barrier.wait(10)
            tokens = await asyncio.gather(*(s.reserve(scope, 1, 50, DECADE) for _ in range(100)))
            return sum(t is not None for t in tokens)
        finally:
            await s.close()

    results.put(asyncio.run(run()))


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=needs_redis)])
async def test_two_processes_reserving_at_once_grant_exactly_the_cap(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    config = config_for(backend, request, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=reserve_in_process, args=(config, "shared", barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    granted = await asyncio.to_thread(lambda: [results.get(timeout=60) for _ in procs])
    for p in procs:
        p.join(10)
    assert sum(granted) == 50, granted
    s = open_store(config)
    try:
        assert await s.spent("shared", DECADE) == 50
    finally:
        await s.close()


async def test_sqlite_state_survives_a_restart(tmp_path: Path) -> None:
    config = StoreConfig(backend="sqlite", path=str(tmp_path / "state.sqlite3"), timeout_s=TIMEOUT_S)
    first = open_store(config)
    token = await first.reserve("tenant", 30, 50, DECADE)
    await first.close()
    second = open_store(config)
    try:
        assert await second.spent("tenant", DECADE) == 30
        assert token is not None
        await second.settle(token, 10)
        assert await second.spent("tenant", DECADE) == 10
        assert (await second.reserve("tenant", 40, 50, DECADE)) is not None
    finally:
        await second.close()


async def test_sqlite_waits_for_a_new_file_another_process_is_writing(tmp_path: Path) -> None:
    """Two workers starting on a new file: the one switching it to WAL while the other writes got `database
    is locked` at once, busy timeout or not (its limits then fell back to memory: one request too many in
    tests/test_shared_state.py's two-worker burst). It now waits, as for any other lock."""
    path = tmp_path / "state.sqlite3"
    other = sqlite3.connect(path, isolation_level=None)  # what the other worker holds while it writes
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE setup (x)")
    s = open_store(StoreConfig(backend="sqlite", path=str(path), timeout_s=5))
    asyncio.get_running_loop().call_later(0.2, other.execute, "COMMIT")
    try:
        assert (await s.hit("k", 1, 1, 60)).allowed
    finally:
        await s.close()
        other.close()


async def test_an_unusable_sqlite_file_raises_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite3").mkdir()
    s = open_store(StoreConfig(backend="sqlite", path=str(tmp_path / "dir.sqlite3")))
    try:
        with pytest.raises(StoreUnavailable, match="sqlite"):
            await s.hit("k", 1, 1, 60)
    finally:
        await s.close()


@needs_redis
async def test_redis_uses_its_own_clock_and_hash_tagged_keys(redis_url: str) -> None:
    prefix = uuid.uuid4().hex
    s = open_store(StoreConfig(backend="redis", url=redis_url, key_prefix=prefix, timeout_s=TIMEOUT_S))
    assert isinstance(s, RedisStore)
    try:
        first = await s.hit("tenant-a", 1, 1, 3600)
        assert first.allowed and 0 < first.reset_s <= 3600
        server_s = float((await s._redis.time())[0])
        assert first.reset_s == pytest.approx(3600 - server_s % 3600, abs=2)
        assert await s.reserve("tenant-a", 1, 1, 3600) is not None
        assert await s.acquire("tenant-a", 1, 60) is not None
        assert (await s.hit("ghost", -1, 1, 60)).allowed, "a refund of a key never hit creates no key"
        anchored = await s.hit("tenant-a", 1, 1, 1800, 900)
        assert anchored.reset_s == pytest.approx(1800 - (server_s - 900) % 1800, abs=2)
        keys = sorted(await s._redis.keys(f"*{prefix}*"))
        assert keys and all(k.startswith(f"{{{prefix}:tenant-a}}:") for k in keys), keys
        ttls = [await s._redis.pttl(k) for k in keys]
        assert all(0 < ttl <= 3_601_000 for ttl in ttls), f"every key expires: {ttls}"
        await s._redis.script_flush()
        assert not (await s.hit("tenant-a", 1, 1, 3600)).allowed, "scripts load again after a flush"
    finally:
        await s.close()


async def test_an_unreachable_redis_raises_store_unavailable_without_its_address() -> None:
    port = free_port()
    s = open_store(StoreConfig(backend="redis", url=f"redis://:secret@127.0.0.1:{port}/0", timeout_s=0.2))
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await s.reserve("tenant", 1, 1, 60)
        assert time.monotonic() - started < 5, "one attempt, no retries with backoff"
        assert str(port) not in str(caught.value) and "secret" not in str(caught.value)
    finally:
        await s.close()


@needs_redis
async def test_cluster_mode_on_an_unusable_endpoint_raises_store_unavailable_without_its_address(
        redis_url: str) -> None:
    port = free_port()
    for url in (f"redis://:secret@127.0.0.1:{port}/0", redis_url):  # nothing there; a server not in cluster mode
        s = open_store(StoreConfig(backend="redis", cluster=True, url=url, timeout_s=0.2))
        try:
            with pytest.raises(StoreUnavailable, match=r"^redis state store: ") as caught:
                await s.hit("tenant", 1, 1, 60)
            assert "127.0.0.1" not in str(caught.value) and "secret" not in str(caught.value)
        finally:
            await s.close()


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="memory, sqlite, redis"):
        open_store(StoreConfig(backend="etcd"))  # type: ignore[arg-type]
