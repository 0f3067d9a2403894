"""The `memory` state backend: dicts in this process. Exact for one process only (tests, a single
worker); with several workers or replicas every process counts on its own. No await happens while a
dict is changed, so each operation is atomic on the event loop without a lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from gateway.store import (
    EPSILON,
    Clock,
    Hit,
    anchor_ms,
    lease_token,
    now_ms,
    parse_lease,
    parse_reservation,
    reservation_token,
    to_ms,
    window_start,
)
from gateway.store.batch import (
    AcquireAsk,
    Ask,
    Give,
    HitAsk,
    Release,
    ReleaseSlot,
    ReserveAsk,
    Settle,
    Taken,
    check,
    fits,
    unapplied,
)

MAX_VALUES = 10_000
"""Values (`put`) kept at most; past it the oldest written is dropped first, so no flood of puts grows the
process without bound (at most a few KB each: about 50 MB for 10,000 session configs of 4 KB)."""


class MemoryStore:
    def __init__(self, clock: Clock, max_values: int = MAX_VALUES) -> None:
        self._clock = clock
        self._max_values = max_values
        self._values: dict[str, tuple[int, str]] = {}
        """key -> (expiry, value), the oldest written first"""
        self._soonest = 0
        """No value expires before this (ms): a write sweeps only once something may have."""
        self._hits: dict[tuple[str, int], tuple[int, float]] = {}
        """(key, window) -> (window start, count)"""
        self._spent: dict[tuple[str, int], tuple[int, float]] = {}
        """(scope, period) -> (period start, reserved + settled)"""
        self._reserved: dict[str, float] = {}
        """token -> amount still reserved"""
        self._leases: dict[str, dict[str, int]] = {}
        """scope -> {lease id: expiry}"""

    async def hit(self, key: str, cost: float, limit: float, window_s: float, anchor_s: float = 0.0) -> Hit:
        return self._hit(key, cost, limit, window_s, anchor_s)[0]

    def _hit(self, key: str, cost: float, limit: float, window_s: float, anchor_s: float) -> tuple[Hit, float]:
        """The hit, and the count before it."""
        window = to_ms(window_s)
        now = now_ms(self._clock)
        start = window_start(now, window, anchor_ms(anchor_s))
        held = self._hits.get((key, window))
        count = before = held[1] if held and held[0] == start else 0.0
        reset_s = (start + window - now) / 1000
        if cost < 0:  # a refund: only a count held in this window goes down, to 0 at most
            if count:
                count = max(0.0, count + cost)
                self._hits[(key, window)] = (start, count)
            return Hit(True, max(0.0, limit - count), reset_s), before
        allowed = count + cost <= limit + EPSILON
        if allowed:
            count += cost
            self._hits[(key, window)] = (start, count)
        return Hit(allowed, max(0.0, limit - count), reset_s), before

    def _current(self, scope: str, period: int, start: int) -> float:
        held_start, total = self._spent.get((scope, period), (start, 0.0))
        return total if held_start == start else 0.0

    async def reserve(
        self, scope: str, amount: float, cap: float, period_s: float, anchor_s: float = 0.0
    ) -> str | None:
        return self._reserve(scope, amount, cap, period_s, anchor_s)

    def _reserve(self, scope: str, amount: float, cap: float, period_s: float, anchor_s: float) -> str | None:
        period = to_ms(period_s)
        start = window_start(now_ms(self._clock), period, anchor_ms(anchor_s))
        total = self._current(scope, period, start)
        if total + amount > cap + EPSILON:
            return None
        self._spent[(scope, period)] = (start, total + amount)
        token = reservation_token(period, start, uuid.uuid4().hex, scope)
        self._reserved[token] = amount
        return token

    def _take(self, token: str, actual: float) -> None:
        amount = self._reserved.pop(token, None)
        if amount is None:
            return
        period, start, _, scope = parse_reservation(token)
        held_start, total = self._spent.get((scope, period), (start, 0.0))
        if held_start == start:
            self._spent[(scope, period)] = (start, max(0.0, total - amount + actual))

    async def settle(self, token: str, actual: float) -> None:
        self._take(token, actual)

    async def release(self, token: str) -> None:
        self._take(token, 0.0)

    async def spent(self, scope: str, period_s: float, anchor_s: float = 0.0) -> float:
        period = to_ms(period_s)
        return self._current(scope, period, window_start(now_ms(self._clock), period, anchor_ms(anchor_s)))

    def _live(self, scope: str, now: int) -> dict[str, int]:
        leases = self._leases.setdefault(scope, {})
        for ident in [i for i, expiry in leases.items() if expiry <= now]:
            del leases[ident]
        return leases

    async def acquire(self, scope: str, limit: int, ttl_s: float) -> str | None:
        return self._acquire(scope, limit, ttl_s)

    def _acquire(self, scope: str, limit: int, ttl_s: float) -> str | None:
        now = now_ms(self._clock)
        leases = self._live(scope, now)
        if len(leases) >= limit:
            return None
        ttl = to_ms(ttl_s)
        ident = uuid.uuid4().hex
        leases[ident] = now + ttl
        return lease_token(ttl, ident, scope)

    async def renew(self, lease: str) -> bool:
        ttl, ident, scope = parse_lease(lease)
        now = now_ms(self._clock)
        leases = self._live(scope, now)
        if ident not in leases:
            return False
        leases[ident] = now + ttl
        return True

    async def release_slot(self, lease: str) -> None:
        self._release_slot(lease)

    def _release_slot(self, lease: str) -> None:
        _, ident, scope = parse_lease(lease)
        self._leases.get(scope, {}).pop(ident, None)

    async def take(self, asks: Sequence[Ask]) -> Taken:
        """Each step as its single operation, in order; when a required one is refused, the state each
        touched is put back as it was (no await in between, so nobody saw it)."""
        check(asks)
        hits = {(a.key, to_ms(a.window_s)): self._hits.get((a.key, to_ms(a.window_s)))
                for a in asks if isinstance(a, HitAsk)}
        spent = {(a.scope, to_ms(a.period_s)): self._spent.get((a.scope, to_ms(a.period_s)))
                 for a in asks if isinstance(a, ReserveAsk)}
        leases = {a.scope: dict(self._leases.get(a.scope, {})) for a in asks if isinstance(a, AcquireAsk)}
        results: list[Hit | str | None] = []
        before: list[float] = []
        for ask in asks:
            if isinstance(ask, HitAsk):
                hit, count = self._hit(ask.key, ask.cost, ask.limit, ask.window_s, ask.anchor_s)
                results.append(hit)
                before.append(count)
            elif isinstance(ask, AcquireAsk):
                results.append(self._acquire(ask.scope, ask.slots, ask.ttl_s))
            else:
                results.append(self._reserve(ask.scope, ask.amount, ask.cap, ask.period_s, ask.anchor_s))
        refused = tuple(i for i, (a, r) in enumerate(zip(asks, results, strict=True)) if not fits(a, r))
        if not any(asks[i].required for i in refused):
            return Taken(True, tuple(results), refused)
        for table, saved in ((self._hits, hits), (self._spent, spent)):
            for k, v in saved.items():
                if v is None:
                    table.pop(k, None)
                else:
                    table[k] = v
        self._leases.update(leases)
        for r in results:
            if isinstance(r, str) and r in self._reserved:
                del self._reserved[r]
        counts = iter(before)
        return Taken(False, tuple(unapplied(a, r, counts) for a, r in zip(asks, results, strict=True)), refused)

    async def give(self, items: Sequence[Give]) -> None:
        for item in items:
            if isinstance(item, Settle | Release):
                self._take(item.token, item.actual if isinstance(item, Settle) else 0.0)
            elif isinstance(item, ReleaseSlot):
                self._release_slot(item.lease)
            else:
                self._hit(item.key, item.cost, item.limit, item.window_s, item.anchor_s)

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        now = now_ms(self._clock)
        if now >= self._soonest:  # something may have expired: drop what has
            for k in [k for k, (expiry, _) in self._values.items() if expiry <= now]:
                del self._values[k]
            self._soonest = min((expiry for expiry, _ in self._values.values()), default=now + to_ms(ttl_s))
        self._values.pop(key, None)  # written again, it is the newest
        while len(self._values) >= self._max_values:
            del self._values[next(iter(self._values))]
        expiry = now + to_ms(ttl_s)
        self._values[key] = (expiry, value)
        self._soonest = min(self._soonest, expiry)

    async def get(self, key: str) -> str | None:
        held = self._values.get(key)
        return held[1] if held is not None and held[0] > now_ms(self._clock) else None

    async def close(self) -> None:
        pass
