"""The `redis` state backend, for several replicas: redis.asyncio, each operation one Lua script
(EVALSHA, loaded again after a server restart), so it is atomic on the server whatever the number of
gateways. The keys of one scope share the hash tag `{<prefix>:<scope>}`, so every script touches one
Cluster slot. Time is the server's `TIME` (one clock for all replicas) unless a clock is injected.
Keys expire shortly after their window, period or longest lease ends; nothing needs sweeping.

With `cluster: true` the client is a `RedisCluster`: it learns the slot map from the URL's node, sends
each script to the primary of its scope's slot and follows MOVED and ASK. A primary promoted in a
failover has no scripts loaded (SCRIPT LOAD is not replicated): its NOSCRIPT makes the script load on
every primary and run again, within the same operation.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as ClusterRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from gateway.store import (
    EPSILON,
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

NOW = """
local function now_ms(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(x) return string.format('%.17g', x) end
local EPSILON = """ + repr(EPSILON) + """
-- a window's or period's count (a hash of start 's' and count 'n'), and whether `start` is the one held
local function held(key, start)
  local h = redis.call('HMGET', key, 's', 'n')
  if tonumber(h[1]) == start then return tonumber(h[2]), true end
  return 0, false
end
"""

HIT = NOW + """
local cost, limit, window, anchor = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
local now = now_ms(ARGV[4])
local start = now - (now - anchor) % window  -- Lua's % is floored, like Python's
local count, current = held(KEYS[1], start)
local allowed = 0
if cost < 0 then  -- a refund: only a count held in this window goes down, to 0 at most
  allowed = 1
  if current then
    count = math.max(0, count + cost)
    redis.call('HSET', KEYS[1], 'n', num(count))
  end
elseif count + cost <= limit + EPSILON then
  allowed = 1
  count = count + cost
  redis.call('HSET', KEYS[1], 's', num(start), 'n', num(count))
  redis.call('PEXPIRE', KEYS[1], start + window - now + 1000)
end
return {allowed, num(count), num(start + window - now)}
"""

RESERVE = NOW + """
local amount, cap, period, anchor = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
local now = now_ms(ARGV[4])
local start = now - (now - anchor) % period
local total, current = held(KEYS[1], start)
if not current then redis.call('DEL', KEYS[2]) end
if total + amount > cap + EPSILON then return false end
redis.call('HSET', KEYS[1], 's', num(start), 'n', num(total + amount))
redis.call('HSET', KEYS[2], ARGV[5], num(amount))
local ttl = start + period - now + 1000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return num(start)
"""

TAKE = NOW + """
local amount = redis.call('HGET', KEYS[2], ARGV[1])
if not amount then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local total, current = held(KEYS[1], tonumber(ARGV[2]))
if current then
  redis.call('HSET', KEYS[1], 'n', num(math.max(0, total - tonumber(amount) + tonumber(ARGV[3]))))
end
return 1
"""

SPENT = NOW + """
local period, anchor = tonumber(ARGV[1]), tonumber(ARGV[3])
local now = now_ms(ARGV[2])
return num(held(KEYS[1], now - (now - anchor) % period))
"""

LEASES = NOW + """
local now = now_ms(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local function keep()
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIRE', KEYS[1], tonumber(last[2]) - now + 1000) end
end
"""

ACQUIRE = LEASES + """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
keep()
return 1
"""

RENEW = LEASES + """
if not redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[4])
keep()
return 1
"""


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
        self._scripts = {
            name: self._redis.register_script(lua)
            for name, lua in (("hit", HIT), ("reserve", RESERVE), ("take", TAKE), ("spent", SPENT),
                              ("acquire", ACQUIRE), ("renew", RENEW))
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

    async def close(self) -> None:
        await self._redis.aclose()
