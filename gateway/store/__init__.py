"""Shared state for traffic policy (issue 12): window counters, budget reservations and leased
concurrency slots (and short-lived values, for realtime client secrets), with the same semantics on three
backends (`memory`, `sqlite`, `redis`), so limits stay exact across workers and replicas.
gateway/policy/admission.py makes one `take` per request and gives back with `give`; the single
operations serve lease renewal, the budget gauge and tests.

Semantics every backend keeps (tests/test_store.py and tests/test_store_batch.py are one contract
suite over all three):
- Time is in integer milliseconds since the UNIX epoch. Memory and SQLite read the caller's wall clock;
  Redis reads the server's `TIME`, so replicas with skewed clocks still agree (tests may inject a clock
  into all three).
- A window or period of length L with anchor A starts at `now - (now - A) % L` (floored modulo, so an
  anchor after now works too): at A plus a multiple of L. Anchor 0 puts it on a multiple of L since the
  epoch (a 60 s window starts on the minute, an 86400 s period at 00:00 UTC). The caller gets calendar
  periods from the anchor: a month is anchor = 00:00 UTC on this month's 1st, L = this month's length;
  a week from Monday is anchor = 1970-01-05. Near a month boundary a caller whose clock disagrees with
  Redis's passes the other month's anchor and length, yet both put a boundary at 00:00 on the 1st, and
  the store places `now` by its own clock: every replica changes month at the same instant, Redis's,
  and no hit Redis sees in one month counts in the other's window. (When the two months differ in
  length, the hits within that clock skew count in a short window of their own.) A key or scope keeps
  one window per length: give one length one anchor.
- `hit` is a fixed-window counter; a refused hit counts nothing. A negative cost is a refund: always
  allowed, it lowers the current window's count, never below 0, and changes nothing (creates nothing)
  when the key has no count in the current window. Counts are exact doubles: a limit of 1e18 always
  counts, and costs like 12.345 add up as in Python.
- `reserve` adds `amount` to the scope's spending in the current period if it stays within `cap`;
  `settle` replaces the reserved amount by the actual one, `release` gives it back. Both are idempotent
  and do nothing once the period the token was reserved in is over (a new period starts at zero).
- `acquire` takes one of `limit` slots for `ttl_s`; `renew` extends it, `release_slot` frees it. A
  lease not renewed within its TTL frees its slot, so a crashed replica's slots come back.
- Each operation is atomic (memory: no await inside one; SQLite: one `BEGIN IMMEDIATE` transaction;
  Redis: one Lua script). So is `take`, a whole admission in one round trip: hits, acquires and
  reserves checked together and applied all or nothing (gateway/store/batch.py); `give` hands back
  several things in one round trip. On Redis Cluster both fall back to single operations (`take` in
  order, giving back what it took when a later step is refused). An unreachable or failing store
  raises `StoreUnavailable`; what to do then is the caller's policy.
- `put` keeps a text value under a key for a TTL and `get` reads it back until then, None after (the
  ephemeral client secrets of gateway/realtime/secrets.py). Redis expires the key itself (`SET PX`);
  SQLite ignores expired rows and sweeps some on each write; memory drops expired values on each write
  and keeps at most `memory.MAX_VALUES` (10,000), dropping the oldest written first.
- Amounts are floats (money); a reservation fits when it exceeds `cap` by at most `EPSILON`, so
  fifty reservations of 0.1 fit a cap of 5.0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.store.batch import Ask, Give, Taken

BACKENDS = ("memory", "sqlite", "redis")
EPSILON = 1e-9

Clock = Callable[[], float]
"""Seconds since the epoch, like time.time (injectable for tests)."""


class StoreUnavailable(Exception):
    """The store could not be reached or failed; the message names the backend, never its URL."""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where the `state:` section says to count (parsed in gateway/policy/rules.py `state_section`;
    these defaults are the documented ones)."""

    backend: Literal["memory", "sqlite", "redis"] = "sqlite"
    """`memory`: one process only (tests, a single worker); `sqlite`: the embedded default, exact for
    several workers on one host and across restarts; `redis`: exact across replicas."""
    path: str = "var/gateway-state.sqlite3"
    """SQLite database file (created with its directory; WAL mode)."""
    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL (`rediss://` for TLS). `StoreUnavailable` never quotes it, so a password in it stays out of
    what callers see."""
    key_prefix: str = "gw"
    """Every Redis key is `{<key_prefix>:<scope>}:...`: the braces are a Cluster hash tag, so the keys
    of one scope share a slot and each script touches one slot."""
    timeout_s: float = 0.5
    """Longest wait for one operation (Redis socket timeout; SQLite busy timeout) before
    `StoreUnavailable`."""
    max_connections: int = 32
    """Redis connections per process (per node with `cluster`); an operation beyond them waits for a
    free one (an operation takes well under a millisecond, so 32 carry thousands of requests a second)."""
    cluster: bool = False
    """`url` names one node of a Redis Cluster: the client learns the others from it and sends each
    scope's operations to the primary of its slot, following MOVED and ASK. Off, a cluster node would
    answer MOVED for most scopes, and those operations fail (`StoreUnavailable`)."""


@dataclass(frozen=True, slots=True)
class Hit:
    allowed: bool
    remaining: float
    """What is left of the limit in this window after this hit (unchanged by a refused hit)."""
    reset_s: float
    """Seconds until the window ends and the counter starts again at zero."""


class Store(Protocol):
    async def hit(self, key: str, cost: float, limit: float, window_s: float, anchor_s: float = 0.0) -> Hit:
        """Count `cost` if it fits under `limit` in the current window; a negative cost is a refund."""

    async def reserve(
        self, scope: str, amount: float, cap: float, period_s: float, anchor_s: float = 0.0
    ) -> str | None:
        """A token, or None when `amount` does not fit under `cap` in the current period. The token
        carries the period's length and start, so settle and release need no anchor."""

    async def settle(self, token: str, actual: float) -> None: ...

    async def release(self, token: str) -> None: ...

    async def spent(self, scope: str, period_s: float, anchor_s: float = 0.0) -> float:
        """Reserved and settled amounts of the scope in the current period."""

    async def acquire(self, scope: str, limit: int, ttl_s: float) -> str | None:
        """A lease, or None when `limit` unexpired leases of the scope are held."""

    async def renew(self, lease: str) -> bool:
        """Extend the lease by its TTL; False if it had already expired or been released."""

    async def release_slot(self, lease: str) -> None: ...

    async def take(self, asks: Sequence[Ask]) -> Taken:
        """All the steps, atomically: if a required one does not fit, none is taken (gateway/store/batch.py)."""

    async def give(self, items: Sequence[Give]) -> None:
        """Settle, release, free and count them all in one round trip; each is idempotent as its single op."""

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        """Keep `value` under `key` for `ttl_s` seconds, replacing what was there."""

    async def get(self, key: str) -> str | None:
        """The value under `key`, or None when there is none or its TTL has passed."""

    async def close(self) -> None: ...


