"""gateway/store/redis.py with `cluster: true` on a real three-node Redis Cluster (tests/redis_cluster.py),
beyond the contract suite that tests/test_store.py runs on it: each scope on the node of its slot (MOVED
followed), scripts loaded again where a node lacks them, a real failover.
"""

from __future__ import annotations

import uuid

import pytest
import redis

from gateway.store import StoreConfig, StoreUnavailable, open_store
from gateway.store.batch import AcquireAsk, HitAsk, ReleaseSlot, ReserveAsk, Settle
from gateway.store.redis import RedisStore
from tests.redis_cluster import Cluster
from tests.test_store import DAY, FakeClock, needs_cluster


def scopes_on_every_node(cluster: Cluster, prefix: str) -> dict[str, int]:
    """Scope -> port of the node serving it, for the first scopes that together cover every node (asked
    of the cluster itself)."""
    owners: dict[str, int] = {}
    for i in range(200):
        port = cluster.owner(f"{{{prefix}:scope-{i}}}")
        if port not in owners.values():
            owners[f"scope-{i}"] = port
        if len(owners) == len(cluster.ports):
            return owners
    raise AssertionError("200 scopes all on fewer nodes than the cluster has")


@needs_cluster
async def test_a_cluster_store_follows_each_scope_to_its_node(redis_cluster: Cluster) -> None:
    prefix = uuid.uuid4().hex
    owners = scopes_on_every_node(redis_cluster, prefix)
    config = StoreConfig(backend="redis", cluster=True, url=redis_cluster.url, key_prefix=prefix, timeout_s=5)
    s = open_store(config, FakeClock())
    try:
        for scope in owners:
            assert (await s.hit(scope, 1, 1, 60)).allowed and not (await s.hit(scope, 1, 1, 60)).allowed
            assert await s.reserve(scope, 3, 5, DAY) is not None and await s.reserve(scope, 3, 5, DAY) is None
            lease = await s.acquire(scope, 1, 30)
            assert lease is not None and await s.acquire(scope, 1, 30) is None
            await s.release_slot(lease)
            assert await s.acquire(scope, 1, 30) is not None
    finally:
        await s.close()
    for scope, port in owners.items():
        held = redis_cluster.ask(port, "KEYS", f"{{{prefix}:{scope}}}:*")
        assert sorted(k.split("}:")[1][0] for k in held) == ["b", "h", "l", "r"], (scope, held)
        assert redis_cluster.ask(port, "HGET", f"{{{prefix}:{scope}}}:h:60000", "n") == "1"
        for other in set(redis_cluster.ports) - {port}:
            with pytest.raises(redis.exceptions.MovedError):  # what the cluster client had to follow
                redis_cluster.ask(other, "HGET", f"{{{prefix}:{scope}}}:h:60000", "n")
    # Without `cluster`, the same URL serves only the scopes of the first node: the others fail.
    plain = open_store(StoreConfig(backend="redis", url=redis_cluster.url, key_prefix=prefix, timeout_s=5), FakeClock())
    try:
        elsewhere = next(scope for scope, port in owners.items() if port != redis_cluster.ports[0])
        with pytest.raises(StoreUnavailable, match="MovedError"):
            await plain.hit(elsewhere, 1, 1, 60)
    finally:
        await plain.close()


@needs_cluster
async def test_a_cluster_store_loads_its_scripts_again_on_a_node_without_them(redis_cluster: Cluster) -> None:
    """A replica promoted in a failover has none of the scripts (SCRIPT LOAD is not replicated): flushing
    every node's scripts puts each primary in that state."""
    prefix = uuid.uuid4().hex
    owners = scopes_on_every_node(redis_cluster, prefix)
    s = open_store(StoreConfig(backend="redis", cluster=True, url=redis_cluster.url, key_prefix=prefix, timeout_s=5),
                   FakeClock())
    try:
        for scope in owners:
            assert (await s.hit(scope, 1, 2, 60)).allowed
        for port in redis_cluster.ports:
            redis_cluster.ask(port, "SCRIPT", "FLUSH")
        for scope in owners:
            second = await s.hit(scope, 1, 2, 60)
            assert (second.allowed, second.remaining) == (True, 0), "counted on, not restarted"
            assert await s.reserve(scope, 1, 1, DAY) is not None
    finally:
        await s.close()


@needs_cluster
async def test_a_cluster_store_goes_on_after_a_failover(redis_cluster: Cluster) -> None:
    """A replica the client never saw takes over a scope's slot: the old primary answers MOVED, the new one
    NOSCRIPT (scripts are not replicated), and the count goes on from what was replicated."""
    prefix = uuid.uuid4().hex
    scope, primary = next(iter(scopes_on_every_node(redis_cluster, prefix).items()))
    s = open_store(StoreConfig(backend="redis", cluster=True, url=redis_cluster.url, key_prefix=prefix, timeout_s=5),
                   FakeClock())
    assert isinstance(s, RedisStore)
    try:
        assert (await s.hit(scope, 1, 3, 60)).remaining == 2
        with redis_cluster.failed_over(primary) as promoted:
            assert redis_cluster.owner(f"{{{prefix}:{scope}}}") == promoted
            sha = s._scripts["hit"].sha
            assert redis_cluster.ask(promoted, "SCRIPT", "EXISTS", sha) == [False]
            second = await s.hit(scope, 1, 3, 60)
            assert (second.allowed, second.remaining) == (True, 1), "counted on from the replicated count"
            assert redis_cluster.ask(promoted, "SCRIPT", "EXISTS", sha) == [True]
            assert redis_cluster.ask(promoted, "HGET", f"{{{prefix}:{scope}}}:h:60000", "n") == "2"
    finally:
        await s.close()


@needs_cluster
async def test_a_cluster_behind_one_endpoint_turns_admissions_into_single_operations(redis_cluster: Cluster) -> None:
    """Without `cluster`, the scopes one node serves (a Cluster behind a proxy that presents one endpoint): a
    batch over several slots is refused with CROSSSLOT before it runs, so `take` and `give` fall back to
    single operations, each in one slot, and keep doing so."""
    prefix = uuid.uuid4().hex
    mine = [f"scope-{i}" for i in range(200)
            if redis_cluster.owner(f"{{{prefix}:scope-{i}}}") == redis_cluster.ports[0]][:3]
    plain = open_store(StoreConfig(backend="redis", url=redis_cluster.url, key_prefix=prefix, timeout_s=5), FakeClock())
    try:
        asks = [HitAsk(mine[0], 1, 2, 60), AcquireAsk(mine[1], 1, 30), ReserveAsk(mine[2], 3, 5, DAY)]
        taken = await plain.take(asks)
        _, lease, token = taken.results
        assert taken.admitted and isinstance(lease, str) and isinstance(token, str)
        assert not (await plain.take(asks)).admitted, "the slot is held, the budget spent"
        await plain.give([ReleaseSlot(lease), Settle(token, 1)])
        assert await plain.spent(mine[2], DAY) == 1 and await plain.acquire(mine[1], 1, 30) is not None
    finally:
        await plain.close()
