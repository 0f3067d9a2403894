"""The `redis` state backend, for several replicas: redis.asyncio, each operation one Lua script
(EVALSHA, loaded again after a server restart; the scripts are in redis_scripts.py), so it is atomic on
the server whatever the number of gateways. The keys of one scope share the hash tag
`{<prefix>:<scope>}`, so every single operation touches one Cluster slot; `take` and `give` touch the
scopes of a whole request, one script on a standalone Redis, single operations on a Cluster. Time is
the server's `TIME` (one clock for all replicas) unless a clock is injected.
Keys expire shortly after their window, period or longest lease ends, values (`put`) with their TTL;
nothing needs sweeping.

With `cluster: true` the client is a `RedisCluster`: it learns the slot map from the URL's node, sends
each script to the primary of its scope's slot and follows MOVED and ASK. A primary promoted in a
failover has no scripts loaded (SCRIPT LOAD is not replicated): its NOSCRIPT makes the script load on
every primary and run again, within the same operation.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as ClusterRetry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterCrossSlotError, RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from gateway.store import (
    Clock,
    Hit,
    StoreUnavailable,
    anchor_ms,
    lease_token,
    parse_lease,
    parse_reservation,
    reservation_token,
    to_ms,
)
from gateway.store.batch import (
    AcquireAsk,
    Ask,
    Count,
    Give,
    HitAsk,
    ReleaseSlot,
    Settle,
    Taken,
    check,
    give_each,
    take_in_order,
)
from gateway.store.redis_scripts import ACQUIRE, BATCH_GIVE, BATCH_TAKE, HIT, RENEW, RESERVE, SPENT, TAKE

log = logging.getLogger("gateway.store")


class RedisStore:
    def __init__(self, url: str, prefix: str, timeout_s: float, max_connections: int, clock: Clock | None,
                 cluster: bool = False) -> None:
        self._prefix = prefix
        self._clock = clock
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._node_slots: dict[str, asyncio.Semaphore] = {}
        # One attempt, no backoff: a store that does not answer within timeout_s is the caller's
        # failure policy to handle, not something to wait out inside a request.
        # At most `max_connections` sockets (per node in a cluster); an operation beyond them waits for
        # one, up to timeout_s.
        timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        self._redis: Redis | RedisCluster
        if cluster:
            # A cluster client raises at once when a node's pool is full; _connection() makes the
            # operation wait instead. MOVED and ASK are followed; errors are not retried.
            self._redis = RedisCluster.from_url(url, max_connections=max_connections,
                                                retry=ClusterRetry(NoBackoff(), 0), decode_responses=True, **timeouts)
        else:
            pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                                   retry=Retry(NoBackoff(), 0), decode_responses=True, **timeouts)
            self._redis = Redis.from_pool(pool)  # owns the pool: close() disconnects its connections too
        self._one_slot = cluster
        """Every script must touch one slot: on a Cluster, and behind a one-endpoint proxy in front of one
        (found out from its first CROSSSLOT). `take` and `give` are then single operations."""
        self._scripts = {
            name: self._redis.register_script(lua)
            for name, lua in (("hit", HIT), ("reserve", RESERVE), ("take", TAKE), ("spent", SPENT),
                              ("acquire", ACQUIRE), ("renew", RENEW),
                              ("batch_take", BATCH_TAKE), ("batch_give", BATCH_GIVE))
        }

    def _key(self, scope: str, kind: str, n: int | None = None) -> str:
        return f"{{{self._prefix}:{scope}}}:{kind}" + ("" if n is None else f":{n}")

    def _now(self) -> str:
        """The injected clock in ms, or '' for the server's TIME."""
        return "" if self._clock is None else str(int(self._clock() * 1000))

    @asynccontextmanager
    async def _connection(self, key: str) -> AsyncIterator[None]:
        """In a cluster, a turn among the `max_connections` of the node serving `key` (waiting up to
        timeout_s, like the single-server pool); with one server its blocking pool does this itself."""
        if not isinstance(self._redis, RedisCluster):
            yield
            return
        node = (await self._redis.initialize()).get_node_from_key(key)
        turns = self._node_slots.get(node.name)
        if turns is None:
            turns = self._node_slots[node.name] = asyncio.Semaphore(self._max_connections)
        try:
            async with asyncio.timeout(self._timeout_s):
                await turns.acquire()
        except TimeoutError:
            raise StoreUnavailable("redis state store: no free connection") from None
        try:
            yield
        finally:
            turns.release()

    async def _run(self, key: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        try:
            async with self._connection(key):
                return await operation()
        except (RedisError, RedisClusterException) as e:
            # The exception's text names host and port: logs get it through the cause, callers don't.
            raise StoreUnavailable(f"redis state store: {type(e).__name__}") from e

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._run(keys[0], lambda: self._scripts[name](keys=keys, args=args))

    async def hit(self, key: str, cost: float, limit: float, window_s: float, anchor_s: float = 0.0) -> Hit:
        window = to_ms(window_s)
        allowed, count, reset = await self._call("hit", [self._key(key, "h", window)],
                                                 [repr(cost), repr(limit), window, self._now(), anchor_ms(anchor_s)])
        return Hit(allowed == 1, max(0.0, limit - float(count)), float(reset) / 1000)

    async def reserve(
        self, scope: str, amount: float, cap: float, period_s: float, anchor_s: float = 0.0
    ) -> str | None:
        period = to_ms(period_s)
        ident = uuid.uuid4().hex
        start = await self._call("reserve", [self._key(scope, "b", period), self._key(scope, "r", period)],
                                 [repr(amount), repr(cap), period, self._now(), ident, anchor_ms(anchor_s)])
        return None if start is None else reservation_token(period, int(float(start)), ident, scope)

    async def _take(self, token: str, actual: float) -> None:
        period, start, ident, scope = parse_reservation(token)
        await self._call("take", [self._key(scope, "b", period), self._key(scope, "r", period)],
                         [ident, start, repr(actual)])

    async def settle(self, token: str, actual: float) -> None:
        await self._take(token, actual)

    async def release(self, token: str) -> None:
        await self._take(token, 0.0)

    async def spent(self, scope: str, period_s: float, anchor_s: float = 0.0) -> float:
        period = to_ms(period_s)
        return float(await self._call("spent", [self._key(scope, "b", period)],
                                      [period, self._now(), anchor_ms(anchor_s)]))

    async def acquire(self, scope: str, limit: int, ttl_s: float) -> str | None:
        ttl = to_ms(ttl_s)
        ident = uuid.uuid4().hex
        got = await self._call("acquire", [self._key(scope, "l")], [self._now(), limit, ttl, ident])
        return lease_token(ttl, ident, scope) if got == 1 else None

    async def renew(self, lease: str) -> bool:
        ttl, ident, scope = parse_lease(lease)
        return await self._call("renew", [self._key(scope, "l")], [self._now(), 0, ttl, ident]) == 1

    async def release_slot(self, lease: str) -> None:
        _, ident, scope = parse_lease(lease)
        key = self._key(scope, "l")
        await self._run(key, lambda: self._redis.zrem(key, ident))

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        """`SET PX`: the server drops it. The value is stored after `<expiry ms>|`, the injected clock's
        (0 without one), so that `get` honours an injected clock too."""
        name, ttl = self._key(key, "v"), to_ms(ttl_s)
        expiry = 0 if self._clock is None else int(self._clock() * 1000) + ttl
        await self._run(name, lambda: self._redis.set(name, f"{expiry}|{value}", px=ttl))

    async def get(self, key: str) -> str | None:
        name = self._key(key, "v")
        held = await self._run(name, lambda: self._redis.get(name))
        if held is None:
            return None
        expiry, _, value = held.partition("|")
        return None if self._clock is not None and int(expiry) <= int(self._clock() * 1000) else value

    async def take(self, asks: Sequence[Ask]) -> Taken:
        """One script for the whole batch (redis_scripts.BATCH_TAKE: check every step, then apply them
        all). A Cluster keeps scopes in different slots: there the single operations run in order."""
        check(asks)
        if self._one_slot:
            return await take_in_order(self, asks)
        keys: list[str] = []
        args: list[Any] = [self._now()]
        idents: list[str] = []
        for ask in asks:
            ident = uuid.uuid4().hex
            idents.append(ident)
            if isinstance(ask, HitAsk):
                window = to_ms(ask.window_s)
                keys += [self._key(ask.key, "h", window)] * 2
                args += ["h", ask.required, repr(ask.cost), repr(ask.limit), window, anchor_ms(ask.anchor_s), ""]
            elif isinstance(ask, AcquireAsk):
                keys += [self._key(ask.scope, "l")] * 2
                args += ["a", ask.required, ask.slots, to_ms(ask.ttl_s), 0, 0, ident]
            else:
                period = to_ms(ask.period_s)
                keys += [self._key(ask.scope, "b", period), self._key(ask.scope, "r", period)]
                args += ["r", ask.required, repr(ask.amount), repr(ask.cap), period, anchor_ms(ask.anchor_s), ident]
        args = [int(a) if isinstance(a, bool) else a for a in args]
        out = await self._batch("batch_take", keys, args)
        if out is None:
            return await take_in_order(self, asks)
        admitted = out[0] == 1
        results: list[Hit | str | None] = []
        refused: list[int] = []
        for i, ask in enumerate(asks):
            fit, figure, left = out[1 + 3 * i: 4 + 3 * i]
            if fit != 1:
                refused.append(i)
            if isinstance(ask, HitAsk):
                results.append(Hit(fit == 1, max(0.0, ask.limit - float(figure)), float(left) / 1000))
            elif not (admitted and fit == 1):
                results.append(None)
            elif isinstance(ask, AcquireAsk):
                results.append(lease_token(to_ms(ask.ttl_s), idents[i], ask.scope))
            else:
                results.append(reservation_token(to_ms(ask.period_s), int(float(figure)), idents[i], ask.scope))
        return Taken(admitted, tuple(results), tuple(refused))

    async def give(self, items: Sequence[Give]) -> None:
        """One script for them all (redis_scripts.BATCH_GIVE); on a Cluster, the single operations at once."""
        if not items:
            return
        if self._one_slot:
            await give_each(self, items)
            return
        keys: list[str] = []
        args: list[Any] = [self._now()]
        for item in items:
            if isinstance(item, ReleaseSlot):
                _, ident, scope = parse_lease(item.lease)
                keys += [self._key(scope, "l")] * 2
                args += ["l", ident, 0, 0, 0]
            elif isinstance(item, Count):
                window = to_ms(item.window_s)
                keys += [self._key(item.key, "h", window)] * 2
                args += ["c", repr(item.cost), repr(item.limit), window, anchor_ms(item.anchor_s)]
            else:
                period, start, ident, scope = parse_reservation(item.token)
                keys += [self._key(scope, "b", period), self._key(scope, "r", period)]
                args += ["s", ident, start, repr(item.actual if isinstance(item, Settle) else 0.0), 0]
        if await self._batch("batch_give", keys, args) is None:
            await give_each(self, items)

    async def _batch(self, name: str, keys: list[str], args: list[Any]) -> Any | None:
        """A script over several scopes, or None when the server refuses keys of several slots (a Cluster
        behind a proxy that presents one endpoint answers CROSSSLOT, having run nothing): from then on
        this store makes single operations, each in one slot."""
        try:
            return await self._call(name, keys, args)
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if not (isinstance(cause, ClusterCrossSlotError)  # (as redis-py parses CROSSSLOT)
                    or (isinstance(cause, ResponseError) and "CROSSSLOT" in str(cause))):
                raise
        log.warning("redis state store: the server refuses scripts over several slots (a Redis Cluster behind a "
                    "proxy?): each admission is single operations from now on")
        self._one_slot = True
        return None

    async def close(self) -> None:
        await self._redis.aclose()