def to_ms(seconds: float) -> int:
    """A window length or TTL in whole milliseconds (at least 1)."""
    return max(1, round(seconds * 1000))


def now_ms(clock: Clock) -> int:
    return int(clock() * 1000)


def anchor_ms(anchor_s: float) -> int:
    """An anchor in whole milliseconds since the epoch (0 or any instant, before or after now)."""
    return round(anchor_s * 1000)


def window_start(now: int, length_ms: int, anchor: int = 0) -> int:
    """The start of the window holding `now`: the anchor plus a multiple of the length (Python's %
    is floored, so an anchor after `now` gives the window that ends at the anchor or before)."""
    return now - (now - anchor) % length_ms


def reservation_token(period_ms: int, start_ms: int, ident: str, scope: str) -> str:
    """`period|start|id|scope`: settle and release find the reservation from the token alone."""
    return f"{period_ms}|{start_ms}|{ident}|{scope}"


def parse_reservation(token: str) -> tuple[int, int, str, str]:
    period, start, ident, scope = token.split("|", 3)
    return int(period), int(start), ident, scope


def lease_token(ttl_ms: int, ident: str, scope: str) -> str:
    return f"{ttl_ms}|{ident}|{scope}"


def parse_lease(lease: str) -> tuple[int, str, str]:
    ttl, ident, scope = lease.split("|", 2)
    return int(ttl), ident, scope


def open_store(config: StoreConfig, clock: Clock | None = None) -> Store:
    """The configured backend. `clock` overrides the time source (tests); by default memory and SQLite
    use time.time and Redis its server's clock."""
    if config.backend == "memory":
        from gateway.store.memory import MemoryStore

        return MemoryStore(clock or time.time)
    if config.backend == "sqlite":
        from gateway.store.sqlite import SqliteStore

        return SqliteStore(config.path, config.timeout_s, clock or time.time)
    if config.backend == "redis":
        from gateway.store.redis import RedisStore

        return RedisStore(config.url, config.key_prefix, config.timeout_s, config.max_connections, clock,
                          config.cluster)
    raise ValueError(f"unknown state backend {config.backend!r}; expected one of {', '.join(BACKENDS)}")
