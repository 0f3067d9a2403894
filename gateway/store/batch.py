"""One round trip per admission: `take` asks for several steps at once, all or nothing, and `give`
hands back several things at once. A request's admission is a hit on each window, a lease on each
concurrency slot and a reservation on each budget; made one by one they cost one round trip each, and a
request refused by a later step would hold its earlier hits meanwhile (another request could be refused
for them). Each backend runs a batch as one atomic operation (memory: no await; SQLite: one transaction;
Redis: one Lua script); the in-order fallbacks here serve Redis Cluster, whose scopes live in different
slots, so one script cannot touch them all.

`take`'s semantics on every backend: the steps are checked in order, each against the current state plus
the steps before it in the batch that fit (two hits on one key add up). If a required step does not fit,
nothing at all is written. Otherwise every step that fits is applied, and an optional one that does not
(a shadow limit) is only reported. `Taken.results` has one entry per step: a `Hit` for each hit (what
is left after it when the batch was applied, what is left now when it was not), the lease or the
reservation token (None when it did not fit or the batch was refused) for the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.store import Hit, Store

UNBOUNDED = 1e18
"""The limit of a hit that counts usage after the fact: it must count whatever it is."""


@dataclass(frozen=True, slots=True)
class HitAsk:
    """A hit on a window counter (`Store.hit`); its cost is not negative (a refund is a `Count`)."""

    key: str
    cost: float
    limit: float
    window_s: float
    anchor_s: float = 0.0
    required: bool = True


@dataclass(frozen=True, slots=True)
class AcquireAsk:
    """A lease on one of `slots` concurrency slots (`Store.acquire`)."""

    scope: str
    slots: int
    ttl_s: float
    required: bool = True


@dataclass(frozen=True, slots=True)
class ReserveAsk:
    """A reservation of `amount` under `cap` (`Store.reserve`)."""

    scope: str
    amount: float
    cap: float
    period_s: float
    anchor_s: float = 0.0
    required: bool = True


Ask = HitAsk | AcquireAsk | ReserveAsk


@dataclass(frozen=True, slots=True)
class Taken:
    admitted: bool
    """No required step was refused: every step that fit was applied. Else nothing was."""
    results: tuple[Hit | str | None, ...]
    """Per step: its Hit, or its lease or token (None when not taken)."""
    refused: tuple[int, ...]
    """The steps that did not fit, required or not, in order."""


@dataclass(frozen=True, slots=True)
class Settle:
    """Settle a reservation to `actual` (`Store.settle`)."""

    token: str
    actual: float


@dataclass(frozen=True, slots=True)
class Release:
    """Give a reservation back (`Store.release`)."""

    token: str


@dataclass(frozen=True, slots=True)
class ReleaseSlot:
    """Free a concurrency slot (`Store.release_slot`)."""

    lease: str


@dataclass(frozen=True, slots=True)
class Count:
    """A hit whose answer nobody waits for: a refund (negative cost), or usage counted after the fact."""

    key: str
    cost: float
    window_s: float
    anchor_s: float = 0.0
    limit: float = UNBOUNDED


Give = Settle | Release | ReleaseSlot | Count


def fits(ask: Ask, result: Hit | str | None) -> bool:
    if isinstance(ask, HitAsk):
        assert result is not None and not isinstance(result, str)
        return result.allowed
    return result is not None


def check(asks: Sequence[Ask]) -> None:
    for ask in asks:
        if isinstance(ask, HitAsk) and ask.cost < 0:
            raise ValueError("a hit in take() cannot be a refund; give() a Count")


def unapplied(ask: Ask, result: Hit | str | None, counts: Iterator[float]) -> Hit | str | None:
    """A step's result in a refused batch: a hit says what is left now (the count before it), the rest None."""
    if not isinstance(ask, HitAsk):
        return None
    assert result is not None and not isinstance(result, str)
    return type(result)(result.allowed, max(0.0, ask.limit - next(counts)), result.reset_s)


async def take_in_order(store: Store, asks: Sequence[Ask]) -> Taken:
    """`take` as single operations in order (Redis Cluster): not atomic, so it stops at the first
    required step that does not fit and gives back what the steps before it took. The steps after it
    are not tried (their result is None). Meanwhile those earlier hits are held: a concurrent request
    may be refused for them, as when each step was its own call."""
    from gateway.store import StoreUnavailable

    check(asks)
    results: list[Hit | str | None] = []
    refused: list[int] = []
    for i, ask in enumerate(asks):
        result: Hit | str | None
        try:
            if isinstance(ask, HitAsk):
                result = await store.hit(ask.key, ask.cost, ask.limit, ask.window_s, ask.anchor_s)
            elif isinstance(ask, AcquireAsk):
                result = await store.acquire(ask.scope, ask.slots, ask.ttl_s)
            else:
                result = await store.reserve(ask.scope, ask.amount, ask.cap, ask.period_s, ask.anchor_s)
        except StoreUnavailable:  # the failure policy takes over: give back what it can, as a refusal would
            try:
                await give_each(store, undo(asks[:i], results))
            except StoreUnavailable:
                pass  # (each expires: a lease after its TTL, a hit or reservation with its window or period)
            raise
        results.append(result)
        if fits(ask, result):
            continue
        refused.append(i)
        if ask.required:
            await give_each(store, undo(asks[:i], results))
            results = [now_left(a, r) if isinstance(a, HitAsk) else None for a, r in zip(asks, results, strict=False)]
            return Taken(False, tuple(results) + (None,) * (len(asks) - len(results)), tuple(refused))
    return Taken(True, tuple(results), tuple(refused))


def now_left(ask: HitAsk, hit: Hit | str | None) -> Hit:
    """A hit given back: what is left now that it is not counted."""
    assert hit is not None and not isinstance(hit, str)
    if not hit.allowed:
        return hit
    return type(hit)(True, max(0.0, min(ask.limit, hit.remaining + ask.cost)), hit.reset_s)


def undo(asks: Sequence[Ask], results: Sequence[Hit | str | None]) -> list[Give]:
    """What gives back the steps of a batch that were taken."""
    back: list[Give] = []
    for ask, result in zip(asks, results, strict=False):
        if not fits(ask, result):
            continue
        if isinstance(ask, HitAsk):
            if ask.cost:
                back.append(Count(ask.key, -ask.cost, ask.window_s, ask.anchor_s, ask.limit))
        elif isinstance(ask, AcquireAsk):
            assert isinstance(result, str)
            back.append(ReleaseSlot(result))
        else:
            assert isinstance(result, str)
            back.append(Release(result))
    return back


async def give_each(store: Store, items: Sequence[Give]) -> None:
    """`give` as single operations, all at once (Redis Cluster: one round trip per node, in parallel)."""
    await asyncio.gather(*(give_one(store, item) for item in items))


async def give_one(store: Store, item: Give) -> None:
    if isinstance(item, Settle):
        await store.settle(item.token, item.actual)
    elif isinstance(item, Release):
        await store.release(item.token)
    elif isinstance(item, ReleaseSlot):
        await store.release_slot(item.lease)
    else:
        await store.hit(item.key, item.cost, item.limit, item.window_s, item.anchor_s)
